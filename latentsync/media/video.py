"""Video decoding at the stream frame rate, with the matching audio, through FFmpeg."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from latentsync.media.audio import confined_input, decode_audio, fit_length, run_confined
from latentsync.media.probe import MediaInfo, MediaProbeError, probe_media
from latentsync.media.timing import samples_before_frame

#: Demuxers an uploaded avatar video may be read with (``-format_whitelist``): MP4/MOV/M4V and
#: Matroska/WebM. Playlists and indirections (concat, HLS, DASH, image sequences) are not on it.
VIDEO_UPLOAD_FORMATS = ("mov", "matroska")


@dataclass(frozen=True)
class VideoClip:
    """A decoded clip on the stream's time base.

    Attributes:
        frames: ``(F, H, W, 3) uint8`` RGB frames at ``fps``.
        fps: Frame rate in frames per second.
        audio: ``(N,) int16`` mono samples at ``sample_rate_hz`` with exactly
            ``N = floor(F * sample_rate_hz / fps)``, or None when the file has no audio.
        sample_rate_hz: Audio sample rate in Hz.
        source: The file it came from.
    """

    frames: np.ndarray
    fps: int
    audio: np.ndarray | None
    sample_rate_hz: int
    source: Path

    @property
    def num_frames(self) -> int:
        """Number of frames ``F``."""
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


def _scale_filter(size: tuple[int, int] | None) -> str:
    if size is None:
        # yuv420p (H.264) needs even dimensions: drop an odd last row/column.
        return "scale=trunc(iw/2)*2:trunc(ih/2)*2:flags=bicubic"
    width, height = size
    return f"scale={int(width)}:{int(height)}:flags=bicubic"


def decode_video_frames(
    path: str | Path, fps: int, size: tuple[int, int] | None = None, max_frames: int | None = None
) -> np.ndarray:
    """Decode a video's frames resampled to ``fps`` by timestamp.

    Resampling is FFmpeg's ``fps`` filter: output frame ``k`` shows the source frame whose
    timestamp is nearest to ``k / fps``, so a 16 fps source repeats frames and a 50 fps source
    skips them, keeping the clip's duration. Rotation metadata is applied (FFmpeg autorotate).

    Args:
        path: Any video FFmpeg reads (H.264, HEVC, VP9, ...; any fps and size).
        fps: Output frame rate in frames per second.
        size: Output ``(width, height)``; None keeps the source size rounded down to even.
        max_frames: Stop after this many frames (None: all).

    Returns:
        ``(F, H, W, 3) uint8`` RGB frames.

    Raises:
        MediaProbeError: If the file has no video stream or decodes to no frames.
    """
    info = probe_media(path)
    if not info.has_video:
        raise MediaProbeError(f"{Path(path).name}: no video stream")
    output_params = ["-vf", f"fps=fps={int(fps)}:round=near,{_scale_filter(size)}"]
    if max_frames is not None:
        output_params += ["-frames:v", str(int(max_frames))]
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=output_params)
    try:
        meta = next(reader)
        width, height = meta["size"]
        expected = int(info.duration_s * fps) + 2 if info.duration_s > 0 else 64
        if max_frames is not None:
            expected = min(expected, int(max_frames))
        frames = np.empty((max(expected, 1), height, width, 3), dtype=np.uint8)
        count = 0
        for raw in reader:
            if count == frames.shape[0]:
                frames = np.concatenate([frames, np.empty_like(frames)], axis=0)
            frames[count] = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
            count += 1
    finally:
        reader.close()
    if count == 0:
        raise MediaProbeError(f"{Path(path).name}: decoded no video frames")
    return frames[:count].copy() if count < frames.shape[0] else frames


def load_clip(
    path: str | Path,
    fps: int,
    sample_rate_hz: int,
    size: tuple[int, int] | None = None,
    with_audio: bool = True,
) -> VideoClip:
    """Decode a video and its audio onto the stream time base.

    The audio (mixed to mono, resampled to ``sample_rate_hz``) is trimmed or zero-padded to
    exactly ``floor(F * sample_rate_hz / fps)`` samples so that it covers the frames exactly.

    Args:
        path: Video file.
        fps: Stream frame rate in frames per second.
        sample_rate_hz: Stream audio rate in Hz.
        size: Output ``(width, height)``; None keeps the source size (rounded down to even).
        with_audio: Decode the audio track too (if the file has one).

    Returns:
        The :class:`VideoClip`.

    Raises:
        MediaProbeError: If the file is missing, unreadable or has no video stream.
    """
    frames = decode_video_frames(path, fps, size)
    audio = None
    if with_audio and probe_media(path).has_audio:
        audio = fit_length(
            decode_audio(path, sample_rate_hz), samples_before_frame(frames.shape[0], sample_rate_hz, fps)
        )
    return VideoClip(frames=frames, fps=int(fps), audio=audio, sample_rate_hz=int(sample_rate_hz), source=Path(path))


def remux_untrusted_video(
    source: str | Path,
    target: str | Path,
    *,
    max_duration_s: float,
    timeout_s: float = 120.0,
    formats: tuple[str, ...] = VIDEO_UPLOAD_FORMATS,
) -> MediaInfo:
    """Copy an uploaded video's first video and audio stream into a Matroska file of our own.

    FFmpeg reads the upload as in :func:`latentsync.media.audio.decode_untrusted_audio`
    (:func:`latentsync.media.audio.confined_input`): an inherited read-only descriptor, no protocol
    but ``fd`` (no second file, device, FIFO or network address can be opened), only the demuxers
    in ``formats``, an empty environment. The streams are
    copied, not re-encoded (fast), and cut at ``max_duration_s + 1`` seconds; the result is a
    self-contained file every later step (probe, decode, preparation) may open by path.

    Args:
        source: The upload (a regular file; a symlink is refused).
        target: Where the Matroska copy is written (replaced if present).
        max_duration_s: Longest video accepted in seconds; a longer one is cut one second past it,
            so the caller sees ``duration_s > max_duration_s`` and refuses it.
        timeout_s: Seconds FFmpeg may run before it is killed.
        formats: Allowed FFmpeg demuxer names (default :data:`VIDEO_UPLOAD_FORMATS`).

    Returns:
        The copy's :class:`MediaInfo` (duration from the copied packets, not the upload's header).

    Raises:
        MediaDecodeTimeout: If FFmpeg ran longer than ``timeout_s``.
        MediaProbeError: If the upload is not in an allowed format or has no video stream.
    """
    source, target = Path(source), Path(target)
    fd_in = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd_out = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            cmd = confined_input(fd_in, formats) + [
                "-t",
                f"{max_duration_s + 1.0:.3f}",
                "-map",
                "0:v:0",
                "-map",
                "0:a:0?",
                "-c",
                "copy",
                "-f",
                "matroska",
                "-fd",
                str(fd_out),
                "fd:",
            ]
            proc = run_confined(cmd, (fd_in, fd_out), source.parent, timeout_s, f"{source.name}: reading the video")
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    if proc.returncode != 0:
        reason = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()
        last = reason[-1] if reason else "ffmpeg failed"
        raise MediaProbeError(f"{source.name}: not a video in an accepted format ({last})")
    info = probe_media(target)
    if not info.has_video:
        raise MediaProbeError(f"{source.name}: no video stream")
    return info
