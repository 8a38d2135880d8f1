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
import enum
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from latentsync.engines import CHUNK_FRAMES, ENGINE_SAMPLE_RATE_HZ, ChunkRequest, ChunkResult
from latentsync.media.timing import samples_before_frame
from latentsync.serving.mixer import ProgramEvent
from latentsync.serving.workers import JobFailed, WorkerPool

logger = logging.getLogger(__name__)

#: Chunks a task may have generated or in flight ahead of the frame on air (bounds memory:
#: 16 x 256 x 256 x 3 bytes = 3 MiB per chunk).
MAX_CHUNKS_AHEAD = 48
#: Frames of features asked for at once: a task's first chunks need only their own Whisper window,
#: the next span is computed while those chunks are generated (48 chunks, ~30 s at 25 fps).
FEATURE_SPAN_FRAMES = 48 * CHUNK_FRAMES
#: Extra frames the jitter buffer keeps in hand beyond the computed minimum.
JITTER_MARGIN_FRAMES = 8
#: Finished tasks kept for ``GET /tasks``.
MAX_FINISHED_TASKS = 200


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


class SpeechProgram:
    """The reorder buffer and jitter buffer of one task, as the mixer's :class:`Program`.

    Generated chunks arrive in any order (:meth:`add_chunk`); frames are handed out in order
    (:meth:`frame`), pasted into the avatar's base frames just in time.

    Args:
        task: The task.
        avatar: The prepared avatar (base frames, paste geometry).
        fps: Stream frame rate.
        tick_counter: Returns the mixer's tick count (interrupt latency in frames); None: not measured.
        on_ttff: Called with the task's time to first frame in seconds (metrics); None: not reported.
        clock: Monotonic clock in seconds for the jitter buffer (default ``time.monotonic``).
    """

    def __init__(self, task: Task, avatar, fps: int, tick_counter=None, on_ttff=None, clock=time.monotonic):
        self.task = task
        self._clock = clock
        self._tick_counter = tick_counter
        self._on_ttff = on_ttff
        self.task_id = task.task_id
        self.num_frames = task.num_frames
        self._avatar = avatar
        self._fps = fps
        self._lock = threading.Lock()
        self._chunks: dict[int, np.ndarray] = {}  # chunk index -> (16, 256, 256, 3) faces
        self._ready_chunks = 0  # contiguous chunks from 0 that have arrived
        self._received = 0
        self._cancelled = threading.Event()
        self._failed = False
        self._started_monotonic: float | None = None
        self._first_chunk_monotonic: float | None = None
        self._on_air_index = 0
        self.changed = threading.Condition(self._lock)

    @property
    def avatar(self):
        """The prepared avatar whose base frames this program pastes into."""
        return self._avatar

    # ----------------------------------------------------------------- producer side
    def add_chunk(self, result: ChunkResult) -> None:
        """Store a generated chunk (any order)."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._chunks[result.chunk_index] = np.asarray(result.faces)
            while self._ready_chunks in self._chunks:
                self._ready_chunks += 1
            if self._first_chunk_monotonic is None:
                self._first_chunk_monotonic = self._clock()
            self._received += 1
            self.task.chunks_generated = self._received
            self.changed.notify_all()

    def generation_started(self) -> None:
        """Mark the moment chunk generation began (the jitter buffer measures from here)."""
        self._started_monotonic = self._clock()

    def fail(self) -> None:
        """Generation failed: the program will never start, or stops where frames run out."""
        with self._lock:
            self._failed = True
            self.changed.notify_all()

    def cancel(self) -> None:
        """Drop everything buffered; the mixer skips (or fades out) this program."""
        with self._lock:
            self._cancelled.set()
            self._chunks.clear()
            self.changed.notify_all()

    def wait_for_room(self, chunk_index: int, timeout_s: float) -> bool:
        """Block until ``chunk_index`` is within :data:`MAX_CHUNKS_AHEAD` of the frame on air."""
        with self._lock:
            return self.changed.wait_for(
                lambda: self._cancelled.is_set() or chunk_index < self._on_air_index // CHUNK_FRAMES + MAX_CHUNKS_AHEAD,
                timeout_s,
            )

    # ----------------------------------------------------------------- mixer side (controller thread)
    def ready_to_start(self) -> bool:
        """Jitter buffer: start once the frames in hand plus those generated while playing cover the task.

        With ``R`` frames ready, generation at ``g`` frames/s and playback at ``r`` = fps, frame
        ``k`` is needed at ``k / r`` and ready at ``(k - R) / g``; no underrun for any ``k < N``
        needs ``R >= (N - 1) * (1 - g / r)``. A faster-than-real-time engine starts with its first chunk.
        """
        if self._cancelled.is_set() or self._failed and self._ready_chunks == 0:
            return False
        ready_frames = min(self._ready_chunks * CHUNK_FRAMES, self.num_frames)
        if ready_frames == 0:
            return False
        if ready_frames >= self.num_frames:
            return True
        started = self._started_monotonic or self._first_chunk_monotonic
        now = self._clock()
        elapsed = max(now - (started or now), 1e-3)
        rate_fps = self._ready_chunks * CHUNK_FRAMES / elapsed
        needed = (self.num_frames - 1) * max(0.0, 1.0 - rate_fps / self._fps)
        return ready_frames >= min(self.num_frames, needed + (JITTER_MARGIN_FRAMES if needed > 0 else 0))

    def frame(self, index: int) -> np.ndarray | None:
        """Full frame ``index`` with its generated face pasted in, or None if not generated yet."""
        faces = self._take(index)
        if faces is None:
            return None
        self.task.frames_streamed = index + 1
        return self._avatar.paste(self._avatar.frame_index(index), faces)

    def _take(self, index: int) -> np.ndarray | None:
        """The generated face of frame ``index``; frees its chunk once the chunk's last frame is taken."""
        chunk, offset = divmod(index, CHUNK_FRAMES)
        with self._lock:
            faces = self._chunks.get(chunk)
            if faces is None:
                return None
            self._on_air_index = index + 1
            if offset == CHUNK_FRAMES - 1:
                del self._chunks[chunk]
            self.changed.notify_all()
            return faces[offset]

    def continuation_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` past the speech (the fade back to idle).

        The generated closed-mouth tail where it exists, else the plain base frame.
        """
        base = self._avatar.frame_index(index)
        face = self._take(index) if index < self.num_frames + self.task.tail_frames else None
        return self._avatar.paste(base, face) if face is not None else self._avatar.frames[base]

    def audio(self, start_sample: int, num_samples: int) -> np.ndarray:
        """``(num_samples,) int16`` of the task's speech from ``start_sample``; zeros past the end."""
        out = np.zeros(num_samples, dtype=np.int16)
        audio = self.task.audio
        if audio is not None:
            part = audio.stream[start_sample : start_sample + num_samples]
            out[: part.shape[0]] = part
        return out

    def is_cancelled(self) -> bool:
        """True once cancelled, or once generation failed and the next frame will never come."""
        if self._cancelled.is_set():
            return True
        return self._failed and (self._on_air_index // CHUNK_FRAMES) not in self._chunks

    def on_air(self, event: ProgramEvent, frames_streamed: int) -> None:
        """Mixer callback: keep the task's state and timestamps."""
        task = self.task
        if event is not ProgramEvent.OFF_AIR:  # off_air counts the fade frames too: not speech
            task.frames_streamed = frames_streamed
        if event is ProgramEvent.FIRST_FRAME:
            task.first_frame_on_air_at = time.time()
            task.first_frame_on_air_monotonic = time.monotonic()
            if self._on_ttff is not None:
                self._on_ttff(task.first_frame_on_air_monotonic - task.received_monotonic)
            task.transition(TaskState.streaming)
        elif event is ProgramEvent.DONE:
            task.transition(TaskState.done)  # refused when generation failed meanwhile: it stays failed
        elif event is ProgramEvent.INTERRUPTED:
            task.transition(TaskState.cancelled)
            self.cancel()
        elif event is ProgramEvent.OFF_AIR:
            if self._tick_counter is not None and task.cancel_requested_tick is not None:
                task.off_air_tick = self._tick_counter()
            with self._lock:  # the fade is over: nothing more will be played
                self._chunks.clear()
            task.release_audio()


class TaskProcessor:
    """Thread that generates one task's chunks (features first, then chunks in order).

    Args:
        task: The task.
        program: Its reorder/jitter buffer.
        pool: The worker pool.
        avatar: The prepared avatar (for base-frame indices).
        deadline_s: Per-job run deadline in seconds (from a worker taking it).
        due_at: Maps a chunk index to the ``time.monotonic()`` by which its first frame must be on
            air (:meth:`TaskManager.due_at`); the pool serves the earliest first.
    """

    def __init__(self, task: Task, program: SpeechProgram, pool: WorkerPool, avatar, deadline_s: float, due_at=None):
        self.task = task
        self.program = program
        self._pool = pool
        self._avatar = avatar
        self._deadline_s = deadline_s
        self._due_at = due_at or (lambda chunk_index: time.monotonic())
        self._stop = threading.Event()
        self._failure = threading.Event()
        self._admitted = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._run, name=f"task-{task.task_id[:8]}", daemon=True)

    def start(self) -> None:
        """Start the thread; it waits (holding only the task's audio) until :meth:`admit`. Idempotent."""
        if not self._started:
            self._started = True
            self._thread.start()

    def admit(self) -> None:
        """Let the task generate (the scheduler admits the task on air and the next ``generate_ahead``)."""
        self._admitted.set()

    @property
    def admitted(self) -> bool:
        """True once :meth:`admit` was called."""
        return self._admitted.is_set()

    def stop(self) -> None:
        """Stop submitting work (cancellation or shutdown) and drop what the task buffered. Idempotent."""
        self._stop.set()
        self.program.cancel()
        self._pool.cancel_task(self.task.task_id)

    def join(self, timeout_s: float) -> None:
        """Wait for the thread."""
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _advance(self, state: TaskState) -> bool:
        """Move to ``state``; False when the task already ended (a cancel may land at any moment)."""
        return not self._stop.is_set() and self.task.transition(state) is not None

    def _fail(self, reason: str) -> None:
        task = self.task
        previous = task.transition(TaskState.failed, reason)
        if previous is None:
            return  # already ended
        self._failure.set()
        self.program.fail()
        self._pool.cancel_task(task.task_id)  # nothing queued for it is needed any more
        if previous is not TaskState.streaming:
            task.release_audio()  # never reached the air: nothing will play it
        # on air: it ends where the frames run out; marked failed now so the API tells the truth
        logger.warning("task %s failed: %s", task.task_id, reason, extra={"task_id": task.task_id})

    def _run(self) -> None:
        task = self.task
        while not self._admitted.wait(0.5):  # waiting its turn: holds only its audio
            if self._stop.is_set():
                return
        try:
            if not self._advance(TaskState.preparing):
                return
            total = task.num_chunks * CHUNK_FRAMES  # the last chunk is padded, never dropped
            spans = [(a, min(a + FEATURE_SPAN_FRAMES, total)) for a in range(0, total, FEATURE_SPAN_FRAMES)]
            pending = self._request_features(*spans[0])
            for k, (first, stop) in enumerate(spans):
                rows = self._await_features(pending)
                if rows is None:
                    return
                if k + 1 < len(spans):  # the next window's features are computed while these chunks are
                    pending = self._request_features(*spans[k + 1])
                if k == 0:
                    if not self._advance(TaskState.generating):
                        return
                    self.program.generation_started()
                for c in range(first // CHUNK_FRAMES, stop // CHUNK_FRAMES):
                    if not self._submit_chunk(c, rows[c * CHUNK_FRAMES - first : (c + 1) * CHUNK_FRAMES - first]):
                        return
        except JobFailed as exc:
            self._fail(str(exc))
        except Exception as exc:  # never let a task thread die silently
            logger.exception("task %s crashed", task.task_id, extra={"task_id": task.task_id})
            self._fail(f"internal error: {type(exc).__name__}: {exc}")

    def _submit_chunk(self, c: int, features: np.ndarray) -> bool:
        """Submit chunk ``c`` once it is within the buffer window; False when the task should stop."""
        task = self.task
        while not self.program.wait_for_room(c, 0.5):
            if self._stop.is_set() or self._failure.is_set():
                return False
        if self._stop.is_set() or self._failure.is_set() or self.program.is_cancelled():
            return False
        frames = np.arange(c * CHUNK_FRAMES, (c + 1) * CHUNK_FRAMES)
        frames = np.minimum(frames, task.num_frames + task.tail_frames - 1)  # last chunk padded, never dropped
        request = ChunkRequest(
            task_id=task.task_id,
            chunk_index=c,
            frame_indices=np.array([self._avatar.frame_index(int(i)) for i in frames], dtype=np.int64),
            features=features,
            seed=task.seed,
            guidance_scale=task.guidance_scale,
        )
        due_at = self._due_at(c)
        self._pool.submit_chunk(request, self._deadline_s, self.program.add_chunk, self._fail, due_at=due_at)
        return True

    def _request_features(self, start_frame: int, end_frame: int) -> tuple[threading.Event, dict] | None:
        """Ask a worker for the feature rows of frames ``[start_frame, end_frame)``; returns a handle."""
        audio = self.task.audio
        if audio is None:  # cancelled before it got here
            return None
        label = f"features {start_frame}-{end_frame} of task {self.task.task_id}"
        return self._submit_features(audio.engine_16k, start_frame, end_frame, label, start_frame // CHUNK_FRAMES)

    def _submit_features(
        self, audio_16k: np.ndarray, start_frame: int, end_frame: int, label: str, chunk_index: int
    ) -> tuple[threading.Event, dict]:
        """Queue one features job (due with chunk ``chunk_index``); a handle for :meth:`_await_features`."""
        box: dict[str, object] = {}
        done = threading.Event()

        def ok(value):
            box["value"] = value
            done.set()

        def err(reason):
            box["error"] = reason
            done.set()

        self._pool.submit_features(
            audio_16k,
            self._deadline_s,
            ok,
            err,
            label,
            frames=(start_frame, end_frame),
            due_at=self._due_at(chunk_index),
            task_id=self.task.task_id,
        )
        return done, box

    def _await_features(self, pending: tuple[threading.Event, dict] | None) -> np.ndarray | None:
        """The rows a :meth:`_request_features` handle asked for; None if the task stopped or failed."""
        if pending is None:
            return None
        done, box = pending
        while not done.wait(0.2):
            if self._stop.is_set():
                return None
        if "error" in box:
            self._fail(str(box["error"]))
            return None
        return np.asarray(box["value"])


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
