"""The outputs of a channel (``stream.outputs``, a channel's ``outputs``) and the ``egress`` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
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
