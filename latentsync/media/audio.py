"""Audio decoding and resampling through FFmpeg (any container/codec it reads)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from latentsync.media.probe import MediaProbeError

DECODE_TIMEOUT_S = 120.0


def decode_audio(
    path: str | Path,
    sample_rate_hz: int,
    *,
    max_duration_s: float | None = None,
    timeout_s: float = DECODE_TIMEOUT_S,
) -> np.ndarray:
    """Decode the first audio stream of a file to mono PCM at ``sample_rate_hz``.

    Channels are mixed down to mono and the signal is resampled by FFmpeg's ``aresample``.

    Args:
        path: Any file FFmpeg reads (WAV, MP3, FLAC, OGG/Opus, M4A/AAC, MP4, ...).
        sample_rate_hz: Output sample rate in Hz.
        max_duration_s: Stop decoding after this many seconds (None: whole stream).
        timeout_s: Seconds to wait for FFmpeg.

    Returns:
        ``(N,) int16`` mono samples at ``sample_rate_hz``.

    Raises:
        MediaProbeError: If the file has no audio stream or FFmpeg cannot decode it.
    """
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path)]
    if max_duration_s is not None:
        cmd += ["-t", f"{max_duration_s:.6f}"]
    cmd += ["-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(int(sample_rate_hz)), "-f", "s16le", "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        reason = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise MediaProbeError(f"{Path(path).name}: cannot decode audio ({reason[-1] if reason else 'ffmpeg failed'})")
    return np.frombuffer(proc.stdout, dtype="<i2").astype(np.int16, copy=True)


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad a 1-D signal to exactly ``length`` samples.

    Args:
        samples: ``(N,)`` array of any dtype.
        length: Wanted number of samples (>= 0).

    Returns:
        ``(length,)`` array of the same dtype.
    """
    if samples.shape[0] >= length:
        return samples[:length].copy()
    out = np.zeros(length, dtype=samples.dtype)
    out[: samples.shape[0]] = samples
    return out
