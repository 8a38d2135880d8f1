"""Speech that streams in: utterances whose PCM arrives while they are generated and played.

One API for every front door (the ``/ws/speech`` WebSocket, ``POST /speak``, the WebSocket's
``text`` messages): :meth:`SpeechStreams.open` an utterance, :meth:`Utterance.push` PCM of any
rate and channel count as it arrives, :meth:`Utterance.end` it, cancel it like any task
(``DELETE /tasks/<id>``). An utterance is a task (same lifecycle, queue, crossfades, ``GET
/tasks``); its :class:`StreamTaskProcessor` submits chunk ``c`` as soon as the audio of its 16
frames plus the engine's look-ahead (:data:`LOOKAHEAD_FRAMES`) is in hand, and its
:class:`StreamSpeechProgram` starts playback by the jitter-buffer rule with the arrival rate seen so
far. When the next chunk is not there at its turn (its audio arrives slower than real time, or it
is still in the pool), the program inserts *gap* frames instead of freezing:
the base video keeps moving (a short back-and-forth around the frame where speech paused) with
the mouth closed and silence, and the speech resumes in sync once its next chunk is generated
(counted as ``underrun_ticks`` of the task). Facts and figures: docs/streaming-speech.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import soxr

from latentsync.engines import CHUNK_FRAMES, ENGINE_SAMPLE_RATE_HZ
from latentsync.media.timing import samples_before_frame
from latentsync.serving.tasks import (
    FINAL_STATES,
    JITTER_MARGIN_FRAMES,
    JobFailed,
    SpeechProgram,
    Task,
    TaskProcessor,
    TaskState,
)

logger = logging.getLogger(__name__)

#: Audio frames past a chunk's last frame the engine must hear before that chunk's features are
#: final, per engine (at 25 fps one frame is 40 ms).
#: parametric: the last frame of a chunk is sampled at its centre + ``ParametricOptions.look_ahead_s``
#: (40 ms), i.e. 20 ms past the chunk's end, interpolated between 10 ms envelope points whose 30 ms
#: Hann windows (``_WIN_S``) reach at most 45 ms past the end; the last 5 ms of a Hann window carry
#: under 3 % of its weight -> 1 frame (40 ms).
#: latentsync: frame ``i`` reads Whisper encoder positions up to ``2 i + 5`` (20 ms each, see
#: ``latentsync.models.whisper_features``), i.e. audio up to 80 ms past the frame's end, + the
#: 25 ms STFT window centred on the last mel frame -> 3 frames (120 ms).
LOOKAHEAD_FRAMES = {"parametric": 1, "latentsync": 3}
#: Look-ahead for an engine not in :data:`LOOKAHEAD_FRAMES` (a test engine): the largest known.
DEFAULT_LOOKAHEAD_FRAMES = max(LOOKAHEAD_FRAMES.values())
#: Frames of audio before a chunk that its features see (10 s at 25 fps): enough for the
#: parametric engine's loudness normalisation and low-pass, and bounded cost per chunk.
FEATURE_CONTEXT_FRAMES = 250
#: Largest swing of the base video's back-and-forth during a gap, in frames. Speech resumes only
#: when the swing is back where it paused, so the picture never jumps; the swings grow (1, 2, then
#: this many frames out and back), so a short hiccup costs 2 frames and a long starvation moves.
GAP_SWING_FRAMES = 3
#: Slack the jitter buffer keeps for an open utterance's next chunk, in seconds (arrival jitter of
#: the client's packets and of the pool).
STREAM_JITTER_MARGIN_S = 0.04  # default of speech_stream.start_margin_s
#: PCM encodings accepted, with their bytes per sample.
ENCODINGS = {"s16le": 2, "f32le": 4}
#: Sample rates accepted, in Hz.
SAMPLE_RATE_RANGE_HZ = (8000, 192000)
#: Channels accepted (interleaved; mixed down to mono).
MAX_CHANNELS = 8
#: A frame count no open utterance reaches (its length is unknown until it ends).
_OPEN_FRAMES = 10**9


class SpeechStreamError(Exception):
    """A refused speech-stream operation.

    Attributes:
        code: Machine-readable reason (the WebSocket's ``error`` event ``code``, or the HTTP error code).
        message: What was wrong, for people.
        status: The HTTP status a front door answers with.
    """

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class PcmFormat:
    """Raw PCM as a client sends it (no container: never goes through FFmpeg).

    Attributes:
        sample_rate_hz: Samples per second per channel.
        channels: Interleaved channels (mixed down to mono by averaging).
        encoding: ``s16le`` (int16 little-endian) or ``f32le`` (float32 little-endian in [-1, 1]).
    """

    sample_rate_hz: int
    channels: int = 1
    encoding: str = "s16le"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise SpeechStreamError("bad_encoding", f"encoding {self.encoding!r} is not one of {sorted(ENCODINGS)}")
        low, high = SAMPLE_RATE_RANGE_HZ
        if (
            not isinstance(self.sample_rate_hz, int)
            or isinstance(self.sample_rate_hz, bool)
            or not (low <= self.sample_rate_hz <= high)
        ):
            raise SpeechStreamError(
                "bad_sample_rate", f"sample_rate {self.sample_rate_hz!r} is not an integer in [{low}, {high}] Hz"
            )
        if (
            not isinstance(self.channels, int)
            or isinstance(self.channels, bool)
            or not (1 <= self.channels <= MAX_CHANNELS)
        ):
            raise SpeechStreamError(
                "bad_channels", f"channels {self.channels!r} is not an integer in [1, {MAX_CHANNELS}]"
            )

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel."""
        return ENCODINGS[self.encoding] * self.channels

    def decode(self, data: bytes) -> np.ndarray:
        """Raw bytes to mono samples.

        Args:
            data: Interleaved PCM, a whole number of :attr:`frame_bytes`.

        Returns:
            ``(n,) float32`` mono in [-1, 1].

        Raises:
            SpeechStreamError: ``odd_length`` if the byte count is not a whole number of sample
                frames; ``bad_samples`` if float samples are not finite.
        """
        if len(data) % self.frame_bytes:
            raise SpeechStreamError(
                "odd_length",
                f"{len(data)} bytes is not a whole number of {self.channels}-channel "
                f"{self.encoding} samples ({self.frame_bytes} bytes each)",
            )
        if self.encoding == "s16le":
            x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        else:
            x = np.frombuffer(data, dtype="<f4").astype(np.float32)
            if not np.all(np.isfinite(x)):
                raise SpeechStreamError("bad_samples", "f32le samples must be finite")
            x = np.clip(x, -1.0, 1.0)
        return x.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)


class _Growable:
    """A 1-D array that grows by doubling up to ``max_len`` (amortised O(1) appends)."""

    def __init__(self, dtype, max_len: int):
        self._data = np.zeros(1024, dtype=dtype)
        self.size = 0
        self._max_len = max_len

    def append(self, x: np.ndarray) -> None:
        need = self.size + x.shape[0]
        if need > self._max_len:
            raise SpeechStreamError("too_long", f"utterance longer than {self._max_len} samples (api.max_audio_s)")
        if need > self._data.shape[0]:
            bigger = np.zeros(min(max(need, 2 * self._data.shape[0]), self._max_len), dtype=self._data.dtype)
            bigger[: self.size] = self._data[: self.size]
            self._data = bigger
        self._data[self.size : need] = x
        self.size = need

    def view(self) -> np.ndarray:
        return self._data[: self.size]


class StreamTaskAudio:
    """A streamed utterance's speech, growing as PCM arrives (the task's ``audio``).

    Each pushed block is resampled with a streaming soxr resampler (state kept across blocks, so
    block edges leave no clicks) to the stream rate (what goes on air) and to 16 kHz (what the
    engine analyses). Thread-safe.

    Args:
        sample_rate_hz: Stream audio rate in Hz.
        max_duration_s: Longest utterance accepted (``api.max_audio_s``).
    """

    def __init__(self, sample_rate_hz: int, max_duration_s: float):
        self.sample_rate_hz = sample_rate_hz
        self._lock = threading.Lock()
        self._stream = _Growable(np.int16, int(max_duration_s * sample_rate_hz) + sample_rate_hz)
        self._engine = _Growable(np.float32, int(max_duration_s * ENGINE_SAMPLE_RATE_HZ) + ENGINE_SAMPLE_RATE_HZ)
        self._in_rate: int | None = None
        self._to_stream: soxr.ResampleStream | None = None
        self._to_engine: soxr.ResampleStream | None = None

    def _flush(self) -> None:
        if self._to_stream is not None and self._to_engine is not None:
            empty = np.zeros(0, np.float32)
            stream = self._to_stream.resample_chunk(empty, last=True)
            self._store(stream, self._to_engine.resample_chunk(empty, last=True))
        self._to_stream = self._to_engine = self._in_rate = None

    def _store(self, stream: np.ndarray, engine: np.ndarray) -> None:
        self._stream.append(np.clip(np.rint(stream * 32768.0), -32768, 32767).astype(np.int16))
        self._engine.append(engine.astype(np.float32))

    def push(self, mono: np.ndarray, rate_hz: int) -> None:
        """Append ``(n,) float32`` mono samples at ``rate_hz``.

        Raises:
            SpeechStreamError: ``too_long`` past ``max_duration_s``.
        """
        with self._lock:
            if rate_hz != self._in_rate:
                self._flush()  # another source (e.g. synthesised text after PCM): finish the old one
                self._in_rate = rate_hz
                self._to_stream = soxr.ResampleStream(rate_hz, self.sample_rate_hz, 1, dtype="float32", quality="HQ")
                self._to_engine = soxr.ResampleStream(rate_hz, ENGINE_SAMPLE_RATE_HZ, 1, dtype="float32", quality="HQ")
            assert self._to_stream is not None and self._to_engine is not None
            x = np.ascontiguousarray(mono, dtype=np.float32)
            self._store(self._to_stream.resample_chunk(x), self._to_engine.resample_chunk(x))

    def finish(self) -> None:
        """Flush the resamplers' last samples (the utterance ended)."""
        with self._lock:
            self._flush()

    @property
    def stream(self) -> np.ndarray:
        """``(N,) int16`` mono at the stream rate received so far (a view: do not modify)."""
        with self._lock:
            return self._stream.view()

    @property
    def engine_16k(self) -> np.ndarray:
        """``(M,) float32`` mono at 16 kHz received so far (a view: do not modify)."""
        with self._lock:
            return self._engine.view()

    @property
    def duration_s(self) -> float:
        """Seconds received so far."""
        with self._lock:
            return self._stream.size / self.sample_rate_hz


class Utterance:
    """The producer side of one streamed utterance: push PCM, end, read its progress.

    Built by :meth:`SpeechStreams.open`. Thread-safe; every wait has a timeout.

    Args:
        task: Its task (``task.audio`` is a :class:`StreamTaskAudio` until released).
        fps: Stream frame rate.
        max_buffered_s: Most seconds of audio received and not yet played (``speech_stream.max_buffered_s``).
        idle_timeout_s: An open utterance that gets nothing for this long is ended (what it has plays).
        clock: Monotonic clock in seconds.
    """

    def __init__(self, task: Task, fps: int, max_buffered_s: float, idle_timeout_s: float, clock=time.monotonic):
        self.task = task
        self.fps = fps
        self.max_buffered_s = max_buffered_s
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self.changed = threading.Condition()
        self.ended = False
        self.end_reason: str | None = None
        self.first_byte_monotonic: float | None = None
        self.last_push_monotonic = clock()
        self.final_frames: int | None = None
        self.program: StreamSpeechProgram | None = None

    @property
    def task_id(self) -> str:
        """Its task's id."""
        return self.task.task_id

    def received_frames(self) -> int:
        """Whole frames of audio received (all frames, the last one partial, once ended)."""
        if self.final_frames is not None:
            return self.final_frames
        audio = self.task.audio
        if audio is None:
            return 0
        # the 16 kHz copy lags the input by the resampler's delay (~16 ms from 48 kHz): count what both hold
        stream = audio.stream.shape[0] * self.fps // audio.sample_rate_hz
        return min(stream, audio.engine_16k.shape[0] * self.fps // ENGINE_SAMPLE_RATE_HZ)

    def received_s(self) -> float:
        """Seconds of audio received (what both resampled copies hold)."""
        audio = self.task.audio
        if audio is None:
            return self.received_frames() / self.fps
        return min(audio.stream.shape[0] / audio.sample_rate_hz, audio.engine_16k.shape[0] / ENGINE_SAMPLE_RATE_HZ)

    def buffered_s(self) -> float:
        """Seconds received and not yet played."""
        played = self.program.content_frames_played() if self.program is not None else 0
        return max(0, self.received_frames() - played) / self.fps

    def push(self, mono: np.ndarray, rate_hz: int) -> float:
        """Append speech.

        Args:
            mono: ``(n,) float32`` mono samples in [-1, 1].
            rate_hz: Their sample rate in Hz.

        Returns:
            Seconds now buffered (received, not played yet).

        Raises:
            SpeechStreamError: ``not_open`` after end/cancel/failure; ``buffer_full`` when more than
                ``max_buffered_s`` would be waiting to play (the utterance is then cancelled);
                ``too_long`` past ``api.max_audio_s``.
        """
        with self.changed:
            if self.ended or self.task.state in FINAL_STATES or self.task.audio is None:
                raise SpeechStreamError("not_open", f"utterance {self.task_id} is {self._status()}: no more audio", 409)
            audio = self.task.audio
            if self.buffered_s() + mono.shape[0] / rate_hz > self.max_buffered_s:
                raise SpeechStreamError(
                    "buffer_full",
                    f"more than speech_stream.max_buffered_s = "
                    f"{self.max_buffered_s:g} s of audio waiting to play: send at real time",
                    429,
                )
            audio.push(mono, rate_hz)
            now = self._clock()
            if self.first_byte_monotonic is None and mono.shape[0]:
                self.first_byte_monotonic = now
            self.last_push_monotonic = now
            self._update_task()
            self.changed.notify_all()
            return self.buffered_s()

    def wait_for_room(self, seconds: float, timeout_s: float) -> bool:
        """Block until ``seconds`` more audio fits the buffer bound (a producer faster than real time).

        Returns:
            True when it fits; False on timeout or once the utterance can take no more audio.
        """
        deadline = self._clock() + timeout_s
        while self.buffered_s() + seconds > self.max_buffered_s:
            if self.ended or self.task.state in FINAL_STATES or self._clock() >= deadline:
                return False
            with self.changed:
                self.last_push_monotonic = self._clock()  # a producer waiting for room is not idle
                self.changed.wait(0.05)
        return not self.ended

    def end(self, reason: str | None = None) -> None:
        """No more audio: what was received plays to its end. Idempotent."""
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
            self.end_reason = reason
            self._update_task()
            self.changed.notify_all()

    def idle_for_s(self) -> float:
        """Seconds since the last push (or :meth:`touch`, or the opening)."""
        return self._clock() - self.last_push_monotonic

    def touch(self) -> None:
        """Count activity without audio (a text being synthesised): postpones the idle timeout."""
        with self.changed:
            self.last_push_monotonic = self._clock()

    def _update_task(self) -> None:
        task = self.task
        frames = self.received_frames()
        task.num_frames = max(1, frames)
        task.num_chunks = math.ceil((task.num_frames + task.tail_frames) / CHUNK_FRAMES)
        audio = task.audio
        if audio is not None:
            task.audio_duration_s = audio.duration_s

    def _status(self) -> str:
        return "ended" if self.ended else self.task.state.value


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


@dataclass(frozen=True)
class StreamLimits:
    """Bounds of streamed speech (``speech_stream`` config section).

    Attributes:
        max_open: Utterances open (not ended) at once.
        max_buffered_s: Seconds of audio received and not yet played, per utterance.
        idle_timeout_s: An open utterance that receives nothing for this long is ended.
        max_duration_s: Longest utterance (``api.max_audio_s``).
        start_margin_s: Slack the jitter buffer keeps for an open utterance's next chunk, in seconds.
    """

    max_open: int = 4
    max_buffered_s: float = 30.0
    idle_timeout_s: float = 10.0
    max_duration_s: float = 300.0
    start_margin_s: float = STREAM_JITTER_MARGIN_S


class SpeechStreams:
    """Opens streamed utterances as tasks of a :class:`~latentsync.serving.tasks.TaskManager`.

    Args:
        manager: The task manager (queue, admission, cancel, ``GET /tasks``).
        limits: The bounds.
        lookahead_frames: The engine's audio look-ahead (:data:`LOOKAHEAD_FRAMES`).
    """

    def __init__(self, manager, limits: StreamLimits, lookahead_frames: int):
        self.manager = manager
        self.limits = limits
        self.lookahead_frames = lookahead_frames
        self._lock = threading.Lock()
        self._open: dict[str, Utterance] = {}

    def open_count(self) -> int:
        """Utterances still open (not ended and not final)."""
        with self._lock:
            self._open = {k: u for k, u in self._open.items() if not u.ended and u.task.state not in FINAL_STATES}
            return len(self._open)

    def open(
        self, seed: int | None = None, guidance_scale: float | None = None, received: tuple[float, float] | None = None
    ) -> Utterance:
        """Open an utterance: a task that waits for audio, queued behind the tasks already accepted.

        Raises:
            SpeechStreamError: ``too_many_streams`` (429) at ``max_open``; ``queue_full`` (429) when
                ``api.max_queued`` tasks already wait.
        """
        if self.open_count() >= self.limits.max_open:
            raise SpeechStreamError(
                "too_many_streams", f"{self.limits.max_open} utterances already open (speech_stream.max_open)", 429
            )
        m = self.manager
        task = Task(
            task_id=uuid.uuid4().hex,
            audio=None,
            num_frames=1,
            num_chunks=1,
            tail_frames=m.tail_frames,
            seed=seed,
            guidance_scale=guidance_scale,
        )
        task.audio = StreamTaskAudio(m.sample_rate_hz, self.limits.max_duration_s)  # type: ignore[assignment]
        if received is not None:
            task.received_at, task.received_monotonic = received
        utterance = Utterance(task, m.fps, self.limits.max_buffered_s, self.limits.idle_timeout_s)
        pool, avatar = m.binding()  # together: an avatar switch changes both
        program = StreamSpeechProgram(
            task,
            utterance,
            avatar,
            m.fps,
            self.lookahead_frames,
            m.tick_counter,
            m.on_ttff,
            start_margin_s=self.limits.start_margin_s,
        )
        processor = StreamTaskProcessor(
            task,
            program,
            utterance,
            pool,
            avatar,
            m.deadline_s,
            self.lookahead_frames,
            m.fps,
            due_at=lambda c: m.due_at(task, c),
        )
        if not m.accept(task, program, processor):
            raise SpeechStreamError("queue_full", "too many tasks wait (api.max_queued); retry later", 429)
        with self._lock:
            self._open[task.task_id] = utterance
        return utterance

    def get(self, task_id: str) -> Utterance | None:
        """The open utterance ``task_id``, if any."""
        with self._lock:
            return self._open.get(task_id)


__all__ = [
    "DEFAULT_LOOKAHEAD_FRAMES",
    "LOOKAHEAD_FRAMES",
    "PcmFormat",
    "SpeechStreamError",
    "SpeechStreams",
    "StreamLimits",
    "StreamSpeechProgram",
    "StreamTaskAudio",
    "StreamTaskProcessor",
    "Utterance",
]
