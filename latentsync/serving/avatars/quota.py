"""The avatar cache's disk quota: room for an upload, least recently used unused avatars evicted.

``avatar.cache_quota_mb`` bounds the whole ``avatar.cache_dir`` (docs/avatars.md, "Disk quota"):
an upload is admitted only if its estimated prepared bytes fit, and those bytes stay reserved
while it waits and prepares. To make room, the least recently used entries no channel uses are
deleted: an upload with its prepared folders, or one prepared folder of a configured video.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from latentsync.config import AVATAR_ID_RE, uploaded_avatar_video
from latentsync.serving.avatars.catalogue import AvatarCatalogue, AvatarError

logger = logging.getLogger(__name__)

#: Bytes per frame of a prepared avatar's per-frame geometry (affine, 68 landmarks twice, box, flags);
#: from latentsync/avatar.py.
GEOMETRY_BYTES_PER_FRAME = 6 * 8 + 2 * 68 * 2 * 4 + 4 * 4 + 2


def prepared_bytes_per_frame(face_size: int) -> int:
    """Bytes per frame a prepared avatar holds besides its ``W x H x 3`` frames.

    Args:
        face_size: Side of its aligned faces in pixels (256; 512 for LatentSync 1.6).

    Returns:
        The aligned ``face_size x face_size x 3`` uint8 face plus :data:`GEOMETRY_BYTES_PER_FRAME`.
    """
    return face_size * face_size * 3 + GEOMETRY_BYTES_PER_FRAME


def tree_bytes(path: Path) -> int:
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


@dataclasses.dataclass
class _Entry:
    """A unit of the cache the quota may delete: an upload with its prepared folders, or one prepared folder."""

    paths: list[Path]
    size: int
    last_used: float
    avatar_id: str | None


class CacheQuota:
    """``avatar.cache_quota_mb`` over the avatar cache: reservations for uploads, eviction of unused avatars.

    Args:
        catalogue: The uploads (their folders; an evicted upload's record is dropped from it) and
            what the channels use (never deleted).
        quota_mb: ``avatar.cache_quota_mb`` (MiB).
        busy: Returns the ids of the uploads waiting for or in preparation (never deleted).
    """

    def __init__(self, catalogue: AvatarCatalogue, *, quota_mb: float, busy: Callable[[], set[str]]):
        self._catalogue = catalogue
        self._quota_mb = quota_mb
        self._busy = busy
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # what queued and running uploads will hold once prepared
        self._admission = threading.Lock()  # one quota check and record insertion at a time

    @property
    def quota_bytes(self) -> int:
        """``avatar.cache_quota_mb`` in bytes."""
        return int(self._quota_mb * 1024 * 1024)

    def usage_bytes(self) -> int:
        """Bytes the whole avatar cache holds on disk (``avatar.cache_dir``)."""
        return tree_bytes(self._catalogue.root)

    # ----------------------------------------------------------------- reservations
    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold the quota for one admission: :meth:`make_room`, then the upload's record and reservation.

        Admissions and :meth:`enforce` run one at a time, so simultaneous uploads never overshoot
        the quota (each sees what the one before it reserved).
        """
        with self._admission:
            yield

    def reserve(self, avatar_id: str, nbytes: int) -> None:
        """Count ``nbytes`` for an upload until :meth:`release`: what it will hold on disk once prepared."""
        with self._lock:
            self._reserved[avatar_id] = nbytes

    def release(self, avatar_id: str) -> None:
        """Stop counting an upload's reservation (it is prepared: its bytes are on disk; or it is gone)."""
        with self._lock:
            self._reserved.pop(avatar_id, None)

    def reserved_bytes(self, avatar_id: str) -> int:
        """Bytes reserved for an upload (0 if none)."""
        with self._lock:
            return self._reserved.get(avatar_id, 0)

    # ----------------------------------------------------------------- eviction
    def make_room(self, need_bytes: int, keep: set[str]) -> None:
        """Delete least recently used unused entries until ``need_bytes`` more fit the quota.

        Run inside :meth:`admission` (the checks of two uploads must not interleave).

        Args:
            need_bytes: Bytes to make room for.
            keep: Upload ids not to delete, and whose reservations do not count (the upload being admitted).

        Raises:
            AvatarError: 507 ``quota_exceeded`` if they cannot fit even with every unused entry deleted
                (nothing is deleted then).
        """
        quota = self.quota_bytes
        with self._lock:  # avatars queued or preparing count with what they will hold
            pending = sum(v for k, v in self._reserved.items() if k not in keep)
        used = self.usage_bytes() + pending
        if used + need_bytes <= quota:
            return
        entries = self._entries(keep)
        if used - sum(e.size for e in entries) + need_bytes > quota:
            raise AvatarError(
                "quota_exceeded",
                f"the prepared avatar needs {need_bytes / 2**20:.0f} MiB and the avatars in use hold "
                f"{(used - sum(e.size for e in entries)) / 2**20:.0f} MiB of avatar.cache_quota_mb = "
                f"{self._quota_mb:g} MiB",
            )
        for entry in entries:
            if used + need_bytes <= quota:
                break
            self._evict(entry)
            used -= entry.size

    def enforce(self) -> None:
        """Delete least recently used unused entries while the cache is over ``avatar.cache_quota_mb``.

        Never raises: a cache over its quota with every avatar in use is logged.
        """
        try:
            with self._admission:
                self.make_room(0, keep=set())
        except AvatarError as exc:
            logger.warning("avatar cache over its quota with every avatar in use: %s", exc.message)

    def _entries(self, keep: set[str]) -> list[_Entry]:
        """Cache entries the quota may delete, least recently used first."""
        root, uploads = self._catalogue.root, self._catalogue.uploads
        in_use = {p.resolve() for p in self._catalogue.in_use()}
        protected = set(keep) | self._busy()
        prepared: dict[str, list[Path]] = {}
        loose: list[Path] = []
        for folder in root.iterdir() if root.is_dir() else []:
            if not folder.is_dir() or folder.name.startswith(".") or not (folder / "meta.json").is_file():
                continue
            owner = "-".join(folder.name.split("-")[:2])
            if AVATAR_ID_RE.fullmatch(owner):
                prepared.setdefault(owner, []).append(folder)
            else:
                loose.append(folder)
        entries = []
        for folder in uploads.glob("av-*") if uploads.is_dir() else []:
            avatar_id = folder.name
            paths = [folder, *prepared.pop(avatar_id, [])]
            if avatar_id in protected or any(p.resolve() in in_use for p in paths):
                continue
            if uploaded_avatar_video(root, avatar_id).resolve() in in_use:
                continue
            entries.append(_Entry(paths, sum(tree_bytes(p) for p in paths), max(map(_tree_mtime, paths)), avatar_id))
        for folders in prepared.values():  # prepared folders of an upload that is gone
            loose.extend(folders)
        for folder in loose:
            if folder.resolve() not in in_use:
                entries.append(_Entry([folder], tree_bytes(folder), _tree_mtime(folder), None))
        entries.sort(key=lambda e: e.last_used)
        return entries

    def _evict(self, entry: _Entry) -> None:
        if entry.avatar_id is not None:
            self._catalogue.forget(entry.avatar_id)
        for path in entry.paths:
            shutil.rmtree(path, ignore_errors=True)
        logger.info(
            "avatar cache: deleted %s (%.0f MiB, unused since %s) to stay within avatar.cache_quota_mb",
            entry.avatar_id or entry.paths[0].name,
            entry.size / 2**20,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used)),
        )
