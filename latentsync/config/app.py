"""The whole configuration: every section, the channels and their limits.

:func:`latentsync.config.loading.load_config` builds it; :func:`latentsync.config.validation.validate`
checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from latentsync.config.api import ApiConfig
from latentsync.config.avatar import AvatarConfig
from latentsync.config.channels import ChannelConfig
from latentsync.config.egress import EgressConfig
from latentsync.config.engine import EngineConfig
from latentsync.config.frames import FramesConfig
from latentsync.config.log import LogConfig
from latentsync.config.media import MediaConfig
from latentsync.config.pool import PoolConfig
from latentsync.config.server import ServerConfig
from latentsync.config.speech import SpeechStreamConfig
from latentsync.config.stream import StreamConfig
from latentsync.config.tasks import TasksConfig
from latentsync.config.ui import UiConfig
from latentsync.config.webrtc import WebRtcConfig


@dataclass(kw_only=True)
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
