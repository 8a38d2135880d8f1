"""The TaskManager: one channel's tasks, from the one builder to the end, and who may generate when.

Every request becomes a task the same way (docs/scheduling.md), through
:meth:`TaskManager.open_source` with the request's speech source (an upload, a text, a PCM socket:
:class:`~latentsync.serving.tasks.ports.SpeechSource`): refuse early what could not be queued,
:meth:`TaskManager.build` the task and its utterance (nothing is queued yet), start the source (an
upload's decoder can still refuse the file), then :meth:`TaskManager.accept` binds it to the
channel's avatar, queues its program on the playout and starts its processor. Only the task
on air and the next ``tasks.generate_ahead`` tasks are admitted to generate; every job carries the
monotonic time by which its first frame must be on air, and the pool serves the earliest first.
:meth:`TaskManager.cancel` is one call that clears every buffer of a task: its queued jobs, its
faces, its audio, its sources (decoder, feeder) and its queue slot.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from latentsync.config import AppConfig
from latentsync.engines import (
    CHUNK_FRAMES_RANGE,
    DEFAULT_CHUNK_FRAMES_RANGE,
    DEFAULT_LOOKAHEAD_FRAMES,
    FIRST_CHUNK_FRAMES,
    LOOKAHEAD_FRAMES,
)
from latentsync.serving.compute.jobs import JobQueue
from latentsync.serving.tasks.ports import OpenedTask, Playout, SourceContext, SpeechSource
from latentsync.serving.tasks.speech_audio import SpeechError
from latentsync.serving.tasks.speech_program import ChunkTimes, SpeechProgram
from latentsync.serving.tasks.task import FINAL_STATES, WAITING_STATES, Task, TaskKind, TaskState
from latentsync.serving.tasks.task_processor import ChunkPlan, TaskProcessor
from latentsync.serving.tasks.utterance import Utterance, UtteranceLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """What a channel's TaskManager needs from the config (one place: :meth:`from_config`).

    Attributes:
        fps: Stream frame rate.
        sample_rate_hz: Stream audio rate in Hz.
        tail_frames: Silent frames generated after each speech (``stream.crossfade_frames``).
        max_queued: Tasks that may wait (not yet on air) before new ones are refused (``api.max_queued``).
        max_open: Streamed utterances (``/speak``, ``/ws/speech``) open at once (``speech_stream.max_open``).
        generate_ahead: Tasks after the one on air that may generate (``tasks.generate_ahead``).
        max_finished: Finished tasks kept for ``GET /tasks`` (``tasks.max_finished``).
        max_frames_ahead: Frames a task may have generated ahead of the frame on air (``tasks.max_frames_ahead``).
        start_margin_s: Jitter-buffer slack for an open utterance (``speech_stream.start_margin_s``).
        plan: How chunks are cut for this engine.
        streamed: Limits of a streamed utterance.
        uploaded: Limits of an upload's utterance (no ``max_buffered_s``: it decodes ahead).
    """

    fps: int
    sample_rate_hz: int
    tail_frames: int
    max_queued: int
    max_open: int
    generate_ahead: int
    max_finished: int
    max_frames_ahead: int
    start_margin_s: float
    plan: ChunkPlan
    streamed: UtteranceLimits
    uploaded: UtteranceLimits

    @classmethod
    def from_config(cls, config: AppConfig) -> TaskSettings:
        """The settings of a channel's configuration (its ``stream`` section is the channel's)."""
        engine = config.engine
        name = engine.name.value
        low, _high = CHUNK_FRAMES_RANGE.get(name, DEFAULT_CHUNK_FRAMES_RANGE)
        first = engine.first_chunk_frames or FIRST_CHUNK_FRAMES.get(name, low)
        ss = config.speech_stream
        return cls(
            fps=config.stream.fps,
            sample_rate_hz=config.stream.audio_sample_rate,
            tail_frames=config.stream.crossfade_frames,
            max_queued=config.api.max_queued,
            max_open=ss.max_open,
            generate_ahead=config.tasks.generate_ahead,
            max_finished=config.tasks.max_finished,
            max_frames_ahead=config.tasks.max_frames_ahead,
            start_margin_s=ss.start_margin_s,
            plan=ChunkPlan(
                lookahead_frames=LOOKAHEAD_FRAMES.get(name, DEFAULT_LOOKAHEAD_FRAMES),
                first_frames=first,
                min_frames=first,
                engine_min_frames=low,
            ),
            streamed=UtteranceLimits.from_config(ss, config.api.max_audio_s),
            uploaded=UtteranceLimits.from_config(ss, config.api.max_audio_s, buffered=False),
        )


@dataclass
class _Entry:
    """A task the manager knows, with its utterance, program and processor while it can still use them.

    A finished task stays listed for ``GET /tasks`` (``tasks.max_finished``) as its :class:`Task`
    alone: once its processor's thread has ended, :meth:`settle` lets go of the rest (the
    utterance's audio and source, the program's frames, the processor's features), which a kept
    entry used to hold for as long as the task was listed (about 0.1 MB a 4 s upload: soak_bench,
    RSS after warm-up +4.3 MB over 40 tasks without this, +0.6 MB over 130 with it).
    """

    task: Task
    utterance: Utterance | None
    program: SpeechProgram | None
    processor: TaskProcessor | None

    def settle(self) -> bool:
        """Drop everything but the task once it is final and its thread is done; True when settled."""
        processor = self.processor
        if processor is not None and (self.task.state not in FINAL_STATES or processor.running):
            return False
        self.utterance = self.program = self.processor = None
        return True


class TaskManager:
    """Builds, accepts, admits, cancels and lists one channel's tasks.

    Args:
        jobs: Where chunks are generated (the shared worker pool).
        playout: Where programs go on air (the channel's mixer).
        avatar: The prepared avatar new tasks use (:meth:`switch_avatar` replaces it).
        settings: Frame rate, limits, chunking (:meth:`TaskSettings.from_config`).
        on_ttff: Called with each task's time to first frame in seconds (metrics), or None.
    """

    def __init__(
        self,
        jobs: JobQueue,
        playout: Playout,
        *,
        avatar: Any,
        settings: TaskSettings,
        on_ttff: Callable[[float], None] | None = None,
    ):
        self._jobs = jobs
        self._playout = playout
        self._avatar = avatar
        self.settings = settings
        self._on_ttff = on_ttff
        self._trimmed_final: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._closed = False
        self._chunk_times = ChunkTimes()  # the jitter buffer's evidence of how long chunks take here

    # ----------------------------------------------------------------- building and accepting
    def build(
        self,
        kind: TaskKind,
        seed: int | None = None,
        guidance_scale: float | None = None,
        received: tuple[float, float] | None = None,
    ) -> Utterance:
        """A new task and its utterance, not yet queued (the one builder of every input).

        Args:
            kind: What will feed it.
            seed: Engine seed (None: engine default).
            guidance_scale: Engine guidance (None: engine default).
            received: ``(time.time(), time.monotonic())`` when the request arrived (None: now); the
                time to first frame counts from it.

        Returns:
            The utterance (``utterance.task`` is the task): push audio into it, then :meth:`accept`
            it, or :meth:`discard` it.
        """
        s = self.settings
        task = Task(
            task_id=uuid.uuid4().hex,
            kind=kind,
            tail_frames=s.tail_frames,
            seed=seed,
            guidance_scale=guidance_scale,
        )
        if received is not None:
            task.received_at, task.received_monotonic = received
        limits = s.uploaded if kind is TaskKind.upload else s.streamed
        return Utterance(task, fps=s.fps, sample_rate_hz=s.sample_rate_hz, limits=limits)

    def accept(self, utterance: Utterance) -> int:
        """Queue a built task on the playout with the channel's current avatar and start its processor.

        A task is accepted wholly with one avatar: an avatar switch waits until none is unfinished
        (:meth:`switch_avatar`), and this binds the avatar under the same lock.

        Returns:
            Its position: tasks ahead of it (0: next on air).

        Raises:
            SpeechError: ``stopping`` once closed; ``too_many_streams`` when ``speech_stream.max_open``
                streamed utterances are open (not for uploads); ``queue_full`` when ``api.max_queued``
                tasks wait or the playlist is full. Nothing is queued then (the caller discards it).
        """
        s = self.settings
        task = utterance.task
        task.on_final = self._admit
        with self._lock:
            waiting = self._refusal(task.kind)
            program = SpeechProgram(
                task,
                utterance,
                avatar=self._avatar,
                fps=s.fps,
                lookahead_frames=s.plan.lookahead_frames,
                min_chunk_frames=s.plan.min_frames,
                max_frames_ahead=s.max_frames_ahead,
                start_margin_s=s.start_margin_s,
                tick_counter=lambda: self._playout.ticks,
                on_ttff=self._on_ttff,
                chunk_times=self._chunk_times,
            )
            processor = TaskProcessor(
                task,
                program,
                utterance=utterance,
                jobs=self._jobs,
                avatar=self._avatar,
                plan=s.plan,
                fps=s.fps,
                due_at=lambda frame: self.due_at(task, frame),
            )
            if not self._playout.enqueue(program):
                raise SpeechError("queue_full", "the playlist is full; retry later")
            utterance.on_failure = processor.fail
            ahead = waiting + self._count((TaskState.streaming,))
            self._entries[task.task_id] = _Entry(task, utterance, program, processor)
            self._trim()
        processor.start()
        self._admit()
        return ahead

    def _refusal(self, kind: TaskKind) -> int:
        """Refuse a task of ``kind`` that could not be queued now, else the tasks waiting (lock held).

        Raises:
            SpeechError: ``stopping`` once closed; ``too_many_streams`` when ``speech_stream.max_open``
                streamed utterances are open (not for uploads); ``queue_full`` when ``api.max_queued`` tasks wait.
        """
        s = self.settings
        if self._closed:
            raise SpeechError("stopping", "the channel is stopping")
        if kind is not TaskKind.upload and self._open_streams() >= s.max_open:
            raise SpeechError("too_many_streams", f"{s.max_open} utterances already open (speech_stream.max_open)")
        waiting = self._count(WAITING_STATES)
        if waiting >= s.max_queued:
            raise SpeechError("queue_full", f"{s.max_queued} tasks already wait (api.max_queued); retry later")
        return waiting

    def open_source(self, source: SpeechSource, received: tuple[float, float] | None = None) -> OpenedTask:
        """The one way a request becomes a task: refuse early, build, start ``source``, accept.

        What would refuse the task at :meth:`accept` is checked first, so nothing is stored, decoded
        or started for a request that cannot be queued (an upload's body is stored by its source's
        :meth:`~latentsync.serving.tasks.ports.SpeechSource.start`). The source then feeds the
        built task (an upload returns once its first chunk's audio is decoded) and the task is
        accepted; whatever refuses it on the way leaves nothing behind (:meth:`discard`).

        Args:
            source: Where the speech comes from (``latentsync.serving.ingest``).
            received: ``(time.time(), time.monotonic())`` of the request (the time to first frame counts from it).

        Returns:
            The accepted task and its position.

        Raises:
            SpeechError: As :meth:`accept`, or what the source refuses (its code).
        """
        with self._lock:
            self._refusal(source.kind)
        utterance = self.build(source.kind, source.seed, source.guidance_scale, received)
        s = self.settings
        context = SourceContext(
            sample_rate_hz=s.sample_rate_hz,
            fps=s.fps,
            first_frames=s.plan.first_frames + s.plan.lookahead_frames,
            cancel=self.cancel,
        )
        try:
            source.start(utterance, context)
            position = self.accept(utterance)
        except BaseException:
            self.discard(utterance)
            raise
        return OpenedTask(utterance, position)

    def open(
        self,
        kind: TaskKind,
        seed: int | None = None,
        guidance_scale: float | None = None,
        received: tuple[float, float] | None = None,
    ) -> Utterance:
        """:meth:`build` and :meth:`accept` an utterance its caller feeds (tests; the API uses :meth:`open_source`).

        Raises:
            SpeechError: As :meth:`accept`.
        """
        utterance = self.build(kind, seed, guidance_scale, received)
        try:
            self.accept(utterance)
        except SpeechError:
            self.discard(utterance)
            raise
        return utterance

    def discard(self, utterance: Utterance) -> None:
        """Drop a built task that was never accepted (its upload was refused): its sources stop, nothing stays."""
        utterance.close()
        utterance.task.release_audio()

    # ----------------------------------------------------------------- scheduling
    def _count(self, states: tuple[TaskState, ...]) -> int:
        """Tasks in one of ``states`` (lock held)."""
        return sum(1 for e in self._entries.values() if e.task.state in states)

    def _open_streams(self) -> int:
        """Streamed utterances still open: not ended, not final (lock held)."""
        return sum(
            1
            for e in self._entries.values()
            if e.task.kind is not TaskKind.upload
            and e.utterance is not None
            and not e.utterance.ended
            and e.task.state not in FINAL_STATES
        )

    def _admit(self, _task: Task | None = None) -> None:
        """Admit the first ``1 + generate_ahead`` unfinished tasks (in playlist order) to generate.

        Called on every accept and whenever a task reaches a final state (its ``on_final`` hook,
        possibly on the controller thread: it only sets events, never blocks).
        """
        with self._lock:
            if self._closed:
                return
            active = [e.processor for e in self._entries.values() if e.task.state not in FINAL_STATES and e.processor]
        for processor in active[: 1 + self.settings.generate_ahead]:
            processor.admit()

    def due_at(self, task: Task, frame: int) -> float:
        """The ``time.monotonic()`` by which content frame ``frame`` of ``task`` must be on air.

        On air: now plus the frames still to play before it. Not on air yet: the earliest time it
        could start, i.e. when every unfinished task ahead of it would end if it played from now
        without a pause, plus the frame's offset (an open utterance counts with the frames it has).

        Args:
            task: An accepted task.
            frame: Its content frame, from 0.

        Returns:
            Seconds on the monotonic clock.
        """
        now = time.monotonic()
        fps = self.settings.fps
        with self._lock:
            active = [e.task for e in self._entries.values() if e.task.state not in FINAL_STATES or e.task is task]
        start = now
        for other in active:
            on_air = other.first_frame_on_air_monotonic is not None
            if other is task:
                if on_air:
                    return now + (frame - task.frames_streamed) / fps
                return start + frame / fps
            if on_air:
                start = now + max(0, other.num_frames - other.frames_streamed) / fps
            else:
                start += other.num_frames / fps
        return now + frame / fps  # no longer listed: as soon as possible

    def switch_avatar(self, avatar, on_switch: Callable[[], None]) -> bool:
        """Give tasks accepted from now on another avatar, if no task is unfinished (idle).

        Atomic with :meth:`accept`: a task is accepted wholly with the old avatar or wholly with the new one.

        Args:
            avatar: The new prepared avatar.
            on_switch: Called under the manager's lock when the switch is made (it must not block;
                e.g. :meth:`ProgramMixer.switch_idle`).

        Returns:
            True if switched; False while a task is unfinished or once closed (nothing changed then).
        """
        with self._lock:
            if self._closed or any(e.task.state not in FINAL_STATES for e in self._entries.values()):
                return False
            on_switch()
            self._avatar = avatar
            return True

    @property
    def avatar(self):
        """The prepared avatar new tasks use."""
        return self._avatar

    # ----------------------------------------------------------------- queries
    def waiting(self) -> int:
        """Tasks accepted and not on air yet."""
        with self._lock:
            return self._count(WAITING_STATES)

    def open_streams(self) -> int:
        """Streamed utterances still open."""
        with self._lock:
            return self._open_streams()

    def admitted(self) -> int:
        """Unfinished tasks admitted to generate (at most ``1 + generate_ahead``)."""
        with self._lock:
            return sum(
                1
                for e in self._entries.values()
                if e.task.state not in FINAL_STATES and e.processor and e.processor.admitted
            )

    def _trim(self) -> None:
        """Settle the finished entries (lock held) and forget the oldest past ``tasks.max_finished``."""
        finished = [k for k, e in self._entries.items() if e.task.state in FINAL_STATES]
        for key in finished:
            self._entries[key].settle()
        for key in finished[: max(0, len(finished) - self.settings.max_finished)]:
            self._trimmed_final[self._entries[key].task.state.value] += 1
            del self._entries[key]

    def final_counts(self) -> dict[str, int]:
        """Tasks that ended since start, by final state (``done``, ``failed``, ``cancelled``)."""
        with self._lock:
            counts = collections.Counter(self._trimmed_final)
            counts.update(e.task.state.value for e in self._entries.values() if e.task.state in FINAL_STATES)
        return {state.value: counts.get(state.value, 0) for state in FINAL_STATES}

    def get(self, task_id: str) -> Task | None:
        """The task, if known."""
        with self._lock:
            entry = self._entries.get(task_id)
        return entry.task if entry else None

    def utterance(self, task_id: str) -> Utterance | None:
        """The utterance of task ``task_id``, if known."""
        with self._lock:
            entry = self._entries.get(task_id)
        return entry.utterance if entry else None  # None too once the task finished and settled

    def list(self, limit: int = 50) -> list[Task]:
        """Most recent tasks first."""
        with self._lock:
            for entry in self._entries.values():  # finished ones let go of what they held (API thread only)
                entry.settle()
            tasks = [e.task for e in self._entries.values()]
        return list(reversed(tasks))[:limit]

    # ----------------------------------------------------------------- ending tasks
    def cancel(self, task_id: str) -> Task | None:
        """Cancel a waiting task, or fade out one on air (within ``crossfade_frames``): one call clears everything.

        Its queued pool jobs leave the queue, its buffered faces are dropped, its sources stop (an
        upload's decoder is killed, a feeder's queue emptied), its audio is released (on air: once
        the fade-out has played it), and it stops counting toward ``api.max_queued``; the next
        waiting task is admitted.

        Returns:
            The task, or None if unknown.
        """
        with self._lock:
            entry = self._entries.get(task_id)
        if entry is None:
            return None
        task = entry.task
        tick = self._playout.ticks
        previous = task.transition(TaskState.cancelled)
        if previous is None:
            return task  # already ended
        task.cancel_requested_tick = tick
        self._playout.interrupt(task_id)  # on air: fades out within crossfade_frames; queued: leaves the playlist
        if entry.processor is not None:  # only a final task settles, and this one was not final
            entry.processor.close()
        if entry.utterance is not None:
            entry.utterance.close()
        if previous is not TaskState.streaming:
            task.release_audio()  # on air, the fade-out still plays it; "off_air" releases it then
        return task

    def close(self, timeout_s: float = 3.0) -> None:
        """Cancel every unfinished task and stop their threads and sources. Idempotent."""
        with self._lock:
            self._closed = True
            entries = list(self._entries.values())
        entries = [e for e in entries if e.processor is not None]  # settled ones hold nothing to stop
        for entry in entries:
            entry.task.transition(TaskState.cancelled, "server shutting down")
            if entry.processor is not None:
                entry.processor.close()
            if entry.utterance is not None:
                entry.utterance.close()
            entry.task.release_audio()
        deadline = time.monotonic() + timeout_s
        for entry in entries:
            if entry.processor is not None:
                entry.processor.join(max(0.0, deadline - time.monotonic()))
