"""The producer side of a task: an utterance whose audio arrives while it is generated and played.

Every input is an utterance (docs/streaming-speech.md): an upload's decoder, the text-to-speech
feeder of ``POST /speak`` and a ``/ws/speech`` socket all :meth:`Utterance.push` PCM of any rate as
it comes and :meth:`Utterance.end` it. What feeds it (its *sources*) is attached to it, so that
cancelling the task stops them too (:meth:`Utterance.close`): one call clears every buffer of a task.

An open utterance is bounded in time as well as in bytes: it may stay open at most
``speech_stream.max_utterance_s`` (wall clock), and once audio flows it must keep arriving at
``speech_stream.min_arrival_ratio`` of real time: below that for ``speech_stream.starve_timeout_s``
while nothing is left to play, it ends (``too_slow``), what it received plays and the queue moves
on. One that receives nothing for ``speech_stream.idle_timeout_s`` ends too (``idle_timeout``).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from latentsync.config import SpeechStreamConfig
from latentsync.serving.tasks.speech_audio import SpeechAudio, SpeechError
from latentsync.serving.tasks.task import FINAL_STATES, Task

logger = logging.getLogger(__name__)

#: Reasons an utterance ended other than its producer's own ``end``; each is an ``error`` event on
#: the WebSocket (the utterance still plays what it received).
END_REASONS = ("idle_timeout", "too_slow", "utterance_timeout")
#: Seconds of audio waiting to play under which an utterance whose arrivals are too slow counts as
#: starving the stream (above it, the arrivals are merely bursty).
STARVING_BUFFER_S = 1.0


class ProgramView(Protocol):
    """What an utterance and its clients read of the task's program.

    Implemented by :class:`~latentsync.serving.tasks.speech_program.SpeechProgram`; a protocol, so
    the two modules do not import each other.
    """

    underrun_ticks: int
    chunk_audio_at: dict[int, float]

    @property
    def first_chunk_monotonic(self) -> float | None:
        """When the first generated chunk arrived (monotonic seconds), or None."""
        ...

    def content_frames_played(self) -> int:
        """Content frames played so far."""
        ...


class Source(Protocol):
    """What feeds an utterance (an upload's decoder, a text-to-speech feeder); stopped with the task."""

    def close(self) -> None:
        """Stop feeding and release what it holds (thread, process, queue). Safe to call twice."""
        ...


@dataclass(frozen=True, kw_only=True)
class UtteranceLimits:
    """Bounds of one utterance (the ``speech_stream`` section and ``api.max_audio_s``).

    Attributes:
        max_buffered_s: Seconds received and not yet played; None: unbounded (an upload's decoder,
            which paces itself and is bounded by ``api.max_audio_s``).
        idle_timeout_s: An open utterance that receives nothing for this long ends; None: no such
            bound (an upload: its decoder waits for playback, and has its own timeout).
        max_utterance_s: Longest time an utterance may stay open (wall clock, from its opening);
            None: no such bound (an upload's length is bounded by ``api.max_audio_s``).
        starve_timeout_s: How long arrivals may stay below ``min_arrival_ratio`` before it ends.
        min_arrival_ratio: Seconds of audio per second of wall clock an open utterance must keep up.
        max_duration_s: Longest speech, in seconds of audio (``api.max_audio_s``).
    """

    max_buffered_s: float | None
    idle_timeout_s: float | None
    max_utterance_s: float | None
    starve_timeout_s: float
    min_arrival_ratio: float
    max_duration_s: float

    @classmethod
    def from_config(cls, ss: SpeechStreamConfig, max_audio_s: float, buffered: bool = True) -> UtteranceLimits:
        """The limits of ``speech_stream``; ``buffered=False`` (an upload): no buffer, idle or wall-clock bound."""
        return cls(
            max_buffered_s=ss.max_buffered_s if buffered else None,
            idle_timeout_s=ss.idle_timeout_s if buffered else None,
            max_utterance_s=ss.max_utterance_s if buffered else None,
            starve_timeout_s=ss.starve_timeout_s,
            min_arrival_ratio=ss.min_arrival_ratio,
            max_duration_s=max_audio_s,
        )


class Utterance:
    """Push PCM, end, read the progress of one task's speech. Thread-safe; every wait has a timeout.

    Args:
        task: Its task (its ``audio`` is set here to a new :class:`SpeechAudio`).
        fps: Stream frame rate.
        sample_rate_hz: Stream audio rate in Hz.
        limits: Its bounds.
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self,
        task: Task,
        *,
        fps: int,
        sample_rate_hz: int,
        limits: UtteranceLimits,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.task = task
        self.fps = fps
        self.limits = limits
        self._clock = clock
        # held by the task only: Task.release_audio frees it while the finished task stays listed
        task.audio = SpeechAudio(sample_rate_hz, limits.max_duration_s)
        self.changed = threading.Condition()
        self.ended = False
        self.end_reason: str | None = None
        self.opened_monotonic = clock()
        self.first_byte_monotonic: float | None = None
        self.last_push_monotonic = self.opened_monotonic
        self.final_frames: int | None = None
        self.program: ProgramView | None = None
        self._arrivals: collections.deque[tuple[float, float]] = collections.deque()  # (time, seconds received)
        self._sources: list[Source] = []
        self._closed = False
        self.failure: str | None = None
        #: Called with the reason when a source fails the utterance (the processor fails the task).
        self.on_failure: Callable[[str], None] | None = None

    @property
    def task_id(self) -> str:
        """Its task's id."""
        return self.task.task_id

    @property
    def max_buffered_s(self) -> float | None:
        """Seconds received and not yet played it accepts (None: unbounded)."""
        return self.limits.max_buffered_s

    # ----------------------------------------------------------------- sources
    def attach(self, source: Source) -> None:
        """Make ``source`` part of this utterance: :meth:`close` stops it (at once if already closed)."""
        with self.changed:
            closed = self._closed
            if not closed:
                self._sources.append(source)
        if closed:
            source.close()

    def close(self) -> None:
        """Stop every source (their queues, threads and processes go); the task is being cancelled or failed."""
        with self.changed:
            self._closed = True
            sources, self._sources = self._sources, []
            self.changed.notify_all()
        for source in sources:
            try:
                source.close()
            except Exception:
                logger.exception("closing a source of %s failed", self.task_id, extra={"task_id": self.task_id})

    # ----------------------------------------------------------------- progress
    def received_frames(self) -> int:
        """Whole frames of audio received (all frames, the last one partial, once ended)."""
        if self.final_frames is not None:
            return self.final_frames
        audio = self.task.audio
        return audio.frames(self.fps) if audio is not None else 0

    def received_s(self) -> float:
        """Seconds of audio received (what both resampled copies hold)."""
        audio = self.task.audio
        return audio.received_s if audio is not None else self.received_frames() / self.fps

    def buffered_s(self) -> float:
        """Seconds received and not yet played."""
        played = self.program.content_frames_played() if self.program is not None else 0
        return max(0, self.received_frames() - played) / self.fps

    def arrival_fps(self, now: float) -> float:
        """Frames of audio per second arrived since the first byte (infinite once ended; 0 before any).

        Measured on the stream-rate copy (the 16 kHz one lags by its resampler's delay).
        """
        if self.ended:
            return math.inf
        audio = self.task.audio
        if self.first_byte_monotonic is None or audio is None:
            return 0.0
        return audio.duration_s * self.fps / max(now - self.first_byte_monotonic, 1e-3)

    # ----------------------------------------------------------------- producer side
    def push(self, mono: npt.NDArray[np.float32], rate_hz: int) -> float:
        """Append speech.

        Args:
            mono: ``(n,) float32`` mono samples in [-1, 1].
            rate_hz: Their sample rate in Hz.

        Returns:
            Seconds now buffered (received, not played yet).

        Raises:
            SpeechError: ``not_open`` after end/cancel/failure; ``buffer_full`` when more than
                ``max_buffered_s`` would be waiting to play; ``too_long`` past ``api.max_audio_s``.
        """
        with self.changed:
            audio = self.task.audio
            if self.ended or self._closed or self.task.state in FINAL_STATES or audio is None:
                raise SpeechError("not_open", f"utterance {self.task_id} is {self._status()}: no more audio")
            limit = self.limits.max_buffered_s
            if limit is not None and self.buffered_s() + mono.shape[0] / rate_hz > limit:
                raise SpeechError(
                    "buffer_full",
                    f"more than speech_stream.max_buffered_s = {limit:g} s of audio waiting to play: send at real time",
                )
            audio.push(mono, rate_hz)
            now = self._clock()
            if self.first_byte_monotonic is None and mono.shape[0]:
                self.first_byte_monotonic = now
            self.last_push_monotonic = now
            self._arrivals.append((now, audio.received_s))
            while len(self._arrivals) > 2 and self._arrivals[1][0] <= now - self.limits.starve_timeout_s:
                self._arrivals.popleft()
            self._update_task()
            self.changed.notify_all()
            return self.buffered_s()

    def wait_for_room(self, seconds: float, timeout_s: float) -> bool:
        """Block until ``seconds`` more audio fits the buffer bound (a producer faster than real time).

        Returns:
            True when it fits; False on timeout or once the utterance can take no more audio.
        """
        limit = self.limits.max_buffered_s
        deadline = self._clock() + timeout_s
        while limit is not None and self.buffered_s() + seconds > limit:
            if self.ended or self._closed or self.task.state in FINAL_STATES or self._clock() >= deadline:
                return False
            with self.changed:
                self.last_push_monotonic = self._clock()  # a producer waiting for room is not idle
                self.changed.wait(0.05)
        return not self.ended and not self._closed

    def end(self, reason: str | None = None) -> None:
        """No more audio: what was received plays to its end. Idempotent.

        Args:
            reason: Why, when not the producer's own end: one of :data:`END_REASONS` (or None).
        """
        with self.changed:
            if self.ended:
                return
            audio = self.task.audio
            if audio is not None:
                audio.finish()
                self.final_frames = math.ceil(audio.stream.shape[0] * self.fps / audio.sample_rate_hz)
            else:
                self.final_frames = 0
            self.ended = True
            self.task.ended = True
            self.end_reason = reason
            self._update_task()
            self.changed.notify_all()

    def fail(self, reason: str) -> None:
        """A source cannot go on (its decode failed or ran too long): the task fails with ``reason``."""
        with self.changed:
            if self.failure is not None:
                return
            self.failure = reason
            hook = self.on_failure
            self.changed.notify_all()
        if hook is not None:
            hook(reason)

    def touch(self) -> None:
        """Count activity without audio (a text being synthesised): postpones the idle timeout."""
        with self.changed:
            self.last_push_monotonic = self._clock()

    def idle_for_s(self) -> float:
        """Seconds since the last push (or :meth:`touch`, or the opening)."""
        return self._clock() - self.last_push_monotonic

    def check_deadlines(self) -> str | None:
        """End the utterance if it broke a time bound (called by its processor's thread every ~0.1 s).

        Returns:
            The reason it was ended now (one of :data:`END_REASONS`), else None.
        """
        if self.ended or self._closed:
            return None
        now = self._clock()
        limits = self.limits
        reason = None
        if limits.max_utterance_s is not None and now - self.opened_monotonic > limits.max_utterance_s:
            reason = "utterance_timeout"
        elif limits.idle_timeout_s is not None and now - self.last_push_monotonic > limits.idle_timeout_s:
            reason = "idle_timeout"
        elif self._starving(now):
            reason = "too_slow"
        if reason is not None:
            logger.info("utterance %s ended: %s", self.task_id, reason, extra={"task_id": self.task_id})
            self.end(reason)
        return reason

    def _starving(self, now: float) -> bool:
        """Arrivals below ``min_arrival_ratio`` of real time over the last ``starve_timeout_s``, nothing to play.

        Only while something still arrives: an utterance that receives nothing is idle, not slow.
        """
        window = self.limits.starve_timeout_s
        first = self.first_byte_monotonic
        if first is None or now - first < window or self.buffered_s() >= STARVING_BUFFER_S:
            return False
        if now - self.last_push_monotonic >= window:
            return False  # nothing at all for the whole window: idle, not slow (idle_timeout_s decides)
        with self.changed:
            then = [s for t, s in self._arrivals if t <= now - window]
            received_then = then[-1] if then else 0.0
        return self.received_s() - received_then < self.limits.min_arrival_ratio * window

    def _update_task(self) -> None:
        task = self.task
        task.num_frames = max(1, self.received_frames())
        audio = task.audio
        if audio is not None:
            task.audio_duration_s = audio.duration_s

    def _status(self) -> str:
        return "ended" if self.ended else self.task.state.value
