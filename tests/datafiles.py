"""The files the tests read: all of them live in the repository under ``tests/data/``.

``tests/data/media/`` holds real recordings (origin and licence in its README);
``tests/data/latentsync_1_0_unet_state_dict.txt`` lists the official U-Net's parameter names and shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
MEDIA = DATA / "media"


def data_file(relative: str) -> Path:
    """A file under ``tests/data/``; fails the test (never skips) when it is missing."""
    path = DATA / relative
    if not path.is_file():
        pytest.fail(f"test data missing: {path} (it is part of the repository: is the checkout complete?)")
    return path


def media_file(relative: str) -> Path:
    """A recording under ``tests/data/media/``, e.g. ``"audio/7s_shan_0801_01.wav"``."""
    return data_file(f"media/{relative}")


def make_faceless_video(path: Path) -> Path:
    """Write 2 s of FFmpeg's colour-bar test pattern (no face) at 256x256, 25 fps, H.264 in MP4, to ``path``."""
    import subprocess

    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=256x256:rate=25"]
        + ["-t", "2", "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)],
        check=True,
        timeout=60,
    )
    return path
