"""The ``stream`` section: a channel's clock, frame size, encoder and destinations."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentsync.config.egress import OutputConfig

# Sample rates the FFmpeg AAC encoder accepts (MPEG-4 Audio sampling frequency index table).
AAC_SAMPLE_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


@dataclass(kw_only=True)
class StreamConfig:
    """The live output: clock, encoder and destinations.

    ``width``/``height`` of None take the idle avatar video's own size (rounded down to even), or,
    when its longest side is over ``max_side``, its aspect ratio with the longest side ``max_side``.
    ``crossfade_frames``: length N of every crossfade (idle <-> speech, speech -> speech, an
    interrupt's fade-out, an idle loop switch): N - 1 blended frames, then on the Nth frame what
    comes in, alone (after an interrupt: idle on the Nth tick); 0 or 1: hard cuts. Also the silent
    frames generated after each speech.
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
