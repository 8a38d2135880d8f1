"""What channels share: decoded idle clips (same video, same format) and avatar preparations (same base video)."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.config import AppConfig
from latentsync.framing_plan import FaceFinder, load_clip
from latentsync.media.framing import FACE_FRACTION
from latentsync.media.probe import probe_media
from latentsync.media.video import VIDEO_FORMATS, ClipLimits, VideoClip, check_clip_limits


def clip_limits(config: AppConfig) -> ClipLimits:
    """The budgets every idle and base video of a channel must fit (``media.*``, ``stream.max_pixels_per_s``)."""
    m = config.media
    return ClipLimits(
        max_s=m.max_clip_s,
        max_file_bytes=int(m.max_clip_mb * 2**20),
        max_decoded_bytes=int(m.max_decoded_mb * 2**20),
        max_pixels_per_s=config.stream.max_pixels_per_s,
    )


class ClipCache:
    """Decoded idle clips, shared by the channels that loop the same video in the same format.

    A decoded clip is ``F x H x W x 3`` bytes (832x1248, 8 s at 25 fps: 594 MiB), so channels with
    the same idle video hold one copy. Entries are weak: a clip is freed when the last channel using
    it is gone (``DELETE /channels/<name>``). Shared frames are made read-only (the idle loop only
    reads them; a write would raise instead of changing another channel's picture).

    Args:
        face_finder: How ``cover`` framing looks for the face (the server's:
            :class:`~latentsync.serving.ops.face_search.ChildFaceFinder`); None: in this process.
    """

    def __init__(self, face_finder: FaceFinder | None = None):
        self._face_finder = face_finder
        self._clips: weakref.WeakValueDictionary[tuple, VideoClip] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def load(
        self,
        path: str | Path,
        fps: int,
        sample_rate_hz: int,
        size: tuple[int, int] | None,
        with_audio: bool,
        limits: ClipLimits | None = None,
        fit: str = "stretch",
        background: str = "blur",
        face_fraction: float = FACE_FRACTION,
        min_face_px: int = 0,
    ) -> VideoClip:
        """:func:`latentsync.framing_plan.load_clip`, or the clip already decoded with these arguments.

        ``fit``, ``background``, ``face_fraction`` and ``min_face_px``: the framing (``avatar.*``; as
        :func:`~latentsync.framing_plan.load_clip`).

        The key includes the file's size and modification time, so a replaced file is decoded again.

        Raises:
            latentsync.media.MediaProbeError: If the file is missing, unreadable or has no video stream.
            latentsync.media.video.MediaLimitError: If it is over one of ``limits`` (checked before decoding).
        """
        try:
            st = os.stat(path)
            file_key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
            key = (*file_key, fps, sample_rate_hz, size, with_audio, fit, background, face_fraction, min_face_px)
        except OSError:  # the usual error
            key = None

        def load() -> VideoClip:
            return load_clip(
                path,
                fps,
                sample_rate_hz,
                size,
                with_audio,
                limits,
                "idle video",
                fit,
                background,
                face_fraction,
                min_face_px,
                self._face_finder,
            )

        if key is None:
            return load()
        with self._lock:  # one decode per key, even when two channels start at once
            clip = self._clips.get(key)
            if clip is None:
                clip = load()
                clip.frames.flags.writeable = False
                if clip.audio is not None:
                    clip.audio.flags.writeable = False
                self._clips[key] = clip
            return clip


class PreparationCancelled(Exception):
    """An avatar preparation stopped because the channel that asked for it is closing."""


#: ``runner(video, settings, cache_dir, stopping) -> Avatar``: prepares one base video (a cache miss).
Runner = Callable[[str | Path, AvatarSettings, str | Path, Callable[[], bool]], Avatar]


def prepare_here(video: str | Path, settings: AvatarSettings, cache_dir: str | Path, stopping) -> Avatar:
    """A :data:`Runner` in this process: :meth:`Avatar.prepare`, stopped at the next 1 % once ``stopping()``.

    The server itself uses the avatar store's queue (a child process at a lower priority,
    :meth:`latentsync.serving.avatars.store.AvatarStore.prepare_for_channel`); this one serves
    channels built alone (tests, tools).
    """

    def check(_fraction: float) -> None:
        if stopping():
            raise PreparationCancelled(f"preparation of {Path(video).name} cancelled")

    return Avatar.prepare(video, settings, cache_dir=cache_dir, on_progress=check)


class AvatarPreparations:
    """Avatar preparations of the channels: one at a time per base video, each cancellable.

    Channels started together (a restart with ``channels_file``, several PUTs) often share a base
    video. The first one to ask prepares it (``runner``: decode, face tracking, warps); the others
    wait for it and then load it from the cache instead of running the same face tracking again
    (four at once took 43 s each on two cores, against 10 s alone). A prepared avatar already in
    the cache is loaded here at once. A preparation whose channel closes (DELETE, shutdown) or
    whose switch is superseded stops (``stopping``).

    Args:
        runner: Prepares a base video that is not in the cache (default :func:`prepare_here`).
    """

    def __init__(self, runner: Runner | None = None):
        self._runner = runner or prepare_here
        self._lock = threading.Lock()
        self._flights: dict[tuple, list] = {}  # key -> [lock, users]: entries live while someone uses them

    def prepare(
        self,
        video: str | Path,
        settings: AvatarSettings,
        cache_dir: str | Path,
        stopping: Callable[[], bool],
        limits: ClipLimits | None = None,
    ) -> Avatar:
        """Prepare ``video`` (or load it from ``cache_dir``), after any preparation of it already running.

        Args:
            video: The base video.
            settings: The preparation settings (fps, size, face fraction).
            cache_dir: The avatar cache.
            stopping: True once the caller no longer wants the avatar; polled while waiting (every
                0.1 s) and while preparing.
            limits: Budgets the video must fit, checked from its probe before anything is decoded.

        Raises:
            PreparationCancelled: When ``stopping()`` became true.
            latentsync.media.video.MediaLimitError: If the video is over one of ``limits``.
            FileNotFoundError, latentsync.media.MediaProbeError, latentsync.face.FaceNotFoundError:
                As :meth:`latentsync.avatar.Avatar.prepare`.
        """
        if limits is not None:
            info = probe_media(video, formats=VIDEO_FORMATS)
            check_clip_limits(info, settings.fps, settings.size, limits, "base video")
        key = (str(Path(video).resolve()), settings, str(Path(cache_dir).resolve()))
        with self._lock:
            flight = self._flights.setdefault(key, [threading.Lock(), 0])
            flight[1] += 1
        try:
            while not flight[0].acquire(timeout=0.1):
                if stopping():
                    raise PreparationCancelled(f"preparation of {Path(video).name} cancelled")
            try:
                if stopping():
                    raise PreparationCancelled(f"preparation of {Path(video).name} cancelled")
                cached = Avatar.load_cached(video, settings, cache_dir)
                return cached if cached is not None else self._runner(video, settings, cache_dir, stopping)
            finally:
                flight[0].release()
        finally:
            with self._lock:
                flight[1] -= 1
                if flight[1] == 0:
                    del self._flights[key]
