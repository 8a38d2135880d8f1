"""The TaskProcessor: the thread that turns one task's audio into chunk jobs for the worker pool."""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np

from latentsync.engines import CHUNK_FRAMES, ENGINE_SAMPLE_RATE_HZ, ChunkRequest
from latentsync.media.timing import samples_before_frame
from latentsync.serving.generation.pool import JobFailed, WorkerPool
from latentsync.serving.generation.program import SpeechProgram, StreamSpeechProgram
from latentsync.serving.generation.task import FINAL_STATES, Task, TaskState
from latentsync.serving.generation.utterance import Utterance

#: Frames of features asked for at once: a task's first chunks need only their own Whisper window,
#: the next span is computed while those chunks are generated (48 chunks, ~30 s at 25 fps).
FEATURE_SPAN_FRAMES = 48 * CHUNK_FRAMES

logger = logging.getLogger(__name__)


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


#: Frames of audio before a chunk that its features see (10 s at 25 fps): enough for the
#: parametric engine's loudness normalisation and low-pass, and bounded cost per chunk.
FEATURE_CONTEXT_FRAMES = 250


class StreamTaskProcessor(TaskProcessor):
    """Generates a streamed utterance chunk by chunk as its audio arrives.

    Chunk ``c`` is submitted once the audio of frames ``[0, 16 (c + 1) + lookahead)`` is in hand
    (or the utterance ended): its features come from the last :data:`FEATURE_CONTEXT_FRAMES` of
    audio before it, then the chunk goes to the pool, as for an upload.
    """

    def __init__(
        self,
        task: Task,
        program: StreamSpeechProgram,
        utterance: Utterance,
        pool,
        avatar,
        deadline_s: float,
        lookahead_frames: int,
        fps: int,
        due_at=None,
        clock=time.monotonic,
    ):
        super().__init__(task, program, pool, avatar, deadline_s, due_at)
        self.utterance = utterance
        self._lookahead = lookahead_frames
        self._fps = fps
        self._clock = clock

    def _wait_audio(self, chunk: int) -> bool:
        """Wait until chunk ``chunk``'s audio (+ look-ahead) is in or the utterance ended; False to stop."""
        u = self.utterance
        need = (chunk + 1) * CHUNK_FRAMES + self._lookahead
        while True:
            with u.changed:
                if self._stop.is_set() or self.task.state in FINAL_STATES:
                    return False
                if u.ended or u.received_frames() >= need:
                    return True
                u.changed.wait(0.1)
            if u.idle_for_s() > u.idle_timeout_s:
                logger.info(
                    "utterance %s idle for %.1f s: ended",
                    self.task.task_id,
                    u.idle_timeout_s,
                    extra={"task_id": self.task.task_id},
                )
                u.end("idle_timeout")

    def _run(self) -> None:
        task = self.task
        u = self.utterance
        program = self.program
        assert isinstance(program, StreamSpeechProgram)
        while not self._admitted.wait(0.5):
            if self._stop.is_set():
                return
        try:
            if not self._advance(TaskState.preparing):
                return
            chunk = 0
            while True:
                if not self._wait_audio(chunk):
                    return
                program.chunk_audio_at.setdefault(chunk, self._clock())
                final = u.final_frames
                if final == 0:
                    self._fail("empty utterance: it ended before any audio")
                    return
                if final is not None and chunk * CHUNK_FRAMES >= final + task.tail_frames:
                    return  # every chunk submitted
                rows = self._features(chunk)
                if rows is None:
                    return
                if chunk == 0:
                    if not self._advance(TaskState.generating):
                        return
                    program.generation_started()
                if not self._submit_chunk(chunk, rows):
                    return
                chunk += 1
        except JobFailed as exc:
            self._fail(str(exc))
        except Exception as exc:  # never let a task thread die silently
            logger.exception("task %s crashed", task.task_id, extra={"task_id": task.task_id})
            self._fail(f"internal error: {type(exc).__name__}: {exc}")

    def _features(self, chunk: int) -> np.ndarray | None:
        """Feature rows of chunk ``chunk`` from the audio received so far (+ silence for the tail once ended)."""
        audio = self.task.audio
        if audio is None:
            return None
        first = chunk * CHUNK_FRAMES
        context = max(0, first - FEATURE_CONTEXT_FRAMES)
        offset = samples_before_frame(context, ENGINE_SAMPLE_RATE_HZ, self._fps)
        engine = audio.engine_16k
        if self.utterance.ended:
            silence = np.zeros(math.ceil((self.task.tail_frames + 1) * ENGINE_SAMPLE_RATE_HZ / self._fps), np.float32)
            engine = np.concatenate([engine, silence])
        pending = self._request_window(
            np.array(engine[offset:]), first - context, first - context + CHUNK_FRAMES, chunk
        )
        return self._await_features(pending)

    def _request_window(self, audio_16k: np.ndarray, start: int, end: int, chunk: int):
        label = f"features of chunk {chunk} of utterance {self.task.task_id}"
        return self._submit_features(audio_16k, start, end, label, chunk)
