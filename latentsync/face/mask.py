"""The fixed LatentSync mouth mask, generated from its documented geometry, at each face size."""

from __future__ import annotations

import cv2
import numpy as np

from latentsync.face.align import check_face_size

#: Side of the grid the mask geometry is defined on, in pixels (LatentSync 1.0 / 1.5 resolution; 1.6's
#: 512 mask is this grid resized, :func:`face_keep_mask`).
MASK_SIZE = 256

#: Rows ``[start, stop)`` where only the two cheek bands are generated (docs/latentsync.md).
_CHEEK_ROWS = (95, 128)
#: Inclusive ``x`` ranges of the two cheek bands; the nose (x 78-177) is kept.
_CHEEK_BANDS = ((9, 77), (178, 246))
#: Sampled rows of the U-shaped lower region and their inclusive ``x`` bounds (docs/latentsync.md).
_U_ROWS = (128, 144, 160, 176, 184, 192, 200, 208, 216, 224, 232, 240)
_U_LEFT = (9, 10, 11, 15, 20, 26, 33, 40, 51, 64, 80, 104)
_U_RIGHT = (247, 246, 245, 240, 235, 230, 223, 216, 207, 196, 180, 160)
#: First row that is kept entirely at the bottom.
_U_END_ROW = 246


def _u_bounds(row: int) -> tuple[int, int]:
    """Inclusive generated ``x`` range of one row of the U region (linear between samples)."""
    if row <= _U_ROWS[-1]:
        left = float(np.interp(row, _U_ROWS, _U_LEFT))
        right = float(np.interp(row, _U_ROWS, _U_RIGHT))
    else:
        # Past the last sample the U keeps closing with the slope of its last segment.
        d = row - _U_ROWS[-1]
        span = _U_ROWS[-1] - _U_ROWS[-2]
        left = _U_LEFT[-1] + d * (_U_LEFT[-1] - _U_LEFT[-2]) / span
        right = _U_RIGHT[-1] + d * (_U_RIGHT[-1] - _U_RIGHT[-2]) / span
    return int(round(left)), int(round(right))


def make_keep_mask(size: int = MASK_SIZE) -> np.ndarray:
    """Build the fixed LatentSync 1.0 keep-mask.

    The geometry (documented in docs/latentsync.md, "Fixed mask") is defined on a 256x256
    grid: rows 0-94 keep everything, rows 95-127 generate two cheek bands beside the nose, rows
    128-245 generate one U-shaped region around mouth and chin, rows 246+ keep everything. About
    40.8 % of the pixels are generated (the original's mask image: about 40.7 %).

    Args:
        size: Output side in pixels. Other sizes are a nearest-neighbour resize of the 256 grid.

    Returns:
        ``(size, size) float32`` with 1.0 = keep the original pixel, 0.0 = generated.

    """
    mask = np.ones((MASK_SIZE, MASK_SIZE), np.float32)
    for x0, x1 in _CHEEK_BANDS:
        mask[_CHEEK_ROWS[0] : _CHEEK_ROWS[1], x0 : x1 + 1] = 0.0
    for row in range(_U_ROWS[0], _U_END_ROW):
        x0, x1 = _u_bounds(row)
        mask[row, x0 : x1 + 1] = 0.0
    if size != MASK_SIZE:
        idx = (np.arange(size) * MASK_SIZE) // size
        mask = mask[np.ix_(idx, idx)]
    return mask


def face_keep_mask(face_size: int = MASK_SIZE) -> np.ndarray:
    """The keep-mask of aligned faces of side ``face_size``, as the original builds it for its resolution.

    The original reads one 256x256 mask image at every version and resizes it to the resolution with
    Lanczos on 8 bits, then divides by 255 (``load_fixed_mask`` at the 1.5 / 1.6 releases): the
    identity at 256, at 512 (LatentSync 1.6) the same geometry with a soft edge (Lanczos's ringing,
    within 7 px of the edges: 3.5 % of the pixels). Here the image is :func:`make_keep_mask`'s 256
    grid, resized the same way.

    Args:
        face_size: Side of the aligned face in pixels (256 for LatentSync 1.0 / 1.5, 512 for 1.6).

    Returns:
        ``(face_size, face_size) float32`` in [0, 1], 1.0 = keep the original pixel, 0.0 = generated;
        at 256 exactly :func:`make_keep_mask`'s.

    Raises:
        ValueError: If ``face_size`` is not an integer of at least 8.

    """
    face_size = check_face_size(face_size)
    grid = make_keep_mask()
    if face_size == MASK_SIZE:
        return grid
    image = (grid * 255.0).astype(np.uint8)
    resized = cv2.resize(image, (face_size, face_size), interpolation=cv2.INTER_LANCZOS4)  # saturates to 0..255
    return (resized.astype(np.float32) / np.float32(255.0)).astype(np.float32)
