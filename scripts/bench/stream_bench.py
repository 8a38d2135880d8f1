#!/usr/bin/env python3
"""Streaming benchmark: run the real Runtime (controller + FFmpeg → RTMP) for N seconds and print
a table of tick accounting, CPU use of the controller thread and of FFmpeg, and memory.

    .venv/bin/python scripts/bench/stream_bench.py --seconds 60 [--video FILE] [key=value ...]

Needs an RTMP server (`scripts/rtmp_server.sh start`). By default streams the 832x1248 idle video
from tests/data/media, or the built-in avatar scaled to 832x1248 when that is missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchclient import publish_url  # noqa: E402  (scripts/bench/)

from latentsync.config import load_config  # noqa: E402
from latentsync.serving.ops.procfs import cpu_seconds, rss_mb  # noqa: E402
from latentsync.serving.runtime.runtime import Runtime  # noqa: E402

DEFAULT_VIDEO = ROOT / "tests" / "data" / "media" / "video" / "2s_GirlMuseum_0730.mp4"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO if DEFAULT_VIDEO.is_file() else None)
    parser.add_argument("--rtmp-port", type=int, default=1935, help="port of scripts/rtmp_server.sh's server")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"stream.rtmp_url={publish_url(args.rtmp_port, 'bench')}", *args.overrides]
    if args.video is not None:
        overrides.insert(0, f"avatar.idle_video={args.video}")
    else:
        overrides[:0] = ["stream.width=832", "stream.height=1248"]
    config = load_config(None, overrides)
    runtime = Runtime(config)
    runtime.start()
    try:
        warm_deadline = time.monotonic() + 10
        while not runtime.health()[0] and time.monotonic() < warm_deadline:
            time.sleep(0.1)
        controller, sink = runtime.controller, runtime.sink
        assert controller is not None and sink is not None
        tid = controller.native_thread_id
        ffmpeg_pid = sink.stats().pid
        start = controller.stats()
        t0 = time.monotonic()
        ctl0 = cpu_seconds("self", tid)
        proc0 = cpu_seconds("self")
        ff0 = cpu_seconds(ffmpeg_pid)
        rss_start = rss_mb("self")
        rss_peak = rss_start
        ff_rss_peak = 0.0
        while time.monotonic() - t0 < args.seconds:
            time.sleep(0.5)
            rss_peak = max(rss_peak, rss_mb("self"))
            ff_rss_peak = max(ff_rss_peak, rss_mb(ffmpeg_pid))
        wall = time.monotonic() - t0
        end = controller.stats()
        ctl = cpu_seconds("self", tid) - ctl0
        proc = cpu_seconds("self") - proc0
        ff = cpu_seconds(ffmpeg_pid) - ff0
        sink_stats = sink.stats()
    finally:
        runtime.close()

    width, height = runtime.stream_size or (0, 0)
    rows = [
        ("stream", f"{width}x{height} @ {config.stream.fps} fps, {config.stream.audio_sample_rate} Hz"),
        ("duration (s)", f"{wall:.1f}"),
        ("frames emitted", f"{end.frames_emitted - start.frames_emitted}"),
        ("expected frames", f"{wall * config.stream.fps:.0f}"),
        ("late ticks", f"{end.late_ticks - start.late_ticks}"),
        ("dropped ticks", f"{end.dropped_ticks - start.dropped_ticks}"),
        ("max tick lateness (ms)", f"{end.max_lateness_ms:.2f}"),
        ("controller thread CPU %", f"{100 * ctl / wall:.1f}"),
        ("server process CPU % (all threads)", f"{100 * proc / wall:.1f}"),
        ("ffmpeg CPU % (encode + RTMP)", f"{100 * ff / wall:.1f}"),
        ("server RSS start / peak (MB)", f"{rss_start:.0f} / {rss_peak:.0f}"),
        ("ffmpeg RSS peak (MB)", f"{ff_rss_peak:.0f}"),
        ("ffmpeg restarts", f"{sink_stats.restarts}"),
    ]
    width_col = max(len(r[0]) for r in rows)
    print(f"| {'metric'.ljust(width_col)} | value |")
    print(f"|{'-' * (width_col + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width_col)} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
