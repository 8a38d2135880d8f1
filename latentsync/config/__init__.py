"""Typed server configuration: defaults, a YAML file, then command-line ``key=value`` overrides.

One module per section of the schema (OmegaConf structured dataclasses): :mod:`.server`,
:mod:`.stream`, :mod:`.media`, :mod:`.avatar`, :mod:`.engine`, :mod:`.pool`, :mod:`.api`,
:mod:`.tasks`, :mod:`.speech` (``speech_stream``), :mod:`.egress` (and the outputs),
:mod:`.webrtc`, :mod:`.frames`, :mod:`.ui`, :mod:`.log`, :mod:`.channels`; :mod:`.app` holds the
whole tree (:class:`AppConfig`). :mod:`.loading` builds it (:func:`load_config`), :mod:`.validation`
checks it (:func:`validate`), :mod:`.derived` gives each channel's own config and outputs,
:mod:`.urls` the host and origin checks, :mod:`.errors` :class:`ConfigError`. Output URLs are
:mod:`latentsync.output_urls`' (re-exported here: :func:`rtmp_host`, :func:`redact_rtmp_url`).

The package is a leaf: it imports nothing of ``latentsync`` but :mod:`latentsync.output_urls`. The
API's own rules for channels made at run time are the runtime's
(:mod:`latentsync.serving.runtime.channel_rules`).
"""

from latentsync.config.api import RESERVED_THREADS, SEED_RANGE, ApiConfig
from latentsync.config.app import AppConfig
from latentsync.config.avatar import AVATAR_ID_RE, AvatarConfig, uploaded_avatar_video
from latentsync.config.channels import CHANNEL_NAME_RE, DEFAULT_CHANNEL, ChannelConfig
from latentsync.config.derived import (
    OutputTarget,
    channel_configs,
    channel_outputs,
    check_local_outputs,
    local_output_clash,
)
from latentsync.config.egress import EgressConfig, OutputConfig
from latentsync.config.engine import (
    CHUNK_FRAMES,
    CHUNK_FRAMES_RANGE,
    DEFAULT_CHUNK_FRAMES_RANGE,
    GUIDANCE_SCALE_RANGE,
    INFERENCE_STEPS_RANGE,
    LATENTSYNC_FACE_SIZE_PX,
    LATENTSYNC_VERSIONS,
    PARAMETRIC_FACE_SIZE_PX,
    PARAMETRIC_MAX_DEFAULT_WORKERS,
    DType,
    EngineConfig,
    EngineName,
    LatentSyncConfig,
    engine_face_size,
    latentsync_face_size,
)
from latentsync.config.errors import ConfigError
from latentsync.config.frames import FramesConfig
from latentsync.config.loading import load_config, load_config_from_environment, parse_channel, parse_outputs, to_yaml
from latentsync.config.log import LogConfig
from latentsync.config.media import MediaConfig
from latentsync.config.pool import PoolBackend, PoolConfig
from latentsync.config.server import ServerConfig
from latentsync.config.speech import (
    PCM_ENCODINGS,
    PCM_MAX_CHANNELS,
    PCM_SAMPLE_RATE_RANGE_HZ,
    TTS_RATE_RANGE_WPM,
    SpeechStreamConfig,
)
from latentsync.config.stream import AAC_SAMPLE_RATES_HZ, StreamConfig
from latentsync.config.tasks import TasksConfig
from latentsync.config.ui import UiConfig
from latentsync.config.urls import is_loopback_host
from latentsync.config.validation import validate, validate_latentsync
from latentsync.config.webrtc import MAX_SDP_BYTES, VideoCodec, WebRtcConfig
from latentsync.output_urls import RTMP_URL_WANT, redact_rtmp_url, rtmp_host

__all__ = [
    "AAC_SAMPLE_RATES_HZ",
    "AVATAR_ID_RE",
    "CHANNEL_NAME_RE",
    "CHUNK_FRAMES",
    "CHUNK_FRAMES_RANGE",
    "DEFAULT_CHANNEL",
    "DEFAULT_CHUNK_FRAMES_RANGE",
    "GUIDANCE_SCALE_RANGE",
    "INFERENCE_STEPS_RANGE",
    "MAX_SDP_BYTES",
    "PARAMETRIC_FACE_SIZE_PX",
    "PARAMETRIC_MAX_DEFAULT_WORKERS",
    "PCM_ENCODINGS",
    "PCM_MAX_CHANNELS",
    "PCM_SAMPLE_RATE_RANGE_HZ",
    "RESERVED_THREADS",
    "RTMP_URL_WANT",
    "SEED_RANGE",
    "TTS_RATE_RANGE_WPM",
    "ApiConfig",
    "AppConfig",
    "AvatarConfig",
    "ChannelConfig",
    "ConfigError",
    "DType",
    "EgressConfig",
    "EngineConfig",
    "EngineName",
    "FramesConfig",
    "LATENTSYNC_FACE_SIZE_PX",
    "LATENTSYNC_VERSIONS",
    "LatentSyncConfig",
    "LogConfig",
    "MediaConfig",
    "OutputConfig",
    "OutputTarget",
    "PoolBackend",
    "PoolConfig",
    "ServerConfig",
    "SpeechStreamConfig",
    "StreamConfig",
    "TasksConfig",
    "UiConfig",
    "VideoCodec",
    "WebRtcConfig",
    "channel_configs",
    "channel_outputs",
    "check_local_outputs",
    "engine_face_size",
    "is_loopback_host",
    "latentsync_face_size",
    "load_config",
    "load_config_from_environment",
    "local_output_clash",
    "parse_channel",
    "parse_outputs",
    "redact_rtmp_url",
    "rtmp_host",
    "to_yaml",
    "uploaded_avatar_video",
    "validate",
    "validate_latentsync",
]
