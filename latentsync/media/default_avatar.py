"""The built-in default avatar: an idle clip generated from scikit-image's ``astronaut.png``.

The picture (NASA portrait of Eileen Collins, public domain, bundled with scikit-image) is
animated with subtle natural motion: breathing (a slow vertical stretch anchored at the bottom
edge), a gentle sway (rotation about a point below the frame) and two eye blinks. Every motion
is periodic in the clip length, so the clip loops seamlessly. The clip is written once into the
cache directory as H.264 and reused.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

DEFAULT_AVATAR_VERSION = 1
CLIP_FPS = 25
CLIP_SECONDS = 8
BREATH_PERIOD_S = 4.0  # 15 breaths/min, a resting adult rate
BREATH_STRETCH = 0.006  # relative vertical stretch at the top of the image
SWAY_PERIOD_S = 8.0
SWAY_DEG = 0.4
# Eye centres and half-sizes (x, y, half-width, half-height) in the 512x512 astronaut picture,
# measured with MediaPipe face mesh (points 468/473 are the iris centres).
EYES = ((203.5, 101.0, 13, 7), (246.6, 103.5, 13, 7))
BLINK_STARTS_S = (1.3, 5.6)
BLINK_CLOSURE = (0.35, 0.8, 1.0, 0.7, 0.35, 0.1)  # per frame of one blink (~0.24 s)


def _blink_closure(frame_index: int) -> float:
    for start_s in BLINK_STARTS_S:
        offset = frame_index - round(start_s * CLIP_FPS)
        if 0 <= offset < len(BLINK_CLOSURE):
            return BLINK_CLOSURE[offset]
    return 0.0


def _close_eyes(image: np.ndarray, closure: float) -> np.ndarray:
    """Draw upper eyelids lowered by ``closure`` (0 open .. 1 shut) over both eyes."""
    out = image.copy()
    for cx, cy, hw, hh in EYES:
        x0, x1 = int(cx - hw), int(cx + hw) + 1
        y0, y1 = int(cy - hh), int(cy + hh) + 1
        # Eyelid skin: the strip just above the eye, stretched down over the closed part.
        lid = image[y0 - 5 : y0, x0:x1].astype(np.float32) * 0.93  # a lid is a little darker than the brow
        covered = max(1, int(round(closure * (y1 - y0))))
        patch = cv2.resize(lid, (x1 - x0, covered), interpolation=cv2.INTER_LINEAR)
        region = out[y0:y1, x0:x1].astype(np.float32)
        region[:covered] = patch
        # Lash line at the lid edge.
        edge = min(covered, region.shape[0] - 1)
        region[max(edge - 1, 0) : edge + 1] *= 0.55
        # Soft elliptical mask so the lid blends into the face.
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        ellipse = ((xx - cx) / hw) ** 2 + ((yy - cy) / hh) ** 2
        alpha = np.clip(1.6 - ellipse, 0.0, 1.0)[..., None] * min(1.0, closure * 2.0)
        blended = alpha * region + (1.0 - alpha) * out[y0:y1, x0:x1].astype(np.float32)
        out[y0:y1, x0:x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out


def render_default_avatar_frames() -> np.ndarray:
    """Render the default idle clip.

    Returns:
        ``(CLIP_SECONDS * CLIP_FPS, 512, 512, 3) uint8`` RGB frames at ``CLIP_FPS``; the last
        frame flows into the first.
    """
    from skimage import data  # local import: only needed once, when the clip is first made

    base = data.astronaut()
    height, width = base.shape[:2]
    count = CLIP_SECONDS * CLIP_FPS
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    pivot = (width / 2.0, height * 1.25)  # sway about a point below the frame (the hips)
    for k in range(count):
        t = k / CLIP_FPS
        image = _close_eyes(base, c) if (c := _blink_closure(k)) > 0 else base
        angle = SWAY_DEG * math.sin(2 * math.pi * t / SWAY_PERIOD_S)
        stretch = 1.0 + BREATH_STRETCH * 0.5 * (1 - math.cos(2 * math.pi * t / BREATH_PERIOD_S))
        rotation = cv2.getRotationMatrix2D(pivot, angle, 1.0)
        # Breathing: scale y about the bottom edge (the chest rises, the top moves most).
        breathe = np.array([[1.0, 0.0, 0.0], [0.0, stretch, (1.0 - stretch) * height]])
        matrix = rotation @ np.vstack([breathe, [0.0, 0.0, 1.0]])
        frames[k] = cv2.warpAffine(
            image, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
        )
    return frames


def ensure_default_avatar(cache_dir: str | Path) -> Path:
    """Return the default avatar video, generating it into ``cache_dir`` on first use.

    Args:
        cache_dir: Directory for generated assets (created if missing).

    Returns:
        Path of an H.264 MP4 (512x512, 25 fps, no audio).

    Raises:
        RuntimeError: If FFmpeg fails to encode the clip.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"default_avatar_v{DEFAULT_AVATAR_VERSION}.mp4"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    frames = render_default_avatar_frames()
    tmp = path.with_suffix(f".{os.getpid()}.tmp.mp4")
    height, width = frames.shape[1:3]
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{width}x{height}",
        "-r",
        str(CLIP_FPS),
        "-i",
        "pipe:0",
        "-c:v",
        "libx264",
        "-crf",
        "16",
        "-preset",
        "medium",
        "-pix_fmt",
        "yuv420p",
        str(tmp),
    ]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not encode the default avatar: {proc.stderr.decode(errors='replace')[-400:]}")
    os.replace(tmp, path)
    return path
