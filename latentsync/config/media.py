"""The ``media`` section: videos named by path through the API, and the decoding budgets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class MediaConfig:
    """Videos named by path through the API, and the budgets of every video the server decodes.

    ``root``: ``PUT /channels/<name>`` may name an ``idle_video``/``video`` only by a path that
    resolves (symlinks followed) to a file under this directory; null: the API takes no paths at
    all (upload the video with ``POST /avatars`` and name its id as ``avatar``). Paths in the
    config file are the operator's and are not restricted.
    ``max_clip_s``, ``max_clip_mb``: longest and largest idle or base video, checked from the
    probe before decoding. ``max_decoded_mb``: largest decoded clip (width x height x 3 bytes per
    frame, at the stream's fps), also checked before decoding.
    """

    root: str | None = None
    max_clip_s: float = 120.0
    max_clip_mb: float = 2048.0
    max_decoded_mb: float = 4096.0
