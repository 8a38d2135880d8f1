#!/usr/bin/env python3
"""Channels benchmark: how many channels one server (one worker pool) keeps on time while all speak.

For n = 1, 2, ... channels, start ``infer_serv.py`` with ``main`` plus n-1 ``channels:`` entries
(each its own stream key on the local nginx-rtmp), every channel at ``--size``; then for
``--duration-s`` every channel posts a 7 s upload every 10 s (channels staggered evenly), and print
one row per n: late, underrun and dropped ticks summed over the channels, time to first frame
(median and max over every task of every channel), and the RSS of the server's process tree (server,
engine workers, FFmpeg) before the speech started. The table stops after the first n with underrun
or dropped ticks or a failed upload (or at ``--max-channels``); late ticks (a tick handled more than
half a frame late, which CPU contention from other processes causes too) are reported, and the
largest n with none of the three is printed. "RSS per extra channel" is (RSS(n) - RSS(1)) / (n - 1).
"Clock queued" is how long the kernel kept the clock threads runnable but waiting for a core during
the speech (``/proc/<pid>/task/<tid>/schedstat``): per channel per second, and per time the thread
got a core, a dispatch (``stream.clock_nice`` keeps both small, ``stream.clock_rt_priority`` near 0).
"Host steal" is the time the hypervisor kept this machine's vCPUs from running during the speech
(``/proc/stat``, all vCPUs, 10 ms resolution; 0 on bare metal): a late tick with steal in its row
may be the host's, not the server's.

    scripts/rtmp_server.sh start
    .venv/bin/python scripts/bench/channels_bench.py --size 512x512 --duration-s 300 [--pool ray] [key=value ...]

Idle video: the built-in default avatar (512x512) scaled to ``--size``, unless ``avatar.idle_video=``
is given. WebRTC egress off. Parametric engine unless overridden.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchclient import free_port, http, multipart, publish_url, steal_ms  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import thread_stats, tree_rss_mb  # noqa: E402

SPEECH = ROOT / "tests" / "data" / "media" / "audio" / "7s_shan_0801_01.wav"
PERIOD_S = 10.0  # each channel speaks a 7 s upload every 10 s


def clock_queueing(pid: int) -> tuple[float, int]:
    """Run delay of the server's clock threads (OS name ``ls-clock``), summed: (ms, timeslices).

    From ``/proc/<pid>/task/<tid>/schedstat`` (time spent runnable but waiting for a core, and the
    number of times the thread got one): how long the kernel kept woken clocks queued.
    """
    ns, slices = 0, 0
    for tid, thread in thread_stats(pid).items():
        if thread.comm != "ls-clock":
            continue
        try:
            _, wait_ns, count = (int(v) for v in Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
        except (OSError, ValueError):  # the thread ended
            continue
        ns, slices = ns + wait_ns, slices + count
    return ns / 1e6, slices


def channel_names(n: int) -> list[str]:
    return ["main"] + [f"ch{i}" for i in range(1, n)]


def health(port: int, name: str) -> dict:
    """The channel's /health body; {} while the server does not answer yet."""
    try:
        return http("GET", f"http://127.0.0.1:{port}/channels/{name}/health", timeout_s=5)[1]
    except OSError:
        return {}


def run(n: int, args, overrides: list[str], log_dir: Path) -> dict:
    port = free_port()
    width, height = (int(v) for v in args.size.split("x"))
    stamp = int(time.time())
    urls = {name: publish_url(args.rtmp_port, f"bench-{stamp}-{name}") for name in channel_names(n)}
    extra = ", ".join(f'{{name: {name}, rtmp_url: "{url}"}}' for name, url in urls.items() if name != "main")
    cmd = [
        sys.executable,
        str(ROOT / "infer_serv.py"),
        f"server.port={port}",
        f"stream.rtmp_url={urls['main']}",
        f"stream.width={width}",
        f"stream.height={height}",
        "webrtc.enabled=false",
        "engine.name=parametric",
        f"max_channels={max(n, 1)}",
        f"channels=[{extra}]",
        *overrides,
    ]
    log = open(log_dir / f"server-{n}.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not all(health(port, name).get("engine_ready") for name in urls):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server with {n} channels did not get ready; see {log.name}")
            time.sleep(0.5)
        time.sleep(3.0)  # settle: FFmpeg connected, first GOPs out
        rss_mb = tree_rss_mb(server.pid)
        before = {name: health(port, name) for name in urls}
        queued_before, steal_before = clock_queueing(server.pid), steal_ms()
        t_start = time.monotonic()
        body, headers = multipart(SPEECH.read_bytes(), SPEECH.name)
        task_urls: dict[str, list[str]] = {name: [] for name in urls}
        errors: list[str] = []

        def speaker(index: int, name: str) -> None:
            start = time.monotonic() + index * PERIOD_S / n
            k = 0
            while (due := start + k * PERIOD_S) < t_end - 7.0:
                time.sleep(max(0.0, due - time.monotonic()))
                status, answer = http("POST", f"http://127.0.0.1:{port}/channels/{name}/generate_video", body, headers)
                if status == 202:
                    task_urls[name].append(answer["status_url"])
                else:
                    errors.append(f"{name}: {status} {answer}")
                k += 1

        t_end = time.monotonic() + args.duration_s
        threads = [threading.Thread(target=speaker, args=(i, name), daemon=True) for i, name in enumerate(urls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.duration_s + 30)
        time.sleep(max(0.0, t_end - time.monotonic()) + 8.0)  # the last uploads play out
        after = {name: health(port, name) for name in urls}
        queued_after, steal_after = clock_queueing(server.pid), steal_ms()
        wall_s = time.monotonic() - t_start
        ttff = []
        for name, tasks in task_urls.items():
            for url in tasks:
                task = http("GET", f"http://127.0.0.1:{port}{url}")[1]
                if task.get("time_to_first_frame_s") is not None:
                    ttff.append(task["time_to_first_frame_s"])
                elif task.get("status") != "done":
                    errors.append(f"{name}: task {task.get('status')} {task.get('error')}")

        def delta(key: str) -> int:
            return sum(after[c][key] - before[c][key] for c in urls)

        return {
            "n": n,
            "late": delta("late_ticks"),
            "underrun": delta("underrun_ticks"),
            "dropped": delta("dropped_ticks"),
            "tasks": len(ttff),
            "ttff_median": statistics.median(ttff) if ttff else float("nan"),
            "ttff_max": max(ttff) if ttff else float("nan"),
            "rss_mb": rss_mb,
            "queued_ms_per_s": (queued_after[0] - queued_before[0]) / n / wall_s,
            "queued_ms_per_slice": (queued_after[0] - queued_before[0]) / max(1, queued_after[1] - queued_before[1]),
            "steal_ms": steal_after - steal_before,
            "errors": errors,
        }
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x512", help="WxH of every channel")
    parser.add_argument("--duration-s", type=float, default=300.0, help="speaking time per row (the issue: 300)")
    parser.add_argument("--min-channels", type=int, default=1, help="first row (RSS per extra channel needs 1)")
    parser.add_argument("--max-channels", type=int, default=8)
    parser.add_argument("--rtmp-port", type=int, default=1935)
    parser.add_argument(
        "--pool", choices=("local", "ray"), default="local", help="pool.backend (ray: a private single-node Ray)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.pool != "local":
        args.overrides = [f"pool.backend={args.pool}", *args.overrides]
    log_dir = Path(tempfile.mkdtemp(prefix="channels-bench-"))
    rows = []
    for n in range(args.min_channels, args.max_channels + 1):
        row = run(n, args, args.overrides, log_dir)
        rows.append(row)
        print(f"n={n}: {row}", file=sys.stderr, flush=True)
        if row["underrun"] or row["dropped"] or row["errors"]:
            break
    base = rows[0]["rss_mb"] if rows[0]["n"] == 1 else None
    print(
        f"\nchannels bench: {args.size}, pool {args.pool}, {args.duration_s:.0f} s per row, each channel a 7 s "
        f"upload every {PERIOD_S:.0f} s (server logs: {log_dir})"
    )
    print(
        "| channels | late ticks | underrun ticks | dropped ticks | tasks | TTFF median s | TTFF max s | RSS MiB "
        "| RSS per extra channel MiB | clock queued ms/s | clock queued ms/dispatch | host steal ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = f"{(r['rss_mb'] - base) / (r['n'] - 1):.0f}" if r["n"] > 1 and base is not None else "-"
        print(
            f"| {r['n']} | {r['late']} | {r['underrun']} | {r['dropped']} | {r['tasks']} | {r['ttff_median']:.2f} "
            f"| {r['ttff_max']:.2f} | {r['rss_mb']:.0f} | {extra} | {r['queued_ms_per_s']:.2f} "
            f"| {r['queued_ms_per_slice']:.3f} | {r['steal_ms']:.0f} |"
        )
    ok = [r["n"] for r in rows if not (r["late"] or r["underrun"] or r["dropped"] or r["errors"])]
    on_time = [r["n"] for r in rows if not (r["underrun"] or r["dropped"] or r["errors"])]
    print(f"\nlargest number of channels with 0 late, 0 underrun, 0 dropped ticks: {max(ok) if ok else 0}")
    print(f"largest number of channels with 0 underrun, 0 dropped ticks: {max(on_time) if on_time else 0}")
    for r in rows:
        for e in r["errors"][:5]:
            print(f"  n={r['n']}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
