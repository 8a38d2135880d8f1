"""Avatars uploaded while the server runs (``POST /avatars``): confined intake, preparation, disk quota.

An uploaded video becomes an avatar in three steps (docs/avatars.md):

1. **Intake** (in the request, fast): the upload is copied stream by stream into a Matroska file of
   our own by an FFmpeg confined to that one file (:func:`latentsync.media.video.remux_untrusted_video`),
   then checked: a video stream, at most ``avatar.upload_max_s`` seconds, and room for its prepared
   frames within ``avatar.cache_quota_mb`` (least recently used avatars no channel uses are deleted to
   make room). Any failure is a 4xx and leaves nothing behind.
2. **Preparation** (in the background, one child process at a time, at a lower CPU priority so the
   stream clocks and engine workers keep theirs): :meth:`latentsync.avatar.Avatar.prepare` at the
   stream's fps and the video's size, reporting its progress; a face missing on too many frames
   (``avatar.min_face_fraction``) is a failure with the reason (``no_face``).
3. **Use**: ``PUT /channels/<name>`` with ``{"avatar": "<id>"}`` (a ready avatar only).

Layout under ``avatar.cache_dir``: ``uploads/<id>/<id>.mkv`` (the copy) and ``uploads/<id>/avatar.json``
(the record, so uploads survive a restart), and the prepared arrays in ``<id>-<key>/`` beside the
other prepared avatars.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from latentsync.config import AVATAR_ID_RE, AppConfig, uploaded_avatar_video
from latentsync.media import MediaProbeError
from latentsync.media.errors import MediaDecodeTimeout
from latentsync.media.video import decode_video_frames, remux_untrusted_video
from latentsync.serving.core.errors import ServingError

logger = logging.getLogger(__name__)

#: Bytes per frame a prepared avatar holds besides its ``W x H x 3`` frames: the aligned 256x256x3
#: face plus the per-frame geometry (affine, 68 landmarks twice, box, flags); from latentsync/avatar.py.
PREPARED_BYTES_PER_FRAME = 256 * 256 * 3 + 6 * 8 + 2 * 68 * 2 * 4 + 4 * 4 + 2
#: Seconds between checks of a running preparation (progress, timeout, stop).
POLL_S = 0.25
#: Stills (``GET /avatars/<id>/still``) kept, least recently used dropped first (~50 kB each).
STILL_CACHE = 32
#: Seconds a preparation child gets to exit after it was told to stop, before it is killed.
CHILD_EXIT_S = 5.0
#: Longest display name kept from the upload.
MAX_NAME_CHARS = 64
#: Record states.
PREPARING, READY, FAILED = "preparing", "ready", "failed"


class AvatarError(ServingError):
    """An avatar request that cannot be served: an error code and a message naming the problem."""


@dataclasses.dataclass
class AvatarRecord:
    """One uploaded avatar, as ``GET /avatars/<id>`` shows it (and ``avatar.json`` stores it).

    Attributes:
        id: ``av-`` and 12 hex digits (random).
        name: Display name (the form's ``name``, or the upload's file name without extension).
        status: ``preparing``, ``ready`` or ``failed``.
        progress: Fraction of the preparation done, 0-1.
        error: ``{"code", "message"}`` when failed, else None.
        duration_s: Length of the video in seconds.
        size: ``[width, height]`` in pixels the avatar is prepared at.
        fps: Frame rate it is prepared at (the stream's).
        num_frames: Frames at ``fps``.
        faces_found: Frames on which the face was detected (once ready).
        created_at: Unix time of the upload.
        prepared_s: Seconds the preparation took (once ready).
        prepared: Name of its prepared directory in the cache (once ready).
        source_size: ``[width, height]`` of the uploaded video as displayed (once ready).
        face_width_px: The face's median width in the uploaded video's pixels (once ready).
        face_px: The face's median width at ``size``, after framing (once ready).
        warnings: ``{"code", "message", ...}`` items: ``face_too_small`` (with ``face_px`` and
            ``min_face_px``) when the face is narrower than ``avatar.min_face_px`` at ``size``;
            ``face_lost`` (with ``frames_without_face`` and ``num_frames``) when the face is not
            found in some frames (it leaves the picture, turns away): speech plays there unsynced.
    """

    id: str
    name: str
    status: str
    progress: float
    error: dict | None
    duration_s: float
    size: list[int]
    fps: int
    num_frames: int
    created_at: float
    faces_found: int | None = None
    prepared_s: float | None = None
    prepared: str | None = None
    source_size: list[int] | None = None
    face_width_px: float | None = None
    face_px: float | None = None
    warnings: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self, used_by: list[str] | None = None) -> dict:
        """The record as JSON, with ``used_by`` (names of the channels using it) and ``status_url``."""
        body = dataclasses.asdict(self)
        body["progress"] = round(self.progress, 3)
        body["used_by"] = sorted(used_by or [])
        body["status_url"] = f"/avatars/{self.id}"
        return body


@dataclasses.dataclass
class _Entry:
    """A unit of the cache the quota may delete: an upload with its prepared folders, or one prepared folder."""

    paths: list[Path]
    size: int
    last_used: float
    avatar_id: str | None


def _tree_bytes(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks; 0 if it vanished meanwhile)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _tree_mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _clean_name(text: str) -> str:
    name = "".join(c for c in text if c.isprintable()).strip()
    return name[:MAX_NAME_CHARS] or "avatar"


def _face(avatar, video: str) -> dict:
    """The prepared avatar's face width at its size and in its source video's pixels, and the source's size."""
    from latentsync.media.framing import face_scale
    from latentsync.media.probe import probe_media
    from latentsync.media.video import VIDEO_FORMATS, display_size

    meta = avatar.meta
    face_px = float(meta.get("face_width_px", {}).get("median", 0.0))
    size = tuple(meta["frame_size"])
    framing = meta.get("framing")
    info = probe_media(video, formats=VIDEO_FORMATS)
    source = display_size(video, (info.width, info.height))  # rotation applied
    fit = framing["fit"] if framing else "stretch"
    return {
        "source_size": list(source),
        "face_width_px": round(face_px / face_scale(source, size, fit), 1),
        "face_px": round(face_px, 1),
    }


def _prepare_child(video: str, settings, cache_dir: str, conn) -> None:
    """Body of the preparation process: prepare, send ``("progress", f)`` messages, then one result.

    Args:
        video: The base video.
        settings: :class:`latentsync.avatar.AvatarSettings` (fps, size, face fraction).
        cache_dir: The avatar cache.
        conn: The pipe to the parent.
    """
    try:
        os.nice(10)  # the stream clocks and the engine workers come first
    except OSError:
        pass
    from latentsync.avatar import Avatar
    from latentsync.face import FaceNotFoundError

    try:
        avatar = Avatar.prepare(video, settings, cache_dir, on_progress=lambda f: conn.send(("progress", f)))
        faces = int(avatar.meta.get("faces_found", 0))
        conn.send(("done", str(avatar.path), faces, avatar.num_frames, _face(avatar, video)))
    except FaceNotFoundError as exc:
        conn.send(("failed", "no_face", f"no usable face: {exc}"))
    except MediaProbeError:
        conn.send(("failed", "not_video", "not a decodable video in an accepted format (MP4/MOV, Matroska/WebM)"))
    except Exception as exc:  # anything else is reported, never raised into a dead process
        conn.send(("failed", "prepare_failed", f"{type(exc).__name__} (the server log has it)"))
        print(f"avatar preparation of {Path(video).name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        conn.close()


class PreparationFailed(Exception):
    """A channel's avatar preparation in the child process failed.

    Attributes:
        code: How (``no_face``, ``not_video``, ``prepare_timeout``, ``prepare_failed``, ``stopping``).
        public_message: What API clients may read (the child never sends FFmpeg's text or a path).
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.public_message = f"{code}: {message}"


@dataclasses.dataclass(eq=False)
class _ChannelJob:
    """A channel's avatar (start or switch) waiting for, or in, the preparation queue."""

    video: str
    settings: object
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: bool = False
    path: str | None = None
    error: tuple[str, str] | None = None


def lost_face_warnings(faces_found: int, num_frames: int) -> list[dict]:
    """``face_lost`` when the face was not found in some of the ``num_frames`` frames of a prepared video.

    Those frames are shown as filmed (frames near a detected face take its interpolated position;
    farther ones are never pasted into: :attr:`latentsync.avatar.Avatar.pasteable`), so speech
    that plays over them has no lip-sync.
    """
    missing = num_frames - faces_found
    if missing <= 0:
        return []
    return [
        {
            "code": "face_lost",
            "message": f"no face in {missing} of {num_frames} frames (the person leaves the picture or turns "
            "away): speech over those frames is not lip-synced",
            "frames_without_face": missing,
            "num_frames": num_frames,
        }
    ]


class AvatarStore:
    """Uploaded avatars: intake, background preparation, listing, deletion and the cache's disk quota.

    Args:
        config: The server configuration (``avatar.*`` limits, ``stream.fps`` and size).
        in_use: Returns what the channels use now: resolved paths (prepared avatar folders and
            video files) mapped to the names of the channels using them. Never deleted by the quota.
    """

    def __init__(self, config: AppConfig, in_use: Callable[[], dict[Path, list[str]]]):
        self._cfg = config.avatar
        self._fps = int(config.stream.fps)
        s = config.stream
        self._size = (int(s.width), int(s.height)) if s.width and s.height else None
        self._root = Path(self._cfg.cache_dir)
        self._uploads = self._root / "uploads"
        self._in_use = in_use
        self._lock = threading.Lock()
        self._records: dict[str, AvatarRecord] = {}
        self._stills: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()  # GET /avatars/<id>/still
        self._jobs: collections.deque[str] = collections.deque()  # ids waiting (with the running one: max_preparing)
        self._channel_jobs: collections.deque[_ChannelJob] = collections.deque()  # served before uploads
        self._reserved = 0  # uploads being taken in (copied, checked): they hold a max_preparing slot already
        self._pending_bytes: dict[str, int] = {}  # what queued and running uploads will hold once prepared
        self._wake = threading.Condition(self._lock)
        self._running: str | None = None
        self._child: multiprocessing.process.BaseProcess | None = None
        self._closed = False
        self._intake = threading.Lock()  # one quota check and record insertion at a time
        self._thread: threading.Thread | None = None
        self._ctx = multiprocessing.get_context("spawn")

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Read the records of earlier uploads and start the preparation thread. Safe to call twice.

        An upload whose preparation was cut by a stop is prepared again.
        """
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
            for record_file in sorted(self._uploads.glob("av-*/avatar.json")):
                try:
                    record = AvatarRecord(**json.loads(record_file.read_text()))
                except (OSError, ValueError, TypeError) as exc:
                    logger.warning("avatar record %s unreadable, ignored: %s", record_file, exc)
                    continue
                if not AVATAR_ID_RE.fullmatch(record.id) or record_file.parent.name != record.id:
                    continue
                self._records[record.id] = record
                if record.status == PREPARING:
                    record.progress = 0.0
                    self._jobs.append(record.id)
            self._thread = threading.Thread(target=self._run, name="avatar-prepare", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = CHILD_EXIT_S) -> None:
        """Stop the preparation (a running child is terminated, its upload stays ``preparing`` for the next start)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            child = self._child
            self._wake.notify_all()
        if child is not None and child.is_alive():
            child.terminate()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ----------------------------------------------------------------- queries
    def _users(self) -> dict[str, list[str]]:
        """Avatar id -> channels using it (by its video or one of its prepared folders)."""
        users: dict[str, set[str]] = {}
        for path, names in self._in_use().items():
            for part in path.parts[-3:]:
                candidate = "-".join(part.split("-")[:2])
                if AVATAR_ID_RE.fullmatch(candidate):
                    users.setdefault(candidate, set()).update(names)
                    break
        return {avatar_id: sorted(names) for avatar_id, names in users.items()}

    def list(self) -> list[dict]:
        """Every uploaded avatar, newest first (JSON records)."""
        users = self._users()
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)
            return [r.to_json(users.get(r.id)) for r in records]

    def get(self, avatar_id: str) -> dict:
        """One avatar's JSON record.

        Raises:
            AvatarError: 404 ``no_avatar`` for an unknown id.
        """
        users = self._users()
        with self._lock:
            record = self._records.get(avatar_id)
            if record is None:
                raise AvatarError("no_avatar", f"no avatar {avatar_id!r} (GET /avatars lists them)")
            return record.to_json(users.get(avatar_id))

    def still(self, avatar_id: str, size: tuple[int, int], fit: str, background: str) -> bytes:
        """A JPEG of the avatar framed as a channel of ``size`` would show it (the page shows it before a switch).

        One frame, 1 s into the upload (or its first), decoded by the confined FFmpeg with the framing
        a channel uses (``cover`` looks for the face: a second or two the first time); the last
        :data:`STILL_CACHE` stills are kept.

        Args:
            avatar_id: A ready avatar.
            size: The channel's ``(width, height)``.
            fit: The channel's ``avatar.fit``.
            background: The channel's ``avatar.background``.

        Raises:
            AvatarError: 404 ``no_avatar``; 409 ``avatar_not_ready``.
        """
        import cv2

        from latentsync.framing_plan import plan_framing
        from latentsync.media.probe import probe_media
        from latentsync.media.video import VIDEO_FORMATS

        self.require_ready(avatar_id)
        key = (avatar_id, tuple(size), fit, background)
        with self._lock:
            if key in self._stills:
                self._stills.move_to_end(key)
                return self._stills[key]
        video = uploaded_avatar_video(self._cfg.cache_dir, avatar_id)
        info = probe_media(video, formats=VIDEO_FORMATS)
        framing = plan_framing(video, (info.width, info.height), size, fit, background)
        frames = decode_video_frames(video, 1, size, max_frames=2, info=info, video_filter=framing.video_filter())
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frames[-1], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise AvatarError("internal", "the still could not be encoded")
        data = jpeg.tobytes()
        with self._lock:
            self._stills[key] = data
            while len(self._stills) > STILL_CACHE:
                self._stills.popitem(last=False)
        return data

    def require_ready(self, avatar_id: str) -> None:
        """Check that a channel may use this avatar now.

        Raises:
            AvatarError: 400 ``no_avatar`` (unknown id) or 409 ``avatar_not_ready`` (preparing or failed).
        """
        with self._lock:
            record = self._records.get(avatar_id)
            if record is None:
                raise AvatarError("no_avatar", f"no avatar {avatar_id!r} (GET /avatars lists them)")
            if record.status != READY:
                detail = f": {record.error['message']}" if record.error else ""
                raise AvatarError("avatar_not_ready", f"avatar {avatar_id} is {record.status}{detail}")

    def collect(self):
        """Prometheus collector (registered by the runtime): avatars by status and the cache's disk use.

        Yields:
            ``latentsync_avatars{status}``, ``latentsync_avatar_cache_bytes`` (the whole
            ``avatar.cache_dir`` on disk) and ``latentsync_avatar_cache_quota_bytes``.
        """
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            counts = collections.Counter(r.status for r in self._records.values())
        avatars = GaugeMetricFamily(
            "latentsync_avatars", "Avatars uploaded with POST /avatars, by status.", labels=["status"]
        )
        for status in (PREPARING, READY, FAILED):
            avatars.add_metric([status], counts.get(status, 0))
        yield avatars
        yield GaugeMetricFamily(
            "latentsync_avatar_cache_bytes", "Bytes avatar.cache_dir holds on disk.", value=self.usage_bytes()
        )
        yield GaugeMetricFamily(
            "latentsync_avatar_cache_quota_bytes",
            "avatar.cache_quota_mb in bytes.",
            value=int(self._cfg.cache_quota_mb * 1024 * 1024),
        )

    # ----------------------------------------------------------------- intake
    def incoming_path(self) -> Path:
        """A path for one upload, alone in a fresh private directory (the caller calls :meth:`discard_incoming`)."""
        incoming = self._uploads / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Path(tempfile.mkdtemp(prefix="u-", dir=incoming)) / "upload"

    def discard_incoming(self, path: Path) -> None:
        """Delete an upload made by :meth:`incoming_path` with its directory (never raises)."""
        if path.parent.parent == self._uploads / ".incoming":
            shutil.rmtree(path.parent, ignore_errors=True)

    def add(self, upload: Path, name: str) -> dict:
        """Take an uploaded video: copy it (confined), check it, queue its preparation.

        Args:
            upload: The uploaded file (from :meth:`incoming_path`; left for the caller to discard).
            name: Display name.

        Returns:
            The new record's JSON (status ``preparing``).

        Raises:
            AvatarError: 429 ``busy`` (``avatar.max_preparing`` uploads prepare or wait), 400
                ``not_video`` (no video stream, or not MP4/MOV/Matroska/WebM), 400 ``too_long``
                (``avatar.upload_max_s``), 503 ``decode_timeout``, 507 ``quota_exceeded`` (its
                prepared frames do not fit ``avatar.cache_quota_mb`` even after deleting every
                unused avatar), 503 ``stopping``.
        """
        cfg = self._cfg
        with self._lock:  # the slot is taken before the (possibly long) copy, so concurrent uploads see it
            if self._closed:
                raise AvatarError("stopping", "the server is stopping")
            busy = len(self._jobs) + (self._running is not None) + self._reserved
            if busy >= cfg.max_preparing:
                raise AvatarError(
                    "busy", f"{busy} avatars are being prepared (avatar.max_preparing); retry when one is ready"
                )
            self._reserved += 1
        try:
            return self._take_in(upload, name)
        finally:
            with self._lock:
                self._reserved -= 1

    def _take_in(self, upload: Path, name: str) -> dict:
        """:meth:`add` once its slot is reserved."""
        cfg = self._cfg
        avatar_id = "av-" + secrets.token_hex(6)
        video = uploaded_avatar_video(self._root, avatar_id)
        video.parent.mkdir(parents=True, mode=0o700)
        try:
            try:
                info = remux_untrusted_video(
                    upload, video, max_duration_s=cfg.upload_max_s, timeout_s=min(600.0, cfg.prepare_timeout_s)
                )
            except MediaDecodeTimeout:
                raise AvatarError(
                    "decode_timeout", "reading the video took too long; send a shorter or simpler file"
                ) from None
            except MediaProbeError:
                raise AvatarError(
                    "not_video", "the upload is not a video in an accepted format (MP4/MOV, Matroska/WebM)"
                ) from None
            if info.duration_s > cfg.upload_max_s:
                raise AvatarError("too_long", f"video longer than avatar.upload_max_s = {cfg.upload_max_s:g} s")
            try:
                first = decode_video_frames(video, self._fps, self._size, max_frames=1)
            except MediaProbeError:
                raise AvatarError("not_video", "the upload's video decodes to no frames") from None
            height, width = int(first.shape[1]), int(first.shape[2])
            num_frames = max(1, round(info.duration_s * self._fps))
            need = num_frames * (width * height * 3 + PREPARED_BYTES_PER_FRAME) + _tree_bytes(video.parent)
            record = AvatarRecord(
                id=avatar_id,
                name=_clean_name(name),
                status=PREPARING,
                progress=0.0,
                error=None,
                duration_s=round(info.duration_s, 3),
                size=[width, height],
                fps=self._fps,
                num_frames=num_frames,
                created_at=round(time.time(), 3),
            )
            with self._intake:
                self._make_room(need, keep={avatar_id})
                with self._lock:
                    if self._closed:
                        raise AvatarError("stopping", "the server is stopping")
                    self._records[avatar_id] = record
                    self._save(record)
                    self._jobs.append(avatar_id)
                    self._pending_bytes[avatar_id] = need - _tree_bytes(video.parent)  # the copy is on disk
                    self._wake.notify_all()
        except BaseException:
            with self._lock:
                self._records.pop(avatar_id, None)
                self._pending_bytes.pop(avatar_id, None)
            shutil.rmtree(video.parent, ignore_errors=True)
            raise
        logger.info(
            "avatar %s uploaded (%s, %.1f s, %dx%d): preparing", avatar_id, record.name, info.duration_s, width, height
        )
        return record.to_json()

    def delete(self, avatar_id: str) -> dict:
        """Delete an uploaded avatar (its video, record and prepared folders).

        Raises:
            AvatarError: 404 ``no_avatar``; 409 ``avatar_in_use`` while a channel uses it or it is being prepared.
        """
        users = self._users().get(avatar_id)
        with self._lock:
            record = self._records.get(avatar_id)
            if record is None:
                raise AvatarError("no_avatar", f"no avatar {avatar_id!r} (GET /avatars lists them)")
            if users:
                raise AvatarError("avatar_in_use", f"avatar {avatar_id} is used by channel(s) {', '.join(users)}")
            if self._running == avatar_id:
                raise AvatarError("avatar_in_use", f"avatar {avatar_id} is being prepared; delete it once it ends")
            if avatar_id in self._jobs:
                self._jobs.remove(avatar_id)
            self._pending_bytes.pop(avatar_id, None)
            del self._records[avatar_id]
        self._remove_upload(avatar_id)
        logger.info("avatar %s deleted", avatar_id)
        return {"id": avatar_id, "status": "deleted"}

    # ----------------------------------------------------------------- quota
    def usage_bytes(self) -> int:
        """Bytes the whole avatar cache holds on disk (``avatar.cache_dir``)."""
        return _tree_bytes(self._root)

    def _entries(self, keep: set[str]) -> list[_Entry]:
        """Cache entries the quota may delete, least recently used first."""
        in_use = {p.resolve() for p in self._in_use()}
        with self._lock:
            protected = set(keep) | set(self._jobs) | ({self._running} if self._running else set())
        prepared: dict[str, list[Path]] = {}
        loose: list[Path] = []
        for folder in self._root.iterdir() if self._root.is_dir() else []:
            if not folder.is_dir() or folder.name.startswith(".") or not (folder / "meta.json").is_file():
                continue
            owner = "-".join(folder.name.split("-")[:2])
            if AVATAR_ID_RE.fullmatch(owner):
                prepared.setdefault(owner, []).append(folder)
            else:
                loose.append(folder)
        entries = []
        for folder in self._uploads.glob("av-*") if self._uploads.is_dir() else []:
            avatar_id = folder.name
            paths = [folder, *prepared.pop(avatar_id, [])]
            if avatar_id in protected or any(p.resolve() in in_use for p in paths):
                continue
            if uploaded_avatar_video(self._root, avatar_id).resolve() in in_use:
                continue
            entries.append(_Entry(paths, sum(_tree_bytes(p) for p in paths), max(map(_tree_mtime, paths)), avatar_id))
        for folders in prepared.values():  # prepared folders of an upload that is gone
            loose.extend(folders)
        for folder in loose:
            if folder.resolve() not in in_use:
                entries.append(_Entry([folder], _tree_bytes(folder), _tree_mtime(folder), None))
        entries.sort(key=lambda e: e.last_used)
        return entries

    def _make_room(self, need_bytes: int, keep: set[str]) -> None:
        """Delete least recently used unused entries until ``need_bytes`` more fit the quota.

        Raises:
            AvatarError: 507 ``quota_exceeded`` if they cannot fit even with every unused entry deleted
                (nothing is deleted then).
        """
        quota = int(self._cfg.cache_quota_mb * 1024 * 1024)
        with self._lock:  # avatars queued or preparing count with what they will hold
            pending = sum(v for k, v in self._pending_bytes.items() if k not in keep)
        used = self.usage_bytes() + pending
        if used + need_bytes <= quota:
            return
        entries = self._entries(keep)
        if used - sum(e.size for e in entries) + need_bytes > quota:
            raise AvatarError(
                "quota_exceeded",
                f"the prepared avatar needs {need_bytes / 2**20:.0f} MiB and the avatars in use hold "
                f"{(used - sum(e.size for e in entries)) / 2**20:.0f} MiB of avatar.cache_quota_mb = "
                f"{self._cfg.cache_quota_mb:g} MiB",
            )
        for entry in entries:
            if used + need_bytes <= quota:
                break
            self._evict(entry)
            used -= entry.size

    def enforce_quota(self) -> None:
        """Delete least recently used unused entries while the cache is over ``avatar.cache_quota_mb``."""
        try:
            with self._intake:
                self._make_room(0, keep=set())
        except AvatarError as exc:
            logger.warning("avatar cache over its quota with every avatar in use: %s", exc.message)

    def _evict(self, entry: _Entry) -> None:
        if entry.avatar_id is not None:
            with self._lock:
                self._records.pop(entry.avatar_id, None)
        for path in entry.paths:
            shutil.rmtree(path, ignore_errors=True)
        logger.info(
            "avatar cache: deleted %s (%.0f MiB, unused since %s) to stay within avatar.cache_quota_mb",
            entry.avatar_id or entry.paths[0].name,
            entry.size / 2**20,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used)),
        )

    def _remove_upload(self, avatar_id: str) -> None:
        shutil.rmtree(self._uploads / avatar_id, ignore_errors=True)
        for folder in self._root.glob(f"{avatar_id}-*"):
            shutil.rmtree(folder, ignore_errors=True)

    # ----------------------------------------------------------------- channels' avatars
    def prepare_for_channel(self, video: str | Path, settings, stopping) -> str | None:
        """Prepare a channel's base video in the preparation queue (a child process, before uploads).

        Every preparation the server runs goes through this one queue: one child process at a time,
        at a lower CPU priority, bounded by ``avatar.prepare_timeout_s`` (docs/avatars.md).

        Args:
            video: The base video (its path was checked by the caller: config file or ``media.root``).
            settings: :class:`latentsync.avatar.AvatarSettings` at the channel's fps and size.
            stopping: True once the channel no longer wants it (closed, or the switch superseded):
                polled every 0.1 s; the job leaves the queue or its child is terminated.

        Returns:
            The prepared avatar's cache folder, or None when ``stopping()`` became true first.

        Raises:
            PreparationFailed: With the child's code (``no_face``, ``not_video``, ``prepare_timeout``,
                ``prepare_failed``, ``stopping``) and a message that never holds FFmpeg's text.
        """
        job = _ChannelJob(str(video), settings)
        with self._lock:
            if self._closed:
                raise PreparationFailed("stopping", "the server is stopping")
            self._channel_jobs.append(job)
            self._wake.notify_all()
        while not job.done.wait(0.1):
            if stopping():
                with self._lock:
                    job.cancelled = True
                    if job in self._channel_jobs:
                        self._channel_jobs.remove(job)
                        return None
                job.done.wait(CHILD_EXIT_S + 1.0)  # its child is being terminated
                return None
        if job.error is not None:
            raise PreparationFailed(*job.error)
        return job.path

    def _prepare_channel(self, job: _ChannelJob) -> None:
        try:
            label = f"channel-{Path(job.video).stem[:24]}"
            result = self._child_result(job.video, job.settings, label, lambda _f: None, lambda: job.cancelled)
            if result is None:
                job.error = ("stopping", "cancelled")
            elif result[0] == "done":
                job.path = result[1]
            else:
                job.error = (result[1], result[2])
        except Exception as exc:  # a bug here must not end the thread
            logger.exception("channel avatar preparation of %s crashed", Path(job.video).name)
            job.error = ("prepare_failed", f"{type(exc).__name__}")
        finally:
            job.done.set()

    # ----------------------------------------------------------------- preparation
    def _save(self, record: AvatarRecord) -> None:
        """Write ``avatar.json`` atomically (lock held)."""
        folder = self._uploads / record.id
        if not folder.is_dir():
            return
        tmp = folder / ".avatar.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(record), indent=1))
        os.replace(tmp, folder / "avatar.json")

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._channel_jobs and not self._closed:
                    self._wake.wait(timeout=1.0)
                if self._closed:
                    for job in self._channel_jobs:
                        job.error = ("stopping", "the server is stopping")
                        job.done.set()
                    self._channel_jobs.clear()
                    return
                if self._channel_jobs:  # a channel waits for it on air: before uploads
                    job = self._channel_jobs.popleft()
                else:
                    job = None
                    avatar_id = self._jobs.popleft()
                    record = self._records.get(avatar_id)
                    if record is None:
                        continue
                    self._running = avatar_id
            if job is not None:
                self._prepare_channel(job)
                continue
            try:
                self._prepare(record)
            except Exception as exc:  # a bug here must not end the thread
                logger.exception("avatar %s: preparation crashed", avatar_id)
                self._finish(record, FAILED, {"code": "prepare_failed", "message": f"{type(exc).__name__}: {exc}"})
            finally:
                with self._lock:
                    self._running = None
                    self._child = None

    def _face_warnings(self, face_px: float, size) -> list[dict]:
        """``face_too_small`` when ``face_px`` (at ``size``) is under ``avatar.min_face_px``."""
        limit = self._cfg.min_face_px
        if face_px >= limit:
            return []
        return [
            {
                "code": "face_too_small",
                "message": f"the face is {face_px:.0f} px across at {size[0]}x{size[1]}, under avatar.min_face_px = "
                f"{limit}: lip-sync will be hard to see",
                "face_px": round(face_px, 1),
                "min_face_px": limit,
            }
        ]

    def check_face_size(self, avatar_id: str, size: tuple[int, int] | None, fit: str) -> None:
        """Refuse an avatar whose face would be narrower than ``avatar.min_face_px`` on a channel of ``size``.

        Args:
            avatar_id: A ready avatar.
            size: The channel's ``(width, height)`` (None: not known yet; nothing is checked).
            fit: The channel's ``avatar.fit``.

        Raises:
            AvatarError: 409 ``face_too_small`` naming the measured and the required width.
        """
        from latentsync.media.framing import face_scale

        with self._lock:
            record = self._records.get(avatar_id)
        if record is None or size is None or record.face_width_px is None or record.source_size is None:
            return
        face_px = record.face_width_px * face_scale(tuple(record.source_size), size, fit)
        if face_px < self._cfg.min_face_px:
            raise AvatarError(
                "face_too_small",
                f"avatar {avatar_id}'s face would be {face_px:.0f} px across at {size[0]}x{size[1]} ({fit}), under "
                f'avatar.min_face_px = {self._cfg.min_face_px}; send "force": true to put it on air anyway',
            )

    def _finish(self, record: AvatarRecord, status: str, error: dict | None = None, **values) -> None:
        with self._lock:
            record.status = status
            record.error = error
            for key, value in values.items():
                setattr(record, key, value)
            if record.id in self._records:
                self._save(record)

    def _child_result(self, video: str, settings, label: str, on_progress, cancelled) -> tuple | None:
        """Prepare ``video`` in a child process (lower priority, ``avatar.prepare_timeout_s``).

        Returns:
            The child's result message (``("done", path, faces, frames, face)`` or ``("failed", code,
            message)``), or None when the store closed or ``cancelled()`` became true (the child is
            terminated).
        """
        t0 = time.monotonic()
        receiver, sender = self._ctx.Pipe(duplex=False)
        child = self._ctx.Process(
            target=_prepare_child,
            args=(video, settings, str(self._root), sender),
            name=f"avatar-prepare-{label}",
            daemon=True,
        )
        with self._lock:
            if self._closed:
                return None
            self._child = child
            child.start()
        sender.close()
        result = None
        deadline = t0 + self._cfg.prepare_timeout_s
        try:
            while result is None:
                if self._closed or cancelled():
                    return None  # terminated below
                if time.monotonic() > deadline:
                    result = (
                        "failed",
                        "prepare_timeout",
                        f"preparation took longer than avatar.prepare_timeout_s = {self._cfg.prepare_timeout_s:g} s",
                    )
                    break
                try:
                    if not receiver.poll(POLL_S):
                        continue
                    message = receiver.recv()
                except (EOFError, OSError):
                    child.join(CHILD_EXIT_S)
                    result = ("failed", "prepare_failed", f"the preparation process died (exit code {child.exitcode})")
                    break
                if message[0] == "progress":
                    on_progress(float(message[1]))
                else:
                    result = message
        finally:
            receiver.close()
            if child.is_alive():
                child.terminate()
            child.join(CHILD_EXIT_S)
            if child.is_alive():
                child.kill()
                child.join(CHILD_EXIT_S)
            with self._lock:
                self._child = None
        return result

    def _prepare(self, record: AvatarRecord) -> None:
        from latentsync.avatar import AvatarSettings

        t0 = time.monotonic()
        video = uploaded_avatar_video(self._root, record.id)
        settings = AvatarSettings(
            fps=record.fps,
            size=tuple(record.size),
            min_face_fraction=self._cfg.min_face_fraction,
            fit=self._cfg.fit,
            background=self._cfg.background,
        )

        def progress(fraction: float) -> None:
            record.progress = min(1.0, max(record.progress, fraction))

        result = self._child_result(str(video), settings, record.id, progress, lambda: False)
        if result is None:
            return  # close() stopped it; it stays "preparing" and is prepared again at the next start
        with self._lock:
            self._pending_bytes.pop(record.id, None)  # what it holds now is on disk
        if result[0] == "done":
            _, path, faces_found, num_frames, face = result
            self._finish(
                record,
                READY,
                progress=1.0,
                prepared=Path(path).name,
                faces_found=int(faces_found),
                num_frames=int(num_frames),
                prepared_s=round(time.monotonic() - t0, 2),
                warnings=self._face_warnings(face["face_px"], record.size)
                + lost_face_warnings(int(faces_found), int(num_frames)),
                **face,
            )
            logger.info("avatar %s ready (%d frames, %.1f s)", record.id, num_frames, time.monotonic() - t0)
            self.enforce_quota()
        else:
            _, code, message = result
            self._finish(record, FAILED, {"code": code, "message": message})
            for folder in self._root.glob(f"{record.id}-*"):
                shutil.rmtree(folder, ignore_errors=True)
            logger.warning("avatar %s failed: %s", record.id, message)
