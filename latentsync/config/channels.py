"""The ``channels`` list: more live streams beside ``main``, each with its own avatar (docs/channels.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from latentsync.config.egress import OutputConfig

#: Channel names: lower-case letters, digits, ``-`` and ``_``, up to 32 characters (they appear in
#: URLs, log lines and Prometheus labels).
CHANNEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
#: The channel the top-level ``stream`` and ``avatar`` keys define (today's single stream).
DEFAULT_CHANNEL = "main"


@dataclass(kw_only=True)
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
