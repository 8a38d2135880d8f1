"""A task: one speech from acceptance to its last frame on air; its states and the moves between them."""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


class TaskState(str, enum.Enum):
    """Lifecycle of a task."""

    queued = "queued"
    preparing = "preparing"
    generating = "generating"
    streaming = "streaming"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


FINAL_STATES = (TaskState.done, TaskState.failed, TaskState.cancelled)


WAITING_STATES = (TaskState.queued, TaskState.preparing, TaskState.generating)


#: The task lifecycle: the moves :meth:`Task.transition` makes; final states have none.
ALLOWED_MOVES: dict[TaskState, frozenset[TaskState]] = {
    TaskState.queued: frozenset({TaskState.preparing, TaskState.failed, TaskState.cancelled}),
    TaskState.preparing: frozenset({TaskState.generating, TaskState.failed, TaskState.cancelled}),
    TaskState.generating: frozenset({TaskState.streaming, TaskState.failed, TaskState.cancelled}),
    TaskState.streaming: frozenset({TaskState.done, TaskState.failed, TaskState.cancelled}),
    TaskState.done: frozenset(),
    TaskState.failed: frozenset(),
    TaskState.cancelled: frozenset(),
}


@dataclass
class TaskAudio:
    """A task's speech, decoded twice by FFmpeg.

    Attributes:
        stream: ``(N,) int16`` mono at the stream's sample rate (what goes on air).
        engine_16k: ``(M,) float32`` mono at 16 kHz in [-1, 1] (what the engine analyses).
        sample_rate_hz: Rate of ``stream`` in Hz.
    """

    stream: np.ndarray
    engine_16k: np.ndarray
    sample_rate_hz: int

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return self.stream.shape[0] / self.sample_rate_hz


@dataclass
class Task:
    """One request's state as the API reports it (times are ``time.time()`` seconds).

    ``num_frames`` frames carry the speech; ``tail_frames`` more are generated from silence (mouth
    closing) for the crossfade back to idle, so the avatar never mouths words after the speech.
    """

    task_id: str
    audio: TaskAudio | None
    num_frames: int
    num_chunks: int
    tail_frames: int = 0
    seed: int | None = None
    guidance_scale: float | None = None
    state: TaskState = TaskState.queued
    error: str | None = None
    chunks_generated: int = 0
    frames_streamed: int = 0
    received_at: float = field(default_factory=time.time)
    received_monotonic: float = field(default_factory=time.monotonic)
    first_frame_on_air_at: float | None = None
    first_frame_on_air_monotonic: float | None = None
    finished_at: float | None = None
    cancel_requested_tick: int | None = None
    off_air_tick: int | None = None
    audio_duration_s: float = 0.0
    #: States this task went through, in order (at most 5: queued ... final).
    history: list[TaskState] = field(default_factory=lambda: [TaskState.queued])
    #: Called with the task, outside its lock, once it reaches a final state (the scheduler's hook).
    on_final: Callable[[Task], None] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.audio is not None:
            self.audio_duration_s = self.audio.duration_s

    def transition(self, to: TaskState, reason: str | None = None) -> TaskState | None:
        """Move to state ``to`` if :data:`ALLOWED_MOVES` allows it from the current state; the only writer of ``state``.

        Several threads race to end a task (API cancel, the TaskProcessor failing, the mixer
        finishing it): the first move to a final state wins, later ones are refused.

        Args:
            to: The new state.
            reason: Stored as ``error`` when the move is made (why it failed or was cancelled).

        Returns:
            The state moved from, or None when the move was refused (already final, or not in the table).
        """
        with self._lock:
            previous = self.state
            if to not in ALLOWED_MOVES[previous]:
                if previous not in FINAL_STATES:
                    logger.error("task %s: illegal move %s -> %s refused", self.task_id, previous.value, to.value)
                return None
            self.state = to
            self.history.append(to)
            if reason is not None:
                self.error = reason
            if to in FINAL_STATES:
                self.finished_at = time.time()
            hook = self.on_final if to in FINAL_STATES else None
        if hook is not None:
            hook(self)
        return previous

    def release_audio(self) -> None:
        """Drop the decoded audio once it can no longer play (finished tasks stay listed, cheaply)."""
        self.audio = None

    def to_json(self) -> dict:
        """The ``GET /tasks/<id>`` body."""
        return {
            "task_id": self.task_id,
            "status": self.state.value,
            "audio_duration_s": round(self.audio_duration_s, 3),
            "frames_total": self.num_frames,
            "frames_streamed": self.frames_streamed,
            "chunks_total": self.num_chunks,
            "chunks_generated": self.chunks_generated,
            "error": self.error,
            "received_at": self.received_at,
            "first_frame_on_air_at": self.first_frame_on_air_at,
            "finished_at": self.finished_at,
            "interrupt_latency_frames": (
                self.off_air_tick - self.cancel_requested_tick
                if self.off_air_tick is not None and self.cancel_requested_tick is not None
                else None
            ),
            "time_to_first_frame_s": (
                round(self.first_frame_on_air_monotonic - self.received_monotonic, 3)
                if self.first_frame_on_air_monotonic is not None
                else None
            ),
        }
