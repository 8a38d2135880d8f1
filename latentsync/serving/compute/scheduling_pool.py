"""SchedulingPool: the earliest-deadline-first job queue every engine backend shares.

The :class:`~latentsync.serving.compute.jobs.JobQueue` of the task side. Jobs wait in our own
bounded priority queue, earliest deadline first: every job carries ``due_at``, the monotonic time
by which its first frame must be on air (docs/scheduling.md). At most one call per worker is in
flight, so a job's run deadline counts from when a worker takes it. A job whose worker was lost
is retried once, then failed with a reason. The backends: :class:`~latentsync.serving.compute.
worker_pool.WorkerPool` (local processes) and :class:`~latentsync.serving.compute.ray_worker_pool.
RayWorkerPool` (Ray actors).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from latentsync.engines import ChunkResult
from latentsync.serving.compute.jobs import ChunkJob, JobFailed, result_problem

logger = logging.getLogger(__name__)


class WorkerPoolError(RuntimeError):
    """The workers could not start (the message carries the worker's own error)."""


class ClusterUnreachable(WorkerPoolError):
    """The cluster the workers run on cannot be reached now (it may come back: worth retrying)."""


@dataclass(kw_only=True)
class Job:
    """A queued or running chunk job with its callbacks and its attempts."""

    key: int
    job: ChunkJob
    on_done: Callable[[ChunkResult], None]
    on_error: Callable[[str], None]
    attempts: int = 0
    submitted_at: float = 0.0
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True, kw_only=True)
class PoolStats:
    """Counters of the pool.

    Attributes:
        workers: Worker processes per pool.
        in_flight: Jobs running in a worker.
        queued: Jobs waiting for a worker.
        rebuilds: Times the pool was replaced after a dead or hung worker.
        retried: Jobs resubmitted after a failure.
        failed: Jobs that failed for good.
        completed: Jobs finished successfully.
        dispatches: Calls sent to workers (a batch of chunks is one call).
    """

    workers: int
    in_flight: int
    queued: int
    rebuilds: int
    retried: int
    failed: int
    completed: int
    dispatches: int


class SchedulingPool:
    """The scheduler every backend shares: a bounded earliest-deadline-first queue, one call per worker.

    Jobs wait in a heap ordered by ``due_at`` (the monotonic time by which their first frame must
    be on air); a free worker takes the earliest, with the chunks of the same avatar due right
    after it up to ``max_batch``. A backend (:class:`WorkerPool` for local processes,
    :class:`latentsync.serving.compute.ray_worker_pool.RayWorkerPool` for Ray actors) says when a
    worker is free (:meth:`_free_worker`) and sends a call (:meth:`_dispatch`); it then reports the
    call's results (:meth:`_deliver`), an engine error (:meth:`_engine_failed`, deterministic: no
    retry) or a lost worker (:meth:`_requeue`: retried once, then failed with the reason).

    Args:
        workers: Workers the backend runs (``stats().workers``).
        on_chunk_done: Called with ``(frames, seconds from dispatch to result)`` for every chunk.
        max_batch: Queued chunks a free worker takes at once (a task's first chunk always alone).
        deadline_s: Seconds a call may take per job before the backend gives up on its worker.
        max_queued: Jobs the queue holds at most.
    """

    def __init__(
        self,
        workers: int,
        *,
        on_chunk_done: Callable[[int, float], None] | None = None,
        max_batch: int = 1,
        deadline_s: float = 60.0,
        max_queued: int = 4096,
    ):
        self._workers = int(workers)
        self._on_chunk_done = on_chunk_done
        self._max_batch = max(1, int(max_batch))
        self._deadline_s = float(deadline_s)
        self._max_queued = int(max_queued)
        self._lock = threading.RLock()
        self._running: dict[int, list[Job]] = {}  # dispatch id -> jobs sent together (one worker each)
        self._queue: list[tuple[float, int, Job]] = []  # heap of (due_at, key, job): waiting for a worker
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._rebuilds = 0
        self._retried = 0
        self._failed = 0
        self._completed = 0
        self._dispatches = 0
        self._broken: str | None = None  # why the pool cannot serve (its workers could not load)
        self._exit_unsafe = False  # a backend left in a state the interpreter's teardown would crash on

    # ----------------------------------------------------------------- what every backend provides
    def start(self) -> None:
        """Start the workers and wait until every one has loaded its engine (raises :class:`WorkerPoolError`)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers; pending jobs fail with "shutting down". Safe to call twice."""
        raise NotImplementedError

    def ready(self) -> bool:
        """True while the workers run and the pool is not broken."""
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        """Process ids of the workers (for Ray: each on its own node)."""
        raise NotImplementedError

    def loaded_avatars(self, timeout_s: float = 5.0) -> list[list[str]]:
        """The avatar keys the workers hold loaded, least recently used first (tests, /health)."""
        raise NotImplementedError

    def worker_stats(self) -> list[Any]:
        """Per-worker figures (node, jobs, latency, failures) where the backend tracks them; else empty."""
        return []

    # ----------------------------------------------------------------- backend hooks (lock held)
    def _accepting(self) -> bool:
        """Whether the backend runs (``submit`` refuses jobs otherwise)."""
        raise NotImplementedError

    def _free_worker(self) -> Any | None:
        """A worker that may take a call now (verified, nothing in flight), or None."""
        raise NotImplementedError

    def _unavailable(self) -> str | None:
        """Why no worker can take a job for now (not broken: it may come back), or None (a backend may say)."""
        return None

    def _dispatch(self, dispatch_id: int, jobs: list[Job], worker: Any) -> None:
        """Send ``jobs`` to ``worker`` as one call."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def stats(self) -> PoolStats:
        """Return a snapshot of the counters."""
        with self._lock:
            in_flight = sum(len(batch) for batch in self._running.values())
            return PoolStats(
                workers=self._workers,
                in_flight=in_flight,
                queued=len(self._queue),
                rebuilds=self._rebuilds,
                retried=self._retried,
                failed=self._failed,
                completed=self._completed,
                dispatches=self._dispatches,
            )

    @property
    def exit_unsafe(self) -> bool:
        """True after :meth:`close` left a backend that the interpreter's normal exit would crash on.

        Ray's driver cannot leave a cluster whose GCS and raylets are gone: ``ray.shutdown()``
        aborts the process and so does the interpreter's teardown. The process that owns such a
        pool ends with ``os._exit`` once its own cleanup is done (latentsync.serving.ops.exit).
        """
        return self._exit_unsafe

    @property
    def broken(self) -> str | None:
        """Why the pool cannot serve (a worker could not load its engine), or None."""
        return self._broken

    @property
    def problem(self) -> str | None:
        """What ``/health`` reports as ``engine_error``: :attr:`broken`, or why no worker can take a job now."""
        with self._lock:
            return self._broken or self._unavailable()

    def submit(self, job: ChunkJob, on_done: Callable[[ChunkResult], None], on_error: Callable[[str], None]) -> None:
        """Queue a chunk job; a free worker computes its features and faces (:class:`JobQueue`).

        Args:
            job: The chunk (its avatar, audio window, frames and ``due_at``: the queue's priority).
            on_done: Called with the :class:`ChunkResult`, on a pool thread.
            on_error: Called with a reason string when the job fails for good.

        Raises:
            JobFailed: If the pool is not running, is broken, or its queue holds ``max_queued`` jobs.
        """
        entry = Job(key=next(self._keys), job=job, on_done=on_done, on_error=on_error)
        with self._lock:
            if not self._accepting() or self._stop.is_set():
                raise JobFailed("worker pool is not running")
            if self._broken is not None:
                raise JobFailed(self._broken)
            if (reason := self._unavailable()) is not None:
                raise JobFailed(reason)
            if len(self._queue) >= self._max_queued:
                raise JobFailed(f"worker pool queue full ({self._max_queued} jobs, engine.max_queued_jobs)")
            heapq.heappush(self._queue, (job.due_at, entry.key, entry))
            self._dispatch_waiting()

    def cancel(self, task_id: str) -> int:
        """Drop every queued job of ``task_id`` at once (their callbacks are never called).

        Jobs already running in a worker finish; their results go to callbacks that ignore a
        cancelled task.

        Returns:
            The number of queued jobs dropped.
        """
        with self._lock:
            kept = [entry for entry in self._queue if entry[2].job.task_id != task_id]
            dropped = len(self._queue) - len(kept)
            if dropped:
                heapq.heapify(kept)
                self._queue = kept
        return dropped

    def _dispatch_waiting(self) -> None:
        """Hand queued jobs to free workers (lock held)."""
        while self._queue and (worker := self._free_worker()) is not None:
            jobs = self._take_batch()
            dispatch_id = next(self._keys)
            self._running[dispatch_id] = jobs
            self._dispatches += 1
            now = time.monotonic()
            for job in jobs:
                job.attempts += 1
                job.submitted_at = now
            try:
                self._dispatch(dispatch_id, jobs, worker)
            except Exception as exc:  # the call never left: its jobs go back with their deadlines (a 2nd time: failed)
                self._running.pop(dispatch_id, None)
                logger.exception("dispatching %s failed", ", ".join(job.job.label for job in jobs))
                self._requeue(jobs, f"dispatch failed: {type(exc).__name__}: {exc}")

    def _take_batch(self) -> list[Job]:
        """The earliest-deadline job, plus the chunk jobs due right after it up to ``max_batch`` (lock held).

        A task's first chunk (chunk index 0) is never batched, in either direction: batching would
        hold its faces back until the whole batch is done.
        """
        batch = [heapq.heappop(self._queue)[2]]

        def batchable(entry: Job) -> bool:
            return entry.job.chunk_index != 0 and entry.job.avatar == batch[0].job.avatar

        if batchable(batch[0]):
            while self._queue and len(batch) < self._max_batch and batchable(self._queue[0][2]):
                batch.append(heapq.heappop(self._queue)[2])
        return batch

    def _deliver(self, dispatch_id: int, results: list[ChunkResult]) -> list[Job] | None:
        """A call came back: hand each result to its job, then give the free worker the next jobs.

        Results are delivered before anything is dispatched, so a dispatch that raises cannot lose
        them. A result that is not what its job asked for (:func:`result_problem`: its ids, or its
        faces' count, shape or dtype) fails that job with the reason and never reaches the task.

        Returns:
            The call's jobs, or None for a stale answer (its worker was given up on meanwhile).
        """
        with self._lock:
            jobs = self._running.pop(dispatch_id, None)
            if jobs is None:
                return None  # a stale answer from a replaced worker
        try:
            answers = list(results) if isinstance(results, list | tuple) else []
            for i, job in enumerate(jobs):
                if i >= len(answers):
                    self._finish_error(job, f"worker returned {len(answers)} results for a call of {len(jobs)} jobs")
                    continue
                result = answers[i]
                problem = result_problem(job.job, result)
                if problem is not None:
                    self._finish_error(job, problem)
                    continue
                with self._lock:
                    self._completed += 1
                if self._on_chunk_done is not None:
                    self._on_chunk_done(len(result.frame_indices), time.monotonic() - job.submitted_at)
                with job.lock:
                    if job.finished:
                        continue
                    job.finished = True
                try:
                    job.on_done(result)
                except Exception:  # the task's side: its own thread handles its failures; the pool goes on
                    logger.exception("delivering %s failed", job.job.label)
        finally:
            with self._lock:
                self._dispatch_waiting()
        return jobs

    def _engine_failed(self, dispatch_id: int, exc: BaseException) -> None:
        """The engine raised on a call: deterministic, so its jobs fail without a retry."""
        with self._lock:
            jobs = self._running.pop(dispatch_id, None)
            if jobs is None:
                return
            self._dispatch_waiting()
        for job in jobs:
            self._finish_error(job, f"{job.job.label} failed: {type(exc).__name__}: {exc}")

    def _requeue(self, jobs: list[Job], reason: str) -> None:
        """Jobs whose worker was lost: queued again (deadlines kept), or failed on their 2nd try (lock held)."""
        for job in sorted(jobs, key=lambda j: j.key, reverse=True):
            if job.attempts >= 2:
                threading.Thread(
                    target=self._finish_error, args=(job, f"{job.job.label} failed twice ({reason})"), daemon=True
                ).start()
            else:
                self._retried += 1
                heapq.heappush(self._queue, (job.job.due_at, job.key, job))

    def _fail_queued(self, error: str) -> None:
        """Fail every queued job with ``<its label> failed: <error>`` (call without the lock: callbacks run here)."""
        with self._lock:
            jobs = [job for _, _, job in self._queue]
            self._queue.clear()
        for job in jobs:
            self._finish_error(job, f"{job.job.label} failed: {error}")

    def _announce_broken(self) -> None:
        """After :attr:`_broken` was set: log it and fail every queued job with it (call without the lock)."""
        logger.error("worker pool broken: %s", self._broken)
        self._fail_queued(self._broken or "")

    def _fail_everything(self, reason: str) -> None:
        """Fail every queued and running job with ``reason`` (closing, or broken)."""
        with self._lock:
            jobs = [j for batch in self._running.values() for j in batch] + [j for _, _, j in self._queue]
            self._running.clear()
            self._queue.clear()
        for job in jobs:
            self._finish_error(job, reason)

    def _finish_error(self, job: Job, reason: str) -> None:
        with job.lock:
            if job.finished:
                return
            job.finished = True
        with self._lock:
            self._failed += 1
        logger.warning("%s", reason)
        job.on_error(reason)
