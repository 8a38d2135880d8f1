"""The task side's seams: where a task's program goes on air, and where its speech comes from.

:class:`Playout` is implemented by :class:`latentsync.serving.playout.mixer.ProgramMixer`; tests
put a fake here (tests/fakes.py). :class:`SpeechSource` is implemented by every way speech arrives
(``latentsync.serving.ingest``: an upload, a text, a PCM socket); the API picks one and hands it to
:meth:`latentsync.serving.tasks.task_manager.TaskManager.open_source`, the one way a request
becomes a task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from latentsync.serving.playout.mixer import Program
from latentsync.serving.tasks.task import TaskKind
from latentsync.serving.tasks.utterance import Utterance

__all__ = ["OpenedTask", "Playout", "SourceContext", "SpeechSource"]


@runtime_checkable
class Playout(Protocol):
    """Where programs go on air, in order (one per channel)."""

    @property
    def ticks(self) -> int:
        """Ticks produced so far (interrupt latency is measured in them)."""
        ...

    def enqueue(self, program: Program) -> bool:
        """Append a program to the playlist; False when the playlist is full."""
        ...

    def interrupt(self, task_id: str) -> None:
        """Fade the program of ``task_id`` out within the crossfade if on air, or drop it from the playlist."""
        ...


@dataclass(frozen=True, kw_only=True)
class SourceContext:
    """What a source is told when its task is built (by :meth:`TaskManager.open_source`).

    Attributes:
        sample_rate_hz: The stream's audio rate in Hz (what a decoder resamples to).
        fps: The stream's frame rate.
        first_frames: Frames of audio the first chunk needs (its frames plus the engine's look-ahead):
            a source that decodes ahead may hold the request until they are there.
        cancel: Cancels a task by id (``TaskManager.cancel``): a feeder cancels its own task on a
            fatal error (``buffer_full``, ``tts_failed``).
    """

    sample_rate_hz: int
    fps: int
    first_frames: int
    cancel: Callable[[str], object]


class SpeechSource(Protocol):
    """Where one task's speech comes from: an upload, a text, a PCM socket (``latentsync.serving.ingest``).

    The API builds one per request, with the request's checks done, and hands it to
    :meth:`TaskManager.open_source`, which builds the task, calls :meth:`start`, and accepts the task.
    """

    @property
    def kind(self) -> TaskKind:
        """What kind of task it feeds (``upload``, ``speak``, ``stream``)."""
        ...

    @property
    def seed(self) -> int | None:
        """Engine seed of its task (None: the engine's default)."""
        ...

    @property
    def guidance_scale(self) -> float | None:
        """Engine guidance of its task (None: the engine's default)."""
        ...

    def start(self, utterance: Utterance, context: SourceContext) -> None:
        """Start feeding ``utterance``; return once its task may be accepted.

        What it starts (a decoder, a feeder thread) is attached to the utterance
        (:meth:`Utterance.attach`) before it can fail, so the manager's discard, or a later
        cancel, stops it. An upload returns once its first chunk's audio is decoded.

        Raises:
            SpeechError: The request's speech is refused (its code names why); the manager then
                discards the task, and nothing the source started is left running.
        """
        ...


@dataclass(frozen=True)
class OpenedTask:
    """A task that :meth:`TaskManager.open_source` accepted.

    Attributes:
        utterance: Its utterance (``utterance.task`` is the task).
        position: Tasks ahead of it when it was accepted (0: next on air).
    """

    utterance: Utterance
    position: int
