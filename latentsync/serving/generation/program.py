"""The program of a task: its reorder and jitter buffer, played by the mixer (faces pasted just in time)."""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from latentsync.engines import CHUNK_FRAMES, ChunkResult
from latentsync.serving.generation.task import Task, TaskState
from latentsync.serving.generation.utterance import _OPEN_FRAMES, STREAM_JITTER_MARGIN_S, Utterance
from latentsync.serving.playout.mixer import ProgramEvent

#: Chunks a task may have generated or in flight ahead of the frame on air (bounds memory:
#: 16 x 256 x 256 x 3 bytes = 3 MiB per chunk).
MAX_CHUNKS_AHEAD = 48


#: Extra frames the jitter buffer keeps in hand beyond the computed minimum.
JITTER_MARGIN_FRAMES = 8


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


#: Largest swing of the base video's back-and-forth during a gap, in frames. Speech resumes only
#: when the swing is back where it paused, so the picture never jumps; the swings grow (1, 2, then
#: this many frames out and back), so a short hiccup costs 2 frames and a long starvation moves.
GAP_SWING_FRAMES = 3


def _out_and_back(frames: int) -> list[int]:
    """Offsets of one swing ``frames`` out and back: ``[1, ..., frames, ..., 1, 0]``."""
    return [*range(1, frames + 1), *range(frames - 1, -1, -1)]


class StreamSpeechProgram(SpeechProgram):
    """The mixer's program of a streamed utterance: its length grows until it ends; gaps on starved audio.

    Frames played (the mixer's index) = content frames (of the audio) + gap frames inserted while
    the next chunk's audio had not arrived. Chunks are indexed by content frame.
    """

    def __init__(
        self,
        task: Task,
        utterance: Utterance,
        avatar,
        fps: int,
        lookahead_frames: int,
        tick_counter=None,
        on_ttff=None,
        clock=time.monotonic,
        start_margin_s: float = STREAM_JITTER_MARGIN_S,
    ):
        self._utterance = utterance
        self._lookahead = lookahead_frames
        self._gap_frames = 0
        self._gap_samples = 0
        self._swing_step = 0  # frames of the running gap; 0: speaking
        self._swing_head = [x for a in range(1, GAP_SWING_FRAMES) for x in _out_and_back(a)]
        self._swing_cycle = _out_and_back(GAP_SWING_FRAMES)
        self.start_margin_s = start_margin_s
        self._gap_tick = False  # the last frame() was a gap frame: its audio() is silence
        self._content_played = 0
        self.underrun_ticks = 0
        self.chunk_audio_at: dict[int, float] = {}  # chunk -> monotonic time its audio was complete
        super().__init__(task, avatar, fps, tick_counter, on_ttff, clock)
        utterance.program = self

    @property
    def num_frames(self) -> int:  # type: ignore[override]
        """Frames the mixer plays: unknown (huge) while open; content + gap frames once ended."""
        final = self._utterance.final_frames
        return _OPEN_FRAMES if final is None else max(final, 1) + self._gap_frames

    @num_frames.setter
    def num_frames(self, _value: int) -> None:  # SpeechProgram.__init__ assigns it
        pass

    @property
    def first_chunk_monotonic(self) -> float | None:
        """When the first generated chunk arrived (monotonic seconds), or None."""
        return self._first_chunk_monotonic

    def content_frames_played(self) -> int:
        """Content frames played so far."""
        return self._content_played

    def _swing(self, step: int) -> int:
        """Base-frame offset of gap frame ``step`` (from 1): 1, 0, 1, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3, ..."""
        head = self._swing_head
        if step <= len(head):
            return head[step - 1]
        return self._swing_cycle[(step - 1 - len(head)) % len(self._swing_cycle)]

    def frame(self, index: int) -> np.ndarray | None:
        """Frame ``index`` of the play timeline: speech, a gap frame (base video), or None (generation late)."""
        content = index - self._gap_frames
        chunk = content // CHUNK_FRAMES
        with self._lock:
            ready = chunk in self._chunks
        if self._swing_step == 0:
            if not ready and content > 0 and content % CHUNK_FRAMES == 0:
                self._swing_step = 1  # audio starved (or its chunk still in the pool): a gap begins
        elif ready and self._swing(self._swing_step) == 0:
            self._swing_step = 0  # back where it paused and the speech is here: resume
        else:
            self._swing_step += 1
        if self._swing_step:
            self._gap_frames += 1
            self._gap_tick = True
            self.underrun_ticks += 1
            self.task.frames_streamed = index + 1
            base = self._avatar.frame_index(content - 1 + self._swing(self._swing_step))
            return self._avatar.frames[base]
        self._gap_tick = False
        faces = self._take(content)
        if faces is None:
            return None
        self._content_played = content + 1
        self.task.frames_streamed = index + 1
        return self._avatar.paste(self._avatar.frame_index(content), faces)

    def continuation_frame(self, index: int) -> np.ndarray:
        """Frame ``index`` past the speech (fade back to idle): the closed-mouth tail, else the base frame."""
        self._gap_tick = False
        content = index - self._gap_frames
        final = self._utterance.final_frames
        face = self._take(content) if final is not None and content < max(final, 1) + self.task.tail_frames else None
        base = self._avatar.frame_index(content)
        return self._avatar.paste(base, face) if face is not None else self._avatar.frames[base]

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

    def ready_to_start(self) -> bool:
        """The jitter buffer with arrivals: start once no chunk is expected late.

        Production runs at ``p = min(g, a)`` frames/s: ``g`` the generation rate, ``a`` the arrival
        rate of audio since its first byte (infinite once ended). With ``N`` frames known (all once
        ended, else those received so far), start when the ready frames cover
        ``(N - 1) (1 - p / fps)`` (+ :data:`JITTER_MARGIN_FRAMES`), as :meth:`SpeechProgram.ready_to_start`;
        an open utterance also waits until its next chunk, predicted from the arrival rate and
        the first chunk's processing time, is due ``start_margin_s`` before it plays.
        """
        u = self._utterance
        if self._cancelled.is_set() or self._failed and self._ready_chunks == 0:
            return False
        ready_frames = self._ready_chunks * CHUNK_FRAMES
        if ready_frames == 0:
            return False
        final = u.final_frames
        if final is not None and ready_frames >= final:
            return True
        now = self._clock()
        started = self._started_monotonic or self._first_chunk_monotonic or now
        gen_fps = ready_frames / max(now - started, 1e-3)
        known = u.received_frames()
        if final is None:
            first = u.first_byte_monotonic or now
            arrival_fps = u.received_s() * self._fps / max(now - first, 1e-3)
        else:
            arrival_fps = math.inf
        rate = min(gen_fps, arrival_fps)
        needed = (known - 1) * max(0.0, 1.0 - rate / self._fps)
        if ready_frames < min(known, needed + (JITTER_MARGIN_FRAMES if needed > 0 else 0)):
            return False
        if final is not None:
            return True
        # the next chunk: its audio complete at first + (2*16 + lookahead) / a, then processed as chunk 0 was
        chunk0_audio = self.chunk_audio_at.get(0)
        process_s = max(0.0, (self._first_chunk_monotonic or now) - (chunk0_audio or now))
        next_chunk = self._ready_chunks
        if next_chunk in self._chunks or arrival_fps <= 0:
            return True
        due_ready = first + ((next_chunk + 1) * CHUNK_FRAMES + self._lookahead) / arrival_fps + process_s
        return now + next_chunk * CHUNK_FRAMES / self._fps >= due_ready + self.start_margin_s
