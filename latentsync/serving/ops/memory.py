"""The server process's heap: freed buffers go back to the system, and full garbage collections stay short.

Video frames (256x456x3 = 350 kB each, 16 per chunk), audio blocks and WebSocket messages are
large and short-lived. glibc's ``malloc`` serves an allocation above its mmap threshold with its
own ``mmap`` (returned to the system on ``free``), but it *raises* that threshold to the size of
every such block freed (up to 32 MiB, "dynamic mmap threshold", ``mallopt(3)``). After the first
chunk of frames is freed, later ones come from the heap arenas instead, where fragmentation keeps
the pages: every burst (an utterance sent faster than real time, a cancelled task) then left the
server's RSS tens of MB higher for good (tests/serving/api/test_hostile.py measured +93 MB over
30 s of WebSocket abuse). Setting the threshold fixes it (and turns the dynamic adjustment off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time

logger = logging.getLogger(__name__)

#: Blocks this large or larger are mapped on their own and unmapped when freed (bytes). 256 KiB:
#: above the per-tick audio blocks and small messages, below one video frame.
MMAP_THRESHOLD_BYTES = 256 << 10
M_MMAP_THRESHOLD = -3  # <malloc.h>
ENV_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"  # the same setting for processes we spawn (glibc reads it at start)


def bound_heap_growth(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold in this process and in the Python processes it spawns later.

    Args:
        threshold_bytes: Allocations of at least this many bytes get their own mapping.

    Returns:
        True if set; False where the C library is not glibc (musl, macOS): nothing changes there.
    """
    os.environ.setdefault(ENV_MMAP_THRESHOLD, str(threshold_bytes))
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.debug("no mallopt in the C library: heap growth left to the allocator")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


def freeze_heap() -> int:
    """Collect the cyclic garbage now, then exempt every object still alive from later collections.

    CPython's cyclic garbage collector stops every thread of the process while it runs, and a full
    (generation 2) collection visits every tracked object: in a started server (Flask, NumPy, OpenCV,
    prometheus-client, the channels) one took 45-57 ms, two to three frame periods, so every clock
    of the process was late at once (the process-wide stalls of docs/performance.md). Objects made at
    start-up live as long as the server, so :func:`gc.freeze` moves them to the permanent generation
    that collections skip; what is made later (tasks, uploads, frames) is collected as before.

    Call it once the server has started, and again after something made at start-up was let go (a
    channel deleted): a frozen object is still freed when its last reference goes, but garbage in a
    reference cycle among frozen objects is only found by the next call, which unfreezes, collects
    and freezes again (one full collection: that call itself pauses the process for one).
    :class:`HeapFreezer` makes that choice for a channel: only one frozen with the server pays it.

    Returns:
        Objects now in the permanent generation (:func:`gc.get_freeze_count`).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class HeapFreezer:
    """The server's frozen heap (:func:`freeze_heap`), and what a released part of it costs to reclaim.

    A channel created after the last freeze (``PUT /channels`` at run time) was never frozen: its garbage in
    reference cycles is found by an ordinary collection, which skips the frozen heap and so visits a few
    thousand objects (a few ms), not the ~95,000 of the whole server (75-90 ms with the GIL held: measured on
    a 2-core host, a channel deleted made ``main`` 2 ticks late each time, issue 38). Only a channel made
    before the last freeze (with the server, from the config or ``channels_file``) needs the full
    unfreeze-collect-freeze, and pays its pause once.

    Thread-safe: the API threads release channels, the start thread freezes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frozen_at: float | None = None  # time.monotonic() of the last freeze, None before the first

    def freeze(self) -> int:
        """:func:`freeze_heap` now (one full collection: a pause); returns the objects in the permanent generation."""
        with self._lock:
            count = freeze_heap()
            self._frozen_at = time.monotonic()
            return count

    def freeze_survivors(self) -> int:
        """Freeze every object tracked now, without a collection (no pause: the clocks may be ticking).

        What became garbage in reference cycles since the last collection is frozen with the rest and
        only freed by a later :meth:`freeze`: call it where that is little and once, right after start-up
        (after a :meth:`freeze` before it). Returns the objects in the permanent generation.
        """
        with self._lock:
            gc.freeze()
            self._frozen_at = time.monotonic()
            return gc.get_freeze_count()

    def release(self, made_at: float) -> tuple[str, int]:
        """Reclaim what a part made at ``made_at`` (``time.monotonic()`` seconds) held, now let go.

        Returns:
            ``("refrozen", frozen objects)`` if that part was frozen (a full collection), else
            ``("collected", unreachable objects found)`` (a collection of the unfrozen heap only).
        """
        with self._lock:
            if self._frozen_at is not None and made_at <= self._frozen_at:
                count = freeze_heap()
                self._frozen_at = time.monotonic()
                return "refrozen", count
            return "collected", gc.collect()
