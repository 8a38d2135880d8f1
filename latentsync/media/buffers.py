"""Recycled frame buffers: a frame made every tick without a fresh allocation every tick.

A speech frame is the avatar's base frame with a face pasted in, so it needs a buffer of its own
(the base frames are read-only and memory-mapped). A fresh ``np.empty`` each tick is larger than the
server's mmap threshold (``latentsync/serving/ops/memory.py``), so each one is its own ``mmap`` and
``munmap``: one page fault per 4 KiB page written (192 for a 512x512 frame, 761 for 832x1248) and a
TLB shoot-down on every other core running the process when it is unmapped, 25 times a second per
speaking channel. :class:`FramePool` hands the same few buffers out again instead.

A buffer is free again when nothing outside the pool holds it: CPython counts every reference to
the array, and every NumPy view of it holds one too (its ``base``), so once a frame handed out has
left every queue, tap and writer, its reference count is back to what the pool alone holds.
"""

from __future__ import annotations

import sys

import numpy as np

#: Buffers a pool keeps at most (more can be out at once: those are allocated and not kept). A
#: frame is held by the mixer (the last frame), the FFmpeg writer's queue and its writer, and the
#: taps (WHEP, frames WebSocket): four to six are in use on a busy channel.
DEFAULT_MAX_BUFFERS = 8


def _free_refcount() -> int:
    """The reference count :meth:`FramePool.take` sees for a buffer only the pool holds.

    Measured through the same loop as ``take`` rather than assumed: what ``sys.getrefcount``
    counts (its own argument, the loop variable) differs between CPython versions.
    """
    buffers = [np.empty(1, np.uint8)]
    for buf in buffers:
        return sys.getrefcount(buf)
    raise AssertionError("unreachable")


class FramePool:
    """Hands out ``(H, W, 3) uint8`` buffers, reusing one once nothing else references it.

    Not thread-safe: one thread takes (the channel's clock thread); any thread may drop the frames.

    Args:
        shape: Shape of every buffer, e.g. ``(H, W, 3)``.
        dtype: Element type (default ``uint8``).
        max_buffers: Buffers kept for reuse (:data:`DEFAULT_MAX_BUFFERS`); while that many are
            all in use, :meth:`take` returns a fresh array that is not kept.

    Raises:
        ValueError: If ``max_buffers`` is less than 1.
    """

    def __init__(
        self, shape: tuple[int, ...], dtype: np.dtype | type = np.uint8, max_buffers: int = DEFAULT_MAX_BUFFERS
    ):
        if max_buffers < 1:
            raise ValueError(f"max_buffers must be at least 1, got {max_buffers}")
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.max_buffers = int(max_buffers)
        self._buffers: list[np.ndarray] = []
        self._free_refs = _free_refcount()
        self.allocated = 0  # arrays allocated so far (kept or not): the rest of the takes were reuses

    def take(self) -> np.ndarray:
        """A buffer of :attr:`shape` that nothing else references; its content is undefined."""
        for buf in self._buffers:
            if sys.getrefcount(buf) <= self._free_refs:
                return buf
        buf = np.empty(self.shape, self.dtype)
        self.allocated += 1
        if len(self._buffers) < self.max_buffers:
            self._buffers.append(buf)
        return buf

    def copy(self, frame: np.ndarray) -> np.ndarray:
        """A pooled copy of ``frame`` (of :attr:`shape`).

        Raises:
            ValueError: If ``frame``'s shape is not :attr:`shape`.
        """
        if frame.shape != self.shape:
            raise ValueError(f"frame of shape {frame.shape} in a pool of {self.shape}")
        out = self.take()
        np.copyto(out, frame)
        return out

    @property
    def kept(self) -> int:
        """Buffers the pool holds for reuse."""
        return len(self._buffers)


def written_into(result: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out``, holding ``result``: what an OpenCV call given ``dst=out`` returned.

    OpenCV writes into ``dst`` when it can (any row-strided view of the right shape and type) and
    otherwise returns a new array; that one is copied into ``out`` here, so the caller's buffer
    always holds the result.
    """
    if not np.shares_memory(result, out):
        np.copyto(out, result)
    return out
