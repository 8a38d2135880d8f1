#!/usr/bin/env python3
"""Frames WebSocket benchmark: server CPU and late ticks with 0, 1 and 4 JPEG clients (encode once).

For each stream size (512x512 and 832x1248 by default) the bench starts its own infer_serv.py
(parametric engine, the 832x1248 idle video from tests/data), then measures the server process's
CPU (its FFmpeg child apart) over ``--seconds`` with 0, 1 and 4 clients receiving JPEG at the
channel's size (clients in a separate process: their decoding is not the server's cost). Goal
(issue 23): the clients after the first cost < 3 % of one core each, 0 late ticks.

    scripts/rtmp_server.sh start      # (RTMP_PORT=... for another port; the bench asks it for the publish URL)
    .venv/bin/python scripts/bench/frames_bench.py [--seconds 20] [--sizes 512x512 832x1248] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchclient import free_port, http, stop_server  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import cpu_seconds  # noqa: E402

VIDEO = ROOT / "tests/data/media/video/2s_GirlMuseum_0730.mp4"
COUNTS = (0, 1, 4)
GOAL_PER_CLIENT_PCT = 3.0


def run_clients(url: str, count: int, fmt: str) -> None:
    """Child process: ``count`` frames clients receiving until SIGTERM; prints their totals as JSON."""
    import simple_websocket

    from latentsync.serving.egress.frames_protocol import split_message

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    totals = [{"ticks": 0, "lost": 0, "bytes": 0} for _ in range(count)]
    sockets = []
    for _ in range(count):
        ws = simple_websocket.Client.connect(url)
        ws.send(json.dumps({"type": "hello", "format": fmt}))
        json.loads(ws.receive(timeout=10))
        sockets.append(ws)

    def receive(ws, total) -> None:
        while not stop.is_set():
            message = ws.receive(timeout=1)
            if isinstance(message, bytes):
                header, _, _ = split_message(message)
                total["ticks"] += 1
                total["lost"] += header.dropped_ticks
                total["bytes"] += len(message)

    pairs = zip(sockets, totals, strict=True)
    threads = [threading.Thread(target=receive, args=pair, daemon=True) for pair in pairs]
    for t in threads:
        t.start()
    print("connected", flush=True)
    while not stop.wait(0.2):
        pass
    for t in threads:
        t.join(5)
    for ws in sockets:
        ws.close()
    print(json.dumps(totals), flush=True)


def measure(base: str, ws_url: str, server_pid: int, seconds: float, fmt: str) -> list[dict]:
    rows = []
    for count in COUNTS:
        child = None
        if count:
            cmd = [sys.executable, __file__, "--clients-child", str(count), "--url", ws_url, "--format", fmt]
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            if child.stdout.readline().strip() != "connected":
                raise SystemExit("clients did not connect")
        time.sleep(2.0)  # settle
        h0 = http("GET", base + "/health")[1]
        c0, t0 = cpu_seconds(server_pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(server_pid), time.monotonic()
        h1 = http("GET", base + "/health")[1]
        clients = []
        if child is not None:
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=30)
            clients = json.loads(out.strip().splitlines()[-1])
        f0, f1 = h0["frames"], h1["frames"]
        rows.append(
            {
                "clients": count,
                "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
                "late": h1["late_ticks"] - h0["late_ticks"],
                "dropped": h1["dropped_ticks"] - h0["dropped_ticks"],
                "encoded": f1["frames_encoded"] - f0["frames_encoded"],
                "ticks": h1["frames_emitted"] - h0["frames_emitted"],
                "client_lost": sum(c["lost"] for c in clients),
                "kb_per_tick": (sum(c["bytes"] for c in clients) / max(1, sum(c["ticks"] for c in clients))) / 1024,
            }
        )
        time.sleep(1.0)
    return rows


def bench_size(size: str, args) -> list[dict]:
    width, height = (int(v) for v in size.split("x"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        str(ROOT / "infer_serv.py"),
        f"server.port={port}",
        f"stream.rtmp_url={args.rtmp_url}",
        f"avatar.idle_video={VIDEO}",
        f"stream.width={width}",
        f"stream.height={height}",
        *args.overrides,
    ]
    log = open(ROOT / "out" / "frames_bench_server.log", "wb") if (ROOT / "out").is_dir() else subprocess.DEVNULL
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if http("GET", base + "/health", timeout_s=2)[1].get("frames") is not None:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        return measure(base, f"ws://127.0.0.1:{port}/ws/frames", server.pid, args.seconds, args.format)
    finally:
        stop_server(server, 15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="CPU window per client count")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "832x1248"])
    parser.add_argument("--format", default="jpeg", choices=["jpeg", "h264", "rgb24"])
    parser.add_argument("--rtmp-url", default="", help="publish URL (default: scripts/rtmp_server.sh publish-url)")
    parser.add_argument("--clients-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.clients_child:
        run_clients(args.url, args.clients_child, args.format)
        return 0
    if not args.rtmp_url:
        script = str(ROOT / "scripts" / "rtmp_server.sh")
        args.rtmp_url = subprocess.run(
            ["bash", script, "publish-url", "frames-bench"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    print(f"{args.format} clients at the channel's size, {args.seconds:g} s per row, {os.cpu_count()} CPUs")
    header = (
        f"{'size':>9} | {'clients':>7} | {'server CPU %':>12} | {'late':>4} | {'dropped':>7} | {'encoded':>7} | "
        f"{'ticks':>5} | {'lost by clients':>15} | {'kB/tick':>7}"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for size in args.sizes:
        rows = bench_size(size, args)
        for r in rows:
            print(
                f"{size:>9} | {r['clients']:>7} | {r['cpu_pct']:>12.1f} | {r['late']:>4} | {r['dropped']:>7} | "
                f"{r['encoded']:>7} | {r['ticks']:>5} | {r['client_lost']:>15} | {r['kb_per_tick']:>7.1f}"
            )
        cpu = {r["clients"]: r["cpu_pct"] for r in rows}
        per_client = (cpu[4] - cpu[1]) / 3
        summary.append(
            f"{size}: first client {cpu[1] - cpu[0]:+.1f} % of one core; clients 2-4 {per_client:+.2f} %/client "
            f"(goal < {GOAL_PER_CLIENT_PCT:g}): {'met' if per_client < GOAL_PER_CLIENT_PCT else 'NOT met'}; "
            f"late ticks {sum(r['late'] for r in rows)}"
        )
    print()
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
