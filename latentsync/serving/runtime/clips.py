"""Decoded idle clips, shared by the channels that loop the same video in the same format."""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

from latentsync.media.video import VideoClip, load_clip


class ClipCache:
    """Decoded idle clips, shared by the channels that loop the same video in the same format.

    A decoded clip is ``F x H x W x 3`` bytes (832x1248, 8 s at 25 fps: 594 MiB), so channels with
    the same idle video hold one copy. Entries are weak: a clip is freed when the last channel using
    it is gone (``DELETE /channels/<name>``). Shared frames are made read-only (the idle loop only
    reads them; a write would raise instead of changing another channel's picture).
    """

    def __init__(self):
        self._clips: weakref.WeakValueDictionary[tuple, VideoClip] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def load(
        self, path: str | Path, fps: int, sample_rate_hz: int, size: tuple[int, int] | None, with_audio: bool
    ) -> VideoClip:
        """:func:`latentsync.media.video.load_clip`, or the clip already decoded with these arguments.

        The key includes the file's size and modification time, so a replaced file is decoded again.

        Raises:
            latentsync.media.MediaProbeError: If the file is missing, unreadable or has no video stream.
        """
        try:
            st = os.stat(path)
            key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, fps, sample_rate_hz, size, with_audio)
        except OSError:
            return load_clip(path, fps, sample_rate_hz, size, with_audio=with_audio)  # raises the usual error
        with self._lock:  # one decode per key, even when two channels start at once
            clip = self._clips.get(key)
            if clip is None:
                clip = load_clip(path, fps, sample_rate_hz, size, with_audio=with_audio)
                clip.frames.flags.writeable = False
                if clip.audio is not None:
                    clip.audio.flags.writeable = False
                self._clips[key] = clip
            return clip
