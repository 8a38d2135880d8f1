#!/usr/bin/env python3
"""Queue benchmark: many long uploads queued at once against a real server.

Starts a private nginx-rtmp (scripts/rtmp_server.sh on free ports) and ``infer_serv.py`` (parametric
engine), POSTs ``--tasks`` uploads of ``--audio-s`` seconds each back to back, then watches the
server for ``--observe-s`` seconds and reports:

  * peak RSS of the server process and all its descendants (engine workers, FFmpeg), in MiB,
  * underrun ticks while a task was on air (``/health`` ``underrun_ticks`` grows only then),
  * per task: state, chunks generated and time to first frame (TTFF) when it reached the air.

    .venv/bin/python scripts/bench/queue_bench.py --tasks 16 --audio-s 300 --observe-s 120
    .venv/bin/python scripts/bench/queue_bench.py --repo /tmp/base   # the same bench on another checkout

``--repo`` picks the checkout whose ``infer_serv.py`` runs (default: this one), so one bench
compares two versions of the server. Speech is tests/data/media/audio/7s_shan_0801_01.wav looped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
from benchclient import free_port, http, multipart, publish_url, stop_server  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import tree_rss_mb  # noqa: E402

SPEECH = ROOT / "tests" / "data" / "media" / "audio" / "7s_shan_0801_01.wav"
SAMPLE_INTERVAL_S = 0.5


def looped_speech(seconds: float, out: Path) -> bytes:
    """``seconds`` of the test speech looped, as 16 kHz mono 16-bit WAV bytes."""
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-stream_loop",
        "-1",
        "-i",
        str(SPEECH),
        "-t",
        f"{seconds}",
        "-ac",
        "1",
        "-ar",
        "16000",
        "-y",
        str(out),
    ]
    subprocess.run(cmd, check=True, timeout=120)
    return out.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--audio-s", type=float, default=300.0)
    parser.add_argument("--observe-s", type=float, default=120.0)
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout whose infer_serv.py runs")
    parser.add_argument("overrides", nargs="*", help="extra key=value server overrides")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="queue-bench-"))
    rtmp_port, http_port, api_port = free_port(), free_port(), free_port()
    rtmp_env = dict(
        os.environ, RTMP_PORT=str(rtmp_port), RTMP_HTTP_PORT=str(http_port), RTMP_RUN_DIR=str(work / "rtmp")
    )
    rtmp_script = ["bash", str(ROOT / "scripts" / "rtmp_server.sh")]
    subprocess.run([*rtmp_script, "start"], env=rtmp_env, check=True, capture_output=True, timeout=60)
    base = f"http://127.0.0.1:{api_port}"
    overrides = [
        f"server.port={api_port}",
        f"stream.rtmp_url={publish_url(rtmp_port, f'queue{api_port}', rtmp_env)}",
        "engine.name=parametric",
        f"api.max_queued={args.tasks}",
        f"api.max_audio_s={args.audio_s + 1}",
        "api.max_upload_mb=200",
        "api.rate_limit_per_min=0",
        f"avatar.cache_dir={work / 'avatars'}",
        *args.overrides,
    ]
    log = open(work / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, str(args.repo / "infer_serv.py"), *overrides],
        cwd=args.repo,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        content = looped_speech(args.audio_s, work / "speech.wav")
        deadline = time.monotonic() + 300
        while True:
            try:
                if http("GET", base + "/health", timeout_s=2)[1].get("engine_ready"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print(f"server did not become ready; log in {work / 'server.log'}", file=sys.stderr)
                return 1
            time.sleep(0.3)
        peak_mb = idle_mb = tree_rss_mb(server.pid)
        ids: list[str] = []
        t0 = time.monotonic()
        for _ in range(args.tasks):
            body, headers = multipart(content, "speech.wav")
            status, answer = http("POST", base + "/generate_video", body, headers)
            if status != 202:
                print(f"POST answered {status}: {answer}", file=sys.stderr)
                return 1
            ids.append(answer["task_id"])
            peak_mb = max(peak_mb, tree_rss_mb(server.pid))
        posted_s = time.monotonic() - t0
        underruns_on_air = 0
        last_underruns = http("GET", base + "/health")[1].get("underrun_ticks", 0)
        max_pool_queued = 0
        while time.monotonic() - t0 < args.observe_s:
            time.sleep(SAMPLE_INTERVAL_S)
            peak_mb = max(peak_mb, tree_rss_mb(server.pid))
            h = http("GET", base + "/health")[1]
            underruns = h.get("underrun_ticks", 0)
            if h.get("on_air_task") is not None:
                underruns_on_air += underruns - last_underruns
            last_underruns = underruns
            max_pool_queued = max(max_pool_queued, h.get("workers", {}).get("queued", 0))
        tasks = [http("GET", f"{base}/tasks/{task_id}")[1] for task_id in ids]
    finally:
        stop_server(server, 30)
        log.close()
        subprocess.run([*rtmp_script, "stop"], env=rtmp_env, capture_output=True, timeout=60)

    print(
        f"checkout {args.repo}: {args.tasks} uploads x {args.audio_s:g} s (posted in {posted_s:.1f} s), "
        f"observed {args.observe_s:g} s from the first POST"
    )
    print(f"{'task':>4}  {'state':<10} {'chunks':>7}  {'TTFF s':>7}")
    for k, t in enumerate(tasks):
        ttff = t.get("time_to_first_frame_s")
        print(
            f"{k:>4}  {t.get('status', '?'):<10} {t.get('chunks_generated', 0):>7}  "
            f"{'-' if ttff is None else f'{ttff:.2f}':>7}"
        )
    print(f"RSS idle {idle_mb:.0f} MiB, peak {peak_mb:.0f} MiB (server + workers + FFmpeg)")
    print(f"underrun ticks while a task was on air: {underruns_on_air}; peak pool queue: {max_pool_queued} jobs")
    shutil.rmtree(work, ignore_errors=True)  # kept (server.log) only when the bench failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
