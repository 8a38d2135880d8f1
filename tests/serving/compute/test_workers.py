"""WorkerPool with real spawned workers (parametric engine): order, batching, a dead worker mid-batch."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.config import load_config
from latentsync.engines import ChunkRequest
from latentsync.serving.api.app import create_app
from latentsync.serving.compute.jobs import ChunkJob, JobFailed
from latentsync.serving.compute.scheduling_pool import WorkerPoolError
from latentsync.serving.compute.worker_pool import WorkerPool
from latentsync.serving.ops.procfs import descriptor_kinds
from latentsync.serving.runtime.runtime import Runtime
from tests.datafiles import media_file
from tests.streamtools import seconds_until

pytestmark = pytest.mark.workers


@pytest.fixture(scope="module")
def avatar(tmp_path_factory) -> Avatar:
    return Avatar.prepare(
        media_file("video/nanmote002.mp4"), AvatarSettings(fps=25), cache_dir=tmp_path_factory.getbasetemp() / "avatars"
    )


@pytest.fixture
def pool(avatar):
    pool = WorkerPool("parametric", {}, avatar_path=avatar.path, workers=1, max_batch=4, deadline_s=30.0)
    pool.start()
    yield pool
    pool.close()


def audio_16k(seed: int, frames: int = 16) -> np.ndarray:
    """``frames`` frames (at 25 fps) of seeded noise at 16 kHz."""
    return (np.random.default_rng(seed).standard_normal(frames * 640) * 0.1).astype(np.float32)


def job(task_id: str, k: int, avatar, due_at: float | None = None, seed: int = 0) -> ChunkJob:
    """Chunk ``k`` of 16 frames whose features are those of its own 16 frames of noise."""
    return ChunkJob(
        task_id=task_id,
        chunk_index=k,
        avatar=str(avatar.path),
        audio_16k=audio_16k(seed + k),
        rows=(0, 16),
        frame_indices=np.arange(16, dtype=np.int64) + 16 * k,
        due_at=time.monotonic() if due_at is None else due_at,
    )


def submit_all(pool: WorkerPool, avatar, n: int) -> tuple[dict, threading.Event, list]:
    results, errors, done = {}, [], threading.Event()

    def ok(result):
        results[result.chunk_index] = result
        if len(results) == n:
            done.set()

    for k in range(n):
        pool.submit(job("task", k, avatar), ok, errors.append)
    return results, done, errors


def test_queued_chunks_go_in_batches_but_first_chunks_alone(pool, avatar):
    results, done, errors = submit_all(pool, avatar, 6)
    assert done.wait(60), errors
    assert sorted(results) == list(range(6)) and not errors
    for k, result in results.items():
        assert result.faces.shape == (16, 256, 256, 3)
        np.testing.assert_array_equal(result.frame_indices, np.arange(16) + 16 * k)
    stats = pool.stats()
    # chunk 0 alone (it holds back a first frame), then 1-4 together, then 5: three calls for six chunks.
    assert stats.dispatches == 3 and stats.completed == 6 and stats.rebuilds == 0


def test_dead_worker_mid_batch_retries_every_chunk_of_the_batch(pool, avatar):
    results, done, errors = submit_all(pool, avatar, 6)
    time.sleep(0.05)
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    assert done.wait(90), errors
    assert sorted(results) == list(range(6)) and not errors
    stats = pool.stats()
    assert stats.rebuilds >= 1 and stats.retried >= 1


def leftovers(pipes_before: int) -> tuple[int, list[str]]:
    """Pipes this process holds beyond ``pipes_before``, and its threads left by discarded pools."""
    extra = descriptor_kinds().get("pipe", 0) - pipes_before
    return extra, [t.name for t in threading.enumerate() if t.name == "worker-pool-terminate"]


def test_a_replaced_pool_leaves_no_pipe_or_thread_behind(avatar):
    """Issue 38: each worker fault of the chaos soak left 10 pipes (and a thread) in the server for good.

    An idle worker waits for work holding the task queue's read lock, and ``Pool.terminate``
    takes that lock first: with the worker killed (kill -9) or stopped past its deadline (then
    killed) the old pool's terminate waited forever, holding the pool and its pipes. A pool of one
    worker makes that worker the holder every time. Each fault is replaced, the job served, and
    nothing of the old pools stays.
    """
    pool = WorkerPool("parametric", {}, avatar_path=avatar.path, workers=1, max_batch=1, deadline_s=2.0)
    pool.start()
    try:
        results, errors = [], []
        pool.submit(job("warm", 0, avatar), results.append, errors.append)
        assert seconds_until(lambda: results, 60) is not None, errors
        pipes_before = descriptor_kinds().get("pipe", 0)
        for n, sig in enumerate([signal.SIGKILL, signal.SIGSTOP, signal.SIGKILL]):
            old = pool.worker_pids()
            os.kill(old[0], sig)
            if sig == signal.SIGKILL:
                replaced = seconds_until(
                    lambda old=old, n=n: pool.worker_pids() != old and pool.stats().rebuilds == n + 1, 30
                )
                assert replaced is not None
            pool.submit(job(f"after-{n}", 0, avatar), results.append, errors.append)  # a stopped one: its deadline
            assert seconds_until(lambda n=n: len(results) == n + 2, 60) is not None, errors
            assert pool.stats().rebuilds == n + 1
            # the old pool's terminate: a 5 s wait at most when a lock holder dies meanwhile, then its pipes close
            clean = seconds_until(lambda: leftovers(pipes_before) == (0, []), 20) is not None
            assert clean, (signal.Signals(sig).name, leftovers(pipes_before))
        assert not errors
    finally:
        pool.close()


def test_engine_that_cannot_load_is_a_clear_start_error(avatar):
    broken = WorkerPool("parametric", {"no_such_option": 1}, avatar_path=avatar.path, workers=1, start_timeout_s=60)
    with pytest.raises(WorkerPoolError, match="no_such_option"):
        broken.start()
    broken.close()


def test_queue_serves_the_earliest_deadline_first_and_cancel_drops_a_tasks_jobs(avatar):
    pool = WorkerPool("parametric", {}, avatar_path=avatar.path, workers=1, max_batch=1)
    pool.start()
    try:
        order, errors = [], []

        def ok(result):
            order.append((result.task_id, result.chunk_index))

        now = time.monotonic()
        # The first job goes to the free worker at once; the rest wait and leave by due time.
        jobs = [
            ("a", 0, now),
            ("late", 1, now + 50),
            ("soon", 1, now + 10),
            ("late", 2, now + 60),
            ("soon", 2, now + 20),
            ("late", 3, now + 70),
            ("mid", 1, now + 30),
        ]
        for task_id, k, due in jobs:
            pool.submit(job(task_id, k, avatar, due_at=due), ok, errors.append)
        assert pool.cancel("late") == 3  # all three still queued: the worker is busy with ("a", 0)
        assert pool.stats().queued == 3
        deadline = time.monotonic() + 60
        while len(order) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert order == [("a", 0), ("soon", 1), ("soon", 2), ("mid", 1)] and not errors
        assert pool.stats().queued == 0 and pool.stats().completed == 4
    finally:
        pool.close()


def test_rebuilt_pool_whose_engine_cannot_load_is_broken_and_fails_fast(avatar, tmp_path):
    flag = tmp_path / "fail-next-load"
    pool = WorkerPool(
        "tests.flaky_engine:create", {"fail_flag": str(flag)}, avatar_path=avatar.path, workers=1, start_timeout_s=60
    )
    pool.start()
    try:
        results, done, errors = submit_all(pool, avatar, 1)
        assert done.wait(60) and not errors and pool.ready() and pool.broken is None
        flag.touch()  # from now on a fresh worker cannot load its engine
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        failed = threading.Event()
        reasons: list[str] = []

        def on_error(reason: str) -> None:
            reasons.append(reason)
            failed.set()

        pool.submit(job("task", 1, avatar), lambda result: reasons.append("generated on a broken pool"), on_error)
        assert failed.wait(60), "the queued job never failed"
        assert "refuses to load" in reasons[0] and len(reasons) == 1
        assert not pool.ready() and "refuses to load" in pool.broken
        with pytest.raises(JobFailed, match="refuses to load"):  # later jobs fail at once, with the reason
            pool.submit(job("task", 2, avatar), lambda result: None, lambda reason: None)
        stats = pool.stats()
        assert stats.rebuilds == 1 and stats.queued == 0 and stats.in_flight == 0
        # Over HTTP: readiness fails and names the reason (the server's /health on this broken pool).
        runtime = Runtime(load_config(None, []))
        runtime.main.pool = pool
        answer = create_app(runtime).test_client().get("/health?ready=1")
        assert answer.status_code == 503
        assert answer.json["engine_ready"] is False and "refuses to load" in answer.json["engine_error"]
    finally:
        pool.close()


def test_a_worker_answering_wrong_faces_fails_that_job_with_the_reason_and_serves_the_next(avatar, tmp_path):
    """A real worker process whose engine answers faces of the wrong size (``wrong_flag``): the pool's check
    fails that job with a reason naming the shape (the task would fail, never the clock thread), keeps the
    worker (it is alive and answering), and the next job is served whole."""
    flag = tmp_path / "wrong-faces"
    pool = WorkerPool(
        "tests.flaky_engine:create", {"wrong_flag": str(flag)}, avatar_path=avatar.path, workers=1, start_timeout_s=60
    )
    pool.start()
    try:
        side = avatar.faces.shape[1]
        pid = pool.worker_pids()[0]
        flag.touch()
        results, done, errors = submit_all(pool, avatar, 1)
        deadline = time.monotonic() + 60
        while not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert errors and not results, "the wrong answer was neither failed nor delivered"
        assert f"faces of shape (16, {side // 2}, {side // 2}, 3) uint8" in errors[0], errors
        assert f"expected (16, {side}, {side}, 3) uint8" in errors[0] and "chunk 0 of task task" in errors[0], errors
        flag.unlink()
        results, done, errors = submit_all(pool, avatar, 1)
        assert done.wait(60) and not errors, errors
        assert results[0].faces.shape == (16, side, side, 3) and results[0].faces.dtype == np.uint8
        stats = pool.stats()
        assert stats.failed == 1 and stats.completed == 1 and stats.rebuilds == 0
        assert pool.worker_pids() == [pid] and pool.ready() and pool.broken is None
    finally:
        pool.close()


def test_jobs_of_several_avatars_share_one_pool_in_deadline_order_with_an_lru_of_avatars(avatar, tmp_path):
    """Channels share the pool: each job runs on its own avatar, EDF across avatars, batches never mix them."""
    other = Avatar.prepare(
        media_file("video/nanmote002.mp4"), AvatarSettings(fps=25, size=(228, 406)), cache_dir=tmp_path
    )
    assert other.path != avatar.path
    pool = WorkerPool("parametric", {}, avatar_path=avatar.path, workers=1, max_batch=4, max_avatars=1)
    pool.start()
    try:
        order, results, errors = [], {}, []
        rng = np.random.default_rng(3)
        done = threading.Event()

        def ok(result):
            order.append((result.task_id, result.chunk_index))
            results[(result.task_id, result.chunk_index)] = result
            if len(results) == 7:
                done.set()

        now = time.monotonic()
        jobs = [
            ("a", 0, now, avatar),
            ("a", 1, now + 40, avatar),
            ("b", 1, now + 10, other),
            ("a", 2, now + 20, avatar),
            ("b", 2, now + 30, other),
            ("b", 3, now + 35, other),
            ("a", 3, now + 60, avatar),
        ]
        sent = {}
        for task_id, k, due, bound in jobs:
            sent[(task_id, k)] = job(task_id, k, bound, due_at=due, seed=int(rng.integers(1000)))
            pool.submit(sent[(task_id, k)], ok, errors.append)
        assert done.wait(90), errors
        # The first job went to the free worker at once; then earliest deadline first whatever the avatar.
        # Batches (max_batch=4) hold one avatar only: b1 alone (a2 is next), a2 alone, b2+b3, a1+a3.
        assert order == [("a", 0), ("b", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 1), ("a", 3)]
        from latentsync.engines.parametric import ParametricEngine

        for bound, tasks in ((avatar, "a"), (other, "b")):
            engine = ParametricEngine(bound)
            engine.load()
            for (task_id, k), chunk in sent.items():
                if task_id == tasks:  # the worker computed the features of the job's audio, then the faces
                    features = engine.features(chunk.audio_16k, *chunk.rows)
                    request = ChunkRequest(
                        task_id=task_id, chunk_index=k, frame_indices=chunk.frame_indices, features=features
                    )
                    np.testing.assert_array_equal(results[(task_id, k)].faces, engine.generate(request).faces)
        assert pool.loaded_avatars() == [[str(avatar.path)]]  # max_avatars=1: the last one used, the other dropped
        assert pool.stats().dispatches == 5 and not errors
    finally:
        pool.close()
