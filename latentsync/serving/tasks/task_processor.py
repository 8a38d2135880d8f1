"""The TaskProcessor: the thread that turns one utterance's audio into chunk jobs as it arrives.

One processor for every input. Chunk ``c`` (content frames ``[s, s + n)``, lengths by
:func:`~latentsync.serving.tasks.chunking.next_chunk_frames`) is submitted once the audio of
frames up to ``s + n`` plus the engine's look-ahead is in hand, or the utterance ended: its job
carries the audio window its features are computed from (the worker computes them, then the
faces), the avatar, and the time its first frame is due on air. While it waits its turn (not
admitted) or for audio, the thread holds nothing but the task's audio, and enforces the
utterance's time bounds (:meth:`Utterance.check_deadlines`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from latentsync.serving.compute.jobs import ChunkJob, JobFailed, JobQueue
from latentsync.serving.tasks.chunking import feature_window, next_chunk_frames, padded_frame_indices
from latentsync.serving.tasks.speech_program import SpeechProgram
from latentsync.serving.tasks.task import FINAL_STATES, Task, TaskState
from latentsync.serving.tasks.utterance import Utterance

logger = logging.getLogger(__name__)

#: Seconds between the checks of a waiting processor (stop, admission, audio, the utterance's deadlines).
POLL_S = 0.1


@dataclass(frozen=True)
class ChunkPlan:
    """How an engine's chunks are cut (``engine`` config and the engine's facts).

    Attributes:
        lookahead_frames: Frames of audio past a chunk's last frame its features need
            (:data:`latentsync.engines.LOOKAHEAD_FRAMES`).
        first_frames: Length of chunk 0 (``engine.first_chunk_frames``).
        min_frames: Shortest later chunk while audio streams in (the first chunk's length).
        engine_min_frames: The engine's shortest chunk; shorter ones are padded to it
            (:data:`latentsync.engines.CHUNK_FRAMES_RANGE`).
    """

    lookahead_frames: int
    first_frames: int
    min_frames: int
    engine_min_frames: int


class TaskProcessor:
    """Generates one task chunk by chunk as its audio arrives.

    Args:
        task: The task.
        program: Its reorder/jitter buffer.
        utterance: Its audio as it arrives.
        jobs: Where chunks are generated.
        avatar: The prepared avatar (base-frame indices; its ``path`` goes on every job).
        plan: Chunk lengths and look-ahead.
        fps: Stream frame rate.
        due_at: Maps a content frame to the ``time.monotonic()`` by which it must be on air
            (:meth:`TaskManager.due_at`).
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self,
        task: Task,
        program: SpeechProgram,
        *,
        utterance: Utterance,
        jobs: JobQueue,
        avatar,
        plan: ChunkPlan,
        fps: int,
        due_at: Callable[[int], float],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.task = task
        self.program = program
        self.utterance = utterance
        self._jobs = jobs
        self._avatar = avatar
        self._plan = plan
        self._fps = fps
        self._due_at = due_at
        self._clock = clock
        self._stop = threading.Event()
        self._admitted = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._run, name=f"task-{task.task_id[:8]}", daemon=True)

    # ----------------------------------------------------------------- lifecycle
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

    def close(self) -> None:
        """Stop submitting work and drop what the task buffered (its queued jobs, its faces). Idempotent."""
        self._stop.set()
        self.program.cancel()
        self._jobs.cancel(self.task.task_id)

    @property
    def running(self) -> bool:
        """True while its thread runs (started and not ended)."""
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        """Wait for the thread (at most ``timeout_s`` seconds)."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def fail(self, reason: str) -> None:
        """Fail the task with ``reason`` (a job failed for good, its decoder failed...): everything it holds goes.

        On air it ends where the frames run out (the mixer fades it out); marked failed at once so
        the API tells the truth.
        """
        task = self.task
        previous = task.transition(TaskState.failed, reason)
        if previous is None:
            return  # already ended
        self._stop.set()
        self.program.fail()
        self._jobs.cancel(task.task_id)  # nothing queued for it is needed any more
        self.utterance.close()
        if previous is not TaskState.streaming:
            task.release_audio()  # never reached the air: nothing will play it
        logger.warning("task %s failed: %s", task.task_id, reason, extra={"task_id": task.task_id})

    # ----------------------------------------------------------------- the thread
    def _stopping(self) -> bool:
        return self._stop.is_set() or self.task.state in FINAL_STATES

    def _advance(self, state: TaskState) -> bool:
        """Move to ``state``; False when the task already ended (a cancel may land at any moment)."""
        return not self._stop.is_set() and self.task.transition(state) is not None

    def _run(self) -> None:
        task = self.task
        try:
            while not self._admitted.wait(POLL_S):  # waiting its turn: holds only its audio
                if self._stopping():
                    return
                self.utterance.check_deadlines()
            if not self._advance(TaskState.preparing):
                return
            start, index, previous = 0, 0, 0
            while True:
                frames = self._wait_chunk(start, previous)
                if frames is None:
                    return
                if frames < 0:
                    return  # every chunk submitted
                self.program.chunk_audio_at.setdefault(index, self._clock())
                if not self._wait_room(start):
                    return
                job = self._job(index, start, frames)
                self.program.plan(index, start, frames)
                task.chunks_planned, task.frames_planned = index + 1, start + frames
                if index == 0:
                    if not self._advance(TaskState.generating):
                        return
                    self.program.generation_started()
                self._jobs.submit(job, self.program.add_chunk, self.fail)
                start, index, previous = start + frames, index + 1, frames
        except JobFailed as exc:
            self.fail(str(exc))
        except Exception as exc:  # never let a task thread die silently
            logger.exception("task %s crashed", task.task_id, extra={"task_id": task.task_id})
            self.fail(f"internal error: {type(exc).__name__}: {exc}")

    def _wait_chunk(self, start: int, previous: int) -> int | None:
        """Wait until the next chunk's audio (+ look-ahead) is in or the utterance ended.

        Returns:
            Its length in frames, -1 once every frame is planned, None to stop (cancelled, failed, empty).
        """
        u, plan = self.utterance, self._plan
        while True:
            with u.changed:
                if self._stopping():
                    return None
                total = None
                if u.ended:
                    if not u.final_frames:
                        self.fail("empty utterance: it ended before any audio")
                        return None
                    total = u.final_frames + self.task.tail_frames
                frames = next_chunk_frames(
                    start,
                    previous,
                    u.received_frames(),
                    total,
                    plan.first_frames,
                    plan.min_frames,
                    plan.lookahead_frames,
                )
                if frames:
                    return frames
                u.changed.wait(POLL_S)
            u.check_deadlines()

    def _wait_room(self, start: int) -> bool:
        """Wait until frame ``start`` is within ``tasks.max_frames_ahead`` of the frame on air; False to stop."""
        while not self.program.wait_for_room(start, POLL_S * 5):
            if self._stopping():
                return False
        return not self._stopping() and not self.program.is_cancelled()

    def _job(self, index: int, start: int, frames: int) -> ChunkJob:
        task, u = self.task, self.utterance
        audio = task.audio
        if audio is None:
            raise JobFailed("the task's audio was released")
        window, rows = feature_window(
            audio.engine_16k, start, frames, self._fps, self._plan.lookahead_frames, ended=u.ended
        )
        indices = np.array([self._avatar.frame_index(i) for i in range(start, start + frames)], np.int64)
        return ChunkJob(
            task_id=task.task_id,
            chunk_index=index,
            avatar=str(self._avatar.path),
            audio_16k=window,
            rows=rows,
            frame_indices=padded_frame_indices(indices, self._plan.engine_min_frames),
            due_at=self._due_at(start),
            seed=task.seed,
            guidance_scale=task.guidance_scale,
            face_size=self._avatar.face_size,
        )
