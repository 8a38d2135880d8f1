"""The program of a task: its reorder and jitter buffer, played by the mixer; gap frames when speech starves.

One class for every input (docs/streaming-speech.md). Chunks cover contiguous ranges of the
task's *content* frames (frames of its audio), planned by the processor in order
(:meth:`SpeechProgram.plan`); their faces arrive in any order (:meth:`SpeechProgram.add_chunk`)
and are handed out in order, pasted into the avatar's base frames just in time on the controller
thread (:class:`~latentsync.serving.playout.paste.FramePaster`), so buffered chunks hold only
aligned faces (256x256; 512x512 for LatentSync 1.6).

Frames the mixer plays = content frames + *gap* frames: when the next content frame is not
generated at its turn (its audio arrives slower than real time, or its chunk is still in the
pool), the program does not freeze the picture: the base video swings out and back around the
frame where speech paused, mouth closed, in silence, and the speech resumes in sync once its chunk
is there (counted as underrun ticks).
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from latentsync.engines import CHUNK_FRAMES, ChunkResult
from latentsync.serving.playout.mixer import ProgramEvent
from latentsync.serving.playout.paste import FramePaster
from latentsync.serving.tasks.task import Task, TaskState
from latentsync.serving.tasks.utterance import Utterance

logger = logging.getLogger(__name__)

#: Extra frames the jitter buffer keeps in hand beyond the computed minimum.
JITTER_MARGIN_FRAMES = 8
#: Largest swing of the base video's back-and-forth during a gap, in frames. Speech resumes only
#: when the swing is back where it paused, so the picture never jumps; the swings grow (1, 2, then
#: this many frames out and back), so a short hiccup costs 2 frames and a long starvation moves.
GAP_SWING_FRAMES = 3
#: A frame count no open utterance reaches (its length is unknown until it ends).
OPEN_FRAMES = 10**9
#: Arrivals at this fraction of real time or more count as real time in the jitter buffer's frame
#: rule (a client sending at real time is measured a little under it, by its packets' jitter):
#: only the next chunk's prediction waits for them.
ARRIVAL_REAL_TIME = 0.9
#: The jitter buffer's factor on the predicted processing time of the next chunk (chunk 0's time,
#: scaled by the lengths): slack for a pool that is slower for a moment (CPU contention).
PROCESSING_SAFETY = 2.0


class ChunkTimes:
    """How long a channel's recent chunks took in the pool: the jitter buffer's prediction of the next.

    Kept per channel (one per :class:`~latentsync.serving.tasks.task_manager.TaskManager`) so a
    new task's first chunk is not the only evidence: the pool's time on a chunk varies with the
    CPU's load (its 90th percentile is about twice its median on this project's 2-core machine).

    Args:
        size: Chunks remembered (the most recent).
    """

    #: Chunks of this many frames or fewer are "short" (streamed at real time, first chunks); the rest "long".
    SHORT_FRAMES = 8
    #: Samples a length bucket needs before its percentile is used.
    MIN_SAMPLES = 4

    def __init__(self, size: int = 64):
        self._lock = threading.Lock()
        self._times: dict[bool, collections.deque[float]] = {
            True: collections.deque(maxlen=size),
            False: collections.deque(maxlen=size),
        }

    def add(self, frames: int, seconds: float) -> None:
        """Record one chunk of ``frames`` frames that took ``seconds`` in the pool."""
        with self._lock:
            self._times[frames <= self.SHORT_FRAMES].append(seconds)

    def predict(self, frames: int) -> float | None:
        """The 90th percentile of recent chunks of that length bucket, in seconds; None without enough of them."""
        with self._lock:
            times = list(self._times[frames <= self.SHORT_FRAMES])
        if len(times) < self.MIN_SAMPLES:
            return None
        return float(np.percentile(times, 90))


def _out_and_back(frames: int) -> list[int]:
    """Offsets of one swing ``frames`` out and back: ``[1, ..., frames, ..., 1, 0]``."""
    return [*range(1, frames + 1), *range(frames - 1, -1, -1)]


class SpeechProgram:
    """The mixer's :class:`~latentsync.serving.playout.mixer.Program` of one task.

    Args:
        task: The task.
        utterance: Its utterance (what has arrived, whether it ended).
        avatar: The prepared avatar (base frames, paste geometry; :class:`latentsync.avatar.Avatar`).
        fps: Stream frame rate.
        lookahead_frames: The engine's audio look-ahead in frames (a chunk's audio must reach this far
            past its last frame before it can be generated).
        min_chunk_frames: The shortest chunk the processor cuts while audio streams in (the jitter
            buffer predicts the next chunk with it).
        max_frames_ahead: Frames a task may have generated or in flight ahead of the frame on air
            (``tasks.max_frames_ahead``; bounds memory: 196 kB per 256x256 face, 786 kB per 512x512 one).
        start_margin_s: Slack the jitter buffer keeps for an open utterance's next chunk, in seconds
            (``speech_stream.start_margin_s``).
        tick_counter: Returns the mixer's tick count (interrupt latency in frames); None: not measured.
        on_ttff: Called with the task's time to first frame in seconds (metrics); None: not reported.
        clock: Monotonic clock in seconds (default ``time.monotonic``).
        chunk_times: The channel's recent chunk times (this program adds its own); None: its own only.
    """

    def __init__(
        self,
        task: Task,
        utterance: Utterance,
        *,
        avatar: Any,
        fps: int,
        lookahead_frames: int,
        min_chunk_frames: int,
        max_frames_ahead: int,
        start_margin_s: float,
        tick_counter: Callable[[], int] | None = None,
        on_ttff: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        chunk_times: ChunkTimes | None = None,
    ):
        self.task = task
        self._chunk_times = chunk_times
        self.task_id = task.task_id
        self._utterance = utterance
        self._avatar = avatar
        self._fps = fps
        self._lookahead = lookahead_frames
        self._min_chunk = min_chunk_frames
        self._max_ahead = max_frames_ahead
        self.start_margin_s = start_margin_s
        self._tick_counter = tick_counter
        self._on_ttff = on_ttff
        self._clock = clock
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self._starts: list[int] = []  # chunk index -> first content frame (planned in order)
        self._ends: list[int] = []  # chunk index -> one past its last content frame
        self._faces: dict[int, np.ndarray] = {}  # chunk index -> (n, S, S, 3) faces not yet played
        self._next_ready = 0  # chunks 0 .. _next_ready - 1 have arrived
        self._ready_frames = 0  # content frames 0 .. _ready_frames - 1 are generated
        self._received = 0
        self._cancelled = threading.Event()
        self._failed = False
        self._started_monotonic: float | None = None
        self._first_chunk_monotonic: float | None = None
        self._busy_s = 0.0  # time the pool spent on the chunks of the ready frames (one after the other)
        self._last_arrival: float | None = None
        self._on_air_index = 0  # content frames taken by the mixer
        self._gap_frames = 0
        self._gap_samples = 0
        self._swing_step = 0  # frames of the running gap; 0: speaking
        self._swing_head = [x for a in range(1, GAP_SWING_FRAMES) for x in _out_and_back(a)]
        self._swing_cycle = _out_and_back(GAP_SWING_FRAMES)
        self._gap_tick = False  # the last frame() was a gap frame: its audio() is silence
        self._content_played = 0
        self.in_gap = False
        self.underrun_ticks = 0
        self.chunk_audio_at: dict[int, float] = {}  # chunk -> monotonic time its audio was complete
        self._paster = FramePaster(avatar)  # recycled frame buffers, from the first paste until OFF_AIR
        utterance.program = self

    @property
    def avatar(self):
        """The prepared avatar whose base frames this program pastes into."""
        return self._avatar

    @property
    def num_frames(self) -> int:
        """Frames the mixer plays: unknown (huge) while open; content + gap frames once ended."""
        final = self._utterance.final_frames
        return OPEN_FRAMES if final is None else max(final, 1) + self._gap_frames

    @property
    def first_chunk_monotonic(self) -> float | None:
        """When the first generated chunk arrived (monotonic seconds), or None."""
        return self._first_chunk_monotonic

    def content_frames_played(self) -> int:
        """Content frames played so far."""
        return self._content_played

    # ----------------------------------------------------------------- producer side
    def plan(self, chunk_index: int, start_frame: int, frames: int) -> None:
        """Record that chunk ``chunk_index`` covers content frames ``[start_frame, start_frame + frames)``.

        Chunks are planned in order and back to back (the processor does), before they are submitted.
        """
        with self._lock:
            if chunk_index != len(self._starts) or start_frame != (self._ends[-1] if self._ends else 0):
                raise ValueError(f"chunk {chunk_index} at frame {start_frame} is not the next one of {self.task_id}")
            self._starts.append(start_frame)
            self._ends.append(start_frame + frames)

    def add_chunk(self, result: ChunkResult) -> None:
        """Store a generated chunk (any order); faces past its planned length (padding) are dropped."""
        with self._lock:
            k = result.chunk_index
            if self._cancelled.is_set() or k >= len(self._starts) or k < self._next_ready and k not in self._faces:
                return
            self._faces[k] = np.asarray(result.faces)[: self._ends[k] - self._starts[k]]
            while self._next_ready < len(self._starts) and self._next_ready in self._faces:
                self._ready_frames = self._ends[self._next_ready]
                self._next_ready += 1
            now = self._clock()
            if self._first_chunk_monotonic is None:
                self._first_chunk_monotonic = now
            # its processing began when it was planned, or when the chunk before it came back
            began = max(self.chunk_audio_at.get(k, now), self._last_arrival or 0.0)
            self._busy_s += max(0.0, now - began)
            self._last_arrival = now
            if self._chunk_times is not None and k in self.chunk_audio_at:
                self._chunk_times.add(self._ends[k] - self._starts[k], max(0.0, now - began))
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

    def abort(self, reason: str) -> None:
        """The mixer dropped it (making its tick raised): the task fails with ``reason``.

        Called on the controller thread, which must not wait: the program lets go of its faces,
        frame buffers and audio here (no ``OFF_AIR`` follows), and the task is failed on a thread of
        its own (its processor stops and its sources close there).
        """
        with self._lock:
            self._failed = True
            self._cancelled.set()
            self._faces.clear()
            self.changed.notify_all()
        self._paster.release()
        self.task.release_audio()
        threading.Thread(
            target=self._utterance.fail, args=(reason,), name=f"abort-{self.task_id[:8]}", daemon=True
        ).start()

    def cancel(self) -> None:
        """Drop everything buffered; the mixer skips (or fades out) this program."""
        with self._lock:
            self._cancelled.set()
            self._faces.clear()
            self.changed.notify_all()

    def wait_for_room(self, start_frame: int, timeout_s: float) -> bool:
        """Block until content frame ``start_frame`` is within ``max_frames_ahead`` of the frame on air.

        Returns:
            True when there is room (or the program was cancelled); False on timeout.
        """
        with self._lock:
            return self.changed.wait_for(
                lambda: self._cancelled.is_set() or start_frame < self._on_air_index + self._max_ahead, timeout_s
            )

    # ----------------------------------------------------------------- mixer side (controller thread)
    def ready_to_start(self) -> bool:
        """The jitter buffer: start once no frame is expected late.

        Production runs at ``p = min(g, a)`` frames/s: ``g`` the generation rate (ready frames /
        the pool's time on their chunks, one after the other), ``a`` the arrival rate of audio since its first byte
        (infinite once the utterance ended; at :data:`ARRIVAL_REAL_TIME` of real time or more it
        counts as real time). With ``N`` frames known (all once ended, else those
        received so far) and ``R`` ready, frame ``k`` is needed at ``k / fps`` and ready at
        ``(k - R) / p``; no underrun for any ``k < N`` needs ``R >= (N - 1)(1 - p / fps)`` (+
        :data:`JITTER_MARGIN_FRAMES`). An open utterance also waits until its next chunk, predicted
        from the arrival rate and the first chunk's processing time, is due ``start_margin_s``
        before it plays, whatever the input: its processing is predicted from chunk 0's
        (:meth:`_next_chunk_in_time`). An engine faster than real time on audio that is all there
        starts with its first chunk, or a few frames later.
        """
        u = self._utterance
        if self._cancelled.is_set() or self._failed and self._next_ready == 0:
            return False
        ready_frames = self._ready_frames
        if ready_frames == 0:
            return False
        final = u.final_frames
        if final is not None and ready_frames >= final:
            return True
        now = self._clock()
        gen_fps = ready_frames / max(self._busy_s, 1e-3)
        arrival_fps = u.arrival_fps(now)
        known = u.received_frames()
        rate = gen_fps if arrival_fps >= ARRIVAL_REAL_TIME * self._fps else min(gen_fps, arrival_fps)
        needed = (known - 1) * max(0.0, 1.0 - rate / self._fps)
        if ready_frames < min(known, needed + (JITTER_MARGIN_FRAMES if needed > 0 else 0)):
            return False
        return self._next_chunk_in_time(now, ready_frames, arrival_fps)

    def _next_chunk_in_time(self, now: float, ready_frames: int, arrival_fps: float) -> bool:
        """Whether the chunk after the frames in hand is predicted ready ``start_margin_s`` before it plays.

        Its audio is complete when it was planned, or (not yet planned) at first byte + (its end +
        look-ahead) / arrival rate; it is processed from then, or once the worker is past chunk 0,
        in the 90th percentile of the channel's recent chunks of its length (:class:`ChunkTimes`),
        or, with no such evidence yet, in the time chunk 0 took scaled by their lengths, times
        :data:`PROCESSING_SAFETY`.
        """
        with self._lock:
            k = self._next_ready
            if k in self._faces or not self._ends:
                return True
            if k < len(self._ends):
                next_start, next_len = self._starts[k], self._ends[k] - self._starts[k]
            elif self._utterance.ended:  # planned at once, doubling (chunking.next_chunk_frames)
                last = self._ends[-1] - self._starts[-1]
                next_start, next_len = ready_frames, max(self._min_chunk, min(2 * last, CHUNK_FRAMES))
            else:  # cut as soon as its shortest length has arrived
                next_start, next_len = ready_frames, self._min_chunk
            first_len = self._ends[0]
        final = self._utterance.final_frames
        if final is not None and next_start >= final:
            return True  # only the closed-mouth tail is left: the fade back to idle covers it
        first_ready = self._first_chunk_monotonic or now
        chunk0_audio = self.chunk_audio_at.get(0, self._started_monotonic or first_ready)
        recent = self._chunk_times.predict(next_len) if self._chunk_times is not None else None
        if recent is not None:
            processing = recent
        else:  # no evidence yet: chunk 0's time, scaled by their lengths, with a safety factor
            processing = max(1e-3, first_ready - chunk0_audio) * max(1.0, next_len / first_len) * PROCESSING_SAFETY
        audio_done = self.chunk_audio_at.get(k)
        if audio_done is None:
            first_byte = self._utterance.first_byte_monotonic or now
            if math.isinf(arrival_fps):
                audio_done = now
            elif arrival_fps <= 0:
                return False
            else:
                audio_done = first_byte + (next_start + next_len + self._lookahead) / arrival_fps
        due_ready = max(audio_done, first_ready) + processing
        return now + ready_frames / self._fps >= due_ready + self.start_margin_s

    def _swing(self, step: int) -> int:
        """Base-frame offset of gap frame ``step`` (from 1): 1, 0, 1, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, ..."""
        head = self._swing_head
        if step <= len(head):
            return head[step - 1]
        return self._swing_cycle[(step - 1 - len(head)) % len(self._swing_cycle)]

    def _available(self, content: int) -> bool:
        with self._lock:
            k = bisect.bisect_right(self._starts, content) - 1
            return k >= 0 and content < self._ends[k] and k in self._faces

    def frame(self, index: int) -> np.ndarray | None:
        """Frame ``index`` of the play timeline: speech, a gap frame (base video), or None.

        None when the next frame will never come (cancelled, or generation failed) or before the
        first chunk: the mixer then fades out (or holds). :attr:`in_gap` says whether the frame
        returned was a gap frame.
        """
        content = index - self._gap_frames
        ready = self._available(content)
        if not ready and (self._failed or self._cancelled.is_set()):
            self.in_gap = False
            return None
        if self._swing_step == 0:
            if not ready and content > 0:
                self._swing_step = 1  # audio starved (or its chunk still in the pool): a gap begins
        elif ready and self._swing(self._swing_step) == 0:
            self._swing_step = 0  # back where it paused and the speech is here: resume
        else:
            self._swing_step += 1
        if self._swing_step:
            self._gap_frames += 1
            self._gap_tick = True
            self.in_gap = True
            self.underrun_ticks += 1
            base = self._avatar.frame_index(content - 1 + self._swing(self._swing_step))
            return self._avatar.frames[base]
        self._gap_tick = False
        self.in_gap = False
        faces = self._take(content)
        if faces is None:
            return None
        self._content_played = content + 1
        self.task.frames_streamed = content + 1  # speech frames: the gap frames are not the task's
        return self._paster.paste(self._avatar.frame_index(content), faces)

    def _take(self, content: int) -> np.ndarray | None:
        """The generated face of content frame ``content``; frees its chunk once the chunk's last frame is taken."""
        with self._lock:
            k = bisect.bisect_right(self._starts, content) - 1
            faces = self._faces.get(k) if k >= 0 else None
            if faces is None or content >= self._ends[k]:
                return None
            self._on_air_index = content + 1
            if content == self._ends[k] - 1:
                del self._faces[k]
            self.changed.notify_all()
            return faces[content - self._starts[k]]

    def continuation_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` past the speech (the fade back to idle): the closed-mouth tail, else the base frame."""
        self._gap_tick = False
        self.in_gap = False
        content = index - self._gap_frames
        final = self._utterance.final_frames
        face = self._take(content) if final is not None and content < max(final, 1) + self.task.tail_frames else None
        base = self._avatar.frame_index(content)
        return self._paster.paste(base, face) if face is not None else self._avatar.frames[base]

    def audio(self, start_sample: int, num_samples: int) -> np.ndarray:
        """``(num_samples,) int16`` for the tick at ``start_sample`` of the play timeline (silence in a gap)."""
        if self._gap_tick:
            self._gap_tick = False
            self._gap_samples += num_samples
            return np.zeros(num_samples, dtype=np.int16)
        out = np.zeros(num_samples, dtype=np.int16)
        audio = self.task.audio
        if audio is not None:
            start = start_sample - self._gap_samples
            part = audio.stream[start : start + num_samples]
            out[: part.shape[0]] = part
        return out

    def is_cancelled(self) -> bool:
        """True once cancelled, or once generation failed and the next frame will never come."""
        if self._cancelled.is_set():
            return True
        return self._failed and not self._available(self._on_air_index)

    def on_air(self, event: ProgramEvent, frames_streamed: int) -> None:
        """Mixer callback: keep the task's state and timestamps."""
        task = self.task
        if event is not ProgramEvent.OFF_AIR:  # off_air counts the fade frames too: not speech
            task.frames_streamed = max(0, frames_streamed - self._gap_frames)
        if event is ProgramEvent.FIRST_FRAME:
            task.first_frame_on_air_at = time.time()
            task.first_frame_on_air_monotonic = time.monotonic()
            task.first_frame_tick = self._tick_counter() if self._tick_counter is not None else None
            if self._on_ttff is not None:
                self._on_ttff(task.first_frame_on_air_monotonic - task.received_monotonic)
            task.transition(TaskState.streaming)
        elif event is ProgramEvent.DONE:
            task.last_frame_tick = self._tick_counter() if self._tick_counter is not None else None
            task.transition(TaskState.done)  # refused when generation failed meanwhile: it stays failed
        elif event is ProgramEvent.INTERRUPTED:
            task.transition(TaskState.cancelled)
            self.cancel()
        elif event is ProgramEvent.OFF_AIR:
            if self._tick_counter is not None and task.cancel_requested_tick is not None:
                task.off_air_tick = self._tick_counter()
            with self._lock:  # the fade is over: nothing more will be played
                self._faces.clear()
            self._paster.release()  # finished tasks keep their program: not its buffers
            task.release_audio()
