"""The compute side's seam: the job queue that makes a task's faces, and its jobs.

:class:`JobQueue` is where a task's chunks are generated (implemented by
:class:`latentsync.serving.compute.worker_pool.WorkerPool` and
:class:`latentsync.serving.compute.ray_worker_pool.RayWorkerPool`). A job carries
everything a worker needs, the avatar included, so one queue serves every channel. Tests put
fakes here (tests/fakes.py) and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from latentsync.engines import ChunkResult
from latentsync.face import FACE_SIZE


class JobFailed(RuntimeError):
    """A job failed for good, or the queue could not take it; the message says why."""


@dataclass(frozen=True, kw_only=True)
class ChunkJob:
    """One chunk of one task, as an engine worker receives it: audio in, faces out.

    The worker computes the chunk's features from ``audio_16k`` (rows ``rows`` of what
    :meth:`latentsync.engines.Engine.features` returns for it), then generates its faces.

    Attributes:
        task_id: The task (unique over the server; :meth:`JobQueue.cancel` drops its jobs).
        chunk_index: Position of the chunk in the task, from 0.
        avatar: Cache directory of the prepared avatar the faces are for (workers load it on first use).
        audio_16k: ``(N,) float32`` mono at 16 kHz in [-1, 1]: the chunk's audio with its context.
        rows: ``(row0, row1)``: the feature rows of ``audio_16k`` that are the chunk's frames.
        frame_indices: ``(n,) int64`` avatar base frames, ``n >= row1 - row0`` (padded by repeating
            the last one to the engine's shortest chunk; the last row is repeated to match).
        due_at: ``time.monotonic()`` by which the chunk's first frame must be on air (the queue
            serves the earliest first).
        seed: Random seed for engines that sample noise (None: engine default).
        guidance_scale: Classifier-free guidance scale (None: the engine's default).
        face_size: Side in pixels of the avatar's aligned faces, what the answer's faces must be
            (256; 512 for LatentSync 1.6: :func:`latentsync.config.engine_face_size`).
    """

    task_id: str
    chunk_index: int
    avatar: str
    audio_16k: npt.NDArray[np.float32]
    rows: tuple[int, int]
    frame_indices: npt.NDArray[np.int64]
    due_at: float
    seed: int | None = None
    guidance_scale: float | None = None
    face_size: int = FACE_SIZE

    @property
    def label(self) -> str:
        """How logs and errors name it."""
        return f"chunk {self.chunk_index} of task {self.task_id}"


@runtime_checkable
class JobQueue(Protocol):
    """Where chunk jobs are generated, earliest ``due_at`` first."""

    def submit(self, job: ChunkJob, on_done: Callable[[ChunkResult], None], on_error: Callable[[str], None]) -> None:
        """Queue a job; ``on_done`` gets its faces, ``on_error`` a reason when it failed for good.

        Raises:
            JobFailed: If the queue cannot take it (not running, broken, full).
        """
        ...

    def cancel(self, task_id: str) -> int:
        """Drop every queued job of ``task_id`` (their callbacks are never called); returns how many."""
        ...


def result_problem(job: ChunkJob, result: object) -> str | None:
    """Why a worker's answer to ``job`` cannot be played, or None when it can.

    A worker is another process (or another machine): what it returns is checked before it reaches
    a task, so a wrong answer fails its job with a reason instead of raising on the clock thread.

    Args:
        job: The job the answer is for (its ``face_size``: the side of the square faces it must hold).
        result: What the worker returned for it.

    Returns:
        The reason, naming the job and what was wrong (its ids, or its faces' shape or dtype), or None.
    """
    if not isinstance(result, ChunkResult):
        return f"worker returned a {type(result).__name__} for {job.label}, expected a ChunkResult"
    if result.task_id != job.task_id or result.chunk_index != job.chunk_index:
        return f"worker returned chunk {result.chunk_index!r} of task {result.task_id!r} for {job.label}"
    n = len(job.frame_indices)
    expected = (n, job.face_size, job.face_size, 3)
    faces = result.faces
    shape = getattr(faces, "shape", None)
    dtype = getattr(faces, "dtype", None)
    if not isinstance(faces, np.ndarray) or shape != expected or dtype != np.uint8:
        what = f"faces of shape {shape} {dtype}" if isinstance(faces, np.ndarray) else f"a {type(faces).__name__}"
        return f"worker returned {what} for {n} frames of {job.label}, expected {expected} uint8"
    return None
