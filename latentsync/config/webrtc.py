"""The ``webrtc`` section: the WHEP (WebRTC) live view of a channel (docs/webrtc.md)."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

#: Largest WHEP SDP offer, in bytes (a real offer is a few kB).
MAX_SDP_BYTES = 64 * 1024

#: The entry of ``webrtc.allowed_candidate_networks`` that stands for loopback and the networks of
#: the server's own interfaces (enumerated at each offer).
LOCAL_NETWORKS = "local"


def candidate_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """One entry of ``webrtc.allowed_candidate_networks``: a CIDR network, or None for ``"local"``.

    Args:
        entry: ``"local"`` or a network such as ``"10.8.0.0/16"``, ``"fd00::/8"`` or a single
            address (``"192.0.2.7"`` = ``/32``); host bits are ignored (``10.1.2.3/8`` = ``10.0.0.0/8``).

    Returns:
        The network, or None for :data:`LOCAL_NETWORKS`.

    Raises:
        ValueError: If ``entry`` is neither.
    """
    if entry == LOCAL_NETWORKS:
        return None
    if not isinstance(entry, str):
        raise ValueError(f"{entry!r} is not a string")
    return ipaddress.ip_network(entry, strict=False)


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
    ``allowed_candidate_networks``: the networks a viewer's ICE candidates must be in for the server
    to send them connectivity checks (STUN); each entry a CIDR network (``"10.8.0.0/16"``,
    ``"fd00::/8"``, ``"0.0.0.0/0"`` for any IPv4 address) or ``"local"``: loopback (127.0.0.0/8,
    ::1) and the networks of the server's own interfaces (read with ``ifaddr`` at each offer). The
    default ``["local"]`` serves viewers on the host and its LAN; add the networks of a VPN or of
    remote viewers. Other candidates of an offer are removed before aiortc sees them; an offer left
    without any is refused (400 ``no_allowed_candidate``). mDNS (``<uuid>.local``) host candidates
    are kept and checked once aioice has resolved them (docs/webrtc.md).
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
    allowed_candidate_networks: list[str] = field(default_factory=lambda: [LOCAL_NETWORKS])
