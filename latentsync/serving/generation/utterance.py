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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soxr

from latentsync.engines import CHUNK_FRAMES, ENGINE_SAMPLE_RATE_HZ
from latentsync.serving.generation.task import FINAL_STATES, Task

if TYPE_CHECKING:
    from latentsync.serving.generation.program import StreamSpeechProgram

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


__all__ = [
    "DEFAULT_LOOKAHEAD_FRAMES",
    "LOOKAHEAD_FRAMES",
    "PcmFormat",
    "SpeechStreamError",
    "StreamTaskAudio",
    "Utterance",
]
