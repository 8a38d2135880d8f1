"""WorkerPool: a persistent ``multiprocessing.Pool`` (spawn) of engine workers, with deadlines.

The :class:`~latentsync.serving.generation.ports.JobQueue` of the generation side. One worker
process per GPU (or one on CPU) loads the default prepared avatar and its engine once, in the pool
initializer, then serves chunk jobs: features of the job's audio window, then its faces
(:mod:`latentsync.serving.generation.worker`). Every channel of the server shares the pool: each
job names its prepared avatar, which a worker loads on first use and keeps among its
``max_avatars`` most recently used (docs/channels.md). Jobs wait in our own bounded priority
queue, earliest deadline first: every job carries ``due_at``, the monotonic time by which its
first frame must be on air (docs/scheduling.md). At most one call per worker is handed to the
``multiprocessing.Pool`` at a time, so a job's run deadline counts from when a worker takes it,
not from when it was queued. A job that misses its deadline, or that
was running on a worker that died, is retried once on a fresh pool (the pool is rebuilt, since a
hung worker would keep its slot forever); a second failure fails the job with a reason. A rebuilt
pool is verified before any job goes to it: every new worker answers a ping proving its engine
loaded; a worker that cannot load marks the pool broken (:attr:`WorkerPool.broken`), which fails
every queued and later job at once with that reason and makes readiness fail. The stream never
depends on the pool: the pool only produces faces.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import multiprocessing
import multiprocessing.pool
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentsync.engines import ChunkResult
from latentsync.serving.generation.ports import ChunkJob, JobFailed
from latentsync.serving.generation.worker import _worker_avatars, _worker_chunks, _worker_init, _worker_ping

logger = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.1
POOL_TERMINATE_TIMEOUT_S = 5.0


class WorkerPoolError(RuntimeError):
    """The workers could not start (the message carries the worker's own error)."""


@dataclass
class _Job:
    """A queued or running chunk job with its callbacks and its attempts."""

    key: int
    job: ChunkJob
    on_done: Callable[[ChunkResult], None]
    on_error: Callable[[str], None]
    attempts: int = 0
    submitted_at: float = 0.0
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
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
    :class:`latentsync.serving.generation.ray_pool.RayWorkerPool` for Ray actors) says when a
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
        self._running: dict[int, list[_Job]] = {}  # dispatch id -> jobs sent together (one worker each)
        self._queue: list[tuple[float, int, _Job]] = []  # heap of (due_at, key, job): waiting for a worker
        self._keys = itertools.count()
        self._stop = threading.Event()
        self._rebuilds = 0
        self._retried = 0
        self._failed = 0
        self._completed = 0
        self._dispatches = 0
        self._broken: str | None = None  # why the pool cannot serve (its workers could not load)

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

    def worker_stats(self) -> list:
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

    def _dispatch(self, dispatch_id: int, jobs: list[_Job], worker: Any) -> None:
        """Send ``jobs`` to ``worker`` as one call."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def stats(self) -> PoolStats:
        """Return a snapshot of the counters."""
        with self._lock:
            in_flight = sum(len(batch) for batch in self._running.values())
            return PoolStats(
                self._workers,
                in_flight,
                len(self._queue),
                self._rebuilds,
                self._retried,
                self._failed,
                self._completed,
                self._dispatches,
            )

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
        entry = _Job(next(self._keys), job, on_done, on_error)
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
            self._dispatch(dispatch_id, jobs, worker)

    def _take_batch(self) -> list[_Job]:
        """The earliest-deadline job, plus the chunk jobs due right after it up to ``max_batch`` (lock held).

        A task's first chunk (chunk index 0) is never batched, in either direction: batching would
        hold its faces back until the whole batch is done.
        """
        batch = [heapq.heappop(self._queue)[2]]

        def batchable(entry: _Job) -> bool:
            return entry.job.chunk_index != 0 and entry.job.avatar == batch[0].job.avatar

        if batchable(batch[0]):
            while self._queue and len(batch) < self._max_batch and batchable(self._queue[0][2]):
                batch.append(heapq.heappop(self._queue)[2])
        return batch

    def _deliver(self, dispatch_id: int, results: list[ChunkResult]) -> list[_Job] | None:
        """A call came back: free its worker, dispatch, then hand each result to its job.

        Returns:
            The call's jobs, or None for a stale answer (its worker was given up on meanwhile).
        """
        with self._lock:
            jobs = self._running.pop(dispatch_id, None)
            if jobs is None:
                return None  # a stale answer from a replaced worker
            self._completed += len(jobs)
            self._dispatch_waiting()
        for job, result in zip(jobs, results, strict=True):
            if self._on_chunk_done is not None:
                self._on_chunk_done(len(result.frame_indices), time.monotonic() - job.submitted_at)
            with job.lock:
                if job.finished:
                    continue
                job.finished = True
            job.on_done(result)
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

    def _requeue(self, jobs: list[_Job], reason: str) -> None:
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

    def _finish_error(self, job: _Job, reason: str) -> None:
        with job.lock:
            if job.finished:
                return
            job.finished = True
        with self._lock:
            self._failed += 1
        logger.warning("%s", reason)
        job.on_error(reason)


class WorkerPool(SchedulingPool):
    """Owns the engine worker processes.

    Args:
        engine_name: ``"parametric"`` or ``"latentsync"``.
        engine_options: Options for :func:`latentsync.engines.create_engine` (picklable).
        avatar_path: Cache directory of the prepared avatar (workers memory-map it).
        workers: Number of worker processes.
        devices: Device per worker index (e.g. ``["cuda:0", "cuda:1"]``), or empty to let the
            engine choose.
        start_timeout_s: Seconds the workers get to load their engine.
        on_chunk_done: Called with ``(frames, seconds from dispatch to result)`` for every chunk that
            comes back (metrics).
        max_batch: Queued chunks a free worker takes at once (one model batch, see
            :meth:`Engine.generate_batch`). A task's first chunk always goes alone, so batching never
            delays a task's first frame; only chunks of the same avatar are batched together.
        max_avatars: Prepared avatars a worker keeps loaded (``engine.max_avatars_per_worker``, LRU):
            a job naming another avatar loads it on first use (docs/channels.md).
        deadline_s: Seconds a job may run in a worker before it is retried once on a rebuilt pool
            (``engine.chunk_deadline_s``; a batch of n jobs gets n deadlines).
        max_queued: Jobs the queue holds at most (``engine.max_queued_jobs``; more is a scheduling
            bug upstream: :meth:`submit` raises :class:`JobFailed`).
        nice: Niceness each worker adds to itself at start (``engine.worker_nice``; 0: none).
    """

    def __init__(
        self,
        engine_name: str,
        engine_options: Mapping[str, Any],
        avatar_path: str | Path,
        workers: int,
        devices: list[str] | None = None,
        start_timeout_s: float = 600.0,
        on_chunk_done: Callable[[int, float], None] | None = None,
        max_batch: int = 1,
        max_avatars: int = 1,
        deadline_s: float = 60.0,
        max_queued: int = 4096,
        nice: int = 0,
    ):
        super().__init__(workers, on_chunk_done, max_batch, deadline_s, max_queued)
        self._nice = int(nice)
        self._engine_name = engine_name
        self._engine_options = dict(engine_options)
        self._avatar_path = str(avatar_path)
        self._devices = list(devices or [])
        self._start_timeout_s = start_timeout_s
        self._max_avatars = max(1, int(max_avatars))
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: multiprocessing.pool.Pool | None = None
        self._pool_pids: list[int] = []
        self._monitor: threading.Thread | None = None
        self._verified = False  # the current pool's workers answered a ping with their engine loaded

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the workers and wait until every one has loaded its engine.

        Raises:
            WorkerPoolError: If a worker's engine failed to load (its message is included) or the
                workers did not come up within ``start_timeout_s``.
        """
        with self._lock:
            if self._pool is not None:
                return
            self._pool = self._new_pool()
        self._check_workers(self._start_timeout_s)
        with self._lock:
            self._verified = True
        self._monitor = threading.Thread(target=self._watch, name="worker-pool-monitor", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        """Terminate the workers; pending jobs fail with "shutting down". Safe to call twice."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(2.0)
        with self._lock:
            pool, self._pool = self._pool, None
        self._fail_everything("server shutting down")
        if pool is not None:
            self._terminate(pool)

    def ready(self) -> bool:
        """True while the pool runs and is not broken (a rebuild being verified still counts as ready)."""
        return self._pool is not None and not self._stop.is_set() and self._broken is None

    def loaded_avatars(self, timeout_s: float = 5.0) -> list[list[str]]:
        """The avatar paths one call found loaded in a worker, least recently used first (tests, /health).

        With several workers, each call lands on whichever worker is free, so this asks as many
        times as there are workers; an answer may repeat a worker.

        Raises:
            JobFailed: If the pool is not running.
            multiprocessing.TimeoutError: If no worker answered within ``timeout_s``.
        """
        with self._lock:
            pool = self._pool
        if pool is None:
            raise JobFailed("worker pool is not running")
        calls = [pool.apply_async(_worker_avatars) for _ in range(self._workers)]
        return [call.get(timeout_s)[1] for call in calls]

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes."""
        with self._lock:
            pool = self._pool
            return [p.pid for p in getattr(pool, "_pool", []) if p.pid is not None]

    # ----------------------------------------------------------------- jobs
    def _accepting(self) -> bool:
        return self._pool is not None

    def _free_worker(self) -> multiprocessing.pool.Pool | None:
        """The current pool while it has a free worker and was verified (lock held)."""
        if len(self._running) < self._workers and self._pool is not None and self._verified:
            return self._pool
        return None

    def _dispatch(self, dispatch_id: int, jobs: list[_Job], worker: multiprocessing.pool.Pool) -> None:
        """Send jobs to the current pool as one call (lock held)."""
        worker.apply_async(
            _worker_chunks,
            ([entry.job for entry in jobs],),
            callback=lambda results: self._deliver(dispatch_id, results),
            error_callback=lambda exc: self._engine_failed(dispatch_id, exc),
        )

    # ----------------------------------------------------------------- supervision
    def _new_pool(self) -> multiprocessing.pool.Pool:
        counter = self._ctx.Value("i", 0)
        pool = self._ctx.Pool(
            processes=self._workers,
            initializer=_worker_init,
            initargs=(
                self._engine_name,
                self._engine_options,
                self._avatar_path,
                counter,
                self._devices,
                self._max_avatars,
                self._nice,
            ),
        )
        self._pool_pids = [p.pid for p in getattr(pool, "_pool", [])]
        return pool

    def _check_workers(self, timeout_s: float) -> None:
        """Ping every worker; raise with the worker's own error if its engine did not load."""
        with self._lock:
            pool = self._pool
        assert pool is not None
        pings = [pool.apply_async(_worker_ping) for _ in range(self._workers)]
        deadline = time.monotonic() + timeout_s
        for ping in pings:
            try:
                _pid, error = ping.get(max(0.1, deadline - time.monotonic()))
            except multiprocessing.TimeoutError:
                self.close()
                raise WorkerPoolError(f"engine workers did not start within {timeout_s:.0f} s") from None
            if error:
                self.close()
                raise WorkerPoolError(f"engine worker failed to start: {error}")

    @staticmethod
    def _terminate(pool: multiprocessing.pool.Pool) -> None:
        """Terminate a pool without ever hanging the caller, and leave no worker process behind.

        ``Pool.terminate`` takes the task-queue lock, which an idle worker holds while it waits
        for work; a worker killed while holding it would block ``terminate`` forever. So healthy
        workers are left to ``terminate`` (in a daemon thread, bounded wait), only stopped (hung)
        workers are killed first, and whatever is still alive afterwards is killed.
        """
        procs = list(getattr(pool, "_pool", []))
        for proc in procs:
            if proc.pid is not None and _pid_state(proc.pid) == "T":  # SIGSTOPped: SIGTERM would wait forever
                proc.kill()
        closer = threading.Thread(target=pool.terminate, name="worker-pool-terminate", daemon=True)
        closer.start()
        closer.join(POOL_TERMINATE_TIMEOUT_S)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            with self._lock:
                pool = self._pool
                if pool is None:
                    return
                dead = [p for p in getattr(pool, "_pool", []) if p.exitcode is not None]
                dead = dead or [pid for pid in self._pool_pids if not _pid_alive(pid)]
                now = time.monotonic()
                late = [
                    jobs[0]
                    for jobs in self._running.values()
                    if now - jobs[0].submitted_at > self._deadline_s * len(jobs)  # a batch gets n deadlines
                ]
                if not dead and not late:
                    continue
                reason = (
                    "a worker died" if dead else f"{late[0].job.label} missed its {self._deadline_s:.1f} s deadline"
                )
                self._rebuild(reason)

    def _rebuild(self, reason: str) -> None:
        """Replace the pool; running jobs are queued again (deadlines kept), or fail on their 2nd try (lock held)."""
        self._rebuilds += 1
        running = [j for batch in self._running.values() for j in batch]
        self._running.clear()
        logger.warning("rebuilding the worker pool: %s (%d jobs in flight)", reason, len(running))
        old = self._pool
        assert old is not None
        threading.Thread(target=self._terminate, args=(old,), name="worker-pool-terminate", daemon=True).start()
        self._pool = self._new_pool()
        self._verified = False  # nothing is dispatched until every new worker proved its engine loaded
        threading.Thread(target=self._verify, args=(self._pool,), name="worker-pool-verify", daemon=True).start()
        self._requeue(running, reason)
        self._dispatch_waiting()

    def _verify(self, pool: multiprocessing.pool.Pool) -> None:
        """Ping a rebuilt pool's workers; then dispatch the waiting jobs, or mark the pool broken."""
        pings = [pool.apply_async(_worker_ping) for _ in range(self._workers)]
        deadline = time.monotonic() + self._start_timeout_s
        error = None
        for ping in pings:
            try:
                _pid, worker_error = ping.get(max(0.1, deadline - time.monotonic()))
            except multiprocessing.TimeoutError:
                error = f"rebuilt engine workers did not start within {self._start_timeout_s:.0f} s"
                break
            except Exception as exc:  # the pool was terminated under us (close or another rebuild)
                error = f"rebuilt engine worker unreachable: {type(exc).__name__}: {exc}"
                break
            if worker_error:
                error = f"engine worker failed to start after a rebuild: {worker_error}"
                break
        with self._lock:
            if self._pool is not pool or self._stop.is_set():
                return  # replaced or closed meanwhile: that pool's verification decides nothing
            if error is None:
                self._verified = True
                logger.info("rebuilt worker pool verified: %d worker(s) loaded their engine", self._workers)
                self._dispatch_waiting()
                return
            self._broken = error
        self._announce_broken()


def _pid_state(pid: int) -> str | None:
    """Process state letter from /proc (``R``, ``S``, ``T`` stopped, ``Z`` zombie, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (killed, not yet reaped)."""
    return _pid_state(pid) not in (None, "Z", "X")
