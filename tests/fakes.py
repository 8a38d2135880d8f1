"""Fakes at the task layer's two seams (the job queue and the playout), shared by its tests.

In the spirit of pipecat's ``run_test``: feed tasks in, drive the fake queue's jobs by hand, assert
what comes out and in which order. No processes, no clock assertions: every wait is for a condition
with a generous timeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from latentsync.config import load_config
from latentsync.engines import ChunkResult
from latentsync.serving.compute.jobs import ChunkJob
from latentsync.serving.tasks.speech_program import SpeechProgram
from latentsync.serving.tasks.task import TaskKind
from latentsync.serving.tasks.task_manager import TaskManager, TaskSettings
from latentsync.serving.tasks.utterance import Utterance

FPS = 25
RATE = 48000
SAMPLES_PER_FRAME = RATE // FPS
WAIT_S = 10.0


@dataclass
class FakeJob:
    """A chunk job waiting in :class:`FakePool` with its callbacks."""

    job: ChunkJob
    on_done: object
    on_error: object

    @property
    def task_id(self) -> str:
        return self.job.task_id

    @property
    def due_at(self) -> float:
        return self.job.due_at

    @property
    def chunk_index(self) -> int:
        return self.job.chunk_index

    @property
    def frames(self) -> int:
        """Content frames of the chunk (its feature rows)."""
        return self.job.rows[1] - self.job.rows[0]


@dataclass
class FakePool:
    """A :class:`~latentsync.serving.compute.jobs.JobQueue`: jobs wait until the test completes them."""

    jobs: list[FakeJob] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, job: ChunkJob, on_done, on_error) -> None:
        with self.lock:
            self.jobs.append(FakeJob(job, on_done, on_error))

    def cancel(self, task_id: str) -> int:
        with self.lock:
            kept = [j for j in self.jobs if j.task_id != task_id]
            dropped = len(self.jobs) - len(kept)
            self.jobs = kept
            self.cancelled.append(task_id)
        return dropped

    def of(self, task_id: str) -> list[FakeJob]:
        with self.lock:
            return [j for j in self.jobs if j.task_id == task_id]

    def take(self, job: FakeJob) -> None:
        with self.lock:
            self.jobs.remove(job)

    def next_of(self, task_id: str) -> FakeJob:
        """Wait for the first job of ``task_id`` and take it out of the queue."""
        wait_for(lambda: self.of(task_id), f"a job of task {task_id}")
        job = self.of(task_id)[0]
        self.take(job)
        return job

    def complete(self, job: FakeJob, fill: int | None = None) -> None:
        """Answer ``job`` with faces whose frame ``k`` is filled with ``fill + k`` (default ``100 + k``)."""
        n = len(job.job.frame_indices)
        base = 100 if fill is None else fill
        data = (base + np.arange(n, dtype=np.uint8)).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
        job.on_done(
            ChunkResult(
                task_id=job.task_id,
                chunk_index=job.chunk_index,
                frame_indices=job.job.frame_indices,
                faces=data,
                generate_s=0.0,
            )
        )


class FakeAvatar:
    """An avatar of 50 blank 2x2 base frames whose paste returns the face as is (its faces: 2x2, as FakePool's)."""

    num_frames = 50
    path = "fake-avatar"
    face_size = 2
    frames = np.zeros((num_frames, 2, 2, 3), np.uint8)

    def frame_index(self, i: int) -> int:
        return i % self.num_frames

    def paste(self, base_index, faces, frame=None, scratch=None):
        return faces


class FramesAvatar(FakeAvatar):
    """Base frames whose pixels say which base frame they are; pasted frames say which face."""

    frames = np.arange(FakeAvatar.num_frames, dtype=np.uint8).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)


class FakePlaylist:
    """A :class:`~latentsync.serving.compute.jobs.Playout` that records what it is given."""

    def __init__(self):
        self.programs: list[SpeechProgram] = []
        self.interrupted: list[str] = []
        self.ticks = 0

    def enqueue(self, program) -> bool:
        self.programs.append(program)
        return True

    def interrupt(self, task_id: str) -> None:
        self.interrupted.append(task_id)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def speech(seconds: float, seed: int = 7) -> np.ndarray:
    """``seconds`` of noise at :data:`RATE`: ``(n,) float32`` mono in [-1, 1]."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(round(seconds * RATE))) * 0.03).astype(np.float32)


def tone(frames: int, start_frame: int = 0) -> np.ndarray:
    """``frames`` frames of a 220 Hz tone at :data:`RATE`, continuing from ``start_frame``."""
    n0 = start_frame * SAMPLES_PER_FRAME
    t = (np.arange(frames * SAMPLES_PER_FRAME) + n0) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def settings(*overrides: str) -> TaskSettings:
    """The TaskManager settings of the default config at 25 fps, 48 kHz, no tail (``key=value`` overrides)."""
    config = load_config(
        None, ["stream.fps=25", "stream.audio_sample_rate=48000", "stream.crossfade_frames=0", *overrides]
    )
    return TaskSettings.from_config(config)


def fake_manager(pool, avatar, *overrides: str) -> tuple[TaskManager, FakePlaylist]:
    """A real TaskManager on fakes: ``pool`` (the job queue), ``avatar``, a new :class:`FakePlaylist`.

    25 fps, 48 kHz, 4 tasks queued at most; ``overrides`` are config ``key=value`` strings.
    """
    playlist = FakePlaylist()
    return TaskManager(pool, playlist, avatar=avatar, settings=settings("api.max_queued=4", *overrides)), playlist


def submit_upload(manager: TaskManager, seconds: float, seed: int | None = None, guidance: float | None = None):
    """An upload's task with its audio all there (what the decoder does, without FFmpeg); ``(task, position)``."""
    utterance: Utterance = manager.build(TaskKind.upload, seed, guidance)
    utterance.push(speech(seconds), RATE)
    utterance.end()
    try:
        position = manager.accept(utterance)
    except Exception:
        manager.discard(utterance)
        raise
    return utterance.task, position
