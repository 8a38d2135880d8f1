"""Avatar: a base video's frames plus per-frame face geometry, prepared once and cached on disk."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentsync.face import (
    FACE_SIZE,
    PasteGeometry,
    PasteScratch,
    TrackerOptions,
    check_face_size,
    compute_affines,
    face_keep_mask,
    paste_face,
    smooth_landmarks,
    template_to_face_affine,
    track_face,
    transform_points,
    warp_face,
)
from latentsync.framing_plan import load_clip_to_file
from latentsync.media.frame_file import FrameFile
from latentsync.media.framing import FACE_FRACTION, Fit, check_background
from latentsync.media.video import FrameBudget

#: Bump when the prepared data changes meaning, so old caches are not reused.
PREPARATION_VERSION = 2
#: Frames before a clip's first or after its last detected face that still take that face's
#: position (:func:`pasteable_frames`): 80 ms at 25 fps, a detector's late start, not a person leaving.
EDGE_GAP_FRAMES = 2
#: Bytes of paste geometries (box, 8-bit masks) an Avatar keeps for reuse, in bytes: every frame of
#: a 200-frame 832x1248 avatar (52 MB; 10 MB at 512x512). Computing one costs 0.5 ms (512x512) to
#: 3.3 ms (832x1248) of the clock thread. Past the budget, geometries are computed per paste and not
#: kept (no eviction: speech walks the frames in a cycle, which would make an LRU miss every time).
_GEOMETRY_CACHE_BYTES = 64 << 20
#: Bytes read at a time when hashing the video file.
_HASH_BLOCK_BYTES = 1 << 20
#: Shares of the preparation's progress (``on_progress``): decode, face tracking, the rest (warps, saves).
_DECODE_SHARE, _TRACK_SHARE = 0.1, 0.8


@dataclass(frozen=True, kw_only=True)
class AvatarSettings:
    """Everything that changes what :meth:`Avatar.prepare` produces (all part of the cache key).

    Attributes:
        fps: Stream frame rate in frames per second; the video is resampled to it by timestamp.
        sample_rate_hz: Sample rate of the avatar's own (idle) audio track in Hz.
        size: Output ``(width, height)`` in pixels, or None to keep the video's size.
        min_face_fraction: Preparation fails when fewer than this fraction (0-1) of frames show a face.
        max_gap_frames: Frames farther than this from any frame with a detected face are passed
            through unchanged by :meth:`Avatar.paste` (their interpolated geometry is a guess);
            before the first or after the last detected face only :data:`EDGE_GAP_FRAMES` are
            pasted into (:func:`pasteable_frames`).
        tracker: Face detector/tracker settings.
        fit: How a video of another aspect ratio than ``size`` fills it: ``cover``, ``contain`` or
            ``stretch`` (:mod:`latentsync.media.framing`). The paste-back geometry is computed on
            the framed frames.
        background: ``contain``'s bars: ``"blur"`` or ``"#rrggbb"``.
        face_fraction: ``cover``: the face's width over the picture's width, 0-1 (the window's size;
            :func:`latentsync.media.framing.cover_width`).
        min_face_px: ``cover``: the window is narrowed (never below ``size``) until the face is at least
            this many output pixels wide (``avatar.min_face_px``, 96; 0: no such bound).
        face_size: Side in pixels of the aligned faces (and of the keep-mask): 256 for LatentSync 1.0 / 1.5
            and the parametric engine, 512 for LatentSync 1.6. The server takes it from the engine's
            configuration (:func:`latentsync.config.engine_face_size`); the latentsync engine refuses an
            avatar of another size. Part of the cache key, so preparations at 256 and 512 of one video
            never share a folder (:func:`cache_key`).

    """

    fps: int = 25
    sample_rate_hz: int = 16000
    size: tuple[int, int] | None = None
    min_face_fraction: float = 0.5
    max_gap_frames: int = 12
    tracker: TrackerOptions = dataclasses.field(default_factory=TrackerOptions)
    fit: str = "cover"
    background: str = "blur"
    face_fraction: float = FACE_FRACTION
    min_face_px: int = 96  # avatar.min_face_px's default (a channel with the defaults finds what this prepares)
    face_size: int = FACE_SIZE

    def __post_init__(self) -> None:
        Fit(self.fit)  # ValueError for an unknown mode
        check_face_size(self.face_size)
        check_background(self.background)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps!r}")
        if self.sample_rate_hz <= 0:
            raise ValueError(f"sample_rate_hz must be positive, got {self.sample_rate_hz!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0):
            raise ValueError(f"size must be (width, height) > 0 or None, got {self.size!r}")
        if not 0.0 <= self.min_face_fraction <= 1.0:
            raise ValueError(f"min_face_fraction must be in [0, 1], got {self.min_face_fraction!r}")
        if not 0.0 < self.face_fraction <= 1.0:
            raise ValueError(f"face_fraction must be in (0, 1], got {self.face_fraction!r}")
        if self.min_face_px < 0:
            raise ValueError(f"min_face_px must be >= 0, got {self.min_face_px!r}")

    def to_json(self) -> dict:
        """Plain-JSON form (used in the cache key and the cache's meta file)."""
        return dataclasses.asdict(self)


def pingpong_index(i: int, n: int) -> int:
    """Base-frame index for output frame ``i`` when looping ``n`` frames forward, backward, ...

    The sequence for ``n = 4`` is 0 1 2 3 2 1 0 1 2 3 ...: the end frames are not repeated, so
    the motion never stalls or jumps.

    Args:
        i: Output frame number, ``i >= 0``.
        n: Number of base frames, ``n >= 1``.

    Returns:
        An index in ``[0, n)``.

    Raises:
        ValueError: If ``n < 1`` or ``i < 0``.

    """
    if n < 1 or i < 0:
        raise ValueError(f"pingpong_index needs i >= 0 and n >= 1, got i={i!r}, n={n!r}")
    if n == 1:
        return 0
    period = 2 * n - 2
    k = i % period
    return k if k < n else period - k


def file_digest(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def cache_key(video: str | Path, settings: AvatarSettings) -> str:
    """Cache key of a prepared avatar: a hash of the video bytes and the settings.

    ``face_size`` is hashed only when it is not 256: a 256 preparation keeps the key it had before
    face sizes existed (its data is the same, so avatars prepared then stay valid), and a 512 one
    (LatentSync 1.6) gets another key.

    Returns:
        24 hex characters.

    """
    keyed = settings.to_json()
    if keyed["face_size"] == FACE_SIZE:
        del keyed["face_size"]
    payload = json.dumps(
        {"video": file_digest(video), "settings": keyed, "version": PREPARATION_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


#: Arrays stored in a cache directory, each as ``<name>.npy``.
_ARRAYS = (
    "frames",
    "faces",
    "affines",
    "landmarks",
    "aligned_landmarks",
    "boxes",
    "found",
    "pasteable",
    "mask",
)


class Avatar:
    """A prepared base video: frames, face geometry, aligned faces and the fixed mask.

    Build with :meth:`prepare` (detects and caches) or :meth:`load` (reads a cache directory).
    Large arrays are memory-mapped read-only.

    Attributes:
        frames: ``(F, H, W, 3) uint8`` RGB base frames at ``fps``.
        faces: ``(F, S, S, 3) uint8`` RGB aligned faces, ``S`` = :attr:`face_size` (256, or 512 for
            LatentSync 1.6).
        affines: ``(F, 2, 3) float64`` frame-to-template affines onto the 256 template (210x280) whatever
            ``S`` (:func:`latentsync.face.align.affine_at_face_size` scales them to ``S``'s template).
        landmarks: ``(F, 68, 2) float32`` detected (or interpolated) landmarks in frame pixels.
        aligned_landmarks: ``(F, 68, 2) float32`` the same landmarks in aligned ``S`` x ``S`` face pixels.
        boxes: ``(F, 4) float32`` face boxes ``(x0, y0, x1, y1)`` in frame pixels.
        found: ``(F,) bool``: the face was detected in this frame (not interpolated).
        pasteable: ``(F,) bool``: a generated face may be pasted into this frame.
        mask: ``(S, S) float32`` fixed keep-mask in [0, 1] (1 = keep, 0 = generated;
            :func:`latentsync.face.face_keep_mask`).
        audio: ``(N,) int16`` the video's own audio at ``sample_rate_hz``, or None.
        fps: Frame rate in frames per second.
        sample_rate_hz: Audio sample rate in Hz.
        key: Cache key.
        path: Cache directory it was loaded from.
        meta: Preparation summary (source name, settings, counts, timing).

    """

    def __init__(self, path: Path, arrays: dict[str, np.ndarray], audio: np.ndarray | None, meta: dict):
        self.path = path
        self.meta = meta
        self.key: str = meta["key"]
        self.fps: int = int(meta["settings"]["fps"])
        self.sample_rate_hz: int = int(meta["settings"]["sample_rate_hz"])
        self.frames = arrays["frames"]
        self.faces = arrays["faces"]
        self.affines = arrays["affines"]
        self.landmarks = arrays["landmarks"]
        self.aligned_landmarks = arrays["aligned_landmarks"]
        self.boxes = arrays["boxes"]
        self.found = arrays["found"]
        self.pasteable = arrays["pasteable"]
        self.mask = arrays["mask"]
        self.audio = audio
        self._geometries: dict[int, PasteGeometry] = {}
        self._geometry_bytes = 0  # of the geometries kept (approximate when threads race: a few more at most)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_frames(self) -> int:
        """Number of base frames ``F``."""
        return len(self)

    @property
    def face_size(self) -> int:
        """Side ``S`` of the aligned faces in pixels (256, or 512 for LatentSync 1.6)."""
        return int(self.faces.shape[1])

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(width, height)`` of the frames in pixels."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])

    def frame_index(self, i: int) -> int:
        """Return the base frame shown at output frame ``i`` (ping-pong, :func:`pingpong_index`)."""
        return pingpong_index(i, len(self))

    def paste_geometry(self, index: int) -> PasteGeometry:
        """Paste geometry of base frame ``index`` (box, inverse warp and masks), memoised up to a byte budget.

        Any thread may call this (a dict's get and set are atomic; two threads computing the same
        geometry at once both get a correct one).
        """
        geometry = self._geometries.get(index)
        if geometry is None:
            geometry = PasteGeometry.from_affine(self.affines[index], self.frame_size, self.face_size)
            if self._geometry_bytes + geometry.nbytes <= _GEOMETRY_CACHE_BYTES:
                self._geometries[index] = geometry
                self._geometry_bytes += geometry.nbytes
        return geometry

    def paste(
        self, index: int, face: np.ndarray, frame: np.ndarray | None = None, scratch: PasteScratch | None = None
    ) -> np.ndarray:
        """Paste a generated face into base frame ``index``.

        Only the face's box is touched. Frames marked not pasteable (face long lost) come back
        unchanged.

        Args:
            index: Base frame index in ``[0, F)``.
            face: ``(S, S, 3) uint8`` RGB generated face aligned like ``faces[index]`` (``S`` = :attr:`face_size`).
            frame: Frame to paste into, ``(H, W, 3) uint8`` RGB; default: a copy of the base frame.
                It is modified in place when given.
            scratch: Reusable buffers for the warped face and the blend's weights
                (:class:`latentsync.face.paste.PasteScratch`, one per pasting thread); None: fresh arrays.

        Returns:
            ``(H, W, 3) uint8`` RGB frame.

        """
        if frame is None:
            frame = np.array(self.frames[index])
        if not self.pasteable[index]:
            return frame
        return paste_face(frame, face, geometry=self.paste_geometry(index), inplace=True, scratch=scratch)

    @classmethod
    def load(cls, path: str | Path) -> Avatar:
        """Load a prepared avatar from its cache directory (arrays memory-mapped, read-only).

        Raises:
            FileNotFoundError: If ``path`` is not a complete avatar cache.

        """
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: not a prepared avatar (no meta.json)")
        meta = json.loads(meta_file.read_text())
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        audio_file = path / "audio.npy"
        audio = np.load(audio_file, mmap_mode="r") if audio_file.is_file() else None
        return cls(path, arrays, audio, meta)

    def engine_payload(self) -> dict:
        """What an engine on another machine needs of this avatar, as plain arrays (Ray's object store).

        Every array but ``frames`` (and the audio): a worker renders aligned faces, only the server
        pastes them into frames. 832x1248 at 25 fps: ~5 MB per second of video instead of ~83 MB.

        Returns:
            ``{"meta": dict, "arrays": {name: ndarray}}``, for :meth:`from_engine_payload`.
        """
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in _ARRAYS if name != "frames"}
        return {"meta": self.meta, "arrays": arrays}

    @classmethod
    def from_engine_payload(cls, payload: dict, path: str | Path) -> Avatar:
        """An avatar for an engine, from :meth:`engine_payload`, with ``path`` as its (node-local) folder.

        Its ``frames`` are ``(F, 0, 0, 3) uint8``: such an avatar renders faces but cannot paste
        them. ``path`` is created; the latentsync engine keeps its latent cache there.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = dict(payload["arrays"])
        arrays["frames"] = np.zeros((len(arrays["faces"]), 0, 0, 3), np.uint8)
        return cls(path, arrays, None, payload["meta"])

    @classmethod
    def load_cached(
        cls, video: str | Path, settings: AvatarSettings, cache_dir: str | Path = ".cache/avatars"
    ) -> Avatar | None:
        """The avatar :meth:`prepare` would return from the cache, or None if it is not prepared yet.

        Nothing is decoded or prepared: a cache hit is loaded (and its directory's modification
        time set to now, as :meth:`prepare` does), a miss returns None.

        Raises:
            FileNotFoundError: If ``video`` does not exist (its bytes are the cache key).
        """
        return cls._cached(Path(cache_dir) / f"{Path(video).stem}-{cache_key(video, settings)}")

    @classmethod
    def _cached(cls, folder: Path) -> Avatar | None:
        if not (folder / "meta.json").is_file():
            return None
        touch_avatar(folder)
        return cls.load(folder)

    @classmethod
    def prepare(
        cls,
        video: str | Path,
        settings: AvatarSettings | None = None,
        cache_dir: str | Path = ".cache/avatars",
        progress: bool = False,
        on_progress: Callable[[float], None] | None = None,
        budget: FrameBudget | None = None,
    ) -> Avatar:
        """Prepare a base video as an avatar, or load it from the cache when already prepared.

        Steps: decode at ``settings.fps`` (and size), track one face (largest/most central),
        fill frames without a face from their neighbours, smooth the landmarks, compute the
        template affines, cut the aligned faces (``settings.face_size``: 256, or 512 for LatentSync
        1.6) and make the keep-mask at that size; store everything under
        ``cache_dir/<video stem>-<key>``, written to a temporary folder and renamed when complete.

        Memory stays bounded whatever the video's length: the decoded frames go straight to
        ``frames.npy`` a batch at a time, and face tracking and the warps read them back one frame
        at a time (docs/avatars.md, "Memory"); only per-frame geometry (landmarks, affines) is kept.

        Args:
            video: Path of the base video.
            settings: Preparation settings (defaults: :class:`AvatarSettings`).
            cache_dir: Root folder of the avatar cache (created if needed).
            progress: Show a tqdm progress bar on stderr.
            on_progress: Called with the fraction done (0-1) as the preparation advances (after
                the decode, every 1 % of face tracking, at the end); not called on a cache hit.
            budget: Most frames the video may decode to, counted while decoding
                (:class:`~latentsync.media.video.FrameBudget`); None: no such budget. Not part of the
                cache key (a video either fits it or fails).

        Returns:
            The :class:`Avatar`, memory-mapped from its cache directory. Its directory's modification
            time is set to now (the cache's least-recently-used order, docs/avatars.md).

        Raises:
            FileNotFoundError: If ``video`` does not exist.
            latentsync.media.MediaProbeError: If it has no decodable video.
            latentsync.media.video.MediaLimitError: If it decodes to more frames than ``budget``
                allows (the message names the budget's key).
            latentsync.face.FaceNotFoundError: If too few frames show a face (names which).

        """
        settings = settings or AvatarSettings()
        video = Path(video)
        if not video.is_file():
            raise FileNotFoundError(f"base video not found: {video}")
        key = cache_key(video, settings)
        root = Path(cache_dir)
        target = root / f"{video.stem}-{key}"
        if (hit := cls._cached(target)) is not None:
            return hit
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{video.stem}-", dir=root))
        try:
            meta = _prepare_into(tmp, video, settings, key, progress, on_progress, budget)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / "meta.json").is_file():  # not a concurrent preparation that won
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(target)


def frames_to_nearest_face(found: np.ndarray) -> np.ndarray:
    """For every frame, how many frames away the nearest frame with a detected face is.

    ``O(n log n)`` time and ``O(n)`` memory (binary search over the frames with a face), so a long
    clip costs no ``n x n`` matrix.

    Args:
        found: ``(F,) bool``, a face detected on each frame.

    Returns:
        ``(F,) int64`` distances in frames (0 on a frame with a face); ``F`` everywhere when no
        frame has one.
    """
    n = found.shape[0]
    faces = np.flatnonzero(found)
    if faces.size == 0:
        return np.full(n, n, dtype=np.int64)
    frames = np.arange(n)
    after = np.searchsorted(faces, frames)  # first face at or after each frame
    nearest_after = faces[np.minimum(after, faces.size - 1)]
    nearest_before = faces[np.maximum(after - 1, 0)]
    return np.minimum(np.abs(nearest_after - frames), np.abs(frames - nearest_before)).astype(np.int64)


def pasteable_frames(found: np.ndarray, max_gap_frames: int, edge_frames: int = EDGE_GAP_FRAMES) -> np.ndarray:
    """Frames a generated face may be pasted into: a face detected there or interpolated from near ones.

    A frame between two detected faces takes their position when one is at most ``max_gap_frames``
    away (a missed detection, a blink). Before the clip's first or after its last detected face
    nothing says the face is still there (the person may have walked out of the picture), so only
    ``edge_frames`` frames there take the nearest face's position.

    Args:
        found: ``(F,) bool``, a face detected on each frame.
        max_gap_frames: Largest distance, in frames, to a detected face inside the clip.
        edge_frames: Largest distance before the first or after the last detected face.

    Returns:
        ``(F,) bool``.
    """
    distance = frames_to_nearest_face(found)
    pasteable = distance <= max_gap_frames
    faces = np.flatnonzero(found)
    if faces.size:
        frames = np.arange(found.shape[0])
        beyond = (frames < faces[0]) | (frames > faces[-1])
        pasteable &= ~beyond | (distance <= min(edge_frames, max_gap_frames))
    return pasteable


def touch_avatar(path: str | Path) -> None:
    """Mark a prepared avatar's cache directory as used now (its mtime; never raises)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _prepare_into(
    folder: Path,
    video: Path,
    settings: AvatarSettings,
    key: str,
    progress: bool,
    on_progress: Callable[[float], None] | None = None,
    budget: FrameBudget | None = None,
) -> dict:
    """Run the preparation and write the arrays into ``folder``; returns the meta dict.

    The frames are decoded straight into ``folder/frames.npy`` and read back one at a time (face
    tracking, then the warps): memory holds a decode batch and a frame, never the clip.
    """
    from tqdm import tqdm

    t0 = time.monotonic()
    clip = load_clip_to_file(
        video,
        folder / "frames.npy",
        settings.fps,
        settings.sample_rate_hz,
        size=settings.size,
        with_audio=True,
        fit=settings.fit,
        background=settings.background,
        budget=budget,
        face_fraction=settings.face_fraction,
        min_face_px=settings.min_face_px,
    )
    n = clip.num_frames
    t_decode = time.monotonic() - t0
    report = on_progress or (lambda _fraction: None)
    report(_DECODE_SHARE)
    tracked = [0]
    step = max(1, n // 100)

    def advance(count: int) -> None:
        bar.update(count)
        tracked[0] += count
        if tracked[0] % step == 0 or tracked[0] == n:
            report(_DECODE_SHARE + _TRACK_SHARE * tracked[0] / max(1, n))

    with FrameFile(clip.frames_path) as frames:
        with tqdm(total=n, desc=f"faces {video.name}", unit="frame", disable=not progress) as bar:
            track = track_face(frames, settings.tracker, settings.min_face_fraction, progress=advance)
        smoothed = smooth_landmarks(track.landmarks)
        affines = compute_affines(smoothed)
        aligned = np.empty((n, 68, 2), np.float32)
        size = settings.face_size
        with open(folder / "faces.npy", "wb") as faces:  # (n, size, size, 3) uint8, a face at a time
            np.lib.format.write_array_header_1_0(
                faces, {"descr": "|u1", "fortran_order": False, "shape": (n, size, size, 3)}
            )
            for i in range(n):
                face = np.ascontiguousarray(warp_face(frames[i], affines[i], size), dtype=np.uint8)
                faces.write(memoryview(face).cast("B"))
                aligned[i] = transform_points(track.landmarks[i], template_to_face_affine(affines[i], size))
    pasteable = pasteable_frames(track.found, settings.max_gap_frames)
    np.save(folder / "affines.npy", affines)
    np.save(folder / "landmarks.npy", track.landmarks.astype(np.float32))
    np.save(folder / "aligned_landmarks.npy", aligned)
    np.save(folder / "boxes.npy", track.boxes.astype(np.float32))
    np.save(folder / "found.npy", track.found)
    np.save(folder / "pasteable.npy", pasteable)
    np.save(folder / "mask.npy", face_keep_mask(size))
    if clip.audio is not None:
        np.save(folder / "audio.npy", clip.audio)
    report(1.0)
    widths = track.boxes[:, 2] - track.boxes[:, 0]
    return {
        "key": key,
        "source": video.name,
        "settings": settings.to_json(),
        "version": PREPARATION_VERSION,
        "num_frames": n,
        "frame_size": [int(clip.size[0]), int(clip.size[1])],
        "framing": clip.framing.to_json() if clip.framing is not None else None,
        "faces_found": int(track.num_found),
        "face_width_px": {"min": float(widths.min()), "median": float(np.median(widths)), "max": float(widths.max())},
        "decode_s": round(t_decode, 3),
        "prepare_s": round(time.monotonic() - t0, 3),
    }
