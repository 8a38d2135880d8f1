"""Audio decoding and resampling through FFmpeg (any container/codec it reads)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from latentsync.media.confine import confined_input, run_confined
from latentsync.media.errors import MediaProbeError
from latentsync.media.probe import MEDIA_FORMATS

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


def untrusted_audio_command(
    fd: int, sample_rate_hz: int, max_duration_s: float | None = None, formats: tuple[str, ...] = MEDIA_FORMATS
) -> list[str]:
    """The confined FFmpeg command that decodes an upload's first audio stream to raw PCM on stdout.

    The input part is :func:`confined_input` (descriptor only, demuxer whitelist) at ``-loglevel
    info``, so the input's ``Duration`` line comes first on stderr; the output is ``s16le`` mono
    at ``sample_rate_hz``, written as it is decoded. Run it as :func:`run_confined` does (only
    ``fd`` inherited, empty environment, in the upload's folder).

    Args:
        fd: A read-only descriptor of the upload.
        sample_rate_hz: Output sample rate in Hz.
        max_duration_s: Stop decoding after this many seconds (None: whole stream).
        formats: Allowed FFmpeg demuxer names.

    Returns:
        The command line.
    """
    cmd = confined_input(fd, formats, loglevel="info")
    if max_duration_s is not None:
        cmd += ["-t", f"{max_duration_s:.6f}"]
    return cmd + ["-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(int(sample_rate_hz)), "-f", "s16le", "pipe:1"]


def decode_untrusted_audio(
    path: str | Path,
    sample_rate_hz: int,
    *,
    max_duration_s: float | None = None,
    timeout_s: float = DECODE_TIMEOUT_S,
    formats: tuple[str, ...] = MEDIA_FORMATS,
    nofollow: bool = True,
) -> np.ndarray:
    """Decode an uploaded file like :func:`decode_audio`, with FFmpeg confined to that one file.

    FFmpeg gets the file as an inherited, read-only descriptor (``-fd N -i fd:``) and may use no
    other protocol (``-protocol_whitelist fd``): no demuxer can open a second file, a device, a
    FIFO or a network address (concat lists, HLS/DASH playlists, MP4 external data references all
    fail). Only the demuxers in ``formats`` may be probed (``-format_whitelist``). It runs with an
    empty environment (no token, no overrides, no proxy settings) in the upload's own directory.

    Args:
        path: The upload (a regular file; a symlink is refused).
        sample_rate_hz: Output sample rate in Hz.
        max_duration_s: Stop decoding after this many seconds (None: whole stream).
        timeout_s: Seconds FFmpeg may run before it is killed.
        formats: Allowed FFmpeg demuxer names (default :data:`~latentsync.media.probe.MEDIA_FORMATS`).
        nofollow: Refuse a symlink (uploads); False for a path the caller already decided on.

    Returns:
        ``(N,) int16`` mono samples at ``sample_rate_hz``, N > 0.

    Raises:
        MediaDecodeTimeout: If FFmpeg ran longer than ``timeout_s``.
        MediaProbeError: If the file is not in an allowed format, has no audio stream, or decodes
            to no samples (e.g. an MP4 whose samples live in another file).
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0))
    try:
        cmd = confined_input(fd, formats)
        if max_duration_s is not None:
            cmd += ["-t", f"{max_duration_s:.6f}"]
        cmd += ["-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(int(sample_rate_hz)), "-f", "s16le", "pipe:1"]
        proc = run_confined(cmd, (fd,), path.parent, timeout_s, f"{path.name}: decoding")
    finally:
        os.close(fd)
    if proc.returncode != 0:
        reason = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise MediaProbeError(f"{path.name}: cannot decode audio ({reason[-1] if reason else 'ffmpeg failed'})")
    if len(proc.stdout) < 2:
        raise MediaProbeError(f"{path.name}: no audio samples decoded")
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
