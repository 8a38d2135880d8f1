"""The catalogue of uploaded avatars: their records in memory and on disk, lookup, listing, ``used_by``.

Each upload has a record, ``<avatar.cache_dir>/uploads/<id>/avatar.json`` (written atomically), so
uploads survive a restart; its copied video lies beside it and its prepared folders are
``<cache_dir>/<id>-<key>/`` (docs/avatars.md). :class:`AvatarCatalogue` holds the records and
deletes an avatar's files; which avatar a channel uses comes from the runtime's ``in_use``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from latentsync.config import AVATAR_ID_RE
from latentsync.serving.core.errors import ServingError

logger = logging.getLogger(__name__)

#: Record states.
PREPARING, READY, FAILED = "preparing", "ready", "failed"


class AvatarError(ServingError):
    """An avatar request that cannot be served: an error code and a message naming the problem."""


@dataclasses.dataclass(kw_only=True)
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
            Both from :mod:`latentsync.serving.avatars.face_policy`.
        sha256: SHA-256 hex digest of the uploaded bytes (None in records from before it was kept): an
            upload of the same bytes is this avatar while it is preparing or ready.
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
    sha256: str | None = None

    def to_json(self, used_by: list[str] | None = None) -> dict:
        """The record as JSON, with ``used_by`` (names of the channels using it) and ``status_url``."""
        body = dataclasses.asdict(self)
        body["progress"] = round(self.progress, 3)
        body["used_by"] = sorted(used_by or [])
        body["status_url"] = f"/avatars/{self.id}"
        return body


def no_avatar(avatar_id: str) -> AvatarError:
    """The ``no_avatar`` error for an unknown id (404 on ``GET``/``DELETE``, 400 in a channel's body)."""
    return AvatarError("no_avatar", f"no avatar {avatar_id!r} (GET /avatars lists them)")


class AvatarCatalogue:
    """The uploaded avatars' records, in memory and in ``uploads/<id>/avatar.json``; thread-safe.

    Args:
        cache_dir: ``avatar.cache_dir``.
        in_use: Returns what the channels use now: resolved paths (prepared avatar folders and
            video files) mapped to the names of the channels using them.

    Attributes:
        root: ``avatar.cache_dir`` (the uploads and every prepared avatar).
        uploads: ``<root>/uploads``: one folder per upload (its copy and its record).
    """

    def __init__(self, cache_dir: str | Path, in_use: Callable[[], dict[Path, list[str]]]):
        self.root = Path(cache_dir)
        self.uploads = self.root / "uploads"
        self._in_use = in_use
        self._lock = threading.Lock()
        self._records: dict[str, AvatarRecord] = {}

    def load(self) -> list[str]:
        """Read the records of earlier uploads (creating ``uploads/`` if missing); unreadable ones are skipped.

        Returns:
            The ids of those whose preparation a stop cut (still ``preparing``; their progress is
            reset to 0), oldest id first: they are to be prepared again.

        Raises:
            OSError: If ``uploads/`` cannot be created.
        """
        waiting = []
        with self._lock:
            self.uploads.mkdir(parents=True, exist_ok=True, mode=0o700)
            for record_file in sorted(self.uploads.glob("av-*/avatar.json")):
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
                    waiting.append(record.id)
        return waiting

    # ----------------------------------------------------------------- queries
    def in_use(self) -> dict[Path, list[str]]:
        """What the channels use now: resolved paths mapped to the names of the channels using them."""
        return self._in_use()

    def users(self) -> dict[str, list[str]]:
        """Avatar id -> channels using it (by its video or one of its prepared folders)."""
        users: dict[str, set[str]] = {}
        for path, names in self._in_use().items():
            for part in path.parts[-3:]:
                candidate = "-".join(part.split("-")[:2])
                if AVATAR_ID_RE.fullmatch(candidate):
                    users.setdefault(candidate, set()).update(names)
                    break
        return {avatar_id: sorted(names) for avatar_id, names in users.items()}

    def record(self, avatar_id: str) -> AvatarRecord | None:
        """The record of ``avatar_id`` (the live object: :meth:`finish` changes it), or None."""
        with self._lock:
            return self._records.get(avatar_id)

    def same_content(self, sha256: str) -> dict | None:
        """The JSON record of an avatar uploaded with these bytes that is preparing or ready (the oldest), or None.

        Args:
            sha256: SHA-256 hex digest of an upload's bytes.
        """
        with self._lock:
            twins = [r for r in self._records.values() if r.sha256 == sha256 and r.status in (PREPARING, READY)]
        if not twins:
            return None
        twin = min(twins, key=lambda r: r.created_at)
        return twin.to_json(self.users().get(twin.id))

    def list(self) -> list[dict]:
        """Every uploaded avatar, newest first (JSON records)."""
        users = self.users()
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)
            return [r.to_json(users.get(r.id)) for r in records]

    def get(self, avatar_id: str) -> dict:
        """One avatar's JSON record.

        Raises:
            AvatarError: 404 ``no_avatar`` for an unknown id.
        """
        users = self.users()
        with self._lock:
            record = self._records.get(avatar_id)
            if record is None:
                raise no_avatar(avatar_id)
            return record.to_json(users.get(avatar_id))

    def require_ready(self, avatar_id: str) -> None:
        """Check that a channel may use this avatar now.

        Raises:
            AvatarError: 400 ``no_avatar`` (unknown id) or 409 ``avatar_not_ready`` (preparing or failed).
        """
        with self._lock:
            record = self._records.get(avatar_id)
            if record is None:
                raise no_avatar(avatar_id)
            if record.status != READY:
                detail = f": {record.error['message']}" if record.error else ""
                raise AvatarError("avatar_not_ready", f"avatar {avatar_id} is {record.status}{detail}")

    def counts(self) -> collections.Counter[str]:
        """Records by status (``preparing``, ``ready``, ``failed``)."""
        with self._lock:
            return collections.Counter(r.status for r in self._records.values())

    # ----------------------------------------------------------------- changes
    def add(self, record: AvatarRecord) -> None:
        """Add a new upload's record and write its ``avatar.json`` (its folder exists already)."""
        with self._lock:
            self._records[record.id] = record
            self._save(record)

    def finish(self, record: AvatarRecord, status: str, error: dict | None = None, **values) -> None:
        """Set a record's ``status``, ``error`` and any other fields, and write it unless it was deleted meanwhile.

        Args:
            record: The record (from :meth:`record`).
            status: ``ready`` or ``failed``.
            error: ``{"code", "message"}`` when failed.
            **values: Further :class:`AvatarRecord` fields (``progress``, ``prepared``, ``warnings``...).
        """
        with self._lock:
            record.status = status
            record.error = error
            for key, value in values.items():
                setattr(record, key, value)
            if record.id in self._records:
                self._save(record)

    def forget(self, avatar_id: str) -> None:
        """Drop a record from memory (its files stay: :meth:`delete_files`). Unknown ids are ignored."""
        with self._lock:
            self._records.pop(avatar_id, None)

    def delete_files(self, avatar_id: str) -> None:
        """Delete an upload's folder (copy and record) and its prepared folders (never raises)."""
        shutil.rmtree(self.uploads / avatar_id, ignore_errors=True)
        self.delete_prepared(avatar_id)

    def delete_prepared(self, avatar_id: str) -> None:
        """Delete the prepared folders (``<root>/<id>-*``) of an upload (never raises)."""
        for folder in self.root.glob(f"{avatar_id}-*"):
            shutil.rmtree(folder, ignore_errors=True)

    def _save(self, record: AvatarRecord) -> None:
        """Write ``avatar.json`` atomically (lock held)."""
        folder = self.uploads / record.id
        if not folder.is_dir():
            return
        tmp = folder / ".avatar.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(record), indent=1))
        os.replace(tmp, folder / "avatar.json")
