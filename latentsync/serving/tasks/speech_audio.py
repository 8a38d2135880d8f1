"""A task's speech as it arrives: raw PCM formats, and the growing audio kept at two rates.

Every input (an upload being decoded, synthesised text, PCM from a socket) is pushed block by block
into one :class:`SpeechAudio`, which keeps it at the stream's rate (what goes on air) and at 16 kHz
(what the engine analyses), resampled by streaming soxr resamplers so block edges leave no clicks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import soxr

from latentsync.config import PCM_ENCODINGS, PCM_MAX_CHANNELS, PCM_SAMPLE_RATE_RANGE_HZ
from latentsync.engines import ENGINE_SAMPLE_RATE_HZ
from latentsync.serving.core.errors import ServingError


class SpeechError(ServingError):
    """A refused speech operation (a push, a format, a text); ``code`` names the reason.

    The codes and what the API answers with them: ``latentsync.serving.api.errors.HTTP_STATUS``;
    the WebSocket's ``error`` events carry them as is (docs/streaming-speech.md).
    """


@dataclass(frozen=True)
class PcmFormat:
    """Raw PCM as a client sends it (no container: never goes through FFmpeg).

    Attributes:
        sample_rate_hz: Samples per second per channel (``latentsync.config.PCM_SAMPLE_RATE_RANGE_HZ``).
        channels: Interleaved channels, mixed down to mono by averaging (up to ``latentsync.config.PCM_MAX_CHANNELS``).
        encoding: ``s16le`` (int16 little-endian) or ``f32le`` (float32 little-endian in [-1, 1]).

    Raises:
        SpeechError: ``bad_encoding``, ``bad_sample_rate`` or ``bad_channels``.
    """

    sample_rate_hz: int
    channels: int = 1
    encoding: str = "s16le"

    def __post_init__(self) -> None:
        if not isinstance(self.encoding, str) or self.encoding not in PCM_ENCODINGS:  # [] would be unhashable
            raise SpeechError("bad_encoding", f"encoding {self.encoding!r} is not one of {sorted(PCM_ENCODINGS)}")
        low, high = PCM_SAMPLE_RATE_RANGE_HZ
        if (
            not isinstance(self.sample_rate_hz, int)
            or isinstance(self.sample_rate_hz, bool)
            or not (low <= self.sample_rate_hz <= high)
        ):
            raise SpeechError(
                "bad_sample_rate", f"sample_rate {self.sample_rate_hz!r} is not an integer in [{low}, {high}] Hz"
            )
        if (
            not isinstance(self.channels, int)
            or isinstance(self.channels, bool)
            or not (1 <= self.channels <= PCM_MAX_CHANNELS)
        ):
            raise SpeechError(
                "bad_channels", f"channels {self.channels!r} is not an integer in [1, {PCM_MAX_CHANNELS}]"
            )

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel."""
        return PCM_ENCODINGS[self.encoding] * self.channels

    def decode(self, data: bytes) -> np.ndarray:
        """Raw bytes to mono samples.

        Args:
            data: Interleaved PCM, a whole number of :attr:`frame_bytes`.

        Returns:
            ``(n,) float32`` mono in [-1, 1].

        Raises:
            SpeechError: ``odd_length`` if the byte count is not a whole number of sample frames;
                ``bad_samples`` if float samples are not finite.
        """
        if len(data) % self.frame_bytes:
            raise SpeechError(
                "odd_length",
                f"{len(data)} bytes is not a whole number of {self.channels}-channel "
                f"{self.encoding} samples ({self.frame_bytes} bytes each)",
            )
        if self.encoding == "s16le":
            x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        else:
            x = np.frombuffer(data, dtype="<f4").astype(np.float32)
            if not np.all(np.isfinite(x)):
                raise SpeechError("bad_samples", "f32le samples must be finite")
            x = np.clip(x, -1.0, 1.0)
        return x.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)


class _Growable:
    """A 1-D array that grows by doubling up to ``max_len`` samples (amortised O(1) appends)."""

    def __init__(self, dtype, max_len: int):
        self._data = np.zeros(1024, dtype=dtype)
        self.size = 0
        self._max_len = max_len

    def append(self, x: np.ndarray) -> None:
        need = self.size + x.shape[0]
        if need > self._max_len:
            raise SpeechError("too_long", f"utterance longer than {self._max_len} samples (api.max_audio_s)")
        if need > self._data.shape[0]:
            bigger = np.zeros(min(max(need, 2 * self._data.shape[0]), self._max_len), dtype=self._data.dtype)
            bigger[: self.size] = self._data[: self.size]
            self._data = bigger
        self._data[self.size : need] = x
        self.size = need

    def view(self) -> np.ndarray:
        return self._data[: self.size]


class SpeechAudio:
    """A task's speech, growing as it arrives: at the stream rate (on air) and at 16 kHz (engine).

    Each pushed block is resampled by a streaming soxr resampler per output rate (its state kept
    across blocks; none for an output at the input's own rate). Thread-safe.

    Memory: 2 bytes per sample at the stream rate plus 4 bytes per sample at 16 kHz (160 kB per
    second of speech at 48 kHz), at most ``max_duration_s`` (+1 s) of it.

    Args:
        sample_rate_hz: Stream audio rate in Hz.
        max_duration_s: Longest speech accepted in seconds (``api.max_audio_s``); a push past it
            raises ``too_long``.
    """

    def __init__(self, sample_rate_hz: int, max_duration_s: float):
        self.sample_rate_hz = sample_rate_hz
        self.max_duration_s = max_duration_s
        self._lock = threading.Lock()
        self._stream = _Growable(np.int16, int(max_duration_s * sample_rate_hz) + sample_rate_hz)
        self._engine = _Growable(np.float32, int(max_duration_s * ENGINE_SAMPLE_RATE_HZ) + ENGINE_SAMPLE_RATE_HZ)
        self._in_rate: int | None = None
        self._to_stream: soxr.ResampleStream | None = None
        self._to_engine: soxr.ResampleStream | None = None

    def _resampler(self, rate_hz: int, out_hz: int) -> soxr.ResampleStream | None:
        return None if rate_hz == out_hz else soxr.ResampleStream(rate_hz, out_hz, 1, dtype="float32", quality="HQ")

    def _flush(self) -> None:
        empty = np.zeros(0, np.float32)
        if self._to_stream is not None:
            self._append_stream(self._to_stream.resample_chunk(empty, last=True))
        if self._to_engine is not None:
            self._engine.append(self._to_engine.resample_chunk(empty, last=True).astype(np.float32))
        self._to_stream = self._to_engine = self._in_rate = None

    def _append_stream(self, x: np.ndarray) -> None:
        self._stream.append(np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16))

    def push(self, mono: np.ndarray, rate_hz: int) -> None:
        """Append ``(n,) float32`` mono samples in [-1, 1] at ``rate_hz``.

        Raises:
            SpeechError: ``too_long`` past ``max_duration_s``.
        """
        with self._lock:
            if rate_hz != self._in_rate:
                self._flush()  # another source (e.g. synthesised text after PCM): finish the old one
                self._in_rate = rate_hz
                self._to_stream = self._resampler(rate_hz, self.sample_rate_hz)
                self._to_engine = self._resampler(rate_hz, ENGINE_SAMPLE_RATE_HZ)
            x = np.ascontiguousarray(mono, dtype=np.float32)
            self._append_stream(self._to_stream.resample_chunk(x) if self._to_stream is not None else x)
            self._engine.append(self._to_engine.resample_chunk(x) if self._to_engine is not None else x)

    def finish(self) -> None:
        """Flush the resamplers' last samples (no more audio)."""
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

    def frames(self, fps: int) -> int:
        """Whole frames at ``fps`` that both copies hold (the 16 kHz one lags by its resampler's delay)."""
        with self._lock:
            stream = self._stream.size * fps // self.sample_rate_hz
            return min(stream, self._engine.size * fps // ENGINE_SAMPLE_RATE_HZ)

    @property
    def duration_s(self) -> float:
        """Seconds received so far (at the stream rate)."""
        with self._lock:
            return self._stream.size / self.sample_rate_hz

    @property
    def received_s(self) -> float:
        """Seconds both copies hold."""
        with self._lock:
            return min(self._stream.size / self.sample_rate_hz, self._engine.size / ENGINE_SAMPLE_RATE_HZ)
