"""Native thread pools of a serving process: OpenCV's and BLAS's, capped once at the process's start.

Every channel already runs on threads of its own (clock, FIFO writers, encoders) and the engine pool
parallelises by process, so the libraries' own pools only add threads that busy-wait for work on
the cores FFmpeg and the other channels need. Measured (docs/performance.md): one parametric worker
whose NumPy called OpenBLAS used twice its wall time in CPU (the second core spinning); capped at one
thread, the same chunks took the same wall time at half the CPU.
"""

from __future__ import annotations

import cv2
import threadpoolctl


def limit_native_threads(threads: int) -> None:
    """Cap OpenCV's parallel loops and the BLAS libraries (OpenBLAS, MKL) of this process at ``threads``.

    A process-wide setting: call it from a process's entry point (the server's ``main``, an engine
    worker's initialiser), never from library code. OpenMP pools (PyTorch's intra-op threads) are
    left alone.

    Args:
        threads: Threads per pool, >= 1; 0 leaves the libraries' defaults (one per core).

    Raises:
        ValueError: If ``threads`` is negative.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads == 0:
        return
    cv2.setNumThreads(threads)
    threadpoolctl.threadpool_limits(limits=threads, user_api="blas")
