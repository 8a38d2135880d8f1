"""Choosing how a video is framed into a channel's frame (looking for the face), and decoding it so.

Where :mod:`latentsync.media` and :mod:`latentsync.face` meet: ``cover`` places its window on the
presenter's face, found by the face tracker on small frames sampled across the video. The framing
arithmetic (:class:`~latentsync.media.framing.Framing`, :func:`~latentsync.media.framing.cover_window`)
and the decoding (:func:`~latentsync.media.video.decode_clip`) stay in media, which imports nothing
of face. Docs: docs/avatars.md ("Framing").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from latentsync.face import FaceTracker, TrackerOptions
from latentsync.face.native_log import NativeLogCapture
from latentsync.media.errors import MediaProbeError
from latentsync.media.framing import (
    FACE_FRACTION,
    FaceBox,
    Fit,
    Framing,
    check_background,
    cover_window,
    displayed_size,
    largest_window,
    same_aspect,
)
from latentsync.media.probe import MediaInfo, probe_media
from latentsync.media.video import (
    VIDEO_FORMATS,
    ClipLimits,
    FrameBudget,
    StoredClip,
    VideoClip,
    check_clip_limits,
    decode_clip,
    decode_clip_to_file,
    decode_small_frames,
)

#: Frames per second at which faces are looked for to place the window, and the most frames looked at
#: (frames are :data:`latentsync.media.video.SMALL_FRAME_SIDE` pixels on their longest side).
FACE_SEARCH_FPS = 2
FACE_SEARCH_MAX_FRAMES = 60
#: A video narrower or lower than this is refused by ``cover`` (nothing to crop a window from).
MIN_SOURCE_SIDE = 16
#: ``finder(path, coded) -> (face, source)``: how :func:`plan_framing` looks for the face (:func:`find_face`
#: in this process; the server runs each search in a child, ``latentsync.serving.ops.face_search``).
FaceFinder = Callable[[str | Path, tuple[int, int]], tuple[FaceBox | None, tuple[int, int]]]


def find_face(path: str | Path, coded: tuple[int, int]) -> tuple[FaceBox | None, tuple[int, int]]:
    """The presenter's face in a video: median box over frames sampled at 2 fps (at most 60).

    Args:
        path: The video (decoded by the confined FFmpeg, rotation metadata applied).
        coded: Its coded ``(width, height)`` (the probe's, before rotation).

    Returns:
        ``(face, source)``: the median face box in displayed source pixels (None when no sampled
        frame shows a face), and the displayed ``(width, height)`` (``coded``, swapped when the video
        carries a quarter-turn rotation).

    Raises:
        latentsync.media.MediaProbeError: If the video cannot be decoded.
    """
    frames = decode_small_frames(path, FACE_SEARCH_FPS, FACE_SEARCH_MAX_FRAMES)
    fh, fw = frames.shape[1:3]
    sw, sh = displayed_size(coded, (fw, fh))
    boxes = []
    with NativeLogCapture(), FaceTracker(TrackerOptions()) as tracker:
        for frame in frames:
            det = tracker.detect(frame)
            if det is not None:
                boxes.append(det.box)
    if not boxes:
        return None, (sw, sh)
    x0, y0, x1, y1 = np.median(np.asarray(boxes, np.float64), axis=0)
    fx, fy = sw / fw, sh / fh
    face = FaceBox(
        cx=(x0 + x1) / 2 * fx,
        cy=(y0 + y1) / 2 * fy,
        width=(x1 - x0) * fx,
        height=(y1 - y0) * fy,
        frames=len(boxes),
        sampled=len(frames),
    )
    return face, (sw, sh)


def plan_framing(
    path: str | Path,
    coded: tuple[int, int],
    size: tuple[int, int],
    fit: Fit | str,
    background: str = "blur",
    face_fraction: float | None = FACE_FRACTION,
    min_face_px: float = 0.0,
    face_finder: FaceFinder | None = None,
) -> Framing:
    """How to frame the video at ``path`` into ``size``.

    ``cover`` looks for the face (:func:`find_face`: up to 60 small frames, a second or two) and crops
    the window :func:`~latentsync.media.framing.cover_window` places and sizes on it, unless the video
    has the frame's aspect ratio and is no larger (no smaller window is possible without upscaling:
    it is only scaled, nothing decoded here); ``contain`` and ``stretch`` decode nothing here
    (``contain``'s filter works out the bars itself).

    Args:
        path: The video.
        coded: Its coded ``(width, height)`` (the probe's).
        size: The frame's ``(width, height)`` in pixels.
        fit: The mode.
        background: ``contain``'s bars.
        face_fraction: ``cover``: the face's width over the picture's width (``avatar.face_fraction``);
            None: the largest window (the rule before it).
        min_face_px: ``cover``: the narrowest face on air the window allows where the source can give
            it (``avatar.min_face_px``; 0: none), in output pixels.
        face_finder: How the face is looked for (:data:`FaceFinder`); None: :func:`find_face` here.

    Raises:
        ValueError: For an unknown mode or background.
        latentsync.media.MediaProbeError: ``cover`` of a video under :data:`MIN_SOURCE_SIDE`
            pixels on a side (or one FFmpeg cannot decode, or a search ``face_finder`` could not make).
    """
    fit = Fit(fit)
    background = check_background(background)
    size = (int(size[0]), int(size[1]))
    scaled = Framing(fit=Fit.stretch, size=size, background=background)
    # (a quarter-turned video never has the same aspect)
    if fit is Fit.stretch or (fit is Fit.contain and same_aspect(coded, size)):
        return scaled
    if fit is Fit.contain:
        return Framing(fit=Fit.contain, size=size, background=background)
    if same_aspect(coded, size) and (coded[0] <= size[0] or face_fraction is None):
        return scaled
    face, source = (face_finder or find_face)(path, coded)
    if min(source) < MIN_SOURCE_SIDE:
        raise MediaProbeError(
            f"{Path(path).name}: {source[0]}x{source[1]} is too small to frame (under {MIN_SOURCE_SIDE} px)"
        )
    crop = cover_window(source, size, face, face_fraction, min_face_px)
    if same_aspect(source, size) and crop[2:] == largest_window(source, size):  # the whole picture
        return dataclasses.replace(scaled, face=face)
    return Framing(fit=Fit.cover, size=size, crop=crop, background=background, face=face)


def load_clip(
    path: str | Path,
    fps: int,
    sample_rate_hz: int,
    size: tuple[int, int] | None = None,
    with_audio: bool = True,
    limits: ClipLimits | None = None,
    what: str = "video",
    fit: Fit | str = Fit.stretch,
    background: str = "blur",
    face_fraction: float | None = FACE_FRACTION,
    min_face_px: float = 0.0,
    face_finder: FaceFinder | None = None,
) -> VideoClip:
    """Decode a video and its audio onto the stream time base, framed into ``size`` (FFmpeg confined to the file).

    Probes the file, checks ``limits``, plans the framing (:func:`plan_framing`) when ``size`` is
    given, then decodes (:func:`latentsync.media.video.decode_clip`: the audio is trimmed or
    zero-padded to exactly ``floor(F * sample_rate_hz / fps)`` samples).

    Args:
        path: Video file (MP4/MOV or Matroska/WebM).
        fps: Stream frame rate in frames per second.
        sample_rate_hz: Stream audio rate in Hz.
        size: Output ``(width, height)``; None keeps the source size (rounded down to even).
        with_audio: Decode the audio track too (if the file has one).
        limits: Budgets checked from the probe before anything is decoded (None: none).
        what: How limit errors name the video.
        fit: How a video of another aspect ratio than ``size`` fills it (:mod:`latentsync.media.framing`:
            ``cover`` crops around the face, ``contain`` letterboxes, ``stretch`` distorts).
        background: ``contain``'s bars: ``"blur"`` or ``"#rrggbb"``.
        face_fraction: ``cover``'s face width over the picture's width (:func:`plan_framing`).
        min_face_px: ``cover``'s narrowest face on air where the source can give it (:func:`plan_framing`).
        face_finder: How ``cover`` looks for the face (:data:`FaceFinder`); None: :func:`find_face` here.

    Returns:
        The :class:`~latentsync.media.video.VideoClip` (its ``framing`` says how it was framed, None
        without ``size``).

    Raises:
        latentsync.media.MediaProbeError: If the file is missing, unreadable or has no video stream.
        latentsync.media.video.MediaLimitError: If it is over one of ``limits``.
    """
    info, framing = _probe_and_plan(
        path, fps, size, limits, what, fit, background, face_fraction, min_face_px, face_finder
    )
    return decode_clip(path, fps, sample_rate_hz, size, with_audio, info=info, framing=framing)


def load_clip_to_file(
    path: str | Path,
    target: str | Path,
    fps: int,
    sample_rate_hz: int,
    size: tuple[int, int] | None = None,
    with_audio: bool = True,
    limits: ClipLimits | None = None,
    what: str = "video",
    fit: Fit | str = Fit.stretch,
    background: str = "blur",
    budget: FrameBudget | None = None,
    face_fraction: float | None = FACE_FRACTION,
    min_face_px: float = 0.0,
) -> StoredClip:
    """:func:`load_clip` with the frames streamed to ``target`` (a ``.npy`` file), never all in memory.

    The same probe, budgets and framing, and the same frames
    (:func:`latentsync.media.video.decode_clip_to_file`).

    Args:
        path: Video file (MP4/MOV or Matroska/WebM).
        target: Where the ``(F, H, W, 3) uint8`` frames are written (deleted again on an error).
        fps: Stream frame rate in frames per second.
        sample_rate_hz: Stream audio rate in Hz.
        size: Output ``(width, height)``; None keeps the source size (rounded down to even).
        with_audio: Decode the audio track too (if the file has one).
        limits: Budgets checked from the probe before anything is decoded (None: none).
        what: How limit errors name the video.
        fit: How a video of another aspect ratio than ``size`` fills it (as :func:`load_clip`).
        background: ``contain``'s bars: ``"blur"`` or ``"#rrggbb"``.
        budget: Most frames the video may decode to, counted while decoding
            (:class:`~latentsync.media.video.FrameBudget`); None: no such budget.
        face_fraction: ``cover``'s face width over the picture's width (:func:`plan_framing`).
        min_face_px: ``cover``'s narrowest face on air where the source can give it (:func:`plan_framing`).

    Returns:
        The :class:`~latentsync.media.video.StoredClip`.

    Raises:
        latentsync.media.MediaProbeError: If the file is missing, unreadable or has no video stream.
        latentsync.media.video.MediaLimitError: If it is over one of ``limits``, or decodes to more
            frames than ``budget`` allows.
    """
    info, framing = _probe_and_plan(path, fps, size, limits, what, fit, background, face_fraction, min_face_px)
    return decode_clip_to_file(
        path, target, fps, sample_rate_hz, size, with_audio, info=info, framing=framing, budget=budget
    )


def _probe_and_plan(
    path: str | Path,
    fps: int,
    size: tuple[int, int] | None,
    limits: ClipLimits | None,
    what: str,
    fit: Fit | str,
    background: str,
    face_fraction: float | None,
    min_face_px: float,
    face_finder: FaceFinder | None = None,
) -> tuple[MediaInfo, Framing | None]:
    """The probe (checked against ``limits``) and the framing (None without ``size``) of :func:`load_clip`."""
    info = probe_media(path, formats=VIDEO_FORMATS)
    if limits is not None:
        check_clip_limits(info, fps, size, limits, what)
    framing = None
    if size is not None:
        framing = plan_framing(
            path, (info.width, info.height), size, fit, background, face_fraction, min_face_px, face_finder
        )
    return info, framing
