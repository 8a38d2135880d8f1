#!/usr/bin/env python3
"""Where a channel's CPU goes: py-spy over the server while channels idle or speak, by part of the tick.

Starts ``infer_serv.py`` with ``--channels`` channels at ``--size`` (parametric engine, WebRTC off,
the default avatar), makes every channel speak a 7 s upload every 10 s or leaves them (``--idle``)
idle, and after a warm-up records the server process with py-spy (non-blocking, so the stream is
not disturbed; NumPy and OpenCV count where their Python caller is) for ``--seconds``, reading the CPU time of
every process of the server's tree from /proc. Prints one table: % of one core by part (the server
process's samples by where they are, the engine workers and the FFmpeg encoders by process).

    .venv/bin/pip install py-spy        # not a dependency of the server
    scripts/rtmp_server.sh start
    .venv/bin/python scripts/bench/tick_profile.py [--channels 2] [--size 512x512] [--seconds 30] [--idle]

py-spy needs ptrace (root, or kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchclient import free_port, http, multipart, publish_url  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import command_line, cpu_seconds, descendants, read_stat  # noqa: E402

SPEECH = ROOT / "tests" / "data" / "media" / "audio" / "7s_shan_0801_01.wav"
RATE_HZ = 50
#: (part, markers): a sample belongs to the first part one of whose markers is in its stack.
PARTS = (
    ("paste-back (face into frame)", ("paste_face", "Avatar.paste", "paste (latentsync/avatar.py")),
    ("mixer: crossfades, audio mix", ("_blend", "_mix ", "_mix (", "crossfade")),
    ("FIFO writes to FFmpeg", ("encoder.py",)),
    ("WebRTC encode", ("whep.py",)),
    ("frames WebSocket", ("egress/frames.py",)),
    ("event feed, health", ("events.py", "health.py", "metrics.py")),
    ("HTTP API (uploads)", ("werkzeug", "flask", "api/app.py")),
    ("decode uploads, chunking", ("upload_decoder.py", "chunking.py", "speech_audio.py", "utterance.py", "whisper")),
    ("scheduler, tasks, pool", ("task_manager.py", "task.py", "task_processor.py", "speech_program.py", "pool.py")),
    ("mixer: idle loop, programs", ("mixer.py", "idle.py")),
    ("clock and tap", ("clock.py", "tap.py")),
)


def tree(pid: int) -> dict[int, str]:
    """pid -> kind (server, worker, ffmpeg, other) of the server's process tree."""
    kinds = {pid: "server"}
    for p in descendants(pid):
        cmd = command_line(p)
        kinds[p] = "ffmpeg" if "ffmpeg" in cmd else "worker" if "multiprocessing" in cmd else "other"
    return kinds


def ready(url: str) -> bool:
    try:
        return bool(http("GET", url, timeout_s=2)[1].get("engine_ready"))
    except OSError:
        return False


def speak_forever(base: str, channels: list[str], stop: threading.Event) -> None:
    body, headers = multipart(SPEECH.read_bytes(), SPEECH.name)
    while not stop.is_set():
        for name in channels:
            path = "/generate_video" if name == "main" else f"/channels/{name}/generate_video"
            http("POST", base + path, body, headers)
        stop.wait(10.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--idle", action="store_true", help="no speech: idle channels only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    width, height = (int(v) for v in args.size.split("x"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    names = ["main"] + [f"ch{i}" for i in range(1, args.channels)]
    extra = ", ".join(f'{{name: {n}, rtmp_url: "{publish_url(1935, f"prof-{n}")}"}}' for n in names[1:])
    cmd = [sys.executable, str(ROOT / "infer_serv.py"), f"server.port={port}",
           f"stream.rtmp_url={publish_url(1935, 'prof-main')}", f"stream.width={width}", f"stream.height={height}",
           "webrtc.enabled=false", f"channels=[{extra}]", *args.overrides]  # fmt: skip
    log = tempfile.NamedTemporaryFile(prefix="tick_profile_", suffix=".log", delete=False)
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 180
        while not all(ready(f"{base}/channels/{n}/health") for n in names):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start (log: {log.name})")
            time.sleep(1.0)
        if not args.idle:
            threading.Thread(target=speak_forever, args=(base, names, stop), daemon=True).start()
        time.sleep(12.0)  # warm-up: speech on every channel
        kinds = tree(server.pid)
        before = {p: cpu_seconds(p) for p in kinds}
        h0 = {n: http("GET", f"{base}/channels/{n}/health")[1] for n in names}
        raw = Path(tempfile.mkdtemp()) / "stacks.txt"
        t0 = time.monotonic()
        subprocess.run([py_spy, "record", "--pid", str(server.pid), "--nonblocking", "--rate", str(RATE_HZ),
                        "--duration", str(int(args.seconds)), "--format", "raw", "--output", str(raw)],
                       check=True, capture_output=True, timeout=args.seconds + 60)  # fmt: skip
        wall = time.monotonic() - t0
        after = {p: found.cpu_s for p in kinds if (found := read_stat(p)) is not None}
        h1 = {n: http("GET", f"{base}/channels/{n}/health")[1] for n in names}
    finally:
        stop.set()
        server.terminate()
        server.wait(30)
    by_kind = collections.Counter()
    for p, kind in kinds.items():
        if p in after:
            by_kind[kind] += 100 * (after[p] - before[p]) / wall
    parts = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        part = next((name for name, marks in PARTS if any(m in stack for m in marks)), "other Python and native")
        parts[part] += n
    scale = by_kind["server"] / total if total else 0.0  # samples -> % of one core (the /proc measurement)
    late = sum(h1[n]["late_ticks"] - h0[n]["late_ticks"] for n in names)
    under = sum(h1[n]["underrun_ticks"] - h0[n]["underrun_ticks"] for n in names)
    mode = "idle" if args.idle else "speaking (7 s every 10 s)"
    setup = f"{args.channels} channels at {args.size}, {mode}, {wall:.0f} s, {os.cpu_count()} CPUs"
    print(f"{setup}; late ticks {late}, underrun ticks {under}")
    print(f"{'part':<36} | {'% of one core':>13} | {'per channel':>11}")
    print("-" * 66)
    rows = [(name, count * scale) for name, count in parts.most_common()]
    rows += [
        ("engine workers (parametric render)", by_kind["worker"]),
        ("FFmpeg (x264 + AAC + FLV)", by_kind["ffmpeg"]),
    ]
    for name, pct in rows:
        print(f"{name:<36} | {pct:>13.1f} | {pct / args.channels:>11.1f}")
    all_pct = by_kind["server"] + by_kind["worker"] + by_kind["ffmpeg"] + by_kind["other"]
    label = f"all (server process {by_kind['server']:.1f})"
    print(f"{label:<36} | {all_pct:>13.1f} | {all_pct / args.channels:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
