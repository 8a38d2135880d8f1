"""Typed server configuration: defaults, a YAML file, then command-line ``key=value`` overrides.

The schema is a tree of dataclasses turned into an OmegaConf structured config, so unknown
keys and values of the wrong type are rejected by OmegaConf with the full key name; semantic
checks (ranges, even sizes, supported AAC rates) follow in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from latentsync.engines import CHUNK_FRAMES_RANGE, DEFAULT_CHUNK_FRAMES_RANGE
from latentsync.output_urls import (
    OUTPUT_NAME_RE,
    RECORD_NAME_RE,
    OutputKind,
    OutputUrl,
    OutputUrlError,
    parse_output_url,
    redact_output_url,
)

# Sample rates the FFmpeg AAC encoder accepts (MPEG-4 Audio sampling frequency index table).
AAC_SAMPLE_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
#: Classifier-free guidance scales accepted everywhere (config, engine, API ``guidance_scale``):
#: 1.0 is no guidance (LatentSync 1.0's sampler needs >= 1; above ~20 the faces break up).
GUIDANCE_SCALE_RANGE = (1.0, 20.0)
#: DDIM denoising steps accepted by ``engine.latentsync.inference_steps``.
INFERENCE_STEPS_RANGE = (1, 1000)
#: Seeds accepted from clients (``seed`` of uploads, ``/speak``, ``/ws/speech``): torch.Generator
#: takes 64-bit seeds; 31 bits keep them portable.
SEED_RANGE = (0, 2**31 - 1)
#: Speaking rates of text to speech in words per minute (``rate`` of ``/speak``, ``speech_stream.tts_rate_wpm``).
TTS_RATE_RANGE_WPM = (80, 450)
#: Raw PCM of ``/ws/speech``: encodings with their bytes per sample, sample rates in Hz, channels.
PCM_ENCODINGS = {"s16le": 2, "f32le": 4}
PCM_SAMPLE_RATE_RANGE_HZ = (8000, 192000)
PCM_MAX_CHANNELS = 8
#: Largest WHEP SDP offer, in bytes (a real offer is a few kB).
MAX_SDP_BYTES = 64 * 1024
#: gunicorn threads beyond ``api.max_long_lived``: always free for health checks, uploads and cancels.
RESERVED_THREADS = 4


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class EngineName(str, enum.Enum):
    """Lip-sync engines."""

    parametric = "parametric"
    latentsync = "latentsync"


@dataclass
class ServerConfig:
    """HTTP API listener.

    A ``host`` that is not loopback (``0.0.0.0``, a LAN address, a name other than ``localhost``)
    needs ``api.token``, or ``allow_public_without_token: true`` to say the exposure is meant
    (e.g. behind an authenticating reverse proxy); otherwise the server refuses to start.
    ``allowed_hosts``: names the ``Host`` header may carry (any other gets 421 ``bad_host``, so a
    DNS-rebinding page cannot read the API); null: the loopback names, ``public_name``, ``host``
    (unless a wildcard) and the hosts of ``api.allowed_origins``. ``public_name``: the name
    clients reach the server by (``avatars.example.com``), or null.
    ``native_threads``: threads the native pools of the server process (OpenCV, BLAS) may use
    (latentsync.serving.ops.threads.limit_native_threads; engine workers always use 1). 1: every
    channel already works on threads of its own, and the pools' spinning threads cost more CPU
    than they save (docs/performance.md); 0: the libraries' defaults (one per core).
    """

    host: str = "127.0.0.1"
    port: int = 11001
    allow_public_without_token: bool = False
    allowed_hosts: list[str] | None = None
    public_name: str | None = None
    native_threads: int = 1


@dataclass
class OutputConfig:
    """One destination of a channel's programme (docs/outputs.md).

    ``url``: ``rtmp://``/``rtmps://`` (FLV), ``srt://host:port`` (MPEG-TS, caller), ``http(s)://``
    (WHIP: H.264 constrained baseline + Opus), ``hls:NAME`` (a folder in ``egress.hls_root``) or
    ``record:FILE.mkv`` (segmented files in ``stream.record_dir``); the rules are those of
    :func:`latentsync.output_urls.parse_output_url`.
    ``name``: how ``/health``, the metrics and the page call it (default: its kind, ``-2``, ``-3``
    for more of one kind). ``required``: the channel is ``streaming`` (and ready) only while this
    output is live; default true, false for recordings. ``video_bitrate_kbps``: an encoding of its
    own at this bitrate (null: the channel's); outputs with the same encoding share one encoder.
    ``bearer_token``: the WHIP endpoint's ``Authorization: Bearer`` token (WHIP only; a secret,
    never shown).
    """

    url: str = ""
    name: str | None = None
    required: bool | None = None
    video_bitrate_kbps: int | None = None
    bearer_token: str | None = None


@dataclass
class EgressConfig:
    """How every channel's outputs are run and watched (docs/outputs.md).

    ``stall_timeout_s``: an output whose bytes stop leaving (no progress from its FFmpeg) for this
    long is ``stalled``: it is killed and restarted with backoff (``stream.restart_backoff_*``).
    ``max_outputs``: outputs per channel. ``hls_root``: the folder ``hls:NAME`` outputs write into
    (null: no HLS outputs); ``hls_segment_s``/``hls_list_size``: segment length (cut at keyframes,
    so a multiple of ``stream.keyframe_interval_s`` in practice) and segments in the playlist.
    ``send_buffer_kb``: the kernel send buffer of an RTMP output's socket (FFmpeg's
    ``send_buffer_size``): small enough that our side hides well under a second of a 512x512 stream
    from a frozen destination (the default buffer and FFmpeg's queues hid ~10 s), large enough for
    20 Mbit/s at 100 ms round trip. ``output_queue_s``: seconds of the programme queued for an output that
    reads slowly; past that it counts as stalled.
    """

    stall_timeout_s: float = 5.0
    max_outputs: int = 16
    hls_root: str | None = None
    hls_segment_s: float = 2.0
    hls_list_size: int = 6
    send_buffer_kb: int = 64
    output_queue_s: float = 4.0


@dataclass
class StreamConfig:
    """The live output: clock, encoder and destinations.

    ``width``/``height`` of None take the idle avatar video's own size (rounded down to even), or,
    when its longest side is over ``max_side``, its aspect ratio with the longest side ``max_side``.
    ``rtmp_url``: ``rtmp://`` or ``rtmps://``; the characters FFmpeg's tee muxer gives a meaning
    (``|``, ``[``, ``]``, a backslash) and whitespace are refused.
    ``record_path``: a local copy of the stream through FFmpeg's tee muxer: a file name (no
    folder) in ``record_dir``, set in the config file only (never through the API); it is written
    in files of about ``record_max_mb`` megabytes each (the segment muxer, timed by bitrate), of
    which the newest ``record_keep`` are kept.
    ``max_pixels_per_s``: budget of width x height x fps of every channel (1920x1080 at 30 fps),
    checked at load and before a video is decoded.
    ``clock_nice``: niceness added to every channel's clock thread (-20..0; 0: left alone), so a
    clock woken on time is not queued behind FFmpeg's encoder threads and the server's others
    (latentsync.serving.ops.threads.renice_this_thread; docs/performance.md "Clock priority").
    Needs root, ``CAP_SYS_NICE`` or a high enough ``RLIMIT_NICE`` (systemd ``LimitNICE=30`` allows
    -10); refused, the clock logs a warning and runs at the process's niceness.
    ``clock_rt_priority``: ``SCHED_FIFO`` priority of every channel's clock thread (1..99; 0: off,
    ``clock_nice`` only): a woken clock then waits for no ordinary thread at all
    (latentsync.serving.ops.threads.make_this_thread_realtime; docs/performance.md "Clock
    priority"). Needs root, ``CAP_SYS_NICE`` or ``RLIMIT_RTPRIO`` (systemd ``LimitRTPRIO=10`` with
    ``RestrictRealtime=false``); refused, the clock logs a warning and keeps ``clock_nice``.
    ``outputs``: the destinations (:class:`OutputConfig`, docs/outputs.md); empty: one output, to
    ``rtmp_url`` (the one-output shorthand). ``record_path`` adds a recording output either way.
    ``allowed_rtmp_hosts``: hosts a channel created or given outputs through the API may send to
    (RTMP, SRT and WHIP alike); null: the hosts of the outputs in the config file (every channel's,
    ``main`` included).
    ``x264_preset``: a libx264 preset, or ``auto``: per channel, ``ultrafast`` when its bitrate
    gives 0.3 bits per pixel or more (512x512 at 25 fps and 2500 kbit/s), else ``superfast``
    (latentsync.serving.egress.rtmp.auto_x264_preset; measurements in docs/performance.md), each
    encoded in one x264 thread (every channel has its own FFmpeg; within ``max_pixels_per_s``
    these presets need well under one core).
    """

    rtmp_url: str = "rtmp://127.0.0.1:1935/live/avatar"
    fps: int = 25
    audio_sample_rate: int = 48000
    audio_channels: int = 2
    width: int | None = None
    height: int | None = None
    max_side: int = 1280
    crossfade_frames: int = 5
    idle_audio: bool = True
    idle_pingpong: bool = False
    video_bitrate_kbps: int = 2500
    audio_bitrate_kbps: int = 128
    x264_preset: str = "auto"
    keyframe_interval_s: float = 2.0
    sink_queue_s: float = 1.0
    max_catchup_s: float = 1.0
    clock_nice: int = -10
    clock_rt_priority: int = 10
    restart_backoff_min_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    record_path: str | None = None
    record_dir: str | None = None
    record_max_mb: float = 1024.0
    record_keep: int = 8
    max_pixels_per_s: int = 1920 * 1080 * 30
    allowed_rtmp_hosts: list[str] | None = None
    outputs: list[OutputConfig] = field(default_factory=list)


@dataclass
class MediaConfig:
    """Videos named by path through the API, and the budgets of every video the server decodes.

    ``root``: ``PUT /channels/<name>`` may name an ``idle_video``/``video`` only by a path that
    resolves (symlinks followed) to a file under this directory; null: the API takes no paths at
    all (upload the video with ``POST /avatars`` and name its id as ``avatar``). Paths in the
    config file are the operator's and are not restricted.
    ``max_clip_s``, ``max_clip_mb``: longest and largest idle or base video, checked from the
    probe before decoding. ``max_decoded_mb``: largest decoded clip (width x height x 3 bytes per
    frame, at the stream's fps), also checked before decoding.
    """

    root: str | None = None
    max_clip_s: float = 120.0
    max_clip_mb: float = 2048.0
    max_decoded_mb: float = 4096.0


@dataclass
class AvatarConfig:
    """The digital human: idle loop and base video for speech (None: the built-in default avatar).

    ``cache_dir`` holds the prepared avatars and the videos uploaded with ``POST /avatars``
    (docs/avatars.md). The ``upload_*``, ``cache_quota_mb``, ``max_preparing`` and
    ``prepare_timeout_s`` keys bound those uploads: a video file at most ``upload_max_mb``
    megabytes and ``upload_max_s`` seconds long; the whole cache at most ``cache_quota_mb``
    megabytes (least recently used avatars no channel uses are deleted to make room);
    ``max_preparing`` uploads prepared or waiting at once; one preparation at most
    ``prepare_timeout_s`` seconds. ``min_face_fraction``: an uploaded video whose face is found on
    fewer than this fraction of its frames fails to prepare. ``fit``: how a video of another aspect
    ratio than the channel fills its frame: ``cover`` (crop around the presenter's face, head in the
    upper third), ``contain`` (whole video, bars filled with ``background``: ``blur`` or ``#rrggbb``)
    or ``stretch`` (distorted; only when asked for). docs/avatars.md, "Framing". ``min_face_px``: an
    uploaded avatar whose face is narrower than this at the stream's size (after framing) gets a
    ``face_too_small`` warning, and ``PUT /channels/<name>`` refuses it (409) unless ``"force": true``.
    """

    idle_video: str | None = None
    video: str | None = None
    cache_dir: str = ".cache/avatars"
    upload_max_mb: float = 200.0
    upload_max_s: float = 60.0
    cache_quota_mb: float = 20480.0
    max_preparing: int = 2
    prepare_timeout_s: float = 1800.0
    min_face_fraction: float = 0.5
    fit: str = "cover"
    background: str = "blur"
    min_face_px: int = 96


class PoolBackend(str, enum.Enum):
    """Where the engine workers run (docs/scale-out.md)."""

    local = "local"  # multiprocessing workers on this host
    ray = "ray"  # Ray actors on a Ray cluster


class DType(str, enum.Enum):
    """Floating-point precision for the LatentSync models on GPU (CPU always runs float32)."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


@dataclass
class LatentSyncConfig:
    """LatentSync 1.0 files and sampling settings (the files are the user's; never downloaded)."""

    unet_path: str = "checkpoints/latentsync_unet.pt"
    unet_config: str = "configs/unet/second_stage.yaml"
    whisper_path: str = "checkpoints/whisper/tiny.pt"
    vae_path: str = "checkpoints/sd-vae-ft-mse"
    scheduler_config: str = "configs/scheduler_config.json"
    dtype: DType = DType.float16
    inference_steps: int = 20
    guidance_scale: float = 1.0
    seed: int = 1247
    compile: bool = False


#: Most parametric workers ``engine.workers: null`` starts (one per core up to this).
PARAMETRIC_MAX_DEFAULT_WORKERS = 4


@dataclass
class EngineConfig:
    """Lip-sync engine and its worker pool.

    ``workers`` None: latentsync one worker process per GPU (1 on CPU); parametric one per core, at
    most :data:`PARAMETRIC_MAX_DEFAULT_WORKERS` (one worker is one core, and the engine is most of
    a speaking channel's CPU: docs/performance.md). ``worker_nice``: niceness added to every
    local engine worker (``os.nice``): generation runs ahead of the clock behind a jitter buffer,
    so the latency-bound parts (the stream's clock thread, FFmpeg) go first when the cores are
    busy; 0 keeps the server's priority. ``device`` None: ``cuda`` when a GPU is visible, else
    ``cpu``. ``chunk_deadline_s``: a chunk not back within this many seconds is retried once on
    a fresh worker, then its task fails. ``max_batch_chunks``: queued chunks a free worker
    generates in one model batch (a task's first chunk always runs alone). 1 (off) by default: a
    batch's results all arrive when the last is done, which only pays where a bigger batch is much
    cheaper than its parts (the latentsync U-Net on a GPU: try 2-4 there).
    ``max_avatars_per_worker``: prepared avatars (engines bound to them; for latentsync the models
    are shared and only the avatar's latents are added) a worker keeps loaded, least recently used
    dropped first (docs/channels.md). ``first_chunk_frames``: length of a task's first chunk, what
    its first frame on air waits for (null: the engine's, ``latentsync.engines.FIRST_CHUNK_FRAMES``:
    parametric 4, latentsync 16, which LatentSync 1.0 needs: its U-Net normalises over all 16
    frames of a chunk, docs/latentsync-1.0.md); later chunks are 16 frames, shorter only while
    audio streams in at real time (docs/streaming-speech.md). ``max_queued_jobs``: chunk jobs the
    pool's queue holds at most (a bound far above what the scheduler ever queues).
    """

    name: EngineName = EngineName.parametric
    workers: int | None = None
    worker_nice: int = 10
    device: str | None = None
    chunk_deadline_s: float = 60.0
    max_batch_chunks: int = 1
    max_avatars_per_worker: int = 4
    first_chunk_frames: int | None = None
    max_queued_jobs: int = 4096
    latentsync: LatentSyncConfig = field(default_factory=LatentSyncConfig)


@dataclass
class PoolConfig:
    """Where the engine workers run; the scheduler above them is the same (docs/scale-out.md).

    ``backend``: ``local`` (processes on this host, ``engine.workers`` of them) or ``ray`` (one
    Ray actor per worker, on any node of a Ray cluster; needs ``pip install -r
    requirements-ray.txt``). ``ray_address``: ``auto`` (the cluster this host belongs to),
    ``host:port`` (a head's GCS), ``ray://host:10001`` (Ray Client), or null/empty to start a
    private single-node Ray owned by the server. ``ray_workers``: actors to run (null: every GPU
    of the cluster for ``latentsync``, one per node for ``parametric``). ``ray_cpus_per_worker``
    and ``ray_gpus_per_worker``: what each actor reserves (GPU only for ``latentsync``).
    ``ray_namespace``: the Ray namespace of the actors (two servers on one cluster use two).
    ``ray_object_store_mb``: the object store of a private Ray (null: Ray's default, 30 % of RAM).
    """

    backend: PoolBackend = PoolBackend.local
    ray_address: str | None = None
    ray_workers: int | None = None
    ray_cpus_per_worker: float = 1.0
    ray_gpus_per_worker: float = 1.0
    ray_namespace: str = "latentsync"
    ray_object_store_mb: int | None = None


@dataclass
class ApiConfig:
    """HTTP API limits and access.

    ``token``: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <token>``.
    ``rate_limit_per_min``: uploads accepted per client address per minute (0: unlimited).
    ``decode_timeout_s``: seconds FFmpeg may take to decode one upload; past it the upload gets
    503 ``decode_timeout``.
    ``allowed_origins``: web origins (``scheme://host[:port]``) whose pages may send state-changing
    requests (POST, PUT, PATCH, DELETE) from a browser. Requests without an ``Origin`` header
    (curl, scripts) and same-origin pages served from a loopback address are always allowed;
    anything else gets 403 ``origin_not_allowed``.
    ``max_long_lived``: connections that hold a server thread for long (``GET /events`` streams and
    WebSockets, every channel together) at once; one more gets 503 ``too_many_connections``, so
    health checks, uploads and cancels always find a thread (gunicorn runs this many threads plus
    :data:`RESERVED_THREADS`). ``send_timeout_s``: a long-lived connection whose client takes no
    data for this long is dropped.
    ``mutations_per_min``: state-changing requests (POST, PUT, PATCH, DELETE) accepted per client
    address per minute, on every route (0: unlimited); ``auth_failures_per_min``: requests with a
    missing or wrong token per client address per minute before that client gets 429 for the rest
    of the minute (0: unlimited).
    """

    max_audio_s: float = 300.0
    max_upload_mb: float = 50.0
    max_queued: int = 16
    token: str | None = None
    rate_limit_per_min: int = 120
    decode_timeout_s: float = 30.0
    allowed_origins: list[str] = field(default_factory=list)
    max_long_lived: int = 4
    send_timeout_s: float = 10.0
    mutations_per_min: int = 600
    auth_failures_per_min: int = 30


@dataclass
class TasksConfig:
    """Scheduling of accepted tasks (docs/scheduling.md).

    ``generate_ahead``: tasks after the one on air that may generate at once; later tasks wait
    holding only their decoded audio (bounded memory per waiting task). ``max_frames_ahead``:
    frames a task may have generated or in flight ahead of the frame on air (768 = 48 chunks of
    16, ~30 s at 25 fps; 196 kB per 256x256 face). ``max_finished``: finished tasks kept for ``GET /tasks``.
    """

    generate_ahead: int = 1
    max_frames_ahead: int = 768
    max_finished: int = 200


class VideoCodec(str, enum.Enum):
    """Video codec of the WebRTC preview (what the one shared encoder produces)."""

    h264 = "h264"  # constrained baseline, packetization-mode 1
    vp8 = "vp8"


@dataclass
class WebRtcConfig:
    """WHEP (WebRTC) live view of the stream (docs/webrtc.md).

    ``max_height``: the preview is downscaled to at most this many rows (even), aspect kept.
    ``keyframe_interval_s``: GOP length of the shared encoder; a joining viewer or a PLI gets a
    keyframe on the next tick anyway. ``viewer_queue_s``: per-viewer backlog before that viewer
    drops (it resumes at the next keyframe). ``loopback_candidates``: also offer 127.0.0.1 as an
    ICE candidate (aioice skips loopback by default), so a browser on the same host always connects.
    """

    enabled: bool = True
    max_viewers: int = 8
    max_height: int = 720
    video_codec: VideoCodec = VideoCodec.h264
    video_bitrate_kbps: int = 1500
    keyframe_interval_s: float = 2.0
    viewer_queue_s: float = 0.5
    connect_timeout_s: float = 15.0
    signalling_timeout_s: float = 10.0
    loopback_candidates: bool = True


@dataclass
class FramesConfig:
    """Frames over a WebSocket (``/ws/frames``): the program as data, for clients that render it.

    Protocol: docs/frames-protocol.md.

    ``max_clients``: frames WebSockets open at once on one channel (one more gets 429
    ``too_many_clients``; each also takes one of ``api.max_long_lived``). ``client_queue_s``:
    ticks one client may have waiting (seconds of stream); a client further behind loses its
    backlog (whole ticks, counted in the next message's header), an H.264 client then resumes at
    a keyframe. ``jpeg_quality``: 1..100 (OpenCV's ``IMWRITE_JPEG_QUALITY``). ``h264_bitrate_kbps``
    and ``keyframe_interval_s``: the shared H.264 encoder (a joining client gets a keyframe on the
    next tick anyway). ``hello_timeout_s``: a client that sends no ``hello`` within this is closed
    (4408).
    """

    enabled: bool = True
    max_clients: int = 4
    client_queue_s: float = 0.5
    jpeg_quality: int = 85
    h264_bitrate_kbps: int = 2000
    keyframe_interval_s: float = 2.0
    hello_timeout_s: float = 5.0


@dataclass
class UiConfig:
    """The control page at ``/`` and its Server-Sent Events feed (``GET /events``).

    ``max_event_clients``: open ``/events`` streams at once (each holds a server thread; keep it
    below gunicorn's ``threads``); one more gets 503. ``event_poll_s``: how often task progress,
    viewers and health are sampled for the feed. ``event_queue_events``: events one client may
    have waiting; one further behind loses events.
    """

    page: bool = True
    max_event_clients: int = 4
    event_poll_s: float = 0.25
    event_queue_events: int = 256


@dataclass
class SpeechStreamConfig:
    """Speech that streams in: ``/ws/speech``, ``POST /speak`` (docs/streaming-speech.md).

    ``max_open``: utterances open (not ended) at once; more get ``too_many_streams``.
    ``max_buffered_s``: seconds of audio received and not yet played per utterance; a client
    pushing faster than real time past it gets ``buffer_full`` (past half of it: ``slow_down``).
    ``idle_timeout_s``: an open utterance that receives nothing for this long is ended.
    ``max_text_chars``: longest text for ``/speak`` or one ``text`` message.
    ``tts_voice``: espeak-ng voice used when a request names none; ``tts_rate_wpm``: its speed.
    ``tts_timeout_s``: seconds espeak-ng may take for one sentence.
    ``start_margin_s``: slack the jitter buffer keeps for an open utterance's next chunk: more
    costs latency to the first frame, less risks gaps when the pool is slow for a moment.
    ``max_utterance_s``: longest time an utterance may stay open (wall clock): then it ends and
    plays what it has. ``starve_timeout_s`` and ``min_arrival_ratio``: once audio flows, an open
    utterance must keep arriving at ``min_arrival_ratio`` of real time; below that for
    ``starve_timeout_s`` with nothing left to play, it ends (``too_slow``), so a trickling client
    never holds its channel's air. ``max_feeder_items``: PCM blocks and texts one utterance may
    have waiting for its feeder, ``max_feeder_bytes`` their bytes in all (PCM as float32).
    ``max_message_bytes``: largest WebSocket message (no compression is negotiated: the bytes on
    the wire); ``max_queued_bytes``: received WebSocket bytes waiting to be handled, past which the
    server stops reading the socket until they are (TCP holds the client back).
    """

    max_open: int = 4
    max_buffered_s: float = 30.0
    idle_timeout_s: float = 10.0
    max_text_chars: int = 5000
    tts_voice: str = "en"
    tts_rate_wpm: int = 175
    tts_timeout_s: float = 10.0
    start_margin_s: float = 0.04
    max_utterance_s: float = 600.0
    starve_timeout_s: float = 5.0
    min_arrival_ratio: float = 0.5
    max_feeder_items: int = 512
    max_feeder_bytes: int = 32 << 20
    max_message_bytes: int = 1 << 20
    max_queued_bytes: int = 4 << 20


@dataclass
class LogConfig:
    """Logging."""

    level: str = "INFO"
    json: bool = False


#: Channel names: lower-case letters, digits, ``-`` and ``_``, up to 32 characters (they appear in
#: URLs, log lines and Prometheus labels).
CHANNEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
#: Ids of avatars uploaded with ``POST /avatars``: ``av-`` and 12 lower-case hex digits (random).
AVATAR_ID_RE = re.compile(r"av-[0-9a-f]{12}")
#: The channel the top-level ``stream`` and ``avatar`` keys define (today's single stream).
DEFAULT_CHANNEL = "main"


@dataclass
class ChannelConfig:
    """One more live stream with its own avatar, served by the shared worker pool (docs/channels.md).

    Every value left null is taken from the top-level ``stream`` / ``avatar`` sections (the
    ``main`` channel's), so a channel only names what differs: at least its ``rtmp_url`` or its
    ``outputs`` (never inherited from ``main``: a destination belongs to one channel).
    ``avatar`` names a video uploaded with ``POST /avatars`` (its id): it is then both the idle
    video and the base video, and ``idle_video``/``video`` must be null.
    """

    name: str = ""
    rtmp_url: str | None = None
    avatar: str | None = None
    idle_video: str | None = None
    video: str | None = None
    width: int | None = None
    height: int | None = None
    fps: int | None = None
    idle_audio: bool | None = None
    idle_pingpong: bool | None = None
    crossfade_frames: int | None = None
    video_bitrate_kbps: int | None = None
    record_path: str | None = None
    outputs: list[OutputConfig] | None = None


@dataclass
class AppConfig:
    """The whole server configuration.

    ``channels_file``: a JSON file where the channels created, deleted or given another avatar
    through the API are kept, so a restart brings them back (docs/channels.md); null: not kept.
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    avatar: AvatarConfig = field(default_factory=AvatarConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    speech_stream: SpeechStreamConfig = field(default_factory=SpeechStreamConfig)
    egress: EgressConfig = field(default_factory=EgressConfig)
    webrtc: WebRtcConfig = field(default_factory=WebRtcConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    log: LogConfig = field(default_factory=LogConfig)
    channels: list[ChannelConfig] = field(default_factory=list)
    max_channels: int = 8
    channels_file: str | None = None


def channel_configs(config: AppConfig) -> dict[str, AppConfig]:
    """The configuration each channel runs with: ``main`` first, then ``channels`` in order.

    A channel's config is the whole config with its ``stream`` and ``avatar`` sections replaced by
    the channel's values (null values keep the top-level ones) and ``channels`` emptied.

    Args:
        config: The server configuration.

    Returns:
        Channel name -> its configuration (``main`` is ``config`` itself with ``channels`` emptied).
    """
    out = {DEFAULT_CHANNEL: dataclasses.replace(config, channels=[])}
    for ch in config.channels:
        stream_values = {
            k: getattr(ch, k)
            for k in (
                "rtmp_url",
                "fps",
                "idle_audio",
                "idle_pingpong",
                "crossfade_frames",
                "video_bitrate_kbps",
                "record_path",
            )
            if getattr(ch, k) is not None
        }
        if ch.width is not None or ch.height is not None:
            stream_values.update(width=ch.width, height=ch.height)
        stream_values["outputs"] = list(ch.outputs or [])  # a destination belongs to one channel
        avatar = dataclasses.replace(
            config.avatar, **{k: getattr(ch, k) for k in ("idle_video", "video") if getattr(ch, k) is not None}
        )
        if ch.idle_video is not None and ch.video is None:  # its own idle video is its base video too
            avatar = dataclasses.replace(avatar, video=None)
        if ch.avatar is not None:  # an uploaded avatar is its idle and base video
            upload = str(uploaded_avatar_video(config.avatar.cache_dir, ch.avatar))
            avatar = dataclasses.replace(avatar, idle_video=upload, video=None)
        stream = dataclasses.replace(config.stream, **stream_values)
        out[ch.name] = dataclasses.replace(config, stream=stream, avatar=avatar, channels=[])
    return out


@dataclass(frozen=True)
class OutputTarget:
    """One output of a channel as it runs: its URL parsed, its defaults filled in (:func:`channel_outputs`).

    Attributes:
        name: Unique within the channel (:data:`latentsync.output_urls.OUTPUT_NAME_RE`).
        url: The parsed URL (``url.url`` may hold a stream key: never log it).
        required: The channel counts as streaming only while this output is live.
        video_bitrate_kbps: The H.264 bitrate of its encoding, in kbit/s.
        bearer_token: The WHIP endpoint's bearer token, or None.
    """

    name: str
    url: OutputUrl
    required: bool
    video_bitrate_kbps: int
    bearer_token: str | None = None

    @property
    def kind(self) -> OutputKind:
        """What the output is (``rtmp``, ``srt``, ``whip``, ``hls``, ``record``)."""
        return self.url.kind

    def public(self) -> dict:
        """The output as the API shows it: no stream key, token or option values."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "url": redact_output_url(self.url.url),
            "required": self.required,
            "video_bitrate_kbps": self.video_bitrate_kbps,
        }


def channel_outputs(config: AppConfig, key: str = "stream.outputs") -> list[OutputTarget]:
    """The outputs a channel runs: ``stream.outputs`` (or the ``rtmp_url`` shorthand) and the recording.

    Args:
        config: A channel's configuration (:func:`channel_configs`), or the top-level one for ``main``.
        key: How messages name the list.

    Returns:
        The outputs in order, each with its name, ``required`` and bitrate filled in: names default
        to the kind (``rtmp``, ``srt``, ``whip``, ``hls``, ``record``; ``-2``, ``-3`` ... for more of
        one kind); ``required`` defaults to true, false for recordings; ``stream.record_path`` adds
        ``record:<record_path>`` (not required) unless an output names it already.

    Raises:
        ConfigError: Naming the output: a refused URL (:func:`latentsync.output_urls.parse_output_url`),
            a name given twice, more than ``egress.max_outputs``, an HLS output without
            ``egress.hls_root``, a recording without ``stream.record_dir``, a bitrate out of range, a
            bearer token on an output that is not WHIP or one with a line break.
    """
    s = config.stream
    given = list(s.outputs) or [OutputConfig(url=s.rtmp_url)]
    if s.record_path and not any(o.url == f"record:{s.record_path}" for o in given):
        given.append(OutputConfig(url=f"record:{s.record_path}", required=False))
    _check(
        len(given) <= config.egress.max_outputs,
        key,
        f"{len(given)} outputs",
        f"at most egress.max_outputs = {config.egress.max_outputs}",
    )
    names: set[str] = set()
    counts: dict[str, int] = {}
    out = []
    for i, o in enumerate(given):
        where = f"{key}[{i}]"
        try:
            url = parse_output_url(o.url)
        except OutputUrlError as exc:
            raise ConfigError(f"{where}.{exc}") from None
        counts[url.kind.value] = counts.get(url.kind.value, 0) + 1
        n = counts[url.kind.value]
        name = o.name if o.name is not None else url.kind.value + (f"-{n}" if n > 1 else "")
        _check(OUTPUT_NAME_RE.fullmatch(name) is not None, f"{where}.name", name, "lower-case letters, digits, - and _")
        _check(name not in names, f"{where}.name", name, "a name no other output of the channel has")
        names.add(name)
        _check(
            url.kind is not OutputKind.hls or config.egress.hls_root is not None,
            f"{where}.url",
            o.url,
            "hls: outputs only with egress.hls_root set",
        )
        _check(
            url.kind is not OutputKind.record or s.record_dir is not None,
            f"{where}.url",
            o.url,
            "record: outputs only with stream.record_dir set",
        )
        bitrate = o.video_bitrate_kbps if o.video_bitrate_kbps is not None else s.video_bitrate_kbps
        _check(100 <= bitrate <= 50000, f"{where}.video_bitrate_kbps", bitrate, "100..50000")
        token = o.bearer_token
        _check(
            token is None or (url.kind is OutputKind.whip and 1 <= len(token) <= 4096 and token.isprintable()),
            f"{where}.bearer_token",
            "<hidden>",
            "a WHIP output's token (printable, no line breaks, at most 4096 characters)",
        )
        required = o.required if o.required is not None else url.kind is not OutputKind.record
        out.append(OutputTarget(name, url, required, bitrate, token))
    return out


def uploaded_avatar_video(cache_dir: str | Path, avatar_id: str) -> Path:
    """Where the video of an avatar uploaded with ``POST /avatars`` lives (docs/avatars.md).

    Args:
        cache_dir: ``avatar.cache_dir``.
        avatar_id: The avatar's id (:data:`AVATAR_ID_RE`; anything else gives a path that never exists).

    Returns:
        ``<cache_dir>/uploads/<id>/<id>.mkv`` (the upload, remuxed to Matroska).
    """
    safe = avatar_id if AVATAR_ID_RE.fullmatch(avatar_id) else "invalid"
    return Path(cache_dir) / "uploads" / safe / f"{safe}.mkv"


def parse_channel(name: str, values: dict) -> ChannelConfig:
    """A :class:`ChannelConfig` from an API body (``PUT /channels/<name>``), type-checked like the YAML.

    Args:
        name: The channel's name (from the URL; a ``name`` in ``values`` must equal it).
        values: Field values (JSON).

    Returns:
        The channel config (not yet checked against the others: :func:`validate` does that).

    Raises:
        ConfigError: On an unknown field or a value of the wrong type (the message names it).
    """
    if "name" in values and values["name"] != name:
        raise ConfigError(f"name: {values['name']!r} differs from the channel in the URL ({name!r})")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ChannelConfig), {**values, "name": name})
        channel = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    assert isinstance(channel, ChannelConfig)
    return channel


def parse_outputs(values: object) -> list[OutputConfig]:
    """Outputs from JSON (a PUT body's ``outputs``, ``channels_file``), type-checked like the YAML.

    Raises:
        ConfigError: If ``values`` is not a list of output objects, or on an unknown field or a
            value of the wrong type (the message names it).
    """
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise ConfigError('outputs: a list of objects like {"url": "rtmp://host/app/key"} is required')
    out = []
    for i, value in enumerate(values):
        try:
            merged = OmegaConf.merge(OmegaConf.structured(OutputConfig), value)
            item = OmegaConf.to_object(merged)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"outputs[{i}].{_omegaconf_message(exc)}") from None
        assert isinstance(item, OutputConfig)
        out.append(item)
    return out


def api_media_path(config: AppConfig, key: str, value: str) -> str:
    """A video named by path through the API: resolved (symlinks followed), and only under ``media.root``.

    The message is the same whether a path outside ``media.root`` exists or not (the API never
    tells whether a file exists outside it).

    Args:
        config: The server configuration (``media.root``).
        key: The field, for messages (``idle_video``, ``video``).
        value: The path as given: absolute, or relative to ``media.root``.

    Returns:
        The resolved absolute path of an existing file under ``media.root``.

    Raises:
        ConfigError: Without ``media.root``, for a path outside it, or for no such file in it.
    """
    root = config.media.root
    if root is None:
        raise ConfigError(
            f"{key}: video paths are not accepted through the API (media.root is not set): upload the video "
            "with POST /avatars and give its id as avatar"
        )
    base = Path(root).resolve()
    resolved = (base / value).resolve()
    if not resolved.is_relative_to(base):
        raise ConfigError(f"{key}: must name a file under media.root")
    if not resolved.is_file():
        raise ConfigError(f"{key}: no such file under media.root")
    return str(resolved)


#: The fields of a channel that name a video (held to :func:`api_media_path` through the API).
API_MEDIA_KEYS = ("idle_video", "video")
#: Why a ``record_path`` given through the API is refused.
RECORD_PATH_CONFIG_ONLY = "record_path: recordings are set in the config file only (stream.record_dir)"


def api_media_paths(config: AppConfig, get: Callable[[str], Any]) -> dict[str, str]:
    """:func:`api_media_path` of every video field given (``get(key)``: a channel's or a body's value).

    Returns:
        ``{key: resolved path}`` for the keys of :data:`API_MEDIA_KEYS` that are set.

    Raises:
        ConfigError: As :func:`api_media_path`.
    """
    return {k: api_media_path(config, k, v) for k in API_MEDIA_KEYS if (v := get(k))}


def allowed_rtmp_hosts(config: AppConfig) -> set[str]:
    """Hosts a channel created (or given outputs) through the API may send to (``stream.allowed_rtmp_hosts``).

    Null: the hosts of the outputs of ``config``'s own channels, ``main`` included (pass the config as
    loaded from the file, not one with channels the API made).
    """
    if config.stream.allowed_rtmp_hosts is not None:
        return {h.strip("[]").lower() for h in config.stream.allowed_rtmp_hosts}
    hosts = set()
    for derived in channel_configs(config).values():
        hosts.update(t.url.host for t in channel_outputs(derived) if t.url.host is not None)
    return hosts


def api_channel(config: AppConfig, spec: ChannelConfig, allowed_hosts: set[str]) -> ChannelConfig:
    """A channel given through the API (a PUT, or an entry of ``channels_file``), held to the API's rules.

    Video paths resolve under ``media.root`` (:func:`api_media_path`); the RTMP URL and the outputs
    are well formed and send to ``allowed_hosts`` only (:func:`check_api_outputs`); ``record_path`` is
    for the config file only.

    Args:
        config: The server configuration.
        spec: The channel as parsed (:func:`parse_channel`).
        allowed_hosts: :func:`allowed_rtmp_hosts` of the config as loaded.

    Returns:
        ``spec`` with its video paths resolved.

    Raises:
        ConfigError: Naming the field.
    """
    if spec.record_path is not None:
        raise ConfigError(RECORD_PATH_CONFIG_ONLY)
    if spec.rtmp_url is not None:
        host = rtmp_host(spec.rtmp_url)
        if host is None:
            raise ConfigError(f"rtmp_url: expected {RTMP_URL_WANT}")
        if host not in allowed_hosts:
            raise ConfigError(
                f"rtmp_url: {host!r} is not in stream.allowed_rtmp_hosts ({', '.join(sorted(allowed_hosts))})"
            )
    if spec.outputs is not None:
        check_api_outputs(spec.outputs, allowed_hosts)
    return dataclasses.replace(spec, **api_media_paths(config, lambda k: getattr(spec, k)))


def check_api_outputs(outputs: Sequence[OutputConfig], allowed_hosts: set[str]) -> None:
    """Hold outputs given through the API to its rules: well-formed URLs to allowed hosts only.

    HLS folders and recording files are names under the operator's roots (``egress.hls_root``,
    ``stream.record_dir``), never paths (:func:`latentsync.output_urls.parse_output_url`); the rest
    of the checks (names, counts, roots set) are :func:`channel_outputs`'.

    Raises:
        ConfigError: Naming the output (``outputs[i].url``).
    """
    for i, o in enumerate(outputs):
        try:
            url = parse_output_url(o.url)
        except OutputUrlError as exc:
            raise ConfigError(f"outputs[{i}].{exc}") from None
        if url.host is not None and url.host not in allowed_hosts:
            raise ConfigError(
                f"outputs[{i}].url: {url.host!r} is not in stream.allowed_rtmp_hosts "
                f"({', '.join(sorted(allowed_hosts))})"
            )


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{key}: {first}" if key else first


def load_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> AppConfig:
    """Build the configuration from defaults, an optional YAML file and dotlist overrides.

    Args:
        config_file: YAML file with any subset of the keys (None: defaults only).
        overrides: ``key=value`` strings, e.g. ``["stream.fps=30", "engine.name=parametric"]``.

    Returns:
        The validated :class:`AppConfig`.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type, a malformed override, a missing
            file, or a value out of range; the message names the key.
    """
    schema = OmegaConf.structured(AppConfig)
    try:
        layers = [schema]
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc)) from None
    assert isinstance(config, AppConfig)
    validate(config)
    return config


def _check(ok: bool, key: str, value: object, want: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is invalid, expected {want}")


def validate(config: AppConfig) -> None:
    """Check value ranges that the types alone do not express.

    Args:
        config: The configuration to check.

    Raises:
        ConfigError: Naming the first key whose value is out of range.
    """
    s = config.stream
    _check(1 <= config.server.port <= 65535, "server.port", config.server.port, "1..65535")
    _check(
        0 <= config.server.native_threads <= 64,
        "server.native_threads",
        config.server.native_threads,
        "0..64 (0: the libraries' defaults)",
    )
    for host in [
        *(config.server.allowed_hosts or []),
        *([config.server.public_name] if config.server.public_name else []),
    ]:
        _check(_HOST_RE.fullmatch(host) is not None, "server.allowed_hosts", host, "host names or IP addresses")
    _check(
        is_loopback_host(config.server.host)
        or config.api.token is not None
        or config.server.allow_public_without_token,
        "server.host",
        config.server.host,
        "a loopback address unless api.token is set (or server.allow_public_without_token: true)",
    )
    for origin in config.api.allowed_origins:
        _check(
            _ORIGIN_RE.fullmatch(origin) is not None,
            "api.allowed_origins",
            origin,
            "origins like https://studio.example.com (scheme://host[:port], no path)",
        )
    _check(rtmp_host(s.rtmp_url) is not None, "stream.rtmp_url", "<hidden>", RTMP_URL_WANT)
    _check(1 <= s.fps <= 120, "stream.fps", s.fps, "1..120")
    _check(64 <= s.max_side <= 7680, "stream.max_side", s.max_side, "64..7680 pixels")
    _check(10**5 <= s.max_pixels_per_s <= 10**10, "stream.max_pixels_per_s", s.max_pixels_per_s, "100000..10000000000")
    if s.width is not None and s.height is not None:
        _check(
            s.width * s.height * s.fps <= s.max_pixels_per_s,
            "stream.width",
            f"{s.width}x{s.height} at {s.fps} fps",
            f"at most stream.max_pixels_per_s = {s.max_pixels_per_s} pixels per second",
        )
    _check(
        s.record_path is None or (s.record_dir is not None and RECORD_NAME_RE.fullmatch(s.record_path) is not None),
        "stream.record_path",
        s.record_path,
        "a file name like live.mkv (letters, digits, . _ -; no folder; mkv, mp4, mov, ts or flv) in stream.record_dir",
    )
    _check(1 <= s.record_max_mb <= 10**6, "stream.record_max_mb", s.record_max_mb, "1..1000000")
    _check(1 <= s.record_keep <= 10000, "stream.record_keep", s.record_keep, "1..10000")
    for host in s.allowed_rtmp_hosts or []:
        _check(_HOST_RE.fullmatch(host) is not None, "stream.allowed_rtmp_hosts", host, "host names or IP addresses")
    eg = config.egress
    _check(0.5 <= eg.stall_timeout_s <= 600, "egress.stall_timeout_s", eg.stall_timeout_s, "0.5..600")
    _check(1 <= eg.max_outputs <= 64, "egress.max_outputs", eg.max_outputs, "1..64")
    _check(1 <= eg.hls_list_size <= 1000, "egress.hls_list_size", eg.hls_list_size, "1..1000")
    _check(0.5 <= eg.hls_segment_s <= 60, "egress.hls_segment_s", eg.hls_segment_s, "0.5..60")
    _check(8 <= eg.send_buffer_kb <= 65536, "egress.send_buffer_kb", eg.send_buffer_kb, "8..65536")
    _check(0.5 <= eg.output_queue_s <= 60, "egress.output_queue_s", eg.output_queue_s, "0.5..60")
    channel_outputs(config)
    m = config.media
    _check(0.5 <= m.max_clip_s <= 86400, "media.max_clip_s", m.max_clip_s, "0.5..86400")
    _check(0.1 <= m.max_clip_mb <= 10**6, "media.max_clip_mb", m.max_clip_mb, "0.1..1000000")
    _check(1 <= m.max_decoded_mb <= 10**7, "media.max_decoded_mb", m.max_decoded_mb, "1..10000000")
    _check(m.root is None or Path(m.root).is_dir(), "media.root", m.root, "an existing directory or null")
    _check(
        s.audio_sample_rate in AAC_SAMPLE_RATES_HZ,
        "stream.audio_sample_rate",
        s.audio_sample_rate,
        f"one of {AAC_SAMPLE_RATES_HZ}",
    )
    _check(s.audio_channels in (1, 2), "stream.audio_channels", s.audio_channels, "1 or 2")
    for key in ("width", "height"):
        value = getattr(s, key)
        _check(
            value is None or (16 <= value <= 7680 and value % 2 == 0),
            f"stream.{key}",
            value,
            "an even number of pixels in 16..7680 (yuv420p) or null",
        )
    _check((s.width is None) == (s.height is None), "stream.width", s.width, "set together with stream.height")
    _check(0 <= s.crossfade_frames <= 10 * s.fps, "stream.crossfade_frames", s.crossfade_frames, f"0..{10 * s.fps}")
    _check(100 <= s.video_bitrate_kbps <= 50000, "stream.video_bitrate_kbps", s.video_bitrate_kbps, "100..50000")
    _check(16 <= s.audio_bitrate_kbps <= 512, "stream.audio_bitrate_kbps", s.audio_bitrate_kbps, "16..512")
    presets = ("auto", "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow")
    _check(s.x264_preset in presets, "stream.x264_preset", s.x264_preset, f"one of {presets}")
    _check(0.1 <= s.keyframe_interval_s <= 10, "stream.keyframe_interval_s", s.keyframe_interval_s, "0.1..10")
    _check(0.1 <= s.sink_queue_s <= 10, "stream.sink_queue_s", s.sink_queue_s, "0.1..10")
    _check(0.1 <= s.max_catchup_s <= 60, "stream.max_catchup_s", s.max_catchup_s, "0.1..60")
    _check(-20 <= s.clock_nice <= 0, "stream.clock_nice", s.clock_nice, "-20..0")
    _check(0 <= s.clock_rt_priority <= 99, "stream.clock_rt_priority", s.clock_rt_priority, "0..99 (0: off)")
    _check(
        0 < s.restart_backoff_min_s <= s.restart_backoff_max_s <= 300,
        "stream.restart_backoff_min_s",
        s.restart_backoff_min_s,
        "0 < min <= stream.restart_backoff_max_s <= 300",
    )
    for key in ("idle_video", "video"):
        value = getattr(config.avatar, key)
        _check(value is None or Path(value).is_file(), f"avatar.{key}", value, "an existing video file or null")
    av = config.avatar
    _check(0.1 <= av.upload_max_mb <= 100000, "avatar.upload_max_mb", av.upload_max_mb, "0.1..100000")
    _check(0.5 <= av.upload_max_s <= 3600, "avatar.upload_max_s", av.upload_max_s, "0.5..3600")
    _check(1 <= av.cache_quota_mb <= 10**8, "avatar.cache_quota_mb", av.cache_quota_mb, "1..1e8")
    _check(1 <= av.max_preparing <= 64, "avatar.max_preparing", av.max_preparing, "1..64")
    _check(1 <= av.prepare_timeout_s <= 86400, "avatar.prepare_timeout_s", av.prepare_timeout_s, "1..86400")
    _check(0 < av.min_face_fraction <= 1, "avatar.min_face_fraction", av.min_face_fraction, "0 < f <= 1")
    _check(av.fit in ("cover", "contain", "stretch"), "avatar.fit", av.fit, "cover, contain or stretch")
    _check(0 <= av.min_face_px <= 4096, "avatar.min_face_px", av.min_face_px, "0..4096 (0: no check)")
    _check(
        av.background == "blur" or re.fullmatch(r"#[0-9a-fA-F]{6}", str(av.background)) is not None,
        "avatar.background",
        av.background,
        "blur or a #rrggbb colour",
    )
    _check(0 <= config.engine.worker_nice <= 19, "engine.worker_nice", config.engine.worker_nice, "0..19")
    _check(
        config.engine.workers is None or 1 <= config.engine.workers <= 64,
        "engine.workers",
        config.engine.workers,
        "1..64 or null",
    )
    e = config.engine
    _check(
        e.device is None or e.device == "cpu" or e.device.startswith("cuda"),
        "engine.device",
        e.device,
        "cpu, cuda, cuda:N or null",
    )
    _check(0.5 <= e.chunk_deadline_s <= 3600, "engine.chunk_deadline_s", e.chunk_deadline_s, "0.5..3600")
    _check(1 <= e.max_batch_chunks <= 64, "engine.max_batch_chunks", e.max_batch_chunks, "1..64")
    _check(16 <= e.max_queued_jobs <= 10**6, "engine.max_queued_jobs", e.max_queued_jobs, "16..1000000")
    pool = config.pool
    _check(pool.ray_workers is None or 1 <= pool.ray_workers <= 4096, "pool.ray_workers", pool.ray_workers, "1..4096")
    _check(0 <= pool.ray_cpus_per_worker <= 256, "pool.ray_cpus_per_worker", pool.ray_cpus_per_worker, "0..256")
    _check(0 < pool.ray_gpus_per_worker <= 16, "pool.ray_gpus_per_worker", pool.ray_gpus_per_worker, "(0, 16]")
    _check(
        pool.ray_object_store_mb is None or pool.ray_object_store_mb >= 78,
        "pool.ray_object_store_mb",
        pool.ray_object_store_mb,
        "78 MB (Ray's least) or more, or null",
    )
    _check(
        bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", pool.ray_namespace)),
        "pool.ray_namespace",
        pool.ray_namespace,
        "1-64 letters, digits, '_', '.', '-'",
    )
    _check(
        not pool.ray_address
        or pool.ray_address == "auto"
        or bool(re.fullmatch(r"(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}", pool.ray_address)),
        "pool.ray_address",
        pool.ray_address,
        "auto, host:port, ray://host:port, or null (a private Ray)",
    )
    low, high = CHUNK_FRAMES_RANGE.get(e.name.value, DEFAULT_CHUNK_FRAMES_RANGE)
    _check(
        e.first_chunk_frames is None or low <= e.first_chunk_frames <= high,
        "engine.first_chunk_frames",
        e.first_chunk_frames,
        f"{low}..{high} frames or null for the {e.name.value} engine"
        + (
            " (LatentSync 1.0's U-Net normalises over all 16 frames of a chunk: a shorter chunk changes every"
            " frame, docs/latentsync-1.0.md)"
            if low == high
            else ""
        ),
    )
    validate_latentsync(e.latentsync)
    a = config.api
    _check(0.1 <= a.max_audio_s <= 3600, "api.max_audio_s", a.max_audio_s, "0.1..3600")
    _check(0.01 <= a.max_upload_mb <= 2048, "api.max_upload_mb", a.max_upload_mb, "0.01..2048")
    _check(1 <= a.max_queued <= 1000, "api.max_queued", a.max_queued, "1..1000")
    _check(a.token is None or len(a.token) >= 16, "api.token", "<hidden>", "at least 16 characters, or null")
    _check(0.5 <= a.decode_timeout_s <= 600, "api.decode_timeout_s", a.decode_timeout_s, "0.5..600")
    _check(0 <= a.rate_limit_per_min <= 100000, "api.rate_limit_per_min", a.rate_limit_per_min, "0..100000")
    _check(1 <= a.max_long_lived <= 1024, "api.max_long_lived", a.max_long_lived, "1..1024")
    _check(0.5 <= a.send_timeout_s <= 600, "api.send_timeout_s", a.send_timeout_s, "0.5..600")
    _check(0 <= a.mutations_per_min <= 10**6, "api.mutations_per_min", a.mutations_per_min, "0..1000000")
    _check(0 <= a.auth_failures_per_min <= 10**6, "api.auth_failures_per_min", a.auth_failures_per_min, "0..1000000")
    t = config.tasks
    _check(0 <= t.generate_ahead <= 64, "tasks.generate_ahead", t.generate_ahead, "0..64")
    _check(32 <= t.max_frames_ahead <= 100000, "tasks.max_frames_ahead", t.max_frames_ahead, "32..100000")
    _check(0 <= t.max_finished <= 100000, "tasks.max_finished", t.max_finished, "0..100000")
    ss = config.speech_stream
    _check(1 <= ss.max_open <= 64, "speech_stream.max_open", ss.max_open, "1..64")
    _check(1.0 <= ss.max_buffered_s <= 600, "speech_stream.max_buffered_s", ss.max_buffered_s, "1..600")
    _check(0.5 <= ss.idle_timeout_s <= 600, "speech_stream.idle_timeout_s", ss.idle_timeout_s, "0.5..600")
    _check(1 <= ss.max_text_chars <= 100000, "speech_stream.max_text_chars", ss.max_text_chars, "1..100000")
    _check(
        re.fullmatch(r"[A-Za-z0-9_+\-/]{1,40}", ss.tts_voice) is not None,
        "speech_stream.tts_voice",
        ss.tts_voice,
        "an espeak-ng voice name like en, en-us, de",
    )
    wpm_low, wpm_high = TTS_RATE_RANGE_WPM
    _check(
        wpm_low <= ss.tts_rate_wpm <= wpm_high, "speech_stream.tts_rate_wpm", ss.tts_rate_wpm, f"{wpm_low}..{wpm_high}"
    )
    _check(0.5 <= ss.tts_timeout_s <= 120, "speech_stream.tts_timeout_s", ss.tts_timeout_s, "0.5..120")
    _check(0 <= ss.start_margin_s <= 5, "speech_stream.start_margin_s", ss.start_margin_s, "0..5")
    _check(0.5 <= ss.max_utterance_s <= 86400, "speech_stream.max_utterance_s", ss.max_utterance_s, "0.5..86400")
    _check(0.1 <= ss.starve_timeout_s <= 600, "speech_stream.starve_timeout_s", ss.starve_timeout_s, "0.1..600")
    _check(0 <= ss.min_arrival_ratio <= 1, "speech_stream.min_arrival_ratio", ss.min_arrival_ratio, "0..1")
    _check(1 <= ss.max_feeder_items <= 100000, "speech_stream.max_feeder_items", ss.max_feeder_items, "1..100000")
    _check(
        1024 <= ss.max_message_bytes <= 64 * 2**20,
        "speech_stream.max_message_bytes",
        ss.max_message_bytes,
        "1024..67108864 bytes",
    )
    _check(
        ss.max_message_bytes <= ss.max_queued_bytes <= 1 << 30,
        "speech_stream.max_queued_bytes",
        ss.max_queued_bytes,
        "speech_stream.max_message_bytes..1073741824 bytes",
    )
    _check(
        1 << 16 <= ss.max_feeder_bytes <= 1 << 32,
        "speech_stream.max_feeder_bytes",
        ss.max_feeder_bytes,
        "65536..4294967296 bytes",
    )
    w = config.webrtc
    _check(1 <= w.max_viewers <= 64, "webrtc.max_viewers", w.max_viewers, "1..64")
    _check(
        64 <= w.max_height <= 4320 and w.max_height % 2 == 0,
        "webrtc.max_height",
        w.max_height,
        "an even number of rows in 64..4320",
    )
    _check(100 <= w.video_bitrate_kbps <= 50000, "webrtc.video_bitrate_kbps", w.video_bitrate_kbps, "100..50000")
    _check(0.1 <= w.keyframe_interval_s <= 10, "webrtc.keyframe_interval_s", w.keyframe_interval_s, "0.1..10")
    _check(0.1 <= w.viewer_queue_s <= 10, "webrtc.viewer_queue_s", w.viewer_queue_s, "0.1..10")
    _check(1 <= w.connect_timeout_s <= 120, "webrtc.connect_timeout_s", w.connect_timeout_s, "1..120")
    _check(1 <= w.signalling_timeout_s <= 60, "webrtc.signalling_timeout_s", w.signalling_timeout_s, "1..60")
    fr = config.frames
    _check(1 <= fr.max_clients <= 64, "frames.max_clients", fr.max_clients, "1..64")
    _check(0.1 <= fr.client_queue_s <= 10, "frames.client_queue_s", fr.client_queue_s, "0.1..10")
    _check(1 <= fr.jpeg_quality <= 100, "frames.jpeg_quality", fr.jpeg_quality, "1..100")
    _check(100 <= fr.h264_bitrate_kbps <= 50000, "frames.h264_bitrate_kbps", fr.h264_bitrate_kbps, "100..50000")
    _check(0.1 <= fr.keyframe_interval_s <= 10, "frames.keyframe_interval_s", fr.keyframe_interval_s, "0.1..10")
    _check(0.5 <= fr.hello_timeout_s <= 60, "frames.hello_timeout_s", fr.hello_timeout_s, "0.5..60")
    u = config.ui
    _check(1 <= u.max_event_clients <= 256, "ui.max_event_clients", u.max_event_clients, "1..256")
    _check(0.05 <= u.event_poll_s <= 10, "ui.event_poll_s", u.event_poll_s, "0.05..10")
    _check(16 <= u.event_queue_events <= 100000, "ui.event_queue_events", u.event_queue_events, "16..100000")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR")
    _check(config.log.level.upper() in levels, "log.level", config.log.level, f"one of {levels}")
    _check(1 <= e.max_avatars_per_worker <= 64, "engine.max_avatars_per_worker", e.max_avatars_per_worker, "1..64")
    _validate_channels(config)


def _validate_channels(config: AppConfig) -> None:
    """Names, limits and each channel's own stream/avatar values (the message names the channel)."""
    _check(1 <= config.max_channels <= 256, "max_channels", config.max_channels, "1..256")
    _check(
        len(config.channels) + 1 <= config.max_channels,
        "channels",
        f"{len(config.channels) + 1} channels",
        f"at most max_channels = {config.max_channels} (main included)",
    )
    names = {DEFAULT_CHANNEL}
    derived_configs = channel_configs(config)
    urls = {t.url.url for t in channel_outputs(derived_configs[DEFAULT_CHANNEL]) if t.kind.networked}
    for i, ch in enumerate(config.channels):
        key = f"channels[{i}]"
        _check(
            CHANNEL_NAME_RE.fullmatch(ch.name) is not None,
            f"{key}.name",
            ch.name,
            "lower-case letters, digits, - and _ (1..32, starting with a letter or digit)",
        )
        _check(
            ch.name not in names,
            f"{key}.name",
            ch.name,
            f"a name not used by another channel ({DEFAULT_CHANNEL!r} is the top-level stream)",
        )
        names.add(ch.name)
        _check(
            ch.rtmp_url is not None or bool(ch.outputs),
            f"{key}.rtmp_url",
            None,
            "the channel's own rtmp:// URL, or its outputs",
        )
        if ch.avatar is not None:
            _check(
                AVATAR_ID_RE.fullmatch(ch.avatar) is not None,
                f"{key}.avatar",
                ch.avatar,
                "the id of an avatar uploaded with POST /avatars (av- and 12 hex digits)",
            )
            _check(
                ch.idle_video is None and ch.video is None,
                f"{key}.avatar",
                ch.avatar,
                "no idle_video or video beside it (the uploaded avatar is both)",
            )
            _check(
                uploaded_avatar_video(config.avatar.cache_dir, ch.avatar).is_file(),
                f"{key}.avatar",
                ch.avatar,
                "an avatar uploaded with POST /avatars that still exists (GET /avatars lists them)",
            )
        try:
            targets = channel_outputs(derived_configs[ch.name], f"{key}.outputs")
        except ConfigError as exc:
            raise ConfigError(f"{key} ({ch.name}): {exc}") from None
        field_name = f"{key}.outputs" if ch.outputs else f"{key}.rtmp_url"
        for t in targets:
            if t.kind.networked:
                _check(t.url.url not in urls, field_name, "<hidden>", "a URL no other channel sends to")
                urls.add(t.url.url)
    for name, derived in derived_configs.items():
        if name == DEFAULT_CHANNEL:
            continue
        try:
            validate(derived)
        except ConfigError as exc:
            index = next(i for i, ch in enumerate(config.channels) if ch.name == name)
            raise ConfigError(f"channels[{index}] ({name}): {exc}") from None


#: What a channel's ``rtmp_url`` must be (:func:`latentsync.output_urls.parse_output_url`'s rules):
#: what FFmpeg reads as syntax, whitespace and control characters refused.
RTMP_URL_WANT = "an rtmp:// or rtmps:// URL with a host, without whitespace, quotes or any of | [ ] \\ %"
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+|\[?[0-9A-Fa-f:.]+\]?")


def rtmp_host(url: str) -> str | None:
    r"""The host of an ``rtmp://``/``rtmps://`` URL (lower case, IPv6 without brackets); None if the URL is refused.

    The rules are the outputs' (:func:`latentsync.output_urls.parse_output_url`): another scheme, no
    host, whitespace, control characters, quotes, ``| [ ] \ %`` (outside an IPv6 literal) are refused.
    """
    try:
        parsed = parse_output_url(url)
    except OutputUrlError:
        return None
    return parsed.host if parsed.kind is OutputKind.rtmp else None


_ORIGIN_RE = re.compile(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``), including ``[::1]``.

    Args:
        host: A listen address or a URL's host part.
    """
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_latentsync(ls: LatentSyncConfig, section: str = "engine.latentsync") -> None:
    """Check the ``engine.latentsync`` values (the engine checks its settings with this too).

    Args:
        ls: The section.
        section: Its key, for messages.

    Raises:
        ConfigError: Naming the first key whose value is out of range.
    """
    _check(isinstance(ls.dtype, DType), f"{section}.dtype", ls.dtype, f"one of {[d.value for d in DType]}")
    steps, scale = ls.inference_steps, ls.guidance_scale
    low, high = INFERENCE_STEPS_RANGE
    _check(
        isinstance(steps, int) and not isinstance(steps, bool) and low <= steps <= high,
        f"{section}.inference_steps",
        steps,
        f"an integer in {low}..{high}",
    )
    low, high = GUIDANCE_SCALE_RANGE
    _check(
        isinstance(scale, int | float) and not isinstance(scale, bool) and low <= scale <= high,
        f"{section}.guidance_scale",
        scale,
        f"{low:g}..{high:g}",
    )
    _check(isinstance(ls.seed, int) and not isinstance(ls.seed, bool), f"{section}.seed", ls.seed, "an integer")


def to_yaml(config: AppConfig) -> str:
    """Render a configuration as YAML (``--print-config``) with stream keys, output secrets and the token hidden."""
    node = OmegaConf.structured(config)
    node.stream.rtmp_url = redact_rtmp_url(config.stream.rtmp_url)
    for out_node, out in zip(node.stream.outputs, config.stream.outputs, strict=True):
        out_node.url = redact_output_url(out.url)
        out_node.bearer_token = "***" if out.bearer_token else None
    for ch_node, ch in zip(node.channels, config.channels, strict=True):
        ch_node.rtmp_url = redact_rtmp_url(ch.rtmp_url) if ch.rtmp_url else None
        for out_node, out in zip(ch_node.outputs or [], ch.outputs or [], strict=True):
            out_node.url = redact_output_url(out.url)
            out_node.bearer_token = "***" if out.bearer_token else None
    if config.api.token is not None:
        node.api.token = "***"
    return OmegaConf.to_yaml(node)


def redact_rtmp_url(url: str) -> str:
    """Hide the stream key (the last path element) and any credentials of an RTMP URL.

    ``rtmp://user:pw@host:1935/live/secretkey`` becomes ``rtmp://host:1935/live/***``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    hostpart, slash, path = rest.partition("/")
    hostpart = hostpart.rsplit("@", 1)[-1]
    app, _, _key = path.rpartition("/")
    return f"{scheme}://{hostpart}{slash}{app + '/' if app else ''}***" if slash else f"{scheme}://{hostpart}"
