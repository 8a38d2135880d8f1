"""The ``avatar`` section, and the ids and files of avatars uploaded with ``POST /avatars``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: Ids of avatars uploaded with ``POST /avatars``: ``av-`` and 12 lower-case hex digits (random).
AVATAR_ID_RE = re.compile(r"av-[0-9a-f]{12}")


@dataclass(kw_only=True)
class AvatarConfig:
    """The digital human: idle loop and base video for speech (None: the built-in default avatar).

    Each defaults to the other: ``video`` alone is the idle loop too (set by
    :func:`latentsync.config.loading.load_config`), ``idle_video`` alone the base video too.

    ``cache_dir`` holds the prepared avatars and the videos uploaded with ``POST /avatars``
    (docs/avatars.md). The ``upload_*``, ``cache_quota_mb``, ``max_preparing`` and
    ``prepare_timeout_s`` keys bound those uploads: a video file at most ``upload_max_mb``
    megabytes and ``upload_max_s`` seconds long; the whole cache at most ``cache_quota_mb``
    megabytes (least recently used avatars no channel uses are deleted to make room);
    ``max_preparing`` uploads prepared or waiting at once; one preparation at most
    ``prepare_timeout_s`` seconds and ``prepare_max_rss_mb`` MiB of resident memory (the preparation
    process's peak, read from /proc; frames stream through disk, so a minute of 1080p needs ~210 MiB).
    ``min_face_fraction``: an uploaded video whose face is found on fewer than this fraction of its
    frames fails to prepare. ``fit``: how a video of another aspect ratio than the channel, or a
    larger one, fills its frame: ``cover`` (crop around the presenter's face, head in the upper third,
    the window sized so the face is ``face_fraction`` of the picture's width: head and shoulders;
    never upscaled, never beyond the picture), ``contain`` (whole video, bars filled with
    ``background``: ``blur`` or ``#rrggbb``) or ``stretch`` (distorted; only when asked for).
    docs/avatars.md, "Framing". ``min_face_px``: an uploaded avatar whose face is narrower than this
    at the stream's size (after framing) gets a ``face_too_small`` warning, and
    ``PUT /channels/<name>`` refuses it (409, naming the largest face the source allows without
    upscaling) unless ``"force": true``; ``cover`` narrows its window (down to the channel's size in
    source pixels) to reach it where the source can. ``face_fraction`` (0.3): the face's width over
    the picture's width in a ``cover`` window (0.05-1; docs/avatars.md, "Framing"). An upload of the
    same bytes as an avatar that is ready or preparing is that avatar (no copy).
    """

    idle_video: str | None = None
    video: str | None = None
    cache_dir: str = ".cache/avatars"
    upload_max_mb: float = 200.0
    upload_max_s: float = 60.0
    cache_quota_mb: float = 20480.0
    max_preparing: int = 2
    prepare_timeout_s: float = 1800.0
    prepare_max_rss_mb: float = 1024.0
    min_face_fraction: float = 0.5
    fit: str = "cover"
    background: str = "blur"
    min_face_px: int = 96
    face_fraction: float = 0.3  # latentsync.media.framing.FACE_FRACTION


def uploaded_avatar_video(cache_dir: str | Path, avatar_id: str) -> Path:
    """Where the video of an avatar uploaded with ``POST /avatars`` lives (docs/avatars.md).

    Args:
        cache_dir: ``avatar.cache_dir``.
        avatar_id: The avatar's id (:data:`AVATAR_ID_RE`; anything else gives a path that never exists).

    Returns:
        ``<cache_dir>/uploads/<id>/<id>.mkv`` (the upload, remuxed to Matroska).
    """
    safe = avatar_id if AVATAR_ID_RE.fullmatch(avatar_id) else "invalid"
    return Path(cache_dir) / "uploads" / safe / f"{safe}.mkv"
