"""Avatars uploaded while the server runs: confined intake, background preparation, the cache's disk quota.

An upload becomes an avatar in three steps (docs/avatars.md): intake in the request, preparation in
the background, use by a channel. One module per job:

- :mod:`~latentsync.serving.avatars.store`: :class:`AvatarStore`, what the runtime and the API use:
  the intake of uploads, deletion, and the parts below wired together;
- :mod:`~latentsync.serving.avatars.catalogue`: :class:`AvatarCatalogue`, the records on disk
  (:class:`AvatarRecord`), lookup, listing, ``used_by``; :class:`AvatarError`;
- :mod:`~latentsync.serving.avatars.quota`: :class:`CacheQuota`, ``avatar.cache_quota_mb``:
  reservations, eviction of unused avatars, ``quota_exceeded``;
- :mod:`~latentsync.serving.avatars.preparation`: :class:`PreparationQueue`, every preparation of the
  server (uploads and channels' base videos), one child process at a time; :class:`PreparationFailed`;
- :mod:`~latentsync.serving.avatars.stills`: :class:`StillCache`, ``GET /avatars/<id>/still``;
- :mod:`~latentsync.serving.avatars.face_policy`: :class:`FacePolicy`, ``avatar.min_face_px``
  (``face_too_small`` warnings and 409s), and :func:`lost_face_warnings`.

Imports go one way: ``store`` uses the others; ``quota``, ``preparation``, ``stills`` and
``face_policy`` use ``catalogue`` (``preparation`` also measures the face with ``face_policy``).
"""

from latentsync.serving.avatars.catalogue import FAILED, PREPARING, READY, AvatarCatalogue, AvatarError, AvatarRecord
from latentsync.serving.avatars.face_policy import FacePolicy, lost_face_warnings
from latentsync.serving.avatars.preparation import PreparationFailed, PreparationQueue
from latentsync.serving.avatars.quota import CacheQuota
from latentsync.serving.avatars.stills import StillCache
from latentsync.serving.avatars.store import AvatarStore

__all__ = [
    "FAILED",
    "PREPARING",
    "READY",
    "AvatarCatalogue",
    "AvatarError",
    "AvatarRecord",
    "AvatarStore",
    "CacheQuota",
    "FacePolicy",
    "PreparationFailed",
    "PreparationQueue",
    "StillCache",
    "lost_face_warnings",
]
