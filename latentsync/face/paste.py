"""Paste generated faces back into full frames through a soft mask.

Two implementations of one operation (docs/latentsync.md, "Face preparation"):
:func:`paste_face_reference` warps and blends over the whole frame, as LatentSync 1.0 does;
:func:`paste_face` does the same work only on the face's bounding box plus the blur margin, which
gives the same pixels (outside the box the soft mask is exactly zero) at a fraction of the cost;
it also works on 8-bit masks and blends with OpenCV (within one grey level of the reference).

Faces of any size the alignment makes paste back (256x256 for LatentSync 1.0 / 1.5, 512x512 for 1.6,
or their templates, 210x280 and 420x560): the face goes back to its size's template, then through
the inverse of the affine scaled to that template (:func:`latentsync.face.align.affine_at_face_size`).
The soft mask is computed in frame pixels, so its edge is the same at every size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from latentsync.face.align import FACE_SIZE, TEMPLATE_SIZE, affine_at_face_size, template_size
from latentsync.media.buffers import written_into

#: First erosion of the warped face mask, kernel side in pixels (LatentSync 1.0: 2).
_FIRST_EROSION_PX = 2
#: The soft edge width is ``int(sqrt(mask area)) // _EDGE_DIVISOR`` pixels (LatentSync 1.0: 20).
_EDGE_DIVISOR = 20


def face_size_of(face: np.ndarray) -> int:
    """The aligned face size a face (or template crop) is of.

    Args:
        face: ``(S, S, 3)`` aligned face, or ``(h, w, 3)`` template crop of a face size (210x280 for 256,
            420x560 for 512: :func:`latentsync.face.align.template_size`).

    Returns:
        ``S``, or the face size whose template is ``w`` x ``h``.

    Raises:
        ValueError: If the shape is neither (quoted).

    """
    h, w = face.shape[:2]
    if h == w and h >= 8:
        return int(h)
    size = w * FACE_SIZE // TEMPLATE_SIZE[0]
    if size >= 8 and template_size(size) == (w, h):
        return int(size)
    raise ValueError(f"face must be square (256x256, 512x512) or a template crop (210x280, 420x560), got {face.shape}")


def _face_to_template(face: np.ndarray, face_size: int) -> np.ndarray:
    """Resize an aligned face back to its size's template (bilinear); a template crop is returned as is."""
    size = template_size(face_size)
    if face.shape[:2] == (size[1], size[0]):
        return face
    return cv2.resize(face, size, interpolation=cv2.INTER_LINEAR)


def _soft_mask(warped_ones: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hard (eroded) and soft masks from a warped all-ones template mask.

    Returns:
        ``(hard, soft)``, both float32 of the input's shape.

    """
    hard = cv2.erode(warped_ones, np.ones((_FIRST_EROSION_PX, _FIRST_EROSION_PX), np.uint8))
    edge = int(math.sqrt(float(hard.sum()))) // _EDGE_DIVISOR
    soft = hard
    if edge > 0:
        soft = cv2.erode(hard, np.ones((2 * edge, 2 * edge), np.uint8))
        soft = cv2.GaussianBlur(soft, (2 * edge + 1, 2 * edge + 1), 0)
    return hard, soft


def _soft_mask_fast(warped_ones: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_soft_mask` on an 8-bit mask (0-255), several times faster, kept in 8 bits.

    Returns:
        ``(hard, soft)`` uint8 (0-255), the shape of ``warped_ones``: the eroded mask and the
        blurred one; :func:`_weights` turns them into the blend's float weights.

    """
    hard = cv2.erode(warped_ones, np.ones((_FIRST_EROSION_PX, _FIRST_EROSION_PX), np.uint8))
    edge = int(math.sqrt(float(cv2.sumElems(hard)[0]) / 255.0)) // _EDGE_DIVISOR
    soft = hard
    if edge > 0:
        soft = cv2.erode(hard, np.ones((2 * edge, 2 * edge), np.uint8))
        soft = cv2.GaussianBlur(soft, (2 * edge + 1, 2 * edge + 1), 0)
    return hard, soft


def _weights(
    hard: np.ndarray, soft: np.ndarray, face_weight: np.ndarray, frame_weight: np.ndarray, work: np.ndarray
) -> None:
    """Fill ``face_weight`` (``soft * hard``) and ``frame_weight`` (``1 - soft``), float32, from 8-bit masks.

    All three outputs are float32 arrays of the masks' shape; ``work`` is overwritten.
    """
    np.multiply(soft, np.float32(1 / 255), out=frame_weight)  # soft in [0, 1]
    np.copyto(work, hard)
    written_into(cv2.multiply(frame_weight, work, dst=face_weight, scale=1 / 255), face_weight)
    np.subtract(np.float32(1.0), frame_weight, out=frame_weight)


def _blend(background: np.ndarray, restored: np.ndarray, hard: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """``soft * hard * restored + (1 - soft) * background``, rounded to uint8."""
    s = soft[..., None]
    out = s * (hard[..., None] * restored.astype(np.float32)) + (1.0 - s) * background.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def paste_face_reference(frame: np.ndarray, face: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Paste a face into a frame the way LatentSync 1.0 does: every step over the whole frame.

    Kept as the reference for :func:`paste_face` (equivalence test and benchmark).

    Args:
        frame: ``(H, W, 3) uint8`` RGB frame.
        face: ``(S, S, 3)`` uint8 RGB aligned face (S = 256 or 512), or its template crop
            (``(280, 210, 3)``, ``(560, 420, 3)``).
        affine: ``(2, 3)`` frame-to-template affine of this frame (256 template, as the avatar keeps it).

    Returns:
        ``(H, W, 3) uint8`` RGB frame with the face pasted (a new array).

    Raises:
        ValueError: If the face's shape is not one of those (:func:`face_size_of`).

    """
    h, w = frame.shape[:2]
    face_size = face_size_of(face)
    inverse = cv2.invertAffineTransform(affine_at_face_size(affine, face_size))
    restored = cv2.warpAffine(_face_to_template(face, face_size), inverse, (w, h))
    tw, th = template_size(face_size)
    ones = np.ones((th, tw), np.float32)
    hard, soft = _soft_mask(cv2.warpAffine(ones, inverse, (w, h)))
    return _blend(frame, restored, hard, soft)


@dataclass(frozen=True)
class PasteGeometry:
    """Everything about pasting into one frame that depends only on its affine.

    The masks are kept in 8 bits, as they are computed (2 bytes a pixel of the box, a quarter of
    the float32 weights the blend needs, which :meth:`weights` makes per paste).

    Attributes:
        box: ``(x0, y0, x1, y1)`` int region of the frame that the paste may change.
        inverse: ``(2, 3) float64`` template-to-box affine (the inverse affine shifted to the box), from
            the template of ``face_size``.
        hard: ``(y1 - y0, x1 - x0) uint8`` eroded warped face mask (0-255).
        soft: ``(y1 - y0, x1 - x0) uint8`` the same eroded further and blurred: the feathered edge.
        face_size: Side in pixels of the aligned faces it pastes (256, or 512 for LatentSync 1.6).

    """

    box: tuple[int, int, int, int]
    inverse: np.ndarray
    hard: np.ndarray
    soft: np.ndarray
    face_size: int = FACE_SIZE

    @property
    def nbytes(self) -> int:
        """Bytes the geometry holds (its masks)."""
        return self.hard.nbytes + self.soft.nbytes

    def weights(self, scratch: PasteScratch | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The blend's weights: ``(face_weight, frame_weight)``, ``(y1 - y0, x1 - x0) float32``.

        ``face_weight`` is the soft mask times the hard one, ``frame_weight`` one minus the soft
        mask (both in [0, 1]). With ``scratch`` they are views of its buffers, valid until its next use.
        """
        h, w = self.hard.shape
        if scratch is None:
            face, frame, work = (np.empty((h, w), np.float32) for _ in range(3))
        else:
            face, frame, work = scratch.weights(h, w)
        _weights(self.hard, self.soft, face, frame, work)
        return face, frame

    @classmethod
    def from_affine(cls, affine: np.ndarray, frame_size: tuple[int, int], face_size: int = FACE_SIZE) -> PasteGeometry:
        """Compute the paste geometry of one frame.

        Args:
            affine: ``(2, 3)`` frame-to-template affine (256 template, as the avatar keeps it).
            frame_size: ``(width, height)`` of the full frame in pixels.
            face_size: Side in pixels of the aligned faces to paste (256; 512 for LatentSync 1.6).

        Returns:
            The geometry; its box covers the warped template plus the soft-edge margin, clipped
            to the frame.

        Raises:
            ValueError: If the face lies entirely outside the frame, or ``face_size`` is not valid.

        """
        w, h = frame_size
        inverse = cv2.invertAffineTransform(affine_at_face_size(affine, face_size))
        tw, th = template_size(face_size)
        corners = np.array([[0, 0], [tw, 0], [0, th], [tw, th]], np.float64)
        pts = corners @ inverse[:, :2].T + inverse[:, 2]
        # The edge width can only be smaller than the one of the unclipped warped area.
        area = abs(float(np.linalg.det(inverse[:, :2]))) * tw * th
        margin = int(math.sqrt(area)) // _EDGE_DIVISOR + _FIRST_EROSION_PX + 4
        x0 = max(int(math.floor(pts[:, 0].min())) - margin, 0)
        y0 = max(int(math.floor(pts[:, 1].min())) - margin, 0)
        x1 = min(int(math.ceil(pts[:, 0].max())) + margin + 1, w)
        y1 = min(int(math.ceil(pts[:, 1].max())) + margin + 1, h)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"face box {pts.min(axis=0)}..{pts.max(axis=0)} lies outside the {w}x{h} frame")
        shifted = inverse.copy()
        shifted[:, 2] -= (x0, y0)
        ones = np.full((th, tw), 255, np.uint8)
        hard, soft = _soft_mask_fast(cv2.warpAffine(ones, shifted, (x1 - x0, y1 - y0)))
        return cls((x0, y0, x1, y1), shifted, hard, soft, int(face_size))


class PasteScratch:
    """Reusable buffers for one paste (the warped face, the blend's weights), grown to the largest box.

    They are as large as the face's box: at 832x1248 up to a megabyte, above the server's mmap
    threshold (``latentsync/serving/ops/memory.py``), so fresh ones per frame were mappings of
    their own and hundreds of page faults a paste. One scratch per thread that pastes (the
    channel's clock thread owns its program's): it is not thread-safe.
    """

    def __init__(self):
        self._face = np.empty((0, 0, 3), np.uint8)
        self._weights = np.empty((3, 0, 0), np.float32)

    def view(self, height: int, width: int) -> np.ndarray:
        """A ``(height, width, 3) uint8`` view of the face buffer (grown when smaller); content undefined."""
        h, w = self._face.shape[:2]
        if height > h or width > w:
            self._face = np.empty((max(height, h), max(width, w), 3), np.uint8)
        return self._face[:height, :width]

    def weights(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Three ``(height, width) float32`` views of the weight buffers (grown when smaller); content undefined."""
        h, w = self._weights.shape[1:]
        if height > h or width > w:
            self._weights = np.empty((3, max(height, h), max(width, w)), np.float32)
        face, frame, work = (plane[:height, :width] for plane in self._weights)
        return face, frame, work


def paste_face(
    frame: np.ndarray,
    face: np.ndarray,
    affine: np.ndarray | None = None,
    geometry: PasteGeometry | None = None,
    inplace: bool = False,
    scratch: PasteScratch | None = None,
) -> np.ndarray:
    """Paste a face into a frame, touching only the face's box (fast path).

    Same result as :func:`paste_face_reference` (identical outside the box, within rounding
    inside it), but the inverse warp, erosion, blur and blend run on the box only.

    Args:
        frame: ``(H, W, 3) uint8`` RGB frame.
        face: ``(S, S, 3)`` uint8 RGB aligned face (S = 256, or 512 for LatentSync 1.6), or its template
            crop (``(280, 210, 3)``, ``(560, 420, 3)``).
        affine: ``(2, 3)`` frame-to-template affine (256 template); needed when ``geometry`` is None.
        geometry: Precomputed :class:`PasteGeometry` of this frame (saves about half the work), made for
            this face size.
        inplace: Write into ``frame`` instead of a copy.
        scratch: Where the warped face and the weights go (:class:`PasteScratch`); None: fresh arrays.

    Returns:
        ``(H, W, 3) uint8`` RGB frame with the face pasted (``frame`` itself when ``inplace``).

    Raises:
        ValueError: If neither ``affine`` nor ``geometry`` is given, the face's shape is not one of those
            (:func:`face_size_of`), or it is of another face size than ``geometry``'s.

    """
    face_size = face_size_of(face)
    if geometry is None:
        if affine is None:
            raise ValueError("paste_face needs an affine or a PasteGeometry")
        geometry = PasteGeometry.from_affine(affine, (frame.shape[1], frame.shape[0]), face_size)
    elif geometry.face_size != face_size:
        raise ValueError(
            f"face of shape {face.shape} is a {face_size} px face, the paste geometry is for {geometry.face_size} px"
        )
    x0, y0, x1, y1 = geometry.box
    size = (x1 - x0, y1 - y0)
    template = _face_to_template(face, face_size)
    view = scratch.view(size[1], size[0]) if scratch is not None else None
    restored = cv2.warpAffine(template, geometry.inverse, size, dst=view)
    out = frame if inplace else frame.copy()
    # dst = (w1 * face + w2 * frame) / (w1 + w2); w1 + w2 = 1 except on the outermost pixel ring.
    box = out[y0:y1, x0:x1]
    face_weight, frame_weight = geometry.weights(scratch)
    written_into(cv2.blendLinear(restored, box, face_weight, frame_weight, dst=box), box)
    return out
