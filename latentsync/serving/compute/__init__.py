"""Compute: the engine workers and the earliest-deadline-first queue in front of them.

:class:`~latentsync.serving.compute.scheduling_pool.SchedulingPool` is the queue every backend
shares; :class:`~latentsync.serving.compute.worker_pool.WorkerPool` runs local worker processes,
:class:`~latentsync.serving.compute.ray_worker_pool.RayWorkerPool` Ray actors (imported only when
``pool.backend=ray``); :class:`~latentsync.serving.compute.engine_host.EngineHost` is what a worker
runs.
"""

from latentsync.serving.compute.jobs import ChunkJob, JobFailed, JobQueue
from latentsync.serving.compute.scheduling_pool import Job, PoolStats, SchedulingPool, WorkerPoolError

__all__ = ["ChunkJob", "Job", "JobFailed", "JobQueue", "PoolStats", "SchedulingPool", "WorkerPoolError"]
