#!/usr/bin/env python3
"""WebRTC (WHEP) egress benchmark against a real server, real viewers and headless Chromium.

  (a) server CPU (the infer_serv.py process; its FFmpeg child apart) and late ticks with 0, 1, 4
      and 8 WHEP viewers watching (pure-Python aiortc viewers in a separate process),
  (b) POST /generate_video → first speech heard in the browser (an AnalyserNode on the received
      WebRTC audio; the page posts and listens, one clock), median of ``--posts``,
  (c) the browser's playout delay from getStats() (jitter-buffer delay per emitted frame/sample).

    scripts/rtmp_server.sh start      # (RTMP_PORT=... for another port; the bench asks it for the publish URL)
    .venv/bin/python scripts/bench/webrtc_bench.py [--seconds 10] [--posts 10] [key=value ...]

The bench starts its own infer_serv.py (832x1248 idle video from tests/data, parametric engine,
idle audio off so the first speech sample is unmistakable) and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from benchclient import free_port, http, stop_server  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import cpu_seconds  # noqa: E402
from tests.browsertools import launch_chromium  # noqa: E402

VIDEO = ROOT / "tests/data/media/video/2s_GirlMuseum_0730.mp4"
SPEECH = ROOT / "tests/data/media/audio/4s_Wavfile_1719704064_11.wav"


def ready(base: str) -> bool:
    """True once the server answers and its engine accepts uploads."""
    try:
        return bool(http("GET", base + "/health", timeout_s=2)[1].get("engine_ready"))
    except OSError:
        return False


def run_viewers(base: str, count: int) -> None:
    """Child process: ``count`` aiortc WHEP viewers receiving until SIGTERM."""
    from tests.whep_client import WhepViewer

    async def main():
        viewers = [WhepViewer(base) for _ in range(count)]
        for v in viewers:
            status, _, body = await v.connect()
            if status != 201:
                raise SystemExit(f"viewer refused: {status} {body[:200]!r}")
        print("connected", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [asyncio.ensure_future(v.receive(10**9, timeout_s=10**6)) for v in viewers]
        await stop.wait()
        for t in tasks:
            t.cancel()
        for v in viewers:
            await v.close()

    asyncio.run(main())


def cpu_table(base: str, server_pid: int, seconds: float) -> list[tuple]:
    rows = []
    for count in (0, 1, 4, 8):
        child = None
        if count:
            child = subprocess.Popen(
                [sys.executable, __file__, "--viewers-child", str(count), "--base", base],
                stdout=subprocess.PIPE,
                text=True,
            )
            if child.stdout.readline().strip() != "connected":
                raise SystemExit("viewers did not connect")
        time.sleep(2.0)  # settle: ICE, first keyframe
        h0 = http("GET", base + "/health")[1]
        c0, t0 = cpu_seconds(server_pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(server_pid), time.monotonic()
        h1 = http("GET", base + "/health")[1]
        if child is not None:
            child.send_signal(signal.SIGTERM)
            child.wait(15)
        w0, w1 = h0.get("webrtc", {}), h1.get("webrtc", {})
        rows.append(
            (
                count,
                100 * (c1 - c0) / (t1 - t0),
                h1["late_ticks"] - h0["late_ticks"],
                h1["dropped_ticks"] - h0["dropped_ticks"],
                w1.get("viewers"),
                w1.get("frames_encoded", 0) - w0.get("frames_encoded", 0),
                w1.get("inbox_dropped_ticks", 0) - w0.get("inbox_dropped_ticks", 0),
            )
        )
        time.sleep(1.0)
    return rows


BROWSER_TRIAL_JS = """async (b64) => {
  const live = window.latentsync;
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const form = new FormData();
  form.append('audio_file', new Blob([bytes], {type: 'audio/wav'}), 'speech.wav');
  live.arm();
  const t0 = performance.now();
  const r = await fetch('/generate_video', {method: 'POST', body: form});
  if (r.status !== 202) return {error: r.status};
  const deadline = t0 + 15000;
  while (live.heardAt === null && performance.now() < deadline) await new Promise(res => setTimeout(res, 5));
  return {heard_ms: live.heardAt === null ? null : live.heardAt - t0};
}"""


def browser_trials(base: str, posts: int) -> tuple[list[float], dict]:
    from playwright.sync_api import sync_playwright

    audio, rate = sf.read(SPEECH, dtype="int16")
    buf = io.BytesIO()
    sf.write(buf, audio[: int(1.5 * rate)], rate, format="WAV", subtype="PCM_16")
    b64 = base64.b64encode(buf.getvalue()).decode()
    heard = []
    with sync_playwright() as pw:
        browser = launch_chromium(pw, shutil.which("chromium"))
        page = browser.new_page()
        page.goto(base + "/")
        page.wait_for_function(
            "document.getElementById('whep-status').textContent === 'WebRTC connected'", timeout=30000
        )
        time.sleep(3.0)
        for _ in range(posts):
            page.wait_for_function("document.getElementById('state').textContent === 'idle'", timeout=30000)
            time.sleep(0.5)
            result = page.evaluate(BROWSER_TRIAL_JS, b64)
            if result.get("heard_ms") is not None:
                heard.append(result["heard_ms"])
            else:
                print("trial failed:", result, file=sys.stderr)
        stats = page.evaluate("""async () => {
          const s = await window.latentsync.inboundStats(); const out = {};
          for (const k of ['video', 'audio']) { const r = s[k]; if (!r) continue;
            out[k] = {jitter_buffer_ms: 1000 * r.jitterBufferDelay / Math.max(1, r.jitterBufferEmittedCount),
                      target_ms: 1000 * (r.jitterBufferTargetDelay || 0) / Math.max(1, r.jitterBufferEmittedCount),
                      fps: r.framesPerSecond, concealed: r.concealedSamples, samples: r.totalSamplesReceived,
                      decoded: r.framesDecoded, codec: r.codecId}; }
          return out; }""")
        browser.close()
    return heard, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU window per viewer count")
    parser.add_argument("--posts", type=int, default=10)
    parser.add_argument(
        "--rtmp-url", default="", help="publish URL (default: scripts/rtmp_server.sh publish-url webrtc-bench)"
    )
    parser.add_argument("--viewers-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--base", default="", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.viewers_child:
        run_viewers(args.base, args.viewers_child)
        return 0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if not args.rtmp_url:  # the local dev server (scripts/rtmp_server.sh start; RTMP_PORT etc. from the environment)
        script = str(ROOT / "scripts" / "rtmp_server.sh")
        args.rtmp_url = subprocess.run(
            ["bash", script, "publish-url", "webrtc-bench"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    cmd = [
        sys.executable,
        str(ROOT / "infer_serv.py"),
        f"server.port={port}",
        f"stream.rtmp_url={args.rtmp_url}",
        f"avatar.idle_video={VIDEO}",
        "stream.idle_audio=false",
        *args.overrides,
    ]
    log = open(ROOT / "out" / "webrtc_bench_server.log", "wb") if (ROOT / "out").is_dir() else subprocess.DEVNULL
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not ready(base):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.5)
        health = http("GET", base + "/health")[1]
        w = health["webrtc"]
        print(
            f"stream {health['stream']['width']}x{health['stream']['height']} @ {health['stream']['fps']} fps; "
            f"WebRTC preview {w['width']}x{w['height']} {w['codec']}; {os.cpu_count()} CPUs"
        )
        rows = cpu_table(base, server.pid, args.seconds)
        print(
            f"\n{'viewers':>7} | {'server CPU %':>12} | {'late ticks':>10} | {'dropped':>7} | {'encoded':>7} | "
            f"{'inbox drops':>11}"
        )
        print("-" * 72)
        for count, cpu, late, dropped, _, encoded, inbox in rows:
            print(f"{count:>7} | {cpu:>12.1f} | {late:>10} | {dropped:>7} | {encoded:>7} | {inbox:>11}")
        cpu = {r[0]: r[1] for r in rows}
        print(
            f"8th viewer vs 1st: {cpu[8] - cpu[1]:+.1f} % of one core for 7 more viewers "
            f"({(cpu[8] - cpu[1]) / 7:+.2f} %/viewer)"
        )
        heard, stats = browser_trials(base, args.posts)
        print(
            f"\nPOST -> first speech heard in Chromium (AnalyserNode), n={len(heard)}: "
            f"median {statistics.median(heard):.0f} ms, min {min(heard):.0f}, max {max(heard):.0f}"
            if heard
            else "\nno speech heard"
        )
        print("browser playout (getStats inbound-rtp):", json.dumps(stats, indent=1))
    finally:
        stop_server(server, 15)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
