#!/usr/bin/env python3
"""Pool benchmark: what the Ray backend adds over the local pool, how it scales, how it recovers.

Parametric engine, 16-frame chunks of an avatar prepared at ``--size``, on a real local Ray
cluster started here (``ray start`` on loopback: a head and, for the scaling and loss rows, a
second node, one CPU each; :class:`tests.raycluster.RayCluster`). Rows:

1. Added latency per chunk: one job at a time, ``--chunks`` times; the figure is the time from
   ``submit`` to the result's callback minus the engine's own time in the worker
   (``ChunkResult.generate_s``; the features, computed in the worker, count as pool cost): what
   the pool itself costs (queues, IPC or Ray, faces coming back).
2. Chunks per second with 1 and with 2 Ray nodes (one CPU actor per node), ``--chunks`` queued at once.
3. Faults: an actor's process SIGKILLed with a call in flight (time to that chunk done elsewhere,
   and to the actor back after Ray's restart and our ping); the head's GCS stopped for 5 s while
   chunks flow (chunks done meanwhile); time from a node's loss (its raylet and everything under
   it SIGKILLed, with a call held in flight on it) to that call's chunk done on the other node,
   with ``--deadline-s`` as the chunk deadline.
4. Network per channel: bytes of one chunk's request (pickled job) and of its returned faces,
   times the 25/16 chunks a speaking channel needs per second.

    .venv/bin/python scripts/bench/pool_bench.py [--size 512x512] [--chunks 60]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from latentsync.avatar import Avatar, AvatarSettings  # noqa: E402
from latentsync.serving.compute.jobs import ChunkJob  # noqa: E402
from latentsync.serving.compute.ray_worker_pool import RayWorkerPool  # noqa: E402
from latentsync.serving.compute.worker_pool import WorkerPool  # noqa: E402
from tests.raycluster import RayCluster  # noqa: E402

VIDEO = ROOT / "tests" / "data" / "media" / "video" / "nanmote002.mp4"
FPS = 25
CHUNK = 16


def job(k: int, avatar: Avatar, due_at: float | None = None) -> ChunkJob:
    audio = (np.random.default_rng(k).standard_normal(CHUNK * 640) * 0.1).astype(np.float32)
    frames = (np.arange(CHUNK, dtype=np.int64) + CHUNK * k) % len(avatar)
    return ChunkJob(
        task_id="bench",
        chunk_index=k,
        avatar=str(avatar.path),
        audio_16k=audio,
        rows=(0, CHUNK),
        frame_indices=frames,
        due_at=due_at or time.monotonic() + k,
    )


class Collector:
    def __init__(self) -> None:
        self.results: dict[int, tuple[float, float]] = {}  # chunk -> (callback time, engine seconds)
        self.errors: list[str] = []
        self.event = threading.Event()
        self.want = 0

    def ok(self, result) -> None:
        self.results[result.chunk_index] = (time.monotonic(), result.generate_s)
        if len(self.results) >= self.want:
            self.event.set()

    def error(self, reason: str) -> None:
        self.errors.append(reason)
        self.event.set()


def added_latency_ms(pool, avatar: Avatar, chunks: int) -> list[float]:
    """Submit-to-callback minus engine time, one chunk at a time (after 3 warm-up chunks)."""
    out = []
    for k in range(chunks + 3):
        c = Collector()
        c.want = 1
        t0 = time.monotonic()
        pool.submit(job(k, avatar), c.ok, c.error)
        if not c.event.wait(60) or c.errors:
            raise RuntimeError(c.errors or "no result")
        done_at, engine_s = c.results[k]
        if k >= 3:
            out.append((done_at - t0 - engine_s) * 1000)
    return out


def throughput(pool, avatar: Avatar, chunks: int) -> float:
    """Chunks per second with ``chunks`` queued at once."""
    c = Collector()
    c.want = chunks
    t0 = time.monotonic()
    for k in range(chunks):
        pool.submit(job(k, avatar, t0 + k), c.ok, c.error)
    if not c.event.wait(300) or c.errors:
        raise RuntimeError(c.errors or "timeout")
    return chunks / (max(t for t, _ in c.results.values()) - t0)


@contextlib.contextmanager
def call_held_on_second_node(
    cluster: RayCluster, avatar: Avatar, deadline_s: float, hold: Path
) -> Iterator[tuple[RayWorkerPool, Collector]]:
    """A pool of one actor per node with two chunks submitted, the second node's stalled in its engine.

    Yields once that call is in flight (the test engine created ``<hold>.held``); the collector
    waits for both chunks.
    """
    options = {"hold_flag": str(hold), "hold_node": "second"}
    pool = RayWorkerPool(
        "tests.flaky_engine:create",
        options,
        avatar_path=avatar.path,
        workers=None,
        address=cluster.address,
        deadline_s=deadline_s,
    )
    pool.start()
    try:
        hold.touch()
        c = Collector()
        c.want = 2
        for k in (0, 1):
            pool.submit(job(k, avatar), c.ok, c.error)
        t = time.monotonic()
        while not Path(f"{hold}.held").exists():
            if time.monotonic() - t > 30:
                raise RuntimeError("the second node never took a job")
            time.sleep(0.02)
        yield pool, c
    finally:
        hold.unlink(missing_ok=True)
        pool.close()


def done_after(c: Collector, since: float) -> float:
    """Seconds from ``since`` to the last of the collector's chunks done (raises on an error or after 60 s)."""
    if not c.event.wait(60) or c.errors:
        raise RuntimeError(c.errors or "timeout")
    return max(t for t, _ in c.results.values()) - since


def loss_recovery_s(cluster: RayCluster, avatar: Avatar, deadline_s: float, tmp: Path) -> float:
    """Seconds from the second node's loss (a call held in flight there) to that chunk done on the head."""
    with call_held_on_second_node(cluster, avatar, deadline_s, tmp / "hold") as (_pool, c):
        cluster.kill_node("second")
        return done_after(c, time.monotonic())


def actor_kill_recovery_s(cluster: RayCluster, avatar: Avatar, deadline_s: float, tmp: Path) -> tuple[float, float]:
    """SIGKILL the second node's actor process with a call in flight: (s to that chunk done, s to the actor back)."""
    hold = tmp / "hold-actor"
    with call_held_on_second_node(cluster, avatar, deadline_s, hold) as (pool, c):
        index = pool.actor_nodes().index(cluster.node_id("second"))
        hold.unlink()
        os.kill(pool.worker_stats()[index].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        chunk_s = done_after(c, killed_at)
        while pool.worker_stats()[index].state != "ready":
            if time.monotonic() - killed_at > 120:
                raise RuntimeError("the actor never came back")
            time.sleep(0.05)
        return chunk_s, time.monotonic() - killed_at


def gcs_pause(cluster: RayCluster, avatar: Avatar, pause_s: float = 5.0, chunks: int = 40) -> tuple[int, int, int]:
    """Stop the head's GCS (SIGSTOP) for ``pause_s`` while a chunk is submitted every 0.2 s.

    Returns:
        (chunks done, of which while the GCS was stopped, errors).
    """
    pool = RayWorkerPool("parametric", {}, avatar_path=avatar.path, workers=None, address=cluster.address)
    pool.start()
    try:
        gcs = cluster.pids("gcs_server")[0]
        c = Collector()
        c.want = chunks

        def feed() -> None:
            for k in range(chunks):
                pool.submit(job(k, avatar, time.monotonic() + k), c.ok, c.error)
                time.sleep(0.2)

        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(1.0)
        os.kill(gcs, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            time.sleep(pause_s)
        finally:
            os.kill(gcs, signal.SIGCONT)
        feeder.join()
        c.event.wait(60)
        during = sum(1 for t, _ in c.results.values() if stopped <= t <= stopped + pause_s)
        return len(c.results), during, len(c.errors)
    finally:
        pool.close()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x512", help="WxH of the avatar's frames")
    parser.add_argument("--chunks", type=int, default=60)
    parser.add_argument("--deadline-s", type=float, default=3.0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    avatar = Avatar.prepare(VIDEO, AvatarSettings(fps=FPS, size=(width, height)), cache_dir=tmp / "avatars")
    rows = []

    local = WorkerPool("parametric", {}, avatar_path=avatar.path, workers=1)
    local.start()
    try:
        local_ms = added_latency_ms(local, avatar, args.chunks)
        local_cps = throughput(local, avatar, args.chunks)
    finally:
        local.close()

    cluster = RayCluster().start()
    try:
        one = RayWorkerPool(
            "parametric", {}, avatar_path=avatar.path, workers=1, address=cluster.address
        )  # one actor: one node's worth
        one.start()
        try:
            ray_ms = added_latency_ms(one, avatar, args.chunks)
            one_cps = throughput(one, avatar, args.chunks)
        finally:
            one.close()
        two = RayWorkerPool(
            "parametric", {}, avatar_path=avatar.path, workers=None, address=cluster.address
        )  # one actor per node
        two.start()
        try:
            two_cps = throughput(two, avatar, args.chunks)
        finally:
            two.close()
        kill_chunk_s, kill_back_s = actor_kill_recovery_s(cluster, avatar, args.deadline_s, tmp)
        gcs_done, gcs_during, gcs_errors = gcs_pause(cluster, avatar)
        recovery_s = loss_recovery_s(cluster, avatar, args.deadline_s, tmp)  # last: the second node is gone
    finally:
        cluster.stop()

    sample = job(0, avatar)
    request_b = len(pickle.dumps(sample, protocol=5))
    faces_b = CHUNK * 256 * 256 * 3
    per_s = FPS / CHUNK
    rows += [
        (
            "added latency per chunk, local pool (median / p95)",
            f"{statistics.median(local_ms):.1f} / {pct(local_ms, 95):.1f} ms",
        ),
        ("added latency per chunk, Ray (median / p95)", f"{statistics.median(ray_ms):.1f} / {pct(ray_ms, 95):.1f} ms"),
        ("Ray minus local (median)", f"{statistics.median(ray_ms) - statistics.median(local_ms):+.1f} ms"),
        ("chunks/s: local pool, 1 worker", f"{local_cps:.2f}"),
        ("chunks/s: Ray, 1 node", f"{one_cps:.2f}"),
        ("chunks/s: Ray, 2 nodes", f"{two_cps:.2f} ({two_cps / one_cps:.2f}x)"),
        (
            "actor process killed mid-call -> its chunk done elsewhere / actor back",
            f"{kill_chunk_s:.2f} s / {kill_back_s:.2f} s",
        ),
        (
            "head's GCS stopped 5 s, a chunk every 0.2 s: done / during the stop / errors",
            f"{gcs_done}/40 / {gcs_during} / {gcs_errors}",
        ),
        (f"node lost -> its chunk done elsewhere (deadline {args.deadline_s:g} s)", f"{recovery_s:.2f} s"),
        ("network per speaking channel: requests", f"{request_b * per_s / 1000:.0f} kB/s ({request_b} B per chunk)"),
        ("network per speaking channel: faces back", f"{faces_b * per_s / 1e6:.2f} MB/s ({faces_b} B per chunk)"),
        ("avatar in the object store (once per avatar)", f"{_payload_mb(avatar):.1f} MB"),
    ]
    print(f"\npool bench: parametric, {args.size}, {args.chunks} chunks of {CHUNK} frames per row\n")
    print("| figure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


def _payload_mb(avatar: Avatar) -> float:
    return sum(a.nbytes for a in avatar.engine_payload()["arrays"].values()) / 1e6


if __name__ == "__main__":
    raise SystemExit(main())
