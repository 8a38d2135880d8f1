"""Face geometry for LatentSync 1.0: landmarks, alignment onto the template, fixed mask, paste-back."""

from latentsync.face.align import (
    FACE_SIZE,
    TEMPLATE_POINTS,
    TEMPLATE_SIZE,
    alignment_points,
    compute_affines,
    similarity_transform,
    smooth_landmarks,
    template_to_face_affine,
    transform_points,
    warp_face,
)
from latentsync.face.landmarks import (
    MESH_TO_68,
    FaceDetection,
    FaceNotFoundError,
    FaceTrack,
    FaceTracker,
    TrackerOptions,
    track_face,
)
from latentsync.face.mask import MASK_SIZE, make_keep_mask
from latentsync.face.paste import PasteGeometry, PasteScratch, paste_face, paste_face_reference

__all__ = [
    "FACE_SIZE",
    "MASK_SIZE",
    "MESH_TO_68",
    "TEMPLATE_POINTS",
    "TEMPLATE_SIZE",
    "FaceDetection",
    "FaceNotFoundError",
    "FaceTrack",
    "FaceTracker",
    "PasteGeometry",
    "PasteScratch",
    "TrackerOptions",
    "alignment_points",
    "compute_affines",
    "make_keep_mask",
    "paste_face",
    "paste_face_reference",
    "similarity_transform",
    "smooth_landmarks",
    "template_to_face_affine",
    "track_face",
    "transform_points",
    "warp_face",
]
