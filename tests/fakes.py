"""Fakes at the generation layer's seams (the worker pool and the mixer's playlist), shared by its tests.

In the spirit of pipecat's ``run_test``: feed tasks in, drive the fake pool's jobs by hand, assert what
comes out. Every wait is for a condition with a generous timeout.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from latentsync.serving.generation.program import SpeechProgram
from latentsync.serving.generation.scheduler import TaskManager
from latentsync.serving.generation.task import TaskAudio

FPS = 25


RATE = 48000


WAIT_S = 10.0


@dataclass
class FakeJob:
    kind: str  # "features" or "chunk"
    task_id: str
    due_at: float
    on_done: object
    on_error: object
    frames: tuple[int, int] | None = None
    request: object = None


@dataclass
class FakePool:
    """The WorkerPool's interface; jobs wait until the test completes them."""

    jobs: list[FakeJob] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submit_features(
        self, audio_16k, deadline_s, on_done, on_error, label="features", frames=None, due_at=None, task_id=None
    ):
        with self.lock:
            self.jobs.append(FakeJob("features", task_id, due_at, on_done, on_error, frames=frames))

    def submit_chunk(self, request, deadline_s, on_done, on_error, due_at=None):
        with self.lock:
            self.jobs.append(FakeJob("chunk", request.task_id, due_at, on_done, on_error, request=request))

    def cancel_task(self, task_id: str) -> int:
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


class FakeAvatar:
    num_frames = 50

    def frame_index(self, i: int) -> int:
        return i % self.num_frames

    def paste(self, base_index, faces):
        return faces


class FakePlaylist:
    def __init__(self):
        self.programs: list[SpeechProgram] = []
        self.interrupted: list[str] = []

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


def speech(seconds: float) -> TaskAudio:
    rng = np.random.default_rng(7)
    stream = (rng.standard_normal(int(seconds * RATE)) * 1000).astype(np.int16)
    return TaskAudio(stream, np.zeros(int(seconds * 16000), np.float32), RATE)


def fake_manager(pool, avatar, **options) -> tuple[TaskManager, FakePlaylist]:
    """A real TaskManager on fakes: ``pool`` (the pool's interface), ``avatar``, a new :class:`FakePlaylist`.

    25 fps, 48 kHz, 4 tasks queued at most, 5 s job deadlines; ``options`` override those or add others.
    """
    playlist = FakePlaylist()
    settings = {"fps": FPS, "sample_rate_hz": RATE, "max_queued": 4, "deadline_s": 5.0, **options}
    return TaskManager(pool, avatar, playlist.enqueue, playlist.interrupt, lambda: 0, **settings), playlist


class FramesAvatar(FakeAvatar):
    """Base frames whose pixels say which base frame they are; pasted frames say which face."""

    frames = np.arange(FakeAvatar.num_frames, dtype=np.uint8).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)

    def paste(self, base_index, faces):
        return faces
