"""Framing a presenter video into a channel's frame: cover (crop around the face), contain, stretch.

A video whose aspect ratio differs from the channel's is never distorted unless asked for:

- ``cover`` (the default) crops a window of the channel's aspect ratio out of the video, sized so
  that the face is ``face_fraction`` of the picture's width (head and shoulders; never smaller than
  the channel in source pixels, so never upscaled, and never beyond the picture), centred on the
  presenter's face horizontally and with the face's centre on the upper third line (as a camera
  operator frames a head-and-shoulders shot), then scales it. The window is one for the whole clip
  (from the median face position over frames sampled across it), so the picture never pans.
- ``contain`` scales the whole video into the frame and fills the bars with a blurred, enlarged copy
  of the video (``background: blur``) or a solid colour (``background: "#rrggbb"``).
- ``stretch`` scales to the frame whatever the aspect ratio (the old behaviour).

Everything runs as FFmpeg filters in the confined decode (:func:`latentsync.media.video.decode_video_frames`):
:meth:`Framing.video_filter` gives the chain. This module is the arithmetic only; looking for the
face and choosing a :class:`Framing` for a file is :func:`latentsync.framing_plan.plan_framing`
(it needs :mod:`latentsync.face`, which media does not import). Docs: docs/avatars.md ("Framing").
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np

#: Aspect ratios closer than this (relative) are the same: the video is only scaled.
SAME_ASPECT = 0.01
#: Where the face's centre sits in a ``cover`` window, as a fraction of its height from the top.
FACE_LINE = 1.0 / 3.0
#: Room kept above the face's centre in a ``cover`` window, in face heights (forehead and hair).
HEADROOM_FACES = 0.9
#: The face's width over the picture's width in a ``cover`` window (``avatar.face_fraction``'s default):
#: head and shoulders (docs/avatars.md, "Framing": why 0.3).
FACE_FRACTION = 0.3
#: A ``cover`` window is at least this many face widths high (headroom, the face, neck and shoulders):
#: on a landscape channel the height, not ``face_fraction``, sets the window's size.
WINDOW_HEIGHT_FACES = 3.0
#: Strength of the ``contain`` background blur (FFmpeg ``boxblur`` luma radius, pixels at stream size).
BLUR_RADIUS = 20
COLOUR_RE = re.compile(r"#[0-9a-fA-F]{6}")
#: Rounds a frame down to even sizes (YUV 4:2:0).
EVEN = "scale=trunc(iw/2)*2:trunc(ih/2)*2"


class Fit(str, enum.Enum):
    """How a video whose aspect ratio differs from the channel's fills its frame."""

    cover = "cover"
    contain = "contain"
    stretch = "stretch"


def check_background(value: str) -> str:
    """``"blur"`` or a ``"#rrggbb"`` colour, lower-cased.

    Raises:
        ValueError: For anything else.
    """
    if value == "blur" or COLOUR_RE.fullmatch(value or ""):
        return value.lower()
    raise ValueError(f"background must be 'blur' or '#rrggbb', got {value!r}")


@dataclass(frozen=True, kw_only=True)
class FaceBox:
    """Where the presenter's face is in the source video (median over sampled frames), in source pixels.

    Attributes:
        cx: Centre x.
        cy: Centre y.
        width: Face width.
        height: Face height.
        frames: Sampled frames the face was found on.
        sampled: Frames sampled.
    """

    cx: float
    cy: float
    width: float
    height: float
    frames: int
    sampled: int


def largest_window(source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest ``(w, h)`` of the target's aspect ratio inside the source, in source pixels (even sizes).

    Args:
        source: Source ``(width, height)`` in pixels.
        target: Target ``(width, height)`` in pixels.
    """
    sw, sh = source
    tw, th = target
    if sw * th > sh * tw:  # source wider than the target: full height, part of the width
        h = sh - sh % 2
        w = min(sw, int(round(h * tw / th)))
    else:
        w = sw - sw % 2
        h = min(sh, int(round(w * th / tw)))
    return w - w % 2, h - h % 2


def cover_width(
    source: tuple[int, int],
    target: tuple[int, int],
    face_width: float | None,
    face_fraction: float | None = FACE_FRACTION,
    min_face_px: float = 0.0,
) -> int:
    """Width in source pixels of ``cover``'s window (its height follows from the target's aspect ratio).

    The window that frames the presenter head-and-shoulders: the face ``face_fraction`` of the picture's
    width, or less where the picture is too low for :data:`WINDOW_HEIGHT_FACES` face widths (landscape
    channels); but never so wide that the face is under ``min_face_px`` on air, never narrower than the
    target (no upscaling: at least ``target`` source pixels, unless the source itself is smaller) and
    never wider than :func:`largest_window`.

    Args:
        source: Source ``(width, height)`` in pixels.
        target: Target ``(width, height)`` in pixels.
        face_width: The face's width in source pixels (None: no face; the largest window).
        face_fraction: The face's width on air over the picture's width, 0-1 (``avatar.face_fraction``);
            None: the largest window (the rule before ``face_fraction``).
        min_face_px: ``avatar.min_face_px``: the window is narrowed (down to the target's width) until
            the face is at least this wide on air, in output pixels (0: no such bound).

    Returns:
        The width, even, in source pixels.
    """
    w_max, _ = largest_window(source, target)
    if face_width is None or face_width <= 0 or face_fraction is None:
        return w_max
    tw, th = target
    compose = max(face_width / face_fraction, WINDOW_HEIGHT_FACES * face_width * tw / th)
    if min_face_px > 0:
        compose = min(compose, face_width * tw / min_face_px)
    floor = min(tw, w_max)
    w = min(w_max, max(floor, compose))
    even = int(w) - int(w) % 2  # rounded down: the face is never under min_face_px by rounding ...
    return max(2, even if even >= floor else min(w_max, floor + floor % 2))  # ... nor upscaled by it


def cover_window(
    source: tuple[int, int],
    target: tuple[int, int],
    face: FaceBox | None,
    face_fraction: float | None = FACE_FRACTION,
    min_face_px: float = 0.0,
) -> tuple[int, int, int, int]:
    """The crop ``(x, y, w, h)`` in source pixels that ``cover`` scales to ``target``.

    A window of the target's aspect ratio, as wide as :func:`cover_width` says (the face
    ``face_fraction`` of the picture's width, no upscaling, inside the source); horizontally centred
    on the face, vertically with the face centre on :data:`FACE_LINE` but never less than
    :data:`HEADROOM_FACES` face heights below the window's top; clamped into the source (a face near
    an edge is off-centre). Without a face: the largest window, centred. Sizes and offsets are even
    (YUV 4:2:0 sources).

    Args:
        source: Source ``(width, height)`` in pixels.
        target: Target ``(width, height)`` in pixels.
        face: The face, or None.
        face_fraction: ``avatar.face_fraction`` (None: the largest window, wherever the face is).
        min_face_px: ``avatar.min_face_px`` (0: no bound); see :func:`cover_width`.
    """
    sw, sh = source
    tw, th = target
    w_max, h_max = largest_window(source, target)
    w = cover_width(source, target, None if face is None else face.width, face_fraction, min_face_px)
    if w >= w_max:
        w, h = w_max, h_max
    else:
        h = min(h_max, int(round(w * th / tw)))
        h -= h % 2
    if face is None:
        x, y = (sw - w) / 2, (sh - h) / 2
    else:
        x = face.cx - w / 2
        y = min(face.cy - FACE_LINE * h, face.cy - HEADROOM_FACES * face.height)
    x = int(np.clip(round(x), 0, sw - w))
    y = int(np.clip(round(y), 0, sh - h))
    return x - x % 2, y - y % 2, w, h


def largest_face_px(source: tuple[int, int], target: tuple[int, int], face_width: float) -> float:
    """The widest the face can be on air, in output pixels, framed with ``cover`` and no upscaling.

    The face's own width in source pixels (the window as narrow as the target), or more when the source
    is smaller than the target (its largest window must be enlarged anyway).

    Args:
        source: Source ``(width, height)`` in pixels.
        target: Target ``(width, height)`` in pixels.
        face_width: The face's width in source pixels.
    """
    w_max, _ = largest_window(source, target)
    return face_width * target[0] / max(1, min(target[0], w_max))


@dataclass(frozen=True, kw_only=True)
class Framing:
    """How one video is framed into one frame size.

    Attributes:
        fit: The mode (``stretch`` also where the aspect ratios are the same).
        size: Output ``(width, height)`` in pixels.
        crop: ``cover``'s window ``(x, y, w, h)`` in source pixels (None otherwise).
        background: ``contain``'s bars: ``"blur"`` or ``"#rrggbb"``.
        face: The face the window was placed on (None: none found or not looked for).
    """

    fit: Fit
    size: tuple[int, int]
    crop: tuple[int, int, int, int] | None = None
    background: str = "blur"
    face: FaceBox | None = None

    def video_filter(self) -> str:
        """The FFmpeg filter chain (one input, one output) from a source frame to ``size``."""
        w, h = self.size
        scale = f"scale={w}:{h}:flags=bicubic"
        if self.fit is Fit.cover and self.crop is not None:
            cx, cy, cw, ch = self.crop
            return f"crop={cw}:{ch}:{cx}:{cy},{scale},setsar=1"
        if self.fit is Fit.contain:
            inner = f"scale={w}:{h}:force_original_aspect_ratio=decrease:flags=bicubic,{EVEN}"
            if self.background == "blur":
                grow = f"scale={w}:{h}:force_original_aspect_ratio=increase:flags=bicubic"
                r = BLUR_RADIUS  # at most a quarter of a plane's side (boxblur refuses more)
                blur = f"boxblur=lr='min({r},min(w,h)/4)':lp=2:cr='min({r},min(cw,ch)/4)':cp=2"
                back = f"{grow},crop={w}:{h},{blur}"
                return f"split[bg][fg];[bg]{back}[b];[fg]{inner}[f];[b][f]overlay=(W-w)/2:(H-h)/2,setsar=1"
            colour = "0x" + self.background[1:]
            return f"{inner},pad={w}:{h}:(ow-iw)/2:(oh-ih)/2:color={colour},setsar=1"
        return f"{scale},setsar=1"

    def to_json(self) -> dict:
        """Plain-JSON form (avatar records, meta files)."""
        return {
            "fit": self.fit.value,
            "size": list(self.size),
            "crop": list(self.crop) if self.crop is not None else None,
            "background": self.background,
            "face": None if self.face is None else {k: round(float(v), 1) for k, v in vars(self.face).items()},
        }


def face_scale(source: tuple[int, int], size: tuple[int, int], fit: Fit | str) -> float:
    """Output pixels per source pixel, horizontally, when ``source`` is framed into ``size`` with ``fit``.

    A face ``w`` source pixels wide is ``w * face_scale(...)`` pixels wide on air. ``cover``: with its
    largest window (no face found); a window sized on the face is :func:`cover_width`.
    """
    fit = Fit(fit)
    sx, sy = size[0] / source[0], size[1] / source[1]
    if fit is Fit.stretch or same_aspect(source, size):
        return sx
    return max(sx, sy) if fit is Fit.cover else min(sx, sy)


def same_aspect(source: tuple[int, int], target: tuple[int, int]) -> bool:
    """True when the two sizes' aspect ratios differ by less than :data:`SAME_ASPECT`."""
    return abs((source[0] / source[1]) / (target[0] / target[1]) - 1.0) < SAME_ASPECT


def displayed_size(coded: tuple[int, int], decoded: tuple[int, int]) -> tuple[int, int]:
    """The coded size, turned a quarter when the decoded (autorotated) frames are the other way round.

    Args:
        coded: The video's coded ``(width, height)`` (the probe's, before rotation).
        decoded: ``(width, height)`` of frames decoded with rotation applied (any scale).

    Returns:
        The video's ``(width, height)`` as displayed, in source pixels.
    """
    return coded if (coded[0] >= coded[1]) == (decoded[0] >= decoded[1]) else (coded[1], coded[0])


def capped_size(display: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """The size a channel without a configured size streams a video of ``display`` pixels at.

    Returns:
        None when the longest side is at most ``max_side`` (the video's own size, even); else the
        video's aspect ratio with the longest side ``max_side`` (even sizes).
    """
    w, h = display
    if max(w, h) <= max_side:
        return None
    scale = max_side / max(w, h)
    return max(2, int(round(w * scale / 2)) * 2), max(2, int(round(h * scale / 2)) * 2)
