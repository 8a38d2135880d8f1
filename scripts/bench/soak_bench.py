#!/usr/bin/env python3
"""Soak benchmark: the server streams for ``--minutes`` while speech is posted every few seconds.

    scripts/rtmp_server.sh start
    .venv/bin/python scripts/bench/soak_bench.py --minutes 20 [--every-s 6] [key=value ...]

The bench starts an RTMP client (FFmpeg recording the live stream to FLV for the whole run) and its
own ``infer_serv.py`` (parametric engine unless overridden) publishing to the local RTMP server, posts
a real speech clip every ``--every-s`` seconds for ``--minutes``, lets the last tasks finish, stops
the server and reports:

* the server process's RSS, open file descriptors by kind (pipes, sockets, FIFOs, files, anonymous
  inodes: ``latentsync.serving.ops.procfs.descriptor_kinds``) and threads at start, after the first
  ``--warmup-tasks`` tasks ended (what a long run should stay at) and at the end, and the entries in
  its private directory;
* A/V drift of the recording: decoded audio duration minus video duration (frames / fps) over the
  whole recording, and the same over its first and its last minute (by packet time);
* late, dropped and underrun ticks and FFmpeg restarts from ``/health``;
* tasks done, failed and cancelled, and uploads refused.

Nothing is asserted: it prints a table (exit status 1 only if the server or the recorder fails).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from benchclient import free_port, http, multipart, publish_url, stop_server  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import descriptor_kinds, rss_mb, thread_count  # noqa: E402
from tests.streamtools import packet_pts_s  # noqa: E402  (the test suite's FLV helpers)

DATA = ROOT / "tests" / "data" / "media"
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
RECORDER_RW_TIMEOUT_S = 10.0  # the recorder ends by itself this long after the publisher is gone
FINAL_STATES = ("done", "failed", "cancelled")
_ASHOWINFO_RE = re.compile(r"pts_time:(-?[\d.]+).*?rate:(\d+) nb_samples:(\d+)")


@dataclass(frozen=True)
class ProcessSnapshot:
    """Resource use of one process.

    Attributes:
        rss_mb: Resident set size in MB (``VmRSS``).
        fds: Open file descriptors by kind (``descriptor_kinds``).
        threads: Threads of the process.
    """

    rss_mb: float
    fds: dict[str, int]
    threads: int


@dataclass(frozen=True)
class Drift:
    """A/V balance of a recording (or a window of it).

    Attributes:
        audio_s: Decoded audio duration in seconds (samples / rate).
        video_s: Video duration in seconds (frames / fps).
    """

    audio_s: float
    video_s: float

    @property
    def drift_ms(self) -> float:
        """``audio_s - video_s`` in milliseconds."""
        return (self.audio_s - self.video_s) * 1000.0


def snapshot(pid: int) -> ProcessSnapshot:
    """Read RSS, threads and descriptors of ``pid`` from ``/proc``."""
    return ProcessSnapshot(rss_mb(pid), descriptor_kinds(pid), thread_count(pid))


def health(base: str) -> dict:
    """The ``/health`` body (any status), or {} when the server does not answer."""
    try:
        return http("GET", base + "/health")[1]
    except OSError:
        return {}


def video_pts_s(path: Path) -> np.ndarray:
    """Sorted PTS (s) of every video packet of an FLV recording (stream copy, no decode)."""
    return np.sort(packet_pts_s(path, "v", timeout_s=600))


def audio_frames(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Every decoded audio frame of a recording: ``(pts in s, samples per frame, sample rate in Hz)``."""
    out = subprocess.run(
        [
            FFMPEG,
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "info",
            "-i",
            str(path),
            "-map",
            "0:a:0",
            "-af",
            "ashowinfo",
            "-f",
            "null",
            "-",
        ],
        capture_output=True,
        check=True,
        timeout=1200,
    )
    rows = [
        (float(m.group(1)), int(m.group(3)), int(m.group(2)))
        for m in _ASHOWINFO_RE.finditer(out.stderr.decode(errors="replace"))
    ]
    if not rows:
        raise RuntimeError(f"no decoded audio in {path}")
    pts, samples, rates = zip(*rows, strict=True)
    return np.array(pts), np.array(samples), rates[0]


def measure_drift(path: Path, fps: int, window_s: float = 60.0) -> tuple[Drift, Drift, Drift]:
    """A/V drift of a recording: whole, first ``window_s`` and last ``window_s`` (by packet time).

    Args:
        path: The FLV recording.
        fps: The stream's nominal frame rate (frames / fps = video duration).
        window_s: Length of the first/last windows in seconds.

    Returns:
        ``(whole, first window, last window)``.
    """
    vpts = video_pts_s(path)
    apts, samples, rate = audio_frames(path)

    def window(t0: float, t1: float) -> Drift:
        frames = int(np.count_nonzero((vpts >= t0) & (vpts < t1)))
        audio = int(samples[(apts >= t0) & (apts < t1)].sum())
        return Drift(audio / rate, frames / fps)

    whole = Drift(int(samples.sum()) / rate, len(vpts) / fps)
    start, end = vpts[0], vpts[-1] + 1 / fps
    return whole, window(start, start + window_s), window(end - window_s, end)


def main() -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--every-s", type=float, default=6.0, help="seconds between two uploads")
    parser.add_argument("--warmup-tasks", type=int, default=20, help="tasks ended before the warm snapshot")
    parser.add_argument("--audio", type=Path, default=DATA / "audio" / "4s_Wavfile_1719704064_11.wav")
    parser.add_argument("--rtmp-port", type=int, default=1935)
    parser.add_argument("--keep", type=Path, help="keep the recording here (default: deleted)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for the server")
    args = parser.parse_args()
    if args.minutes <= 0 or args.every_s <= 0:
        parser.error("--minutes and --every-s must be positive")
    if not args.audio.is_file():
        print(f"audio clip missing: {args.audio}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> int:
    """Run the soak in ``tmp`` (recording, the server's private directory) and print the report."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = publish_url(args.rtmp_port, f"soak{port}")
    record = args.keep or tmp / "soak.flv"
    server_tmp = tmp / "server"
    server_tmp.mkdir()
    (ROOT / ".cache").mkdir(exist_ok=True)
    log_path = ROOT / ".cache" / "soak_bench_server.log"
    recorder = subprocess.Popen(
        [
            FFMPEG,
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-rw_timeout",
            str(int(RECORDER_RW_TIMEOUT_S * 1e6)),
            "-i",
            url,
            "-c",
            "copy",
            "-y",
            str(record),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    overrides = [f"server.port={port}", f"stream.rtmp_url={url}", *args.overrides]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "infer_serv.py"), *overrides],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TMPDIR=str(server_tmp)),
        )
        try:
            result = soak(args, base, server, server_tmp)
        finally:
            stop_server(server, 15)
    try:
        _, err = recorder.communicate(timeout=RECORDER_RW_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        recorder.kill()
        _, err = recorder.communicate()
    if result is None:
        print(f"server did not become ready (log: {log_path})", file=sys.stderr)
        return 1
    if not record.is_file() or record.stat().st_size == 0:
        print(f"recorder wrote nothing: {err.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return 1
    fps = int(result["health_end"].get("stream", {}).get("fps") or 25)
    whole, first, last = measure_drift(record, fps)
    report(args, result, whole, first, last, server.returncode, record.stat().st_size)
    return 0 if server.returncode == 0 else 1


def soak(args: argparse.Namespace, base: str, server: subprocess.Popen, server_tmp: Path) -> dict | None:
    """Wait for the server, post for ``args.minutes``, let the tasks finish; returns the measurements.

    Args:
        args: The command line.
        base: The server's base URL.
        server: The server process.
        server_tmp: The server's ``TMPDIR`` (its private directory is made inside).

    Returns:
        Snapshots, health bodies and task counts; None if the server never got ready or died.
    """
    deadline = time.monotonic() + 300
    while not health(base).get("engine_ready"):
        if time.monotonic() > deadline or server.poll() is not None:
            return None
        time.sleep(0.3)
    time.sleep(2.0)
    start = snapshot(server.pid)
    health_start = health(base)
    body, headers = multipart(args.audio.read_bytes(), args.audio.name)
    refused: dict[int, int] = {}
    task_ids: list[str] = []
    t_end = time.monotonic() + args.minutes * 60
    next_post = time.monotonic()
    warm: ProcessSnapshot | None = None
    while time.monotonic() < t_end:
        if server.poll() is not None:
            return None
        status, reply = http("POST", base + "/generate_video", body, headers)
        if status == 202:
            task_ids.append(reply["task_id"])
        else:
            refused[status] = refused.get(status, 0) + 1
        if warm is None and len(task_ids) > args.warmup_tasks:
            warmup_id = task_ids[args.warmup_tasks - 1]
            if http("GET", f"{base}/tasks/{warmup_id}")[1].get("status") in FINAL_STATES:
                warm = snapshot(server.pid)
        next_post += args.every_s
        time.sleep(max(0.0, min(next_post, t_end) - time.monotonic()))
    finals: dict[str, int] = {}
    wait_until = time.monotonic() + 120
    for task_id in task_ids:
        task: dict = {}
        while task.get("status") not in FINAL_STATES and time.monotonic() < wait_until:
            task = http("GET", f"{base}/tasks/{task_id}")[1]
            if task.get("status") not in FINAL_STATES:
                time.sleep(0.2)
        finals[task.get("status", "unknown")] = finals.get(task.get("status", "unknown"), 0) + 1
    time.sleep(2.0)
    return {
        "start": start,
        "warm": warm or start,
        "end": snapshot(server.pid),
        "health_start": health_start,
        "health_end": health(base),
        "posted": len(task_ids) + sum(refused.values()),
        "refused": refused,
        "finals": finals,
        "private_entries": sorted(p.name for p in server_tmp.rglob("*") if p.parent != server_tmp),
    }


def report(
    args: argparse.Namespace, r: dict, whole: Drift, first: Drift, last: Drift, exit_code: int | None, record_bytes: int
) -> None:
    """Print the soak table."""
    s, w, e, h0, h1 = r["start"], r["warm"], r["end"], r["health_start"], r["health_end"]
    print(
        f"Soak: {args.minutes:g} min, {args.audio.name} every {args.every_s:g} s "
        f"({' '.join(args.overrides) or 'defaults'}); recording {record_bytes / 2**20:.1f} MB"
    )
    print(f"| {'measure':<40} | {'start':>10} | {'warm':>10} | {'end':>10} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    kinds = sorted(set(s.fds) | set(w.fds) | set(e.fds))
    rows = [
        ("server RSS (MB)", f"{s.rss_mb:.1f}", f"{w.rss_mb:.1f}", f"{e.rss_mb:.1f}"),
        ("server open fds", sum(s.fds.values()), sum(w.fds.values()), sum(e.fds.values())),
        *((f"  of them {k}", s.fds.get(k, 0), w.fds.get(k, 0), e.fds.get(k, 0)) for k in kinds),
        ("server threads", s.threads, w.threads, e.threads),
        ("files in the server's private dir", "", "", len(r["private_entries"])),
        ("ticks", h0.get("ticks"), "", h1.get("ticks")),
        ("late ticks", h0.get("late_ticks"), "", h1.get("late_ticks")),
        ("dropped ticks", h0.get("dropped_ticks"), "", h1.get("dropped_ticks")),
        ("underrun ticks", h0.get("underrun_ticks"), "", h1.get("underrun_ticks")),
        ("max tick lateness (ms)", h0.get("max_tick_lateness_ms"), "", h1.get("max_tick_lateness_ms")),
        ("FFmpeg restarts", h0.get("ffmpeg_restarts"), "", h1.get("ffmpeg_restarts")),
        (
            "worker pool rebuilds",
            (h0.get("workers") or {}).get("rebuilds"),
            "",
            (h1.get("workers") or {}).get("rebuilds"),
        ),
    ]
    for name, a, b, c in rows:
        print(f"| {name:<40} | {a!s:>10} | {b!s:>10} | {c!s:>10} |")
    finals = ", ".join(f"{k} {v}" for k, v in sorted(r["finals"].items())) or "none"
    refused = ", ".join(f"{k}: {v}" for k, v in sorted(r["refused"].items())) or "none"
    print(f"uploads: {r['posted']} posted; tasks {finals}; refused {refused}")
    print(f"| {'A/V in the recording':<40} | {'audio s':>10} | {'video s':>10} | {'drift ms':>9} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 12}|{'-' * 11}|")
    for name, d in (("whole recording", whole), ("first minute", first), ("last minute", last)):
        print(f"| {name:<40} | {d.audio_s:>10.3f} | {d.video_s:>10.3f} | {d.drift_ms:>9.1f} |")
    print(f"private dir at the end: {', '.join(r['private_entries']) or 'empty'}; server exit code: {exit_code}")


if __name__ == "__main__":
    sys.exit(main())
