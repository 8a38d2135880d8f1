"""Paste-back on the clock thread: generated faces into copies of the avatar's base frames, in recycled buffers.

A speaking program hands the mixer one frame per tick: the base frame with the generated face
pasted just in time (so buffered chunks hold only the aligned faces: 256x256, 512x512 for LatentSync
1.6). :class:`FramePaster` does the
paste into buffers it recycles (:class:`~latentsync.media.buffers.FramePool` for the frames,
:class:`~latentsync.face.paste.PasteScratch` for the warped face and the blend's weights): at
832x1248 a fresh frame a tick would be 3 MB allocated 25 times a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latentsync.face import PasteScratch
from latentsync.media.buffers import FramePool

__all__ = ["FramePaster"]


class FramePaster:
    """Pastes one program's faces into its avatar's base frames; one pasting thread (the clock's).

    The buffers are made at the first paste and let go by :meth:`release` (a finished task keeps
    its program, not its buffers).

    Args:
        avatar: The prepared avatar (:class:`latentsync.avatar.Avatar`: ``frames`` ``(F, H, W, 3) uint8``
            RGB and its ``paste``).
    """

    def __init__(self, avatar: Any):
        self._avatar = avatar
        self._pool: FramePool | None = None
        self._scratch: PasteScratch | None = None

    def paste(self, base: int, face: np.ndarray) -> np.ndarray:
        """Base frame ``base`` with ``face`` pasted.

        Args:
            base: Base frame index in ``[0, F)``.
            face: ``(S, S, 3) uint8`` RGB generated face, aligned like the avatar's faces (``S`` its face
                size: 256, 512 for LatentSync 1.6).

        Returns:
            ``(H, W, 3) uint8`` RGB frame in a recycled buffer (back in the pool once nothing references it).
        """
        frames = self._avatar.frames
        pool, scratch = self._pool, self._scratch
        if pool is None or scratch is None:
            pool = self._pool = FramePool(frames.shape[1:], frames.dtype)
            scratch = self._scratch = PasteScratch()
        return self._avatar.paste(base, face, frame=pool.copy(frames[base]), scratch=scratch)

    @property
    def allocated(self) -> int:
        """Frame buffers allocated since the buffers were made (0 while none are held): the other pastes reused one."""
        return self._pool.allocated if self._pool is not None else 0

    @property
    def holding(self) -> bool:
        """Whether it holds buffers (from the first paste until :meth:`release`)."""
        return self._pool is not None or self._scratch is not None

    def release(self) -> None:
        """Let go of the buffers (the program is off air); a later :meth:`paste` makes new ones."""
        self._pool = self._scratch = None
