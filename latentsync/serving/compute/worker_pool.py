"""WorkerPool: a persistent ``multiprocessing.Pool`` (spawn) of engine workers, with deadlines.

The :class:`~latentsync.serving.compute.jobs.JobQueue` of the generation side. One worker
process per GPU (or one on CPU) loads the default prepared avatar and its engine once, in the pool
initializer, then serves chunk jobs: features of the job's audio window, then its faces
(:mod:`latentsync.serving.compute.engine_host`). Every channel of the server shares the pool: each
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

import logging
import multiprocessing
import multiprocessing.pool
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from latentsync.serving.compute.engine_host import worker_avatars, worker_chunks, worker_init, worker_ping
from latentsync.serving.compute.jobs import JobFailed
from latentsync.serving.compute.scheduling_pool import Job, SchedulingPool, WorkerPoolError
from latentsync.serving.ops.procfs import is_alive, process_state

logger = logging.getLogger(__name__)

#: Seconds between the monitor's checks of dead workers and missed deadlines.
MONITOR_INTERVAL_S = 0.1
#: Seconds ``Pool.terminate`` gets before the remaining workers are killed.
POOL_TERMINATE_TIMEOUT_S = 5.0


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
        *,
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
        super().__init__(
            workers, on_chunk_done=on_chunk_done, max_batch=max_batch, deadline_s=deadline_s, max_queued=max_queued
        )
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
        calls = [pool.apply_async(worker_avatars) for _ in range(self._workers)]
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

    def _dispatch(self, dispatch_id: int, jobs: list[Job], worker: multiprocessing.pool.Pool) -> None:
        """Send jobs to the current pool as one call (lock held)."""
        worker.apply_async(
            worker_chunks,
            ([entry.job for entry in jobs],),
            callback=lambda results: self._deliver(dispatch_id, results),
            error_callback=lambda exc: self._engine_failed(dispatch_id, exc),
        )

    # ----------------------------------------------------------------- supervision
    def _new_pool(self) -> multiprocessing.pool.Pool:
        counter = self._ctx.Value("i", 0)
        pool = self._ctx.Pool(
            processes=self._workers,
            initializer=worker_init,
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
        pings = [pool.apply_async(worker_ping) for _ in range(self._workers)]
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
        """Terminate a pool without ever hanging the caller, and leave no worker process or thread behind.

        ``Pool.terminate`` first takes the task queue's read lock, which an idle worker holds while
        it waits for work (CPython's ``Pool._help_stuff_finish``). A worker killed while idle (a
        ``kill -9``, the OOM killer) never gives it back, so ``terminate`` used to wait forever: its
        thread, the old pool and the pool's 10 pipe descriptors stayed in the server for good (the
        chaos soak's descriptors rose by 10 after each such fault, issue 38). So when a worker is
        dead, or ``terminate`` is still waiting after :data:`POOL_TERMINATE_TIMEOUT_S`, every worker
        is killed (the pool is being discarded: its jobs were queued again) and the lock, which no
        live process can hold any more, is given back; ``terminate`` then finishes. Stopped
        (SIGSTOPped) workers are killed first, since SIGTERM would wait for them forever; healthy
        workers of a healthy pool get ``terminate``'s SIGTERM.
        """
        procs = list(getattr(pool, "_pool", []))
        for proc in procs:
            if proc.pid is not None and process_state(proc.pid) == "T":  # SIGSTOPped: SIGTERM would wait forever
                proc.kill()
                proc.join(1.0)
        if any(proc.exitcode is not None for proc in procs):  # one died: it may hold the read lock
            WorkerPool._kill_all(pool, procs)
        closer = threading.Thread(target=pool.terminate, name="worker-pool-terminate", daemon=True)
        closer.start()
        closer.join(POOL_TERMINATE_TIMEOUT_S)
        if closer.is_alive():  # waiting for the read lock of a worker that died meanwhile, or a hung one
            WorkerPool._kill_all(pool, procs)
            closer.join(POOL_TERMINATE_TIMEOUT_S)
            if closer.is_alive():
                logger.error("a discarded worker pool did not terminate in %.0f s", 2 * POOL_TERMINATE_TIMEOUT_S)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        if not closer.is_alive():
            # the calls still unanswered refer to the pool, and it to them (its cache): a cycle that
            # kept the pool's pipes open until a full collection, rare in a server with a frozen heap
            getattr(pool, "_cache", {}).clear()

    @staticmethod
    def _kill_all(pool: multiprocessing.pool.Pool, procs: list[Any]) -> None:
        """Kill every worker of a discarded ``pool`` and give back its task queue's read lock if a dead one held it."""
        procs = procs + [p for p in getattr(pool, "_pool", []) if p not in procs]  # respawned by the pool meanwhile
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in procs:
            proc.join(1.0)
        lock = getattr(getattr(pool, "_inqueue", None), "_rlock", None)
        if lock is None or any(proc.exitcode is None for proc in procs):
            return  # a worker survived SIGKILL (uninterruptible sleep): it may hold the lock yet
        try:  # free after this either way: taken and given back, or given back for the dead worker that held it
            lock.acquire(False)
            lock.release()
        except ValueError:  # released meanwhile: nothing to give back
            pass

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            with self._lock:
                pool = self._pool
                if pool is None:
                    return
                dead = [p for p in getattr(pool, "_pool", []) if p.exitcode is not None]
                dead = dead or [pid for pid in self._pool_pids if not is_alive(pid)]
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
        pings = [pool.apply_async(worker_ping) for _ in range(self._workers)]
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
