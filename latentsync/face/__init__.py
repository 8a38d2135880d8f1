"""Face geometry for LatentSync: landmarks, alignment onto the template, fixed mask, paste-back (256 or 512 px)."""

from latentsync.face.align import (
    FACE_SIZE,
    TEMPLATE_POINTS,
    TEMPLATE_SIZE,
    affine_at_face_size,
    alignment_points,
    check_face_size,
    compute_affines,
    similarity_transform,
    smooth_landmarks,
    template_size,
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
from latentsync.face.mask import MASK_SIZE, face_keep_mask, make_keep_mask
from latentsync.face.paste import PasteGeometry, PasteScratch, face_size_of, paste_face, paste_face_reference

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
    "affine_at_face_size",
    "alignment_points",
    "check_face_size",
    "compute_affines",
    "face_keep_mask",
    "face_size_of",
    "make_keep_mask",
    "paste_face",
    "paste_face_reference",
    "similarity_transform",
    "smooth_landmarks",
    "template_size",
    "template_to_face_affine",
    "track_face",
    "transform_points",
    "warp_face",
]
