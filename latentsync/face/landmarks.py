"""Face landmarks from MediaPipe face mesh, mapped to the 68-point layout, tracked through a clip."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from latentsync.face.native_log import NativeLogCapture

#: MediaPipe face-mesh indices of the 68-point layout, in order (docs/latentsync.md).
MESH_TO_68 = (
    162, 234, 93, 58, 172, 136, 149, 148, 152, 377, 378, 365, 397, 288, 323, 454, 389,
    71, 63, 105, 66, 107, 336, 296, 334, 293, 301,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87,
)  # fmt: skip
_MESH_TO_68 = np.array(MESH_TO_68, np.intp)


@dataclass(frozen=True, kw_only=True)
class TrackerOptions:
    """How faces are searched for and tracked.

    Attributes:
        crop_scale: Side of the square re-detection crop around the previous face, as a multiple
            of that face's size (largest side of its landmark box).
        crop_size_px: The crop is resized to this side before the mesh runs on it, so small faces
            (50-300 px) reach the mesh at a consistent, comfortable size.
        max_num_faces: Faces the mesh may return per image; the tracked one is chosen among them.
        min_detection_confidence: MediaPipe face-detector threshold in [0, 1].
        min_tracking_confidence: MediaPipe landmark-presence threshold in [0, 1].
        tile_search: When the whole frame shows no face, also look in overlapping, upscaled tiles
            (finds faces too small for the detector's 128 px input).

    """

    crop_scale: float = 2.0
    crop_size_px: int = 384
    max_num_faces: int = 3
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    tile_search: bool = True


@dataclass(frozen=True)
class FaceDetection:
    """One face found in one frame.

    Attributes:
        landmarks: ``(68, 2) float32`` points in frame pixels ``(x, y)``.
        box: ``(x0, y0, x1, y1)`` float box of the full 478-point mesh in frame pixels.

    """

    landmarks: np.ndarray
    box: tuple[float, float, float, float]

    @property
    def center(self) -> np.ndarray:
        """``(2,) float64`` box centre in pixels."""
        x0, y0, x1, y1 = self.box
        return np.array([(x0 + x1) / 2, (y0 + y1) / 2])

    @property
    def size(self) -> float:
        """Largest side of the box in pixels."""
        x0, y0, x1, y1 = self.box
        return float(max(x1 - x0, y1 - y0))


def _mesh_points(face_landmarks, width: int, height: int) -> np.ndarray:
    """``(478, 2) float64`` pixel points of one MediaPipe face in an image of the given size."""
    return np.array([(p.x * width, p.y * height) for p in face_landmarks.landmark], np.float64)


class FaceTracker:
    """Follows one face through consecutive frames of a clip.

    The first face is the largest and most central one; later frames keep the face nearest the
    previous one. The mesh runs on the whole frame in MediaPipe's tracking mode (on our test clips,
    faces 57-175 px wide, this gave the steadiest landmarks: aligned-crop jitter 0.60-1.44 px against
    0.68-1.61 px for an upscaled crop in tracking mode). When it finds nothing, it runs on an
    upscaled square crop around the previous face, then on overlapping upscaled tiles, which find
    faces too small for the face detector's 128 px input.

    Use as a context manager or call :meth:`close`; one tracker per clip (it keeps the previous
    face and MediaPipe's tracking state).
    """

    def __init__(self, options: TrackerOptions | None = None) -> None:
        import mediapipe as mp  # heavy import, only where faces are detected

        self.options = options or TrackerOptions()
        mesh = mp.solutions.face_mesh
        common = dict(
            max_num_faces=self.options.max_num_faces,
            refine_landmarks=True,
            min_detection_confidence=self.options.min_detection_confidence,
            min_tracking_confidence=self.options.min_tracking_confidence,
        )
        # Whole frames: tracking mode (measured steadiest on our clips). Crops and tiles: static mode,
        # since they move from frame to frame.
        self._frame_mesh = mesh.FaceMesh(static_image_mode=False, **common)
        self._crop_mesh = mesh.FaceMesh(static_image_mode=True, **common)
        self._previous: FaceDetection | None = None

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the MediaPipe graphs; safe to call twice."""
        for name in ("_crop_mesh", "_frame_mesh"):
            mesh = getattr(self, name)
            if mesh is not None:
                mesh.close()
                setattr(self, name, None)

    def reset(self) -> None:
        """Forget the previous face (next frame is searched from scratch)."""
        self._previous = None

    def _run(self, mesh, image: np.ndarray) -> list[np.ndarray]:
        """All faces in one RGB image, as ``(478, 2)`` pixel arrays."""
        result = mesh.process(np.ascontiguousarray(image))
        if not result.multi_face_landmarks:
            return []
        h, w = image.shape[:2]
        return [_mesh_points(f, w, h) for f in result.multi_face_landmarks]

    def _in_crop(self, frame: np.ndarray, prev: FaceDetection) -> list[np.ndarray]:
        side = max(prev.size * self.options.crop_scale, 32.0)
        scale = self.options.crop_size_px / side
        cx, cy = prev.center
        # Crop-to-frame affine inverse: frame point p -> (p - (c - side/2)) * scale.
        m = np.array([[scale, 0.0, -(cx - side / 2) * scale], [0.0, scale, -(cy - side / 2) * scale]])
        size = self.options.crop_size_px
        crop = cv2.warpAffine(frame, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        faces = self._run(self._crop_mesh, crop)
        return [(f - m[:, 2]) / scale for f in faces]

    def _in_tiles(self, frame: np.ndarray) -> list[np.ndarray]:
        h, w = frame.shape[:2]
        side = int(min(h, w) * 0.6)
        if side < 160:
            return []
        faces = []
        for y0 in np.linspace(0, h - side, max(2, round(h / side * 1.5))).astype(int):
            for x0 in np.linspace(0, w - side, max(2, round(w / side * 1.5))).astype(int):
                tile = frame[y0 : y0 + side, x0 : x0 + side]
                scale = self.options.crop_size_px / side
                up = cv2.resize(tile, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
                faces += [f / scale + (x0, y0) for f in self._run(self._crop_mesh, up)]
        return faces

    def _choose(self, faces: list[np.ndarray], frame_shape: tuple[int, ...]) -> FaceDetection | None:
        if not faces:
            return None
        dets = [FaceDetection(f[_MESH_TO_68].astype(np.float32), (*f.min(axis=0), *f.max(axis=0))) for f in faces]
        prev = self._previous
        if prev is not None:
            dist = [np.linalg.norm(d.center - prev.center) for d in dets]
            best = dets[int(np.argmin(dist))]
            # A jump by more than a face size is another face, not the one we track.
            return best if min(dist) < prev.size else None
        h, w = frame_shape[:2]
        centre = np.array([w / 2, h / 2])
        diag = float(np.hypot(w, h))

        def score(d: FaceDetection) -> float:
            return d.size**2 * (1.0 - np.linalg.norm(d.center - centre) / diag)

        return max(dets, key=score)

    def detect(self, frame: np.ndarray) -> FaceDetection | None:
        """Find the tracked face in the next frame.

        Args:
            frame: ``(H, W, 3) uint8`` RGB frame.

        Returns:
            The face, or None when no face is found (the previous face is kept for the next frame).

        """
        found = self._choose(self._run(self._frame_mesh, frame), frame.shape)
        if found is None and self._previous is not None:
            found = self._choose(self._in_crop(frame, self._previous), frame.shape)
        if found is None and self.options.tile_search:
            found = self._choose(self._in_tiles(frame), frame.shape)
        if found is not None:
            self._previous = found
        return found


class FaceNotFoundError(ValueError):
    """Too few frames of a clip show a face to prepare it as an avatar."""


@dataclass(frozen=True)
class FaceTrack:
    """One face followed through a clip.

    Attributes:
        landmarks: ``(F, 68, 2) float32`` points in frame pixels; frames without a detection hold
            values interpolated linearly in time from the nearest detected frames (held constant
            before the first and after the last).
        boxes: ``(F, 4) float32`` mesh boxes ``(x0, y0, x1, y1)`` in frame pixels, interpolated
            the same way.
        found: ``(F,) bool``, True where the face was detected.

    """

    landmarks: np.ndarray
    boxes: np.ndarray
    found: np.ndarray

    @property
    def num_found(self) -> int:
        """Number of frames with a detected face."""
        return int(self.found.sum())


def _ranges(indices: np.ndarray) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``'0-2, 5, 7-8'``."""
    parts: list[str] = []
    idx = [int(i) for i in indices]
    start = prev = None
    for i in idx + [None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)


def _interpolate_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fill rows of ``values`` (F, ...) where ``found`` is False by linear interpolation in time."""
    out = values.astype(np.float32).copy()
    t_found = np.flatnonzero(found)
    flat = out.reshape(len(out), -1)
    for col in range(flat.shape[1]):
        flat[:, col] = np.interp(np.arange(len(out)), t_found, flat[t_found, col])
    return out


def track_face(
    frames: np.ndarray,
    options: TrackerOptions | None = None,
    min_found_fraction: float = 0.5,
    progress=None,
) -> FaceTrack:
    """Detect and track one face through a clip, filling frames where it is not found.

    Args:
        frames: ``(F, H, W, 3) uint8`` RGB frames: an array, a memory map, or any sequence of
            ``(H, W, 3)`` frames (``len`` and ``frames[i]``: :class:`latentsync.media.frame_file.FrameFile`).
        options: Detector settings (defaults: :class:`TrackerOptions`).
        min_found_fraction: Fail when fewer than this fraction of frames (0-1) show a face.
        progress: Optional callable ``progress(n)`` called with 1 after every frame (e.g. a tqdm
            bar's ``update``).

    Returns:
        The :class:`FaceTrack`.

    Raises:
        FaceNotFoundError: If the face is found on fewer than ``min_found_fraction`` of the frames;
            the message names how many and which frames lack it.

    """
    n = len(frames)
    landmarks = np.zeros((n, 68, 2), np.float32)
    boxes = np.zeros((n, 4), np.float32)
    found = np.zeros(n, bool)
    with NativeLogCapture(), FaceTracker(options) as tracker:
        for i in range(n):
            det = tracker.detect(np.asarray(frames[i]))
            if det is not None:
                landmarks[i], boxes[i], found[i] = det.landmarks, det.box, True
            if progress is not None:
                progress(1)
    num_found = int(found.sum())
    if n == 0 or num_found < max(1, min_found_fraction * n):
        missing = np.flatnonzero(~found)
        raise FaceNotFoundError(
            f"a face was found on only {num_found} of {n} frames "
            f"(need at least {min_found_fraction:.0%}); frames without a face: {_ranges(missing) or 'none'}"
        )
    if num_found < n:
        landmarks = _interpolate_missing(landmarks, found)
        boxes = _interpolate_missing(boxes, found)
    return FaceTrack(landmarks, boxes, found)
