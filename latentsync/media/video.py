"""Video decoding at the stream frame rate, with the matching audio, through a confined FFmpeg.

Every video the server decodes (idle loops, base videos, uploaded avatars) is read by an FFmpeg
that gets the file as an inherited read-only descriptor, may open nothing else (no second file,
device, FIFO or network address, whatever the file asks), probes it only with the demuxers of
:data:`VIDEO_FORMATS` and runs with an empty environment (docs/security.md). Budgets
(:class:`ClipLimits`) are checked from the probe, before a frame is decoded.

A clip framed into a channel's size around the presenter's face (probe, budgets, face search,
decode) is :func:`latentsync.framing_plan.load_clip`: the face search needs :mod:`latentsync.face`,
which media does not import.
"""

from __future__ import annotations

import collections
import math
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentsync.media.audio import decode_untrusted_audio, fit_length
from latentsync.media.confine import confined_input, run_confined
from latentsync.media.errors import MediaDecodeTimeout, MediaProbeError
from latentsync.media.framing import EVEN, Framing, displayed_size
from latentsync.media.probe import MediaInfo, probe_media
from latentsync.media.timing import samples_before_frame

#: Demuxers a video may be read with (``-format_whitelist``): MP4/MOV/M4V and Matroska/WebM.
#: Playlists and indirections (concat, HLS, DASH, image sequences) are not on it.
VIDEO_FORMATS = ("mov", "matroska")
#: Seconds one video decode may take before its FFmpeg is killed.
VIDEO_DECODE_TIMEOUT_S = 600.0
#: Frames :func:`iter_video_frames` decodes into one batch (1920x1080: 50 MB).
DECODE_BATCH_FRAMES = 8
#: Longest side, in pixels, of the small frames decoded to look at a video (face search, displayed size).
SMALL_FRAME_SIDE = 640


class MediaLimitError(MediaProbeError):
    """A video is over a budget (:class:`ClipLimits`); the message names the budget's key."""


@dataclass(frozen=True)
class FrameBudget:
    """The most frames a decode may produce, counted as they are decoded (not read from the container).

    The probe's duration comes from the file; a budget on decoded frames holds whatever the file
    claims (:func:`iter_video_frames` stops FFmpeg at the first frame past it).

    Attributes:
        max_frames: Most frames allowed (at least 1).
        key: The configuration key the budget comes from, named in the error (``avatar.upload_max_s``).
        max_s: That key's value in seconds (named in the error too).
    """

    max_frames: int
    key: str
    max_s: float

    @classmethod
    def for_duration(cls, max_s: float, fps: int, key: str) -> FrameBudget:
        """The frames a clip of at most ``max_s`` seconds decodes to at ``fps``: ``ceil(max_s * fps) + 1``.

        One more than the duration's frames, as :func:`check_clip_limits` counts (FFmpeg's ``fps``
        filter may emit a frame for the very end).
        """
        return cls(max_frames=max(1, math.ceil(max_s * fps) + 1), key=key, max_s=float(max_s))

    def message(self, fps: int, what: str = "video") -> str:
        """The :class:`MediaLimitError` text: it names :attr:`key` (never a path or FFmpeg's text)."""
        return (
            f"{what}: decodes to more than {self.max_frames} frames at {int(fps)} fps, "
            f"longer than {self.key} = {self.max_s:g} s"
        )


@dataclass(frozen=True)
class ClipLimits:
    """Budgets a video must fit before it is decoded (None: no budget).

    Attributes:
        max_s: Longest duration in seconds (``media.max_clip_s``).
        max_file_bytes: Largest file in bytes (``media.max_clip_mb``).
        max_decoded_bytes: Largest decoded clip, ``width * height * 3 * frames`` bytes
            (``media.max_decoded_mb``).
        max_pixels_per_s: Largest ``width * height * fps`` of the decoded clip
            (``stream.max_pixels_per_s``).
    """

    max_s: float | None = None
    max_file_bytes: int | None = None
    max_decoded_bytes: int | None = None
    max_pixels_per_s: int | None = None


def check_clip_limits(
    info: MediaInfo, fps: int, size: tuple[int, int] | None, limits: ClipLimits, what: str = "video"
) -> None:
    """Refuse a probed video that would not fit ``limits`` once decoded at ``fps`` and ``size``.

    Args:
        info: The video's probe (:func:`latentsync.media.probe.probe_media`).
        fps: Frame rate it would be decoded at, in frames per second.
        size: ``(width, height)`` it would be decoded at; None: its own size.
        limits: The budgets.
        what: How messages name it (``idle video``, ``base video``).

    Raises:
        MediaLimitError: Naming the budget it exceeds (never FFmpeg's text or the path).
    """
    width, height = size or (info.width, info.height)
    if limits.max_pixels_per_s is not None and width * height * fps > limits.max_pixels_per_s:
        raise MediaLimitError(
            f"{what}: {width}x{height} at {fps} fps is {width * height * fps / 1e6:.1f} Mpx/s, "
            f"more than stream.max_pixels_per_s = {limits.max_pixels_per_s / 1e6:.1f} Mpx/s"
        )
    if limits.max_s is not None and info.duration_s > limits.max_s:
        raise MediaLimitError(f"{what}: {info.duration_s:.1f} s is longer than media.max_clip_s = {limits.max_s:g} s")
    if limits.max_s is not None and info.duration_s <= 0:
        raise MediaLimitError(f"{what}: its duration is unknown (media.max_clip_s cannot be checked)")
    try:
        file_bytes = os.stat(info.path).st_size
    except OSError:
        file_bytes = 0
    if limits.max_file_bytes is not None and file_bytes > limits.max_file_bytes:
        raise MediaLimitError(
            f"{what}: {file_bytes / 2**20:.0f} MB is larger than "
            f"media.max_clip_mb = {limits.max_file_bytes / 2**20:g} MB"
        )
    frames = math.ceil(info.duration_s * fps) + 1
    decoded = width * height * 3 * frames
    if limits.max_decoded_bytes is not None and decoded > limits.max_decoded_bytes:
        raise MediaLimitError(
            f"{what}: {frames} frames of {width}x{height} decode to {decoded / 2**20:.0f} MB, more than "
            f"media.max_decoded_mb = {limits.max_decoded_bytes / 2**20:g} MB"
        )


@dataclass(frozen=True, kw_only=True)
class VideoClip:
    """A decoded clip on the stream's time base.

    Attributes:
        frames: ``(F, H, W, 3) uint8`` RGB frames at ``fps``.
        fps: Frame rate in frames per second.
        audio: ``(N,) int16`` mono samples at ``sample_rate_hz`` with exactly
            ``N = floor(F * sample_rate_hz / fps)``, or None when the file has no audio.
        sample_rate_hz: Audio sample rate in Hz.
        source: The file it came from.
        framing: How it was framed into its size (None: decoded at its own size).
    """

    frames: np.ndarray
    fps: int
    audio: np.ndarray | None
    sample_rate_hz: int
    source: Path
    framing: Framing | None = None

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
    path: str | Path,
    fps: int,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    *,
    info: MediaInfo | None = None,
    timeout_s: float = VIDEO_DECODE_TIMEOUT_S,
    video_filter: str | None = None,
    budget: FrameBudget | None = None,
) -> np.ndarray:
    """Decode a video's frames resampled to ``fps`` by timestamp, with FFmpeg confined to the file.

    Resampling is FFmpeg's ``fps`` filter: output frame ``k`` shows the source frame whose
    timestamp is nearest to ``k / fps``, so a 16 fps source repeats frames and a 50 fps source
    skips them, keeping the clip's duration. Rotation metadata is applied (FFmpeg autorotate).
    The frames come out as binary PPM images (each with its own size header) on FFmpeg's stdout.

    Args:
        path: An MP4/MOV or Matroska/WebM video (:data:`VIDEO_FORMATS`; H.264, HEVC, VP9, ...; any
            fps and size). Symlinks are followed: the caller decides which paths may be opened.
        fps: Output frame rate in frames per second.
        size: Output ``(width, height)``; None keeps the source size rounded down to even.
        max_frames: Stop after this many frames (None: all).
        info: The file's probe, if the caller has it (else it is probed here).
        timeout_s: Seconds FFmpeg may run before it is killed.
        video_filter: An FFmpeg filter chain used instead of scaling to ``size`` (a
            :meth:`latentsync.media.framing.Framing.video_filter`; it must give even sizes).
        budget: Most frames it may decode to (:class:`FrameBudget`, enforced while decoding); None: no budget.

    Returns:
        ``(F, H, W, 3) uint8`` RGB frames (all in memory: :func:`iter_video_frames` decodes a batch at a time).

    Raises:
        MediaProbeError: If the file is not a video in an accepted format or decodes to no frames.
        MediaLimitError: If it decodes to more frames than ``budget`` allows.
        latentsync.media.errors.MediaDecodeTimeout: If decoding took longer than ``timeout_s``.
    """
    path = Path(path)
    info = info or probe_media(path, formats=VIDEO_FORMATS)
    expected = int(info.duration_s * fps) + 2 if info.duration_s > 0 else 64
    if max_frames is not None:
        expected = min(expected, int(max_frames))
    frames: np.ndarray | None = None
    count = 0
    batches = iter_video_frames(
        path, fps, size, max_frames, info=info, timeout_s=timeout_s, video_filter=video_filter, budget=budget
    )
    try:
        for batch in batches:
            k = batch.shape[0]
            if frames is None:
                frames = np.empty((max(expected, k), *batch.shape[1:]), dtype=np.uint8)
            while count + k > frames.shape[0]:
                frames = np.concatenate([frames, np.empty_like(frames)], axis=0)
            frames[count : count + k] = batch
            count += k
    finally:
        batches.close()  # FFmpeg is killed now, not when the generator is collected
    assert frames is not None  # iter_video_frames raises when there is no frame
    return frames[:count].copy() if count < frames.shape[0] else frames


def iter_video_frames(
    path: str | Path,
    fps: int,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
    *,
    info: MediaInfo | None = None,
    timeout_s: float = VIDEO_DECODE_TIMEOUT_S,
    video_filter: str | None = None,
    budget: FrameBudget | None = None,
    batch_frames: int = DECODE_BATCH_FRAMES,
) -> Iterator[np.ndarray]:
    """Decode a video's frames as :func:`decode_video_frames` does, a batch at a time (bounded memory).

    FFmpeg writes binary PPM images to a pipe; they are read into one reused buffer of
    ``batch_frames`` frames, yielded whenever it is full (and at the end). Closing the generator
    early (``break``, an exception in the caller) kills FFmpeg.

    Args:
        path: An MP4/MOV or Matroska/WebM video (as :func:`decode_video_frames`).
        fps: Output frame rate in frames per second.
        size: Output ``(width, height)``; None keeps the source size rounded down to even.
        max_frames: Stop quietly after this many frames (None: all).
        info: The file's probe, if the caller has it (else it is probed here).
        timeout_s: Seconds FFmpeg may run before it is killed, counted from the first batch asked
            for (the caller's time between batches included).
        video_filter: An FFmpeg filter chain used instead of scaling to ``size`` (even sizes).
        budget: The most frames this video may decode to, enforced as they are decoded: one more
            stops FFmpeg and raises :class:`MediaLimitError` (a container whose header claims a
            shorter duration gains nothing). None: no budget.
        batch_frames: Frames per batch (at least 1).

    Yields:
        ``(k, H, W, 3) uint8`` RGB frames, ``1 <= k <= batch_frames``: a view of the reused
        buffer, valid until the next batch is asked for (copy or write it out before that).

    Raises:
        MediaProbeError: If the file is not a video in an accepted format or decodes to no frames.
        MediaLimitError: If it decodes to more than ``budget.max_frames`` frames.
        latentsync.media.errors.MediaDecodeTimeout: If decoding took longer than ``timeout_s``.
    """
    path = Path(path)
    info = info or probe_media(path, formats=VIDEO_FORMATS)
    if not info.has_video:
        raise MediaProbeError(f"{path.name}: no video stream")
    batch_frames = max(1, int(batch_frames))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        cmd = confined_input(fd, VIDEO_FORMATS) + ["-map", "0:v:0", "-an"]
        cmd += ["-vf", f"fps=fps={int(fps)}:round=near,{video_filter or _scale_filter(size)}"]
        if max_frames is not None:
            cmd += ["-frames:v", str(int(max_frames))]
        cmd += ["-pix_fmt", "rgb24", "-c:v", "ppm", "-f", "image2pipe", "pipe:1"]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            cwd=path.parent,
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    errors: collections.deque[str] = collections.deque(maxlen=8)
    drain = threading.Thread(target=_drain_lines, args=(proc.stderr, errors), daemon=True)
    drain.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    buffer: np.ndarray | None = None
    filled = 0  # frames in the buffer not yielded yet
    count = 0  # frames decoded
    try:
        assert proc.stdout is not None
        while (header := _ppm_header(proc.stdout)) is not None:
            width, height = header
            if budget is not None and count >= budget.max_frames:
                raise MediaLimitError(budget.message(fps))
            if buffer is None:
                buffer = np.empty((batch_frames, height, width, 3), dtype=np.uint8)
            elif buffer.shape[1:3] != (height, width):
                raise MediaProbeError(f"{path.name}: the frame size changed mid-stream")
            view = memoryview(buffer[filled]).cast("B")
            got = 0
            while got < len(view):
                n = proc.stdout.readinto(view[got:])
                if not n:
                    raise MediaProbeError(f"{path.name}: a frame ended early")
                got += n
            filled += 1
            count += 1
            if filled == batch_frames:
                yield buffer
                filled = 0
        if timed_out.is_set():
            raise MediaDecodeTimeout(f"{path.name}: decoding took longer than {timeout_s:g} s")
        if count == 0:
            last = errors[-1] if errors else "no frames"
            raise MediaProbeError(f"{path.name}: decoded no video frames ({last})")
        if filled:
            yield buffer[:filled]
    except MediaProbeError as exc:
        if timed_out.is_set() and not isinstance(exc, MediaDecodeTimeout):
            raise MediaDecodeTimeout(f"{path.name}: decoding took longer than {timeout_s:g} s") from None
        raise
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        drain.join(5)
        for stream in (proc.stdout, proc.stderr):  # explicitly, not whenever the Popen is collected
            if stream is not None:
                stream.close()


def _ppm_header(stream) -> tuple[int, int] | None:
    """Read one binary PPM header (``P6 <w> <h> 255`` and one whitespace byte); None at the end."""
    fields: list[bytes] = []
    token = b""
    while len(fields) < 4:
        byte = stream.read(1)
        if not byte:
            if fields or token:
                raise MediaProbeError("a frame header ended early")
            return None
        if byte.isspace():
            if token:
                fields.append(token)
                token = b""
        elif byte == b"#" and not token:  # a comment runs to the end of its line
            while (c := stream.read(1)) and c not in b"\r\n":
                pass
        else:
            token += byte
    if fields[0] != b"P6" or fields[3] != b"255":
        raise MediaProbeError(f"unexpected frame header {b' '.join(fields)[:40]!r}")
    return int(fields[1]), int(fields[2])


def _drain_lines(stream, tail: collections.deque[str]) -> None:
    for raw in iter(stream.readline, b""):
        tail.append(raw.decode("utf-8", errors="replace").rstrip())
    stream.close()


def decode_small_frames(path: str | Path, fps: int, max_frames: int) -> np.ndarray:
    """Frames with the longest side at most :data:`SMALL_FRAME_SIDE`, aspect kept (rotation applied).

    Args:
        path: The video (decoded as by :func:`decode_video_frames`).
        fps: Frame rate to sample at, in frames per second.
        max_frames: Stop after this many frames.

    Returns:
        ``(F, H, W, 3) uint8`` RGB frames, ``1 <= F <= max_frames``, even sizes.

    Raises:
        MediaProbeError: As :func:`decode_video_frames`.
    """
    side = SMALL_FRAME_SIDE
    fit = f"scale=w='if(gte(iw,ih),min({side},iw),-2)':h='if(gte(iw,ih),-2,min({side},ih))'"
    return decode_video_frames(path, fps, max_frames=max_frames, video_filter=f"{fit},{EVEN}")


def display_size(path: str | Path, coded: tuple[int, int]) -> tuple[int, int]:
    """A video's ``(width, height)`` as displayed (rotation metadata applied), from one small decoded frame.

    Args:
        path: The video.
        coded: Its coded size (the probe's).

    Raises:
        MediaProbeError: As :func:`decode_video_frames`.
    """
    frame = decode_small_frames(path, 1, 1)
    return displayed_size(coded, (int(frame.shape[2]), int(frame.shape[1])))


def _clip_audio(path: str | Path, info: MediaInfo, sample_rate_hz: int, fps: int, num_frames: int) -> np.ndarray | None:
    """A clip's own audio for its ``num_frames`` frames, or None when the file has none.

    Returns:
        ``(N,) int16`` mono at ``sample_rate_hz``, trimmed or zero-padded to exactly
        ``N = floor(num_frames * sample_rate_hz / fps)`` samples.
    """
    if not info.has_audio:
        return None
    decoded = decode_untrusted_audio(path, sample_rate_hz, formats=VIDEO_FORMATS, nofollow=False)
    return fit_length(decoded, samples_before_frame(num_frames, sample_rate_hz, fps))


def decode_clip(
    path: str | Path,
    fps: int,
    sample_rate_hz: int,
    size: tuple[int, int] | None = None,
    with_audio: bool = True,
    *,
    info: MediaInfo | None = None,
    framing: Framing | None = None,
) -> VideoClip:
    """Decode a video and its audio onto the stream time base (FFmpeg confined to the file).

    The audio (mixed to mono, resampled to ``sample_rate_hz``) is trimmed or zero-padded to
    exactly ``floor(F * sample_rate_hz / fps)`` samples so that it covers the frames exactly.

    Args:
        path: Video file (MP4/MOV or Matroska/WebM).
        fps: Stream frame rate in frames per second.
        sample_rate_hz: Stream audio rate in Hz.
        size: Output ``(width, height)``; None keeps the source size (rounded down to even).
        with_audio: Decode the audio track too (if the file has one).
        info: The file's probe, if the caller has it (else it is probed here).
        framing: How the video is framed into ``size`` (:func:`latentsync.framing_plan.plan_framing`);
            None scales it to ``size`` whatever the aspect ratio.

    Returns:
        The :class:`VideoClip` (its ``framing`` is ``framing``).

    Raises:
        MediaProbeError: If the file is missing, unreadable or has no video stream.
        MediaDecodeTimeout: If FFmpeg ran out of time.
    """
    info = info or probe_media(path, formats=VIDEO_FORMATS)
    frames = decode_video_frames(path, fps, size, info=info, video_filter=framing.video_filter() if framing else None)
    audio = _clip_audio(path, info, sample_rate_hz, fps, frames.shape[0]) if with_audio else None
    return VideoClip(
        frames=frames, fps=int(fps), audio=audio, sample_rate_hz=int(sample_rate_hz), source=Path(path), framing=framing
    )


@dataclass(frozen=True, kw_only=True)
class StoredClip:
    """A clip decoded on the stream's time base into a frames file (:func:`decode_clip_to_file`).

    Attributes:
        frames_path: The ``(F, H, W, 3) uint8`` RGB ``.npy`` file (read it with
            :class:`latentsync.media.frame_file.FrameFile`, or ``np.load(mmap_mode="r")``).
        num_frames: ``F``.
        size: ``(width, height)`` in pixels.
        fps: Frame rate in frames per second.
        audio: ``(N,) int16`` mono samples at ``sample_rate_hz``, ``N = floor(F * sample_rate_hz / fps)``,
            or None when the file has no audio.
        sample_rate_hz: Audio sample rate in Hz.
        source: The video it came from.
        framing: How it was framed into its size (None: decoded at its own size).
    """

    frames_path: Path
    num_frames: int
    size: tuple[int, int]
    fps: int
    audio: np.ndarray | None
    sample_rate_hz: int
    source: Path
    framing: Framing | None = None


def decode_clip_to_file(
    path: str | Path,
    target: str | Path,
    fps: int,
    sample_rate_hz: int,
    size: tuple[int, int] | None = None,
    with_audio: bool = True,
    *,
    info: MediaInfo | None = None,
    framing: Framing | None = None,
    budget: FrameBudget | None = None,
    timeout_s: float = VIDEO_DECODE_TIMEOUT_S,
) -> StoredClip:
    """:func:`decode_clip`, with the frames written to ``target`` batch by batch instead of held in memory.

    The same FFmpeg command gives the same frames; each batch (:data:`DECODE_BATCH_FRAMES`) is
    appended to ``target`` as it arrives (:class:`latentsync.media.frame_file.FrameFileWriter`), so
    memory stays at one batch however long the video. On any error ``target`` is deleted.

    Args:
        path: Video file (MP4/MOV or Matroska/WebM).
        target: The ``.npy`` file the frames go to (created or replaced).
        fps: Stream frame rate in frames per second.
        sample_rate_hz: Stream audio rate in Hz.
        size: Output ``(width, height)``; None keeps the source size (rounded down to even).
        with_audio: Decode the audio track too (if the file has one).
        info: The file's probe, if the caller has it (else it is probed here).
        framing: How the video is framed into ``size`` (None: scaled to it).
        budget: Most frames it may decode to, enforced while decoding (:class:`FrameBudget`).
        timeout_s: Seconds FFmpeg may run (writing the frames included) before it is killed.

    Returns:
        The :class:`StoredClip`.

    Raises:
        MediaProbeError: If the file is missing, unreadable or has no video stream.
        MediaLimitError: If it decodes to more frames than ``budget`` allows (FFmpeg is stopped there).
        MediaDecodeTimeout: If FFmpeg ran out of time.
        OSError: If ``target`` cannot be written.
    """
    from latentsync.media.frame_file import FrameFileWriter

    target = Path(target)
    info = info or probe_media(path, formats=VIDEO_FORMATS)
    batches = iter_video_frames(
        path,
        fps,
        size,
        info=info,
        timeout_s=timeout_s,
        video_filter=framing.video_filter() if framing else None,
        budget=budget,
    )
    try:
        with FrameFileWriter(target) as writer:
            for batch in batches:
                writer.write(batch)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        batches.close()  # FFmpeg is killed now, not when the generator is collected
    assert writer.frame_shape is not None  # close() refuses a file without frames
    height, width = writer.frame_shape[:2]
    audio = _clip_audio(path, info, sample_rate_hz, fps, writer.num_frames) if with_audio else None
    return StoredClip(
        frames_path=target,
        num_frames=writer.num_frames,
        size=(width, height),
        fps=int(fps),
        audio=audio,
        sample_rate_hz=int(sample_rate_hz),
        source=Path(path),
        framing=framing,
    )


def remux_untrusted_video(
    source: str | Path,
    target: str | Path,
    *,
    max_duration_s: float,
    timeout_s: float = 120.0,
    formats: tuple[str, ...] = VIDEO_FORMATS,
) -> MediaInfo:
    """Copy an uploaded video's first video and audio stream into a Matroska file of our own.

    FFmpeg reads the upload as in :func:`latentsync.media.audio.decode_untrusted_audio`
    (:func:`latentsync.media.confine.confined_input`): an inherited read-only descriptor, no protocol
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
        formats: Allowed FFmpeg demuxer names (default :data:`VIDEO_FORMATS`).

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
    info = probe_media(target, formats=("matroska",))
    if not info.has_video:
        raise MediaProbeError(f"{source.name}: no video stream")
    return info
