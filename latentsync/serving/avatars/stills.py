"""Stills of uploaded avatars (``GET /avatars/<id>/still?channel=``): one JPEG frame framed as a channel shows it.

The control page shows the still before a switch (docs/avatars.md, "The still").
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from latentsync.config import uploaded_avatar_video
from latentsync.media.video import decode_video_frames
from latentsync.serving.avatars.catalogue import AvatarError

if TYPE_CHECKING:
    from latentsync.framing_plan import FaceFinder

#: Stills (``GET /avatars/<id>/still``) kept, least recently used dropped first (~50 kB each).
STILL_CACHE = 32


class StillCache:
    """Stills of uploaded avatars, the last :data:`STILL_CACHE` kept; thread-safe.

    Args:
        cache_dir: ``avatar.cache_dir`` (the uploads' copies).
        face_fraction: ``avatar.face_fraction`` (``cover``'s window size, as channels frame it).
        min_face_px: ``avatar.min_face_px`` (``cover`` narrows its window to reach it where it can).
        face_finder: How ``cover`` looks for the face, a :data:`latentsync.framing_plan.FaceFinder` (the
            server's runs each search in a child process); None: in this process.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        face_fraction: float = 0.3,
        min_face_px: int = 96,
        face_finder: FaceFinder | None = None,
    ):
        self._cache_dir = cache_dir
        self._face_finder = face_finder
        self._face_fraction = face_fraction
        self._min_face_px = min_face_px
        self._lock = threading.Lock()
        self._stills: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()

    def still(
        self,
        avatar_id: str,
        size: tuple[int, int],
        fit: str,
        background: str,
        may_render: Callable[[], bool] | None = None,
    ) -> bytes:
        """A JPEG of the avatar framed as a channel of ``size`` would show it.

        One frame, 1 s into the upload (or its first), decoded by the confined FFmpeg with the framing
        a channel uses (``cover`` looks for the face: a second or two the first time), JPEG quality 85.
        The caller checks that the avatar is ready.

        Args:
            avatar_id: A ready avatar.
            size: The channel's ``(width, height)``.
            fit: The channel's ``avatar.fit``.
            background: The channel's ``avatar.background``.
            may_render: Asked before a still that is not in the cache is made (the requester's rate
                limit: ``api.stills_per_min``); None: always.

        Returns:
            The JPEG's bytes.

        Raises:
            AvatarError: 429 ``rate_limited`` when ``may_render`` says no; 500 ``internal`` if the
                frame cannot be encoded.
            latentsync.media.MediaProbeError: If the upload's copy cannot be read.
        """
        import cv2

        from latentsync.framing_plan import plan_framing
        from latentsync.media.probe import probe_media
        from latentsync.media.video import VIDEO_FORMATS

        key = (avatar_id, tuple(size), fit, background)
        with self._lock:
            if key in self._stills:
                self._stills.move_to_end(key)
                return self._stills[key]
        if may_render is not None and not may_render():
            raise AvatarError(
                "rate_limited", "too many avatar stills made for this client this minute (api.stills_per_min)"
            )
        video = uploaded_avatar_video(self._cache_dir, avatar_id)
        info = probe_media(video, formats=VIDEO_FORMATS)
        framing = plan_framing(
            video,
            (info.width, info.height),
            size,
            fit,
            background,
            self._face_fraction,
            self._min_face_px,
            self._face_finder,
        )
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
