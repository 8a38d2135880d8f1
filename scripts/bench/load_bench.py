#!/usr/bin/env python3
"""Load benchmark: many concurrent uploads against one server; it must answer only 202 or 429.

    scripts/rtmp_server.sh start
    .venv/bin/python scripts/bench/load_bench.py [--requests 200] [--clients 20] [key=value ...]
    .venv/bin/python scripts/bench/load_bench.py --url http://127.0.0.1:11001 [--pid PID]

``--requests`` POSTs of a short real speech clip from ``--clients`` threads (stdlib urllib, loopback
only, each thread a bounded loop), then every accepted task is cancelled so the server drains. It
prints latencies (median/p95/max ms) and counts by status, and checks:

* every answer is 202 or 429 (no 5xx, no connection error);
* the server process's RSS (``VmRSS`` in ``/proc/<pid>/status``) grew by at most ``--max-rss-growth-mb``
  (measured after a warm-up burst of one upload per client, so first-use allocations do not count);
* ``/health`` reports the same number of dropped ticks before and after.

Without ``--url`` the bench starts its own ``infer_serv.py`` (parametric engine, default
``api.max_queued`` 16, so most uploads get 429) publishing to the local RTMP server and stops it at
the end. With ``--url`` the RSS check needs ``--pid`` (the server's process id) and is skipped
otherwise. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchclient import free_port, http, multipart, publish_url  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import rss_kib  # noqa: E402

DATA = ROOT / "tests" / "data" / "media"
HTTP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Answer:
    """One POST's outcome.

    Attributes:
        status: HTTP status, or 0 when the request failed without an answer.
        latency_ms: Wall-clock time from sending the request to reading the whole answer, in ms.
        task_id: The accepted task's id (202 only).
        error: The error code from the body, or the exception text when ``status`` is 0.
    """

    status: int
    latency_ms: float
    task_id: str | None
    error: str | None


def post_loop(url: str, body: bytes, headers: dict, count: int, out: list[Answer], lock: threading.Lock) -> None:
    """POST ``count`` times in a row, appending each :class:`Answer` to ``out``."""
    for _ in range(count):
        t0 = time.perf_counter()
        try:
            status, reply = http("POST", url + "/generate_video", body, headers)
            error = (reply.get("error") or {}).get("code")
            answer = Answer(status, (time.perf_counter() - t0) * 1000, reply.get("task_id"), error)
        except OSError as exc:  # connection refused/reset, timeout: no HTTP answer at all
            answer = Answer(0, (time.perf_counter() - t0) * 1000, None, repr(exc))
        with lock:
            out.append(answer)


def burst(base: str, body: bytes, headers: dict, per_client: list[int]) -> tuple[list[Answer], float]:
    """Run one thread per client, each POSTing its count in a row; returns the answers and the wall time (s)."""
    answers: list[Answer] = []
    lock = threading.Lock()
    threads = [
        threading.Thread(target=post_loop, args=(base, body, headers, n, answers, lock), daemon=True)
        for n in per_client
        if n
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(HTTP_TIMEOUT_S * max(per_client) + 10)
    return answers, time.monotonic() - t0


def cancel_and_drain(base: str, answers: list[Answer]) -> list[str]:
    """DELETE every accepted task, wait until the stream is idle again; returns the cancelled task ids."""
    accepted = [a.task_id for a in answers if a.status == 202 and a.task_id]
    for task_id in accepted:
        http("DELETE", f"{base}/tasks/{task_id}")
    wait_drained(base, 60)
    time.sleep(2.0)  # let freed memory settle before reading RSS
    return accepted


def wait_ready(base: str, server: subprocess.Popen | None, timeout_s: float) -> bool:
    """Wait until ``/health`` is 200 with the engine ready."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            return False
        try:
            status, body = http("GET", base + "/health")
            if status == 200 and body.get("engine_ready"):
                return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def wait_drained(base: str, timeout_s: float) -> dict:
    """Wait until the stream is idle with nothing on air or queued; returns the last ``/health`` body."""
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        body = http("GET", base + "/health")[1]
        workers = body.get("workers") or {}
        if body.get("state") == "idle" and body.get("on_air_task") is None and not workers.get("queued"):
            break
        time.sleep(0.2)
    return body


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def report(answers: list[Answer], wall_s: float) -> None:
    """Print the latency table by status."""
    print(f"| {'status':<14} | {'count':>5} | {'median ms':>9} | {'p95 ms':>8} | {'max ms':>8} |")
    print(f"|{'-' * 16}|{'-' * 7}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    groups: dict[str, list[float]] = {}
    for a in answers:
        label = f"{a.status} {a.error or ''}".strip() if a.status else "no answer"
        groups.setdefault(label, []).append(a.latency_ms)
    groups["all"] = [a.latency_ms for a in answers]
    for label, ms in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        print(
            f"| {label:<14} | {len(ms):>5} | {statistics.median(ms):>9.1f} | {percentile(ms, 95):>8.1f} "
            f"| {max(ms):>8.1f} |"
        )
    print(f"{len(answers)} requests in {wall_s:.1f} s ({len(answers) / wall_s:.1f} req/s)")


def main() -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--audio", type=Path, default=DATA / "audio" / "4s_Wavfile_1719704064_11.wav")
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--pid", type=int, help="process id of the --url server (for the RSS check)")
    parser.add_argument("--rtmp-port", type=int, default=1935, help="local RTMP server port (own server only)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the server started here")
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1:
        parser.error("--requests and --clients must be at least 1")
    if not args.audio.is_file():
        print(f"audio clip missing: {args.audio}", file=sys.stderr)
        return 2

    server = None
    log = None
    pid = args.pid
    if args.url:
        base = args.url.rstrip("/")
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        overrides = [
            f"server.port={port}",
            f"stream.rtmp_url={publish_url(args.rtmp_port, f'load{port}')}",
            *args.overrides,
        ]
        (ROOT / ".cache").mkdir(exist_ok=True)
        log = open(ROOT / ".cache" / "load_bench_server.log", "wb")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "infer_serv.py"), *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        pid = server.pid
    try:
        if not wait_ready(base, server, 300):
            print(f"server at {base} did not become ready (log: .cache/load_bench_server.log)", file=sys.stderr)
            return 1
        body, headers = multipart(args.audio.read_bytes(), args.audio.name)
        rss_start = rss_kib(pid) if pid else None
        # Warm-up: one upload per client at once (first decodes, per-thread malloc arenas), then drain.
        warmup, _ = burst(base, body, headers, [1] * args.clients)
        cancel_and_drain(base, warmup)
        _, health_before = http("GET", base + "/health")
        rss_before = rss_kib(pid) if pid else None
        per_client = [args.requests // args.clients + (i < args.requests % args.clients) for i in range(args.clients)]
        answers, wall_s = burst(base, body, headers, per_client)
        accepted = cancel_and_drain(base, answers)
        rss_after = rss_kib(pid) if pid else None
        _, health_after = http("GET", base + "/health")
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        if log is not None:
            log.close()

    print(
        f"Load: {args.requests} POSTs of {args.audio.name} from {args.clients} clients "
        f"({' '.join(args.overrides) or 'defaults'})"
    )
    report(answers, wall_s)
    failures = []
    statuses = {a.status for a in answers}
    if len(answers) != args.requests:
        failures.append(f"{args.requests - len(answers)} requests never finished")
    if not statuses <= {202, 429}:
        odd = [a for a in answers if a.status not in (202, 429)]
        failures.append(f"{len(odd)} answers not 202/429, e.g. {odd[:3]}")
    if rss_before is not None and rss_after is not None:
        growth_mb = (rss_after - rss_before) / 1024
        print(
            f"server RSS: {rss_start / 1024:.1f} MB at start, {rss_before / 1024:.1f} MB after a warm-up burst "
            f"of {args.clients}, {rss_after / 1024:.1f} MB after the load (+{growth_mb:.1f} MB; "
            f"bound {args.max_rss_growth_mb:g} MB)"
        )
        if growth_mb > args.max_rss_growth_mb:
            failures.append(f"RSS grew by {growth_mb:.1f} MB")
    else:
        print("server RSS: not checked (give --pid with --url)")
    dropped = (health_before.get("dropped_ticks"), health_after.get("dropped_ticks"))
    print(
        f"/health dropped ticks: {dropped[0]} before, {dropped[1]} after; late ticks: "
        f"{health_before.get('late_ticks')} before, {health_after.get('late_ticks')} after "
        f"(max lateness {health_after.get('max_tick_lateness_ms')} ms); "
        f"ffmpeg restarts: {health_before.get('ffmpeg_restarts')} -> {health_after.get('ffmpeg_restarts')}"
    )
    if dropped[0] != dropped[1]:
        failures.append(f"dropped ticks went from {dropped[0]} to {dropped[1]}")
    print(f"accepted tasks cancelled: {len(accepted)}; state after drain: {health_after.get('state')}")
    for f in failures:
        print(f"FAIL: {f}")
    print("PASS" if not failures else "FAILED")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
