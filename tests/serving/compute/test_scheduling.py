"""SchedulingPool's boundary with its workers, on a backend of no processes: results are checked
before they reach a task, and delivered before the next dispatch (issue 35)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from latentsync.engines import ChunkResult
from latentsync.serving.compute.jobs import ChunkJob
from latentsync.serving.compute.scheduling_pool import Job, SchedulingPool

FRAMES = 16


class ScriptedPool(SchedulingPool):
    """One worker; the test plays the worker: it answers each call with :meth:`answer`.

    ``dispatch_errors`` are raised by the next dispatches (one each), like a Ray ``remote`` that fails.
    """

    def __init__(self) -> None:
        super().__init__(1, max_batch=1)
        self.busy = False
        self.calls: list[tuple[int, list[Job]]] = []
        self.dispatch_errors: list[Exception] = []

    def _accepting(self) -> bool:
        return True

    def _free_worker(self) -> Any | None:
        return None if self.busy else "worker"

    def _dispatch(self, dispatch_id: int, jobs: list[Job], worker: Any) -> None:
        if self.dispatch_errors:
            raise self.dispatch_errors.pop(0)
        self.busy = True
        self.calls.append((dispatch_id, jobs))

    def answer(self, results: list[Any]) -> None:
        """The worker's call came back with ``results``: the worker is free again."""
        dispatch_id, _ = self.calls[-1]
        self.busy = False
        self._deliver(dispatch_id, results)


def chunk_job(task_id: str, k: int = 0) -> ChunkJob:
    return ChunkJob(
        task_id=task_id,
        chunk_index=k,
        avatar="avatar",
        audio_16k=np.zeros(FRAMES * 640, np.float32),
        rows=(0, FRAMES),
        frame_indices=np.arange(FRAMES, dtype=np.int64),
        due_at=float(k),
    )


def result_for(job: ChunkJob, faces: Any = None, **changes: Any) -> ChunkResult:
    fields: dict[str, Any] = {
        "task_id": job.task_id,
        "chunk_index": job.chunk_index,
        "frame_indices": job.frame_indices,
        "faces": np.zeros((FRAMES, 256, 256, 3), np.uint8) if faces is None else faces,
        "generate_s": 0.0,
    }
    fields.update(changes)
    return ChunkResult(**fields)


class Outcomes:
    def __init__(self) -> None:
        self.done: dict[str, ChunkResult] = {}
        self.errors: dict[str, str] = {}

    def submit(self, pool: SchedulingPool, job: ChunkJob) -> None:
        pool.submit(
            job,
            lambda result: self.done.__setitem__(job.task_id, result),
            lambda reason: self.errors.__setitem__(job.task_id, reason),
        )


@pytest.mark.parametrize(
    ("faces", "changes", "says"),
    [
        (np.zeros((FRAMES, 128, 128, 3), np.uint8), {}, "faces of shape (16, 128, 128, 3) uint8"),
        (np.zeros((FRAMES, 256, 256, 3), np.float32), {}, "faces of shape (16, 256, 256, 3) float32"),
        (np.zeros((FRAMES - 1, 256, 256, 3), np.uint8), {}, "faces of shape (15, 256, 256, 3) uint8"),
        (np.zeros((FRAMES, 256, 256), np.uint8), {}, "faces of shape (16, 256, 256) uint8"),
        ([[0]], {}, "a list"),
        (None, {"chunk_index": 7}, "chunk 7 of task 'bad'"),
        (None, {"task_id": "other"}, "of task 'other'"),
    ],
)
def test_a_wrong_result_fails_its_job_with_the_reason_and_the_pool_serves_the_next(faces, changes, says):
    pool = ScriptedPool()
    outcomes = Outcomes()
    bad, good = chunk_job("bad"), chunk_job("good", 1)
    outcomes.submit(pool, bad)
    outcomes.submit(pool, good)  # queued behind it

    pool.answer([result_for(bad, faces, **changes)])

    assert "bad" not in outcomes.done  # never reaches the task
    assert says in outcomes.errors["bad"] and "chunk 0 of task bad" in outcomes.errors["bad"]
    if not changes:
        assert "expected (16, 256, 256, 3) uint8" in outcomes.errors["bad"]
    assert pool.stats().failed == 1 and pool.stats().completed == 0
    pool.answer([result_for(good)])  # the next job was dispatched and is served
    assert outcomes.done["good"].faces.shape == (FRAMES, 256, 256, 3) and not outcomes.errors.keys() - {"bad"}
    assert pool.stats().completed == 1


def test_a_call_answered_with_too_few_results_fails_the_unanswered_job():
    pool = ScriptedPool()
    outcomes = Outcomes()
    outcomes.submit(pool, chunk_job("a"))
    pool.answer([])
    assert "returned 0 results for a call of 1 jobs" in outcomes.errors["a"]


def test_results_are_delivered_before_a_dispatch_that_raises_and_its_job_is_retried_with_its_deadline():
    pool = ScriptedPool()
    outcomes = Outcomes()
    first, second = chunk_job("first"), chunk_job("second", 1)
    outcomes.submit(pool, first)
    outcomes.submit(pool, second)  # waits for the worker
    pool.dispatch_errors.append(RuntimeError("remote call refused"))

    pool.answer([result_for(first)])  # frees the worker: dispatching "second" raises once

    assert "first" in outcomes.done  # delivered all the same
    assert not outcomes.errors
    (_, jobs), stats = pool.calls[-1], pool.stats()
    assert [j.job.task_id for j in jobs] == ["second"] and jobs[0].attempts == 2  # retried at once
    assert stats.in_flight == 1 and stats.retried == 1 and stats.queued == 0
    assert jobs[0].job.due_at == 1.0 and jobs[0].submitted_at > 0  # its deadline runs from this dispatch


def test_a_job_whose_dispatch_raises_twice_fails_with_the_reason_and_nothing_is_left_running():
    pool = ScriptedPool()
    outcomes = Outcomes()
    outcomes.submit(pool, chunk_job("first"))
    outcomes.submit(pool, chunk_job("second", 1))
    pool.dispatch_errors += [RuntimeError("remote call refused"), RuntimeError("remote call refused")]

    pool.answer([result_for(chunk_job("first"))])

    assert "first" in outcomes.done
    deadline = time.monotonic() + 5
    while "second" not in outcomes.errors and time.monotonic() < deadline:  # failed on a thread of its own
        time.sleep(0.01)
    assert "failed twice (dispatch failed: RuntimeError: remote call refused)" in outcomes.errors["second"]
    stats = pool.stats()
    assert stats.in_flight == 0 and stats.queued == 0 and stats.failed == 1
