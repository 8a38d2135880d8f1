"""The files the tests read: all of them live in the repository under ``tests/data/``.

``tests/data/media/`` holds real recordings (origin and licence in its README);
``tests/data/latentsync_1_0_unet_state_dict.txt`` lists the official U-Net's parameter names and shapes.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf

DATA = Path(__file__).resolve().parent / "data"
MEDIA = DATA / "media"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def data_file(relative: str) -> Path:
    """A file under ``tests/data/``; fails the test (never skips) when it is missing."""
    path = DATA / relative
    if not path.is_file():
        pytest.fail(f"test data missing: {path} (it is part of the repository: is the checkout complete?)")
    return path


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (not a package; ``name`` may be ``bench/x``) as module ``x``, in ``sys.modules``.

    The tests use the scripts' own functions (``make_tiny_checkpoints``, ``make_parity_fixtures``) rather
    than copies of them.

    Raises:
        FileNotFoundError: If the script is not in ``scripts/``.
    """
    path = SCRIPTS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no script {path}")
    spec = importlib.util.spec_from_file_location(Path(name).name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def media_file(relative: str) -> Path:
    """A recording under ``tests/data/media/``, e.g. ``"audio/7s_shan_0801_01.wav"``."""
    return data_file(f"media/{relative}")


def speech_wav(seconds: float, relative: str = "audio/7s_shan_0801_01.wav") -> bytes:
    """``seconds`` of the recording ``relative`` (repeated as needed) as 16-bit PCM WAV bytes, at its own rate."""
    audio, rate = sf.read(media_file(relative), dtype="float32")
    audio = np.tile(audio, int(np.ceil(seconds * rate / len(audio))) + 1)[: int(seconds * rate)]
    out = io.BytesIO()
    sf.write(out, audio, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def other_bytes(source: Path, folder: Path, tag: str) -> Path:
    """The same video with other bytes (``POST /avatars`` takes the same bytes again as the same avatar).

    Its streams are copied, not re-encoded, into ``folder/<stem>-<tag>.mp4`` with ``tag`` as its comment.
    """
    import subprocess

    import imageio_ffmpeg

    out = folder / f"{source.stem}-{tag}.mp4"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(source), "-c", "copy"]
        + ["-metadata", f"comment={tag}", "-y", str(out)],
        check=True,
        timeout=60,
    )
    return out


def make_faceless_video(path: Path) -> Path:
    """Write 2 s of FFmpeg's colour-bar test pattern (no face) at 256x256, 25 fps, H.264 in MP4, to ``path``."""
    import subprocess

    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=256x256:rate=25"]
        + ["-t", "2", "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", str(path)],
        check=True,
        timeout=60,
    )
    return path


def make_moving_bar_video(path: Path) -> Path:
    """Write 4 s of a white 40x200 bar moving over flat grey at 256x456, 25 fps, lossless H.264, to ``path``.

    The bar moves several pixels every frame, so each frame differs clearly from its neighbours (the
    tap tests align received frames with an RTMP recording) and lossy encodes stay near exact.
    """
    import subprocess

    import imageio_ffmpeg

    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         "color=c=gray:s=256x456:r=25:d=4", "-f", "lavfi", "-i", "color=c=white:s=40x200:r=25:d=4",
         "-filter_complex", "[0][1]overlay=x='n*2':y='mod(n*13,256)':shortest=1,format=yuv420p",
         "-c:v", "libx264", "-qp", "0", "-y", str(path)],
        check=True,
        timeout=60,
    )  # fmt: skip
    return path
