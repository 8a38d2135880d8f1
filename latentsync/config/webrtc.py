"""The ``webrtc`` section: the WHEP (WebRTC) live view of a channel (docs/webrtc.md)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Largest WHEP SDP offer, in bytes (a real offer is a few kB).
MAX_SDP_BYTES = 64 * 1024


class VideoCodec(str, enum.Enum):
    """Video codec of the WebRTC preview (what the one shared encoder produces)."""

    h264 = "h264"  # constrained baseline, packetization-mode 1
    vp8 = "vp8"


@dataclass(kw_only=True)
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
