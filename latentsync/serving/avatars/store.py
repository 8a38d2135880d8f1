"""The avatar store (``POST /avatars``): intake of uploads, and the parts of the package wired together.

An uploaded video becomes an avatar in three steps (docs/avatars.md):

1. **Intake** (in the request, fast; here): the upload is copied stream by stream into a Matroska file
   of our own by an FFmpeg confined to that one file (:func:`latentsync.media.video.remux_untrusted_video`),
   then checked: a video stream, at most ``avatar.upload_max_s`` seconds, and room for its prepared
   frames within ``avatar.cache_quota_mb`` (:mod:`~latentsync.serving.avatars.quota`: least recently
   used avatars no channel uses are deleted to make room). Any failure is a 4xx and leaves nothing behind.
2. **Preparation** (in the background: :mod:`~latentsync.serving.avatars.preparation`, one child
   process at a time): :meth:`latentsync.avatar.Avatar.prepare` at the stream's fps and the video's
   size, reporting its progress; a face missing on too many frames (``avatar.min_face_fraction``)
   is a failure with the reason (``no_face``), more decoded frames than ``avatar.upload_max_s``
   allows is ``too_long``, a child over ``avatar.prepare_max_rss_mb`` is ``prepare_memory``; the face's width is checked
   (:mod:`~latentsync.serving.avatars.face_policy`).
3. **Use**: ``PUT /channels/<name>`` with ``{"avatar": "<id>"}`` (a ready avatar only).

The records live in the :mod:`~latentsync.serving.avatars.catalogue`; stills in
:mod:`~latentsync.serving.avatars.stills`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from latentsync.config import AppConfig, engine_face_size, uploaded_avatar_video
from latentsync.media import MediaProbeError
from latentsync.media.errors import MediaDecodeTimeout
from latentsync.media.video import FrameBudget, decode_video_frames, remux_untrusted_video
from latentsync.serving.avatars.catalogue import (
    FAILED,
    PREPARING,
    READY,
    AvatarCatalogue,
    AvatarError,
    AvatarRecord,
    no_avatar,
)
from latentsync.serving.avatars.face_policy import FacePolicy, lost_face_warnings
from latentsync.serving.avatars.preparation import CHILD_EXIT_S, PreparationQueue
from latentsync.serving.avatars.quota import CacheQuota, prepared_bytes_per_frame, tree_bytes
from latentsync.serving.avatars.stills import StillCache

if TYPE_CHECKING:
    from latentsync.framing_plan import FaceFinder

logger = logging.getLogger(__name__)

#: Longest display name kept from the upload.
MAX_NAME_CHARS = 64


def _sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes (read 1 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _clean_name(text: str) -> str:
    name = "".join(c for c in text if c.isprintable()).strip()
    return name[:MAX_NAME_CHARS] or "avatar"


class AvatarStore:
    """Uploaded avatars: intake, background preparation, listing, deletion and the cache's disk quota.

    Args:
        config: The server configuration (``avatar.*`` limits, ``stream.fps`` and size, the engine: the face size).
        in_use: Returns what the channels use now: resolved paths (prepared avatar folders and
            video files) mapped to the names of the channels using them. Never deleted by the quota.
        face_finder: How stills framed ``cover`` look for the face (a
            :data:`latentsync.framing_plan.FaceFinder`); None: in this process.

    Attributes:
        quota: The cache's disk quota (:class:`~latentsync.serving.avatars.quota.CacheQuota`).
        face_policy: The ``avatar.min_face_px`` rule (:class:`~latentsync.serving.avatars.face_policy.FacePolicy`).
    """

    def __init__(
        self,
        config: AppConfig,
        in_use: Callable[[], dict[Path, list[str]]],
        face_finder: FaceFinder | None = None,
    ):
        self._cfg = config.avatar
        self._max_clip_s = float(config.media.max_clip_s)  # a channel's base video (counted while decoding)
        self._fps = int(config.stream.fps)
        self._face_size = engine_face_size(config.engine)  # what the engine needs (512 for LatentSync 1.6)
        s = config.stream
        self._size = (int(s.width), int(s.height)) if s.width and s.height else None
        self._catalogue = AvatarCatalogue(self._cfg.cache_dir, in_use)
        self._queue = PreparationQueue(
            self._cfg.cache_dir,
            timeout_s=self._cfg.prepare_timeout_s,
            max_rss_mb=self._cfg.prepare_max_rss_mb,
            prepare_upload=self._prepare_upload,
        )
        self.quota = CacheQuota(self._catalogue, quota_mb=self._cfg.cache_quota_mb, busy=self._queue.busy_uploads)
        self.face_policy = FacePolicy(self._cfg.min_face_px, self._cfg.face_fraction)
        # GET /avatars/<id>/still
        self._stills = StillCache(self._cfg.cache_dir, self._cfg.face_fraction, self._cfg.min_face_px, face_finder)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Read the records of earlier uploads and start the preparation thread. Safe to call twice.

        An upload whose preparation was cut by a stop is prepared again.
        """
        self._queue.start(self._catalogue.load)

    def close(self, timeout_s: float = CHILD_EXIT_S) -> None:
        """Stop the preparation (a running child is terminated, its upload stays ``preparing`` for the next start)."""
        self._queue.close(timeout_s)

    # ----------------------------------------------------------------- queries
    def list(self) -> list[dict]:
        """Every uploaded avatar, newest first (JSON records)."""
        return self._catalogue.list()

    def get(self, avatar_id: str) -> dict:
        """One avatar's JSON record.

        Raises:
            AvatarError: 404 ``no_avatar`` for an unknown id.
        """
        return self._catalogue.get(avatar_id)

    def still(
        self,
        avatar_id: str,
        size: tuple[int, int],
        fit: str,
        background: str,
        may_render: Callable[[], bool] | None = None,
    ) -> bytes:
        """A JPEG of the avatar framed as a channel of ``size`` would show it (the page shows it before a switch).

        One frame, 1 s into the upload (or its first), decoded by the confined FFmpeg with the framing
        a channel uses (``cover`` looks for the face: a second or two the first time); the last
        :data:`~latentsync.serving.avatars.stills.STILL_CACHE` stills are kept.

        Args:
            avatar_id: A ready avatar.
            size: The channel's ``(width, height)``.
            fit: The channel's ``avatar.fit``.
            background: The channel's ``avatar.background``.
            may_render: Asked before a still not in the cache is made (``api.stills_per_min``); None: always.

        Raises:
            AvatarError: 404 ``no_avatar``; 409 ``avatar_not_ready``; 429 ``rate_limited`` when
                ``may_render`` says no.
        """
        self.require_ready(avatar_id)
        return self._stills.still(avatar_id, size, fit, background, may_render)

    def require_ready(self, avatar_id: str) -> None:
        """Check that a channel may use this avatar now.

        Raises:
            AvatarError: 400 ``no_avatar`` (unknown id) or 409 ``avatar_not_ready`` (preparing or failed).
        """
        self._catalogue.require_ready(avatar_id)

    def check_face_size(self, avatar_id: str, size: tuple[int, int] | None, fit: str) -> None:
        """Refuse an avatar whose face would be narrower than ``avatar.min_face_px`` on a channel of ``size``.

        Args:
            avatar_id: A ready avatar (an unknown id is not checked here: :meth:`require_ready` refuses it).
            size: The channel's ``(width, height)`` (None: not known yet; nothing is checked).
            fit: The channel's ``avatar.fit``.

        Raises:
            AvatarError: 409 ``face_too_small`` naming the measured and the required width.
        """
        record = self._catalogue.record(avatar_id)
        if record is not None:
            self.face_policy.check(record, size, fit)

    def collect(self):
        """Prometheus collector (registered by the runtime): avatars by status and the cache's disk use.

        Yields:
            ``latentsync_avatars{status}``, ``latentsync_avatar_cache_bytes`` (the whole
            ``avatar.cache_dir`` on disk) and ``latentsync_avatar_cache_quota_bytes``.
        """
        from prometheus_client.core import GaugeMetricFamily

        counts = self._catalogue.counts()
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
            value=self.quota.quota_bytes,
        )

    # ----------------------------------------------------------------- quota
    def usage_bytes(self) -> int:
        """Bytes the whole avatar cache holds on disk (``avatar.cache_dir``)."""
        return self.quota.usage_bytes()

    def enforce_quota(self) -> None:
        """Delete least recently used unused entries while the cache is over ``avatar.cache_quota_mb``."""
        self.quota.enforce()

    # ----------------------------------------------------------------- intake
    @property
    def incoming_root(self) -> Path:
        """Where uploaded videos wait while they are checked and copied, one private folder each.

        :func:`latentsync.serving.core.uploads.stored_upload` makes and deletes each folder in it.
        """
        return self._catalogue.uploads / ".incoming"

    def add(self, upload: Path, name: str) -> tuple[dict, bool]:
        """Take an uploaded video: copy it (confined), check it, queue its preparation.

        The same bytes as an avatar that is preparing or ready (SHA-256 of the upload) are that avatar:
        nothing is copied or prepared again (its name is kept). A failed one is not matched (the
        upload is a new attempt).

        Args:
            upload: The uploaded file (stored under :attr:`incoming_root`; left for the caller to delete).
            name: Display name.

        Returns:
            ``(record, created)``: the record's JSON, and True for a new avatar (status ``preparing``),
            False for the existing avatar with these bytes.

        Raises:
            AvatarError: 429 ``busy`` (``avatar.max_preparing`` uploads prepare or wait), 400
                ``not_video`` (no video stream, or not MP4/MOV/Matroska/WebM), 400 ``too_long``
                (``avatar.upload_max_s``), 503 ``decode_timeout``, 507 ``quota_exceeded`` (its
                prepared frames do not fit ``avatar.cache_quota_mb`` even after deleting every
                unused avatar), 503 ``stopping``.
        """
        digest = _sha256(upload)
        twin = self._catalogue.same_content(digest)
        if twin is not None:  # before the slot: the same video again is never "busy"
            logger.info("avatar upload %r: the same bytes as %s (%s)", _clean_name(name), twin["id"], twin["name"])
            return twin, False
        with self._queue.upload_slot(self._cfg.max_preparing):  # taken before the (possibly long) copy
            return self._take_in(upload, name, digest)

    def _take_in(self, upload: Path, name: str, digest: str) -> tuple[dict, bool]:
        """:meth:`add` once its slot is reserved."""
        cfg = self._cfg
        avatar_id = "av-" + secrets.token_hex(6)
        video = uploaded_avatar_video(self._catalogue.root, avatar_id)
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
            per_frame = width * height * 3 + prepared_bytes_per_frame(self._face_size)
            need = num_frames * per_frame + tree_bytes(video.parent)
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
                sha256=digest,
            )
            with self.quota.admission():
                twin = self._catalogue.same_content(digest)  # the same bytes, taken in meanwhile
                if twin is not None:
                    shutil.rmtree(video.parent, ignore_errors=True)
                    return twin, False
                self.quota.make_room(need, keep={avatar_id})
                self._catalogue.add(record)
                self.quota.reserve(avatar_id, need - tree_bytes(video.parent))  # the copy is on disk
                self._queue.enqueue_upload(avatar_id)  # last: the queue's thread looks its record up
        except BaseException:
            self._catalogue.forget(avatar_id)
            self.quota.release(avatar_id)
            shutil.rmtree(video.parent, ignore_errors=True)
            raise
        logger.info(
            "avatar %s uploaded (%s, %.1f s, %dx%d): preparing", avatar_id, record.name, info.duration_s, width, height
        )
        return record.to_json(), True

    def delete(self, avatar_id: str) -> dict:
        """Delete an uploaded avatar (its video, record and prepared folders).

        Raises:
            AvatarError: 404 ``no_avatar``; 409 ``avatar_in_use`` while a channel uses it or it is being prepared.
        """
        users = self._catalogue.users().get(avatar_id)
        if self._catalogue.record(avatar_id) is None:
            raise no_avatar(avatar_id)
        if users:
            raise AvatarError("avatar_in_use", f"avatar {avatar_id} is used by channel(s) {', '.join(users)}")
        if not self._queue.withdraw_upload(avatar_id):
            raise AvatarError("avatar_in_use", f"avatar {avatar_id} is being prepared; delete it once it ends")
        self.quota.release(avatar_id)
        self._catalogue.forget(avatar_id)
        self._catalogue.delete_files(avatar_id)
        logger.info("avatar %s deleted", avatar_id)
        return {"id": avatar_id, "status": "deleted"}

    # ----------------------------------------------------------------- preparation
    def prepare_for_channel(self, video: str | Path, settings, stopping) -> str | None:
        """Prepare a channel's base video in the preparation queue (a child process, before uploads).

        Every preparation the server runs goes through this one queue: one child process at a time,
        at a lower CPU priority, bounded by ``avatar.prepare_timeout_s`` and ``avatar.prepare_max_rss_mb``,
        and the video by ``media.max_clip_s`` counted in decoded frames (docs/avatars.md).

        Args:
            video: The base video (its path was checked by the caller: config file or ``media.root``).
            settings: :class:`latentsync.avatar.AvatarSettings` at the channel's fps and size.
            stopping: True once the channel no longer wants it (closed, or the switch superseded):
                polled every 0.1 s; the job leaves the queue or its child is terminated.

        Returns:
            The prepared avatar's cache folder, or None when ``stopping()`` became true first.

        Raises:
            PreparationFailed: With the child's code (``no_face``, ``not_video``, ``too_long``,
                ``prepare_timeout``, ``prepare_memory``, ``prepare_failed``, ``stopping``) and a
                message that never holds FFmpeg's text.
        """
        budget = FrameBudget.for_duration(self._max_clip_s, settings.fps, "media.max_clip_s")
        return self._queue.prepare_for_channel(video, settings, stopping, budget=budget)

    def _prepare_upload(self, avatar_id: str) -> None:
        """Prepare one queued upload (on the queue's thread); a crash fails it with ``prepare_failed``."""
        record = self._catalogue.record(avatar_id)
        if record is None:
            return  # deleted or evicted meanwhile
        try:
            self._prepare(record)
        except Exception as exc:  # a bug here must not end the thread
            logger.exception("avatar %s: preparation crashed", avatar_id)
            self._catalogue.finish(
                record, FAILED, {"code": "prepare_failed", "message": f"{type(exc).__name__}: {exc}"}
            )

    def _prepare(self, record: AvatarRecord) -> None:
        from latentsync.avatar import AvatarSettings

        t0 = time.monotonic()
        video = uploaded_avatar_video(self._catalogue.root, record.id)
        settings = AvatarSettings(
            fps=record.fps,
            size=(record.size[0], record.size[1]),
            min_face_fraction=self._cfg.min_face_fraction,
            fit=self._cfg.fit,
            background=self._cfg.background,
            face_fraction=self._cfg.face_fraction,
            min_face_px=self._cfg.min_face_px,
            face_size=self._face_size,  # as the channels' (runtime.channel.avatar_settings): the same cache folder
        )

        def progress(fraction: float) -> None:
            record.progress = min(1.0, max(record.progress, fraction))

        result = self._queue.run_child(
            str(video),
            settings,
            label=record.id,
            on_progress=progress,
            cancelled=lambda: False,
            budget=FrameBudget.for_duration(self._cfg.upload_max_s, record.fps, "avatar.upload_max_s"),
        )
        if result is None:
            return  # close() stopped it; it stays "preparing" and is prepared again at the next start
        self.quota.release(record.id)  # what it holds now is on disk
        if result[0] == "done":
            _, path, faces_found, num_frames, face = result
            self._catalogue.finish(
                record,
                READY,
                progress=1.0,
                prepared=Path(path).name,
                faces_found=int(faces_found),
                num_frames=int(num_frames),
                prepared_s=round(time.monotonic() - t0, 2),
                warnings=self.face_policy.too_small_warnings(face["face_px"], record.size)
                + lost_face_warnings(int(faces_found), int(num_frames)),
                **face,
            )
            logger.info("avatar %s ready (%d frames, %.1f s)", record.id, num_frames, time.monotonic() - t0)
            self.enforce_quota()
        else:
            _, code, message = result
            self._catalogue.finish(record, FAILED, {"code": code, "message": message})
            self._catalogue.delete_prepared(record.id)
            logger.warning("avatar %s failed: %s", record.id, message)
