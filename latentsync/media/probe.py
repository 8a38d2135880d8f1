"""Probe a media file with the FFmpeg binary shipped by ``imageio-ffmpeg`` (there is no ffprobe)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from latentsync.media.confine import confined_input, run_confined
from latentsync.media.errors import MediaProbeError

PROBE_TIMEOUT_S = 30.0

#: Demuxers the server reads media with (FFmpeg's ``-format_whitelist``; a name matches any demuxer
#: whose comma-separated name list holds it, ``mov`` covers MP4/M4A/MOV): WAV, MP3, FLAC, Ogg,
#: MP4/MOV, Matroska/WebM, raw ADTS AAC. Playlists and indirections (concat, HLS, DASH, image
#: sequences, ...) are not on it, so no file can make FFmpeg open another one.
MEDIA_FORMATS = ("wav", "mp3", "flac", "ogg", "mov", "matroska", "aac")

# What a file says about itself cannot forge these: FFmpeg prints the input's own lines
# (``Duration:``, ``Stream #``) indented by exactly two spaces, and every metadata tag at four or
# more, a tag value's further lines behind a ``:`` (checked on a file whose title holds such lines).
# So a title tag reading ``Duration: 00:00:00.04`` (issue 35) is never taken for the duration.

#: FFmpeg's ``Duration: HH:MM:SS.ss`` line of an input it opened (absent or ``N/A`` when unknown):
#: anchored at a line's start, two spaces in (``re.MULTILINE``: search a whole log or one line).
DURATION_RE = re.compile(r"^  Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", re.MULTILINE)
_VIDEO_RE = re.compile(r"^  Stream #\d+:\d+.*?: Video: (\w+).*?, (\d{2,5})x(\d{2,5})", re.MULTILINE)
_FPS_RE = re.compile(r"(\d+(?:\.\d+)?) fps")
_AUDIO_RE = re.compile(r"^  Stream #\d+:\d+.*?: Audio: (\w+).*?, (\d+) Hz, ([^,]+)", re.MULTILINE)


def parse_duration_s(match: re.Match) -> float:
    """Seconds of a :data:`DURATION_RE` match."""
    return int(match.group(1)) * 3600 + int(match.group(2)) * 60 + float(match.group(3))


@dataclass(frozen=True, kw_only=True)
class MediaInfo:
    """What FFmpeg reports about a media file's first video and audio streams.

    Attributes:
        path: The probed file.
        duration_s: Container duration in seconds (0.0 if unknown).
        video_codec: e.g. ``"h264"``, ``"hevc"``; None without a video stream.
        width: Coded width in pixels (before any rotation metadata); 0 without video.
        height: Coded height in pixels; 0 without video.
        fps: Average frame rate in frames per second; 0.0 if unknown or no video.
        audio_codec: e.g. ``"aac"``, ``"pcm_s16le"``; None without an audio stream.
        audio_sample_rate_hz: Audio sample rate in Hz; 0 without audio.
        audio_layout: Channel layout as FFmpeg names it (``"mono"``, ``"stereo"``, ``"5.1"``, ...).
    """

    path: Path
    duration_s: float
    video_codec: str | None
    width: int
    height: int
    fps: float
    audio_codec: str | None
    audio_sample_rate_hz: int
    audio_layout: str | None

    @property
    def has_video(self) -> bool:
        """True when the file has a video stream."""
        return self.video_codec is not None

    @property
    def has_audio(self) -> bool:
        """True when the file has an audio stream."""
        return self.audio_codec is not None


def probe_media(
    path: str | Path, timeout_s: float = PROBE_TIMEOUT_S, formats: tuple[str, ...] = MEDIA_FORMATS
) -> MediaInfo:
    """Read stream information from ``ffmpeg -i`` (no decoding), with FFmpeg confined to the file.

    FFmpeg gets the file as an inherited read-only descriptor, may open nothing else and probes it
    only with the demuxers in ``formats``, in an empty environment
    (:func:`latentsync.media.confine.confined_input`, docs/security.md).

    Args:
        path: Media file (symlinks are followed: the caller decides which paths may be opened).
        timeout_s: Seconds to wait for FFmpeg.
        formats: Allowed FFmpeg demuxer names.

    Returns:
        The file's :class:`MediaInfo`.

    Raises:
        MediaProbeError: If the file does not exist or FFmpeg finds no audio or video stream in it.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaProbeError(f"no such file: {path}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        cmd = confined_input(fd, formats, loglevel="info")
        proc = run_confined(cmd, (fd,), path.parent, timeout_s, f"{path.name}: probing")
    finally:
        os.close(fd)
    text = proc.stderr.decode("utf-8", errors="replace")
    duration_s = 0.0
    if m := DURATION_RE.search(text):
        duration_s = parse_duration_s(m)
    video_codec, width, height, fps = None, 0, 0, 0.0
    for line in text.splitlines():
        if video_codec is None and (m := _VIDEO_RE.search(line)) and "attached pic" not in line:
            video_codec, width, height = m.group(1), int(m.group(2)), int(m.group(3))
            if f := _FPS_RE.search(line):
                fps = float(f.group(1))
    audio_codec, rate, layout = None, 0, None
    if m := _AUDIO_RE.search(text):
        audio_codec, rate, layout = m.group(1), int(m.group(2)), m.group(3).strip()
    if video_codec is None and audio_codec is None:
        last = text.strip().splitlines()[-1] if text.strip() else "no output"
        raise MediaProbeError(f"{path.name}: not a readable audio or video file ({last})")
    return MediaInfo(
        path=path,
        duration_s=duration_s,
        video_codec=video_codec,
        width=width,
        height=height,
        fps=fps,
        audio_codec=audio_codec,
        audio_sample_rate_hz=rate,
        audio_layout=layout,
    )
