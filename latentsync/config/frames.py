"""The ``frames`` section: the programme as data over ``/ws/frames`` (docs/frames-protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
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
