"""Tasks: one uploaded speech from acceptance to the last frame on air.

A :class:`TaskProcessor` thread per task turns the audio into per-frame features and 16-frame
chunks, submits them to the :class:`~latentsync.serving.workers.WorkerPool` (a bounded window ahead
of playback), and puts the out-of-order results back in order in a :class:`SpeechProgram`, which
the controller's mixer plays: faces are pasted into full frames just in time, on the controller
thread, so buffered chunks hold only 256x256 faces.

Scheduling (docs/scheduling.md): only the task on air and the next ``generate_ahead`` tasks are
admitted to generate; every pool job carries the monotonic time by which its first frame must be
on air, and the pool serves the earliest first. A task's state changes only through
:meth:`Task.transition`, under the task's lock, along :data:`ALLOWED_MOVES`.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid

import numpy as np

from latentsync.engines import CHUNK_FRAMES, ENGINE_SAMPLE_RATE_HZ
from latentsync.media.timing import samples_before_frame
from latentsync.serving.generation.pool import WorkerPool
from latentsync.serving.generation.processor import TaskProcessor
from latentsync.serving.generation.program import SpeechProgram
from latentsync.serving.generation.task import FINAL_STATES, WAITING_STATES, Task, TaskAudio, TaskState

logger = logging.getLogger(__name__)

#: Finished tasks kept for ``GET /tasks``.
MAX_FINISHED_TASKS = 200


class TaskManager:
    """Accepts tasks, runs their processors, keeps recent ones for the API.

    Args:
        pool: The worker pool.
        avatar: The prepared avatar.
        enqueue_program: Puts a program on the controller's playlist (False when full).
        interrupt_program: Fades a program out / drops it from the playlist.
        tick_counter: Returns the mixer's tick count (to measure interrupt latency in frames).
        tail_frames: Silent frames generated after each speech (the crossfade back to idle).
        on_ttff: Called with each task's time to first frame in seconds (metrics).
        fps: Stream frame rate.
        sample_rate_hz: Stream audio rate in Hz.
        max_queued: Tasks that may wait (not yet on air) before new ones are refused.
        deadline_s: Per-job run deadline in seconds.
        generate_ahead: Tasks after the one on air that may generate (``tasks.generate_ahead``);
            later ones wait holding only their audio.
    """

    def __init__(
        self,
        pool: WorkerPool,
        avatar,
        enqueue_program,
        interrupt_program,
        tick_counter,
        fps: int,
        sample_rate_hz: int,
        max_queued: int,
        deadline_s: float,
        tail_frames: int = 0,
        on_ttff=None,
        generate_ahead: int = 1,
    ):
        self._pool = pool
        self._avatar = avatar
        self._enqueue = enqueue_program
        self._interrupt = interrupt_program
        self._tick_counter = tick_counter
        self._fps = fps
        self._sample_rate_hz = sample_rate_hz
        self._max_queued = max_queued
        self._deadline_s = deadline_s
        self._tail_frames = tail_frames
        self._on_ttff = on_ttff
        self._generate_ahead = int(generate_ahead)
        self._trimmed_final: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._tasks: collections.OrderedDict[str, tuple[Task, TaskProcessor]] = collections.OrderedDict()
        self._closed = False

    def waiting(self) -> int:
        """Tasks accepted and not on air yet."""
        with self._lock:
            return self._count(WAITING_STATES)

    def _count(self, states: tuple[TaskState, ...]) -> int:
        """Tasks in one of ``states`` (lock held)."""
        return sum(1 for t, _ in self._tasks.values() if t.state in states)

    def _admit(self, _task: Task | None = None) -> None:
        """Admit the first ``1 + generate_ahead`` unfinished tasks (in playlist order) to generate.

        Called on every submit and whenever a task reaches a final state (its ``on_final`` hook,
        possibly on the controller thread: it only sets events, never blocks).
        """
        with self._lock:
            if self._closed:
                return
            active = [p for t, p in self._tasks.values() if t.state not in FINAL_STATES]
        for processor in active[: 1 + self._generate_ahead]:
            processor.admit()

    def due_at(self, task: Task, chunk_index: int) -> float:
        """The ``time.monotonic()`` by which chunk ``chunk_index`` of ``task`` must start playing.

        On air: now plus the frames still to play before that chunk. Not on air yet: the earliest
        time it could start, i.e. when every unfinished task ahead of it would end if it played
        from now without a pause, plus the chunk's offset.

        Args:
            task: An accepted task.
            chunk_index: Its chunk, from 0.

        Returns:
            Seconds on the monotonic clock.
        """
        now = time.monotonic()
        offset_frames = chunk_index * CHUNK_FRAMES
        with self._lock:
            active = [t for t, _ in self._tasks.values() if t.state not in FINAL_STATES or t is task]
        start = now
        for other in active:
            on_air = other.first_frame_on_air_monotonic is not None
            if other is task:
                if on_air:
                    return now + (offset_frames - task.frames_streamed) / self._fps
                return start + offset_frames / self._fps
            if on_air:
                start = now + max(0, other.num_frames - other.frames_streamed) / self._fps
            else:
                start += other.num_frames / self._fps
        return now + offset_frames / self._fps  # no longer listed: as soon as possible

    def submit(
        self,
        audio: TaskAudio,
        seed: int | None,
        guidance_scale: float | None,
        received: tuple[float, float] | None = None,
    ) -> tuple[Task, int] | None:
        """Accept a task.

        Args:
            audio: The decoded speech.
            seed: Engine seed (None: engine default).
            guidance_scale: Engine guidance (None: engine default).
            received: ``(time.time(), time.monotonic())`` when the request arrived (None: now).

        Returns:
            ``(task, position)`` where position counts the tasks ahead of it (0: next on air), or
            None when ``max_queued`` tasks already wait (the caller answers 429).
        """
        num_frames = max(1, math.ceil(audio.stream.shape[0] * self._fps / self._sample_rate_hz))
        padded = np.zeros(samples_before_frame(num_frames, self._sample_rate_hz, self._fps), dtype=np.int16)
        padded[: audio.stream.shape[0]] = audio.stream[: padded.shape[0]]
        tail = self._tail_frames
        silence = np.zeros(math.ceil((tail + 1) * ENGINE_SAMPLE_RATE_HZ / self._fps), dtype=np.float32)
        audio = TaskAudio(padded, np.concatenate([audio.engine_16k, silence]), audio.sample_rate_hz)
        task = Task(
            task_id=uuid.uuid4().hex,
            audio=audio,
            num_frames=num_frames,
            num_chunks=math.ceil((num_frames + tail) / CHUNK_FRAMES),
            tail_frames=tail,
            seed=seed,
            guidance_scale=guidance_scale,
        )
        if received is not None:
            task.received_at, task.received_monotonic = received
        for _attempt in range(2):  # a second build only if the avatar was switched in between
            pool, avatar = self.binding()
            program = SpeechProgram(task, avatar, self._fps, self._tick_counter, self._on_ttff)
            processor = TaskProcessor(
                task,
                program,
                pool,
                avatar,
                self._deadline_s,
                due_at=lambda chunk_index: self.due_at(task, chunk_index),
            )
            with self._lock:
                ahead = self._count((*WAITING_STATES, TaskState.streaming))
                stale = program.avatar is not self._avatar
            if stale:
                continue
            if not self.accept(task, program, processor):
                return None
            return task, ahead
        return None

    def accept(self, task: Task, program: SpeechProgram, processor: TaskProcessor) -> bool:
        """Queue a built task (an upload's, or a streamed utterance's) and start its processor.

        Returns:
            False when ``max_queued`` tasks already wait, the playlist is full or the manager is closed.
        """
        task.on_final = self._admit
        with self._lock:
            if self._closed or program.avatar is not self._avatar:  # built before an avatar switch
                return False
            if self._count(WAITING_STATES) >= self._max_queued or not self._enqueue(program):
                return False
            self._tasks[task.task_id] = (task, processor)
            self._trim()
        processor.start()
        self._admit()
        return True

    def switch_avatar(self, pool, avatar, on_switch) -> bool:
        """Give tasks accepted from now on another avatar, if no task is unfinished (idle).

        Atomic with :meth:`accept`: a task is built and accepted wholly with the old avatar or
        wholly with the new one (:meth:`accept` refuses a program built before the switch).

        Args:
            pool: The pool view whose jobs name the new avatar (:class:`~latentsync.serving.channels.ChannelPool`).
            avatar: The new prepared avatar.
            on_switch: Called under the manager's lock when the switch is made (it must not block;
                e.g. :meth:`ProgramMixer.switch_idle`).

        Returns:
            True if switched; False while a task is unfinished (queued, generating or on air) or
            once the manager is closed (nothing changed then).
        """
        with self._lock:
            if self._closed or any(t.state not in FINAL_STATES for t, _ in self._tasks.values()):
                return False
            on_switch()
            self._pool = pool
            self._avatar = avatar
            return True

    # what a task built outside this class (latentsync.serving.speech_stream) needs
    def binding(self) -> tuple:
        """``(pool, avatar)`` for a new task, read together (an avatar switch changes both)."""
        with self._lock:
            return self._pool, self._avatar

    @property
    def pool(self) -> WorkerPool:
        """The worker pool (view) new tasks use."""
        return self._pool

    @property
    def avatar(self):
        """The prepared avatar new tasks use."""
        return self._avatar

    @property
    def fps(self) -> int:
        """Stream frame rate."""
        return self._fps

    @property
    def sample_rate_hz(self) -> int:
        """Stream audio rate in Hz."""
        return self._sample_rate_hz

    @property
    def tail_frames(self) -> int:
        """Silent frames generated after each speech."""
        return self._tail_frames

    @property
    def deadline_s(self) -> float:
        """Per-job run deadline in seconds."""
        return self._deadline_s

    @property
    def tick_counter(self):
        """Returns the mixer's tick count."""
        return self._tick_counter

    @property
    def on_ttff(self):
        """Time-to-first-frame callback (metrics), or None."""
        return self._on_ttff

    def admitted(self) -> int:
        """Unfinished tasks admitted to generate (at most ``1 + generate_ahead``)."""
        with self._lock:
            return sum(1 for t, p in self._tasks.values() if t.state not in FINAL_STATES and p.admitted)

    def _trim(self) -> None:
        finished = [k for k, (t, _) in self._tasks.items() if t.state in FINAL_STATES]
        for key in finished[: max(0, len(finished) - MAX_FINISHED_TASKS)]:
            self._trimmed_final[self._tasks[key][0].state.value] += 1
            del self._tasks[key]

    def final_counts(self) -> dict[str, int]:
        """Tasks that ended since start, by final state (``done``, ``failed``, ``cancelled``)."""
        with self._lock:
            counts = collections.Counter(self._trimmed_final)
            counts.update(t.state.value for t, _ in self._tasks.values() if t.state in FINAL_STATES)
        return {state.value: counts.get(state.value, 0) for state in FINAL_STATES}

    def get(self, task_id: str) -> Task | None:
        """The task, if known."""
        with self._lock:
            entry = self._tasks.get(task_id)
        return entry[0] if entry else None

    def list(self, limit: int = 50) -> list[Task]:
        """Most recent tasks first."""
        with self._lock:
            tasks = [t for t, _ in self._tasks.values()]
        return list(reversed(tasks))[:limit]

    def cancel(self, task_id: str) -> Task | None:
        """Cancel a waiting task, or fade out one on air (within ``crossfade_frames``).

        Everything the task held goes at once: its queued pool jobs leave the pool's queue, its
        buffered chunks are dropped, its audio is released (on air: once the fade-out has played
        it), and it stops counting toward ``api.max_queued``; the next waiting task is admitted.
        """
        with self._lock:
            entry = self._tasks.get(task_id)
        if entry is None:
            return None
        task, processor = entry
        tick = self._tick_counter()
        previous = task.transition(TaskState.cancelled)
        if previous is None:
            return task  # already ended
        task.cancel_requested_tick = tick
        self._interrupt(task_id)  # on air: fades out within crossfade_frames; queued: leaves the playlist
        processor.stop()
        if previous is not TaskState.streaming:
            task.release_audio()  # on air, the fade-out still plays it; "off_air" releases it then
        return task

    def close(self, timeout_s: float = 3.0) -> None:
        """Cancel every unfinished task and stop their threads. Idempotent."""
        with self._lock:
            self._closed = True
            entries = list(self._tasks.values())
        for task, processor in entries:
            task.transition(TaskState.cancelled, "server shutting down")
            processor.stop()
            task.release_audio()
        deadline = time.monotonic() + timeout_s
        for _, processor in entries:
            processor.join(max(0.0, deadline - time.monotonic()))
