"""Landmark smoothing, the three alignment points and the similarity transform onto the template.

All constants come from docs/latentsync.md ("Faces", "Versions"). Coordinates are ``(x, y)``
pixels; an affine is a ``(2, 3) float64`` matrix mapping full-frame pixels to template pixels.

Face sizes: LatentSync 1.0 / 1.5 run on 256x256 faces, 1.6 on 512x512 (``face_size``; the engine's
version decides it, :func:`latentsync.config.engine_face_size`). The original scales its whole
template with the face size (``ratio = resolution / 256 * 2.8``: points and crop), so one affine
serves every size: the affines here always map onto the 256 template (210x280,
:data:`TEMPLATE_POINTS`), and :func:`affine_at_face_size` scales one to the template of another
size (420x560 at 512). At 256 every function here computes exactly what it did before sizes existed.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Template crop size ``(width, height)`` in pixels onto which faces are aligned, at :data:`FACE_SIZE`
#: (the original's ``(int(75 * ratio), int(100 * ratio))`` with ``ratio = 2.8``; :func:`template_size`).
TEMPLATE_SIZE = (210, 280)
#: Template positions of the three alignment points at :data:`FACE_SIZE`: brow 17-21, brow 22-26, nose
#: 27-35 (the original's ``[[17, 20], [58, 20], [37.5, 40]] * ratio`` with ``ratio = 2.8``).
TEMPLATE_POINTS = np.array([[47.6, 56.0], [162.4, 56.0], [105.0, 112.0]], np.float64)
#: Side of the aligned face given to the model, in pixels: LatentSync 1.0 / 1.5 (1.6: 512, ``face_size``).
FACE_SIZE = 256
#: Grey used outside the frame when warping (RGB).
BORDER_VALUE = (127, 127, 127)
#: Weight of the previous affine translation when smoothing it over time.
TRANSLATION_PREV_WEIGHT = 0.2
#: Landmark smoothing scale: weight on the previous point is ``exp(-d^2 / (face_width * 0.3))``.
LANDMARK_SMOOTH_FACTOR = 0.3

#: Groups of 68-point indices whose means are the three alignment points.
_ALIGN_GROUPS = (slice(17, 22), slice(22, 27), slice(27, 36))


def face_width(landmarks: np.ndarray) -> float:
    """Width of a face from its jaw line.

    Args:
        landmarks: ``(68, 2)`` points in pixels.

    Returns:
        Horizontal extent of the jaw points 0-16 in pixels (at least 1).

    """
    jaw = landmarks[:17, 0]
    return max(float(jaw.max() - jaw.min()), 1.0)


def smooth_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Smooth a landmark track over time, per point, as LatentSync 1.0 does.

    Each point moves from its previous smoothed position towards the new detection with weight
    ``w = exp(-d^2 / (face_width * 0.3))`` on the previous position, where ``d`` is the distance
    between the two: sub-pixel jitter is almost frozen, real motion is followed.

    Args:
        landmarks: ``(F, 68, 2)`` float points in pixels, F >= 1.

    Returns:
        ``(F, 68, 2) float64`` smoothed points.

    """
    pts = np.asarray(landmarks, np.float64)
    out = np.empty_like(pts)
    out[0] = pts[0]
    for i in range(1, len(pts)):
        prev = out[i - 1]
        d2 = np.sum((pts[i] - prev) ** 2, axis=1, keepdims=True)
        w = np.exp(-d2 / (face_width(pts[i]) * LANDMARK_SMOOTH_FACTOR))
        out[i] = w * prev + (1.0 - w) * pts[i]
    return out


def alignment_points(landmarks: np.ndarray) -> np.ndarray:
    """Compute the three alignment points of one face.

    Args:
        landmarks: ``(68, 2)`` points in pixels.

    Returns:
        ``(3, 2) float64``: mean of brow 17-21, mean of brow 22-26, mean of nose 27-35.

    """
    pts = np.asarray(landmarks, np.float64)
    return np.stack([pts[g].mean(axis=0) for g in _ALIGN_GROUPS])


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama/Procrustes: centre both point sets, scale by their standard deviations, take the
    rotation from the SVD of the cross-covariance (reflections excluded).

    Args:
        src: ``(N, 2)`` points, N >= 2, not all equal.
        dst: ``(N, 2)`` target points.

    Returns:
        ``(2, 3) float64`` affine ``A`` with ``dst ~ A[:, :2] @ src + A[:, 2]``.

    Raises:
        ValueError: If ``src`` is degenerate (all points equal).

    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_std, dst_std = float(np.std(src_c)), float(np.std(dst_c))
    if src_std < 1e-9:
        raise ValueError(f"degenerate source points: {src.tolist()}")
    src_n, dst_n = src_c / src_std, dst_c / dst_std
    u, _, vt = np.linalg.svd(dst_n.T @ src_n)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ d @ vt
    scale = dst_std / src_std
    lin = scale * rot
    return np.hstack([lin, (dst_mean - lin @ src_mean)[:, None]])


def compute_affines(smoothed_landmarks: np.ndarray) -> np.ndarray:
    """Frame-to-template affines for a whole track, with the translation smoothed over time.

    Args:
        smoothed_landmarks: ``(F, 68, 2)`` points in frame pixels (output of :func:`smooth_landmarks`).

    Returns:
        ``(F, 2, 3) float64`` affines mapping frame pixels to the 210x280 template. The translation
        column is ``0.2 * previous + 0.8 * current`` (LatentSync 1.0's smoothing of the third point).

    """
    affines = np.empty((len(smoothed_landmarks), 2, 3), np.float64)
    for i, lm in enumerate(smoothed_landmarks):
        a = similarity_transform(alignment_points(lm), TEMPLATE_POINTS)
        if i > 0:
            a[:, 2] = TRANSLATION_PREV_WEIGHT * affines[i - 1, :, 2] + (1 - TRANSLATION_PREV_WEIGHT) * a[:, 2]
        affines[i] = a
    return affines


def transform_points(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Apply a ``(2, 3)`` affine to ``(..., 2)`` points; returns float64 of the same shape."""
    pts = np.asarray(points, np.float64)
    return pts @ affine[:, :2].T + affine[:, 2]


def check_face_size(face_size: int) -> int:
    """Check an aligned face size.

    Args:
        face_size: Side of the aligned face in pixels (256 for LatentSync 1.0 / 1.5, 512 for 1.6).

    Returns:
        ``face_size`` as an int.

    Raises:
        ValueError: If it is not an integer of at least 8 (quoted).

    """
    if isinstance(face_size, bool) or not isinstance(face_size, int | np.integer) or face_size < 8:
        raise ValueError(f"face_size must be an integer >= 8 (256 or 512), got {face_size!r}")
    return int(face_size)


def template_size(face_size: int = FACE_SIZE) -> tuple[int, int]:
    """Template crop ``(width, height)`` in pixels for aligned faces of side ``face_size``.

    The original's ``(int(75 * ratio), int(100 * ratio))`` with ``ratio = face_size / 256 * 2.8``,
    in integers: 210x280 at 256, 420x560 at 512.

    Raises:
        ValueError: If ``face_size`` is not valid (:func:`check_face_size`).

    """
    face_size = check_face_size(face_size)
    return TEMPLATE_SIZE[0] * face_size // FACE_SIZE, TEMPLATE_SIZE[1] * face_size // FACE_SIZE


def affine_at_face_size(affine: np.ndarray, face_size: int = FACE_SIZE) -> np.ndarray:
    """Scale a frame-to-template affine (256 template) to the template of another face size.

    The original aligns onto the template points times ``face_size / 256 * 2.8``; the least-squares
    similarity onto points scaled by ``k`` is the similarity onto the unscaled ones, scaled by ``k``
    (translation included, and the translation smoothing is linear), so this is that alignment.

    Args:
        affine: ``(2, 3)`` frame-to-template affine onto :data:`TEMPLATE_POINTS` (210x280).
        face_size: Side of the aligned face in pixels.

    Returns:
        ``(2, 3) float64`` frame-to-template affine onto the :func:`template_size` template of
        ``face_size``; at 256 the same values as ``affine``.

    Raises:
        ValueError: If ``face_size`` is not valid (:func:`check_face_size`).

    """
    return np.asarray(affine, np.float64) * (check_face_size(face_size) / FACE_SIZE)


def template_to_face_affine(affine: np.ndarray, face_size: int = FACE_SIZE) -> np.ndarray:
    """Compose a frame-to-template affine with the template -> aligned face resize.

    Args:
        affine: ``(2, 3)`` frame-to-template affine (256 template, as :func:`compute_affines` gives).
        face_size: Side of the aligned face in pixels (256: the 210x280 -> 256x256 resize; 512: the
            template scaled to 420x560, then 420x560 -> 512x512).

    Returns:
        ``(2, 3) float64`` affine mapping frame pixels to aligned ``face_size`` x ``face_size`` face
        pixels (pixel-centre convention of ``cv2.resize``).

    Raises:
        ValueError: If ``face_size`` is not valid (:func:`check_face_size`).

    """
    affine = affine_at_face_size(affine, face_size)
    tw, th = template_size(face_size)
    sx, sy = face_size / tw, face_size / th
    scale = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
    return np.hstack([scale[:, :2] @ affine[:, :2], (scale[:, :2] @ affine[:, 2] + scale[:, 2])[:, None]])


def warp_face(frame: np.ndarray, affine: np.ndarray, face_size: int = FACE_SIZE) -> np.ndarray:
    """Cut the aligned face out of a frame.

    Warps onto the template of ``face_size`` (210x280 at 256, 420x560 at 512: :func:`template_size`)
    with Lanczos and a constant grey border, then resizes to ``face_size`` x ``face_size`` with
    Lanczos (aspect not preserved), as LatentSync does at each version's resolution.

    Args:
        frame: ``(H, W, 3) uint8`` RGB frame.
        affine: ``(2, 3)`` frame-to-template affine (256 template, as :func:`compute_affines` gives).
        face_size: Side of the aligned face in pixels (256 for LatentSync 1.0 / 1.5, 512 for 1.6).

    Returns:
        ``(face_size, face_size, 3) uint8`` RGB aligned face.

    Raises:
        ValueError: If ``face_size`` is not valid (:func:`check_face_size`).

    """
    crop = cv2.warpAffine(
        frame,
        affine_at_face_size(affine, face_size),
        template_size(face_size),
        flags=cv2.INTER_LANCZOS4,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=BORDER_VALUE,
    )
    return cv2.resize(crop, (face_size, face_size), interpolation=cv2.INTER_LANCZOS4)
