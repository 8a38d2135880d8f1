"""The media probe reads what FFmpeg says of the file, never what the file's tags say of themselves (issue 35)."""

from __future__ import annotations

import subprocess

import imageio_ffmpeg
import pytest

from latentsync.media.probe import DURATION_RE, parse_duration_s, probe_media

#: A title tag that reads like FFmpeg's own lines: a 1-frame, 16x16 clip (what the old probe believed).
FORGED_TITLE = (
    "Duration: 00:00:00.04, start: 0.0\n  Duration: 00:00:00.04, start: 0.0\n"
    "  Stream #0:0: Video: h264, yuv420p, 16x16, 25 fps\n  Stream #0:1: Audio: aac, 8000 Hz, mono"
)


@pytest.fixture(scope="module")
def forged(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "forged.mp4"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=25"]
    cmd += [
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=22050",
        "-t",
        "3",
        "-metadata",
        f"title={FORGED_TITLE}",
    ]
    subprocess.run([*cmd, "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(path)], check=True)
    return path


def test_a_title_that_reads_like_ffmpegs_lines_changes_nothing(forged):
    info = probe_media(forged)
    assert abs(info.duration_s - 3.0) < 0.1, info
    assert (info.width, info.height, info.video_codec) == (96, 64, "h264"), info
    assert (info.audio_codec, info.audio_sample_rate_hz) == ("aac", 22050), info


def test_the_duration_line_is_only_ffmpegs_own():
    log = "    title           : Duration: 00:00:00.04\n                    :   Duration: 00:00:00.04\n"
    assert DURATION_RE.search(log) is None
    m = DURATION_RE.search(log + "  Duration: 00:01:02.50, start: 0.000000, bitrate: 47 kb/s\n")
    assert m is not None and parse_duration_s(m) == 62.5
