"""Threads of a serving process: native pools (OpenCV's, BLAS's) capped at start, per-thread priority.

Every channel already runs on threads of its own (clock, FIFO writers, encoders) and the engine pool
parallelises by process, so the libraries' own pools only add threads that busy-wait for work on
the cores FFmpeg and the other channels need. Measured (docs/performance.md): one parametric worker
whose NumPy called OpenBLAS used twice its wall time in CPU (the second core spinning); capped at one
thread, the same chunks took the same wall time at half the CPU.
"""

from __future__ import annotations

import os
import sys
import threading

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


def renice_this_thread(offset: int) -> int | None:
    """Add ``offset`` to the calling thread's niceness, leaving the process's other threads as they are.

    On Linux niceness belongs to each thread (``setpriority(PRIO_PROCESS, tid)``) and threads the
    calling thread starts later inherit it. A negative offset (ahead of the rest of the process)
    needs ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` that allows the result: the limit allows niceness
    down to ``20 - limit`` (setrlimit(2)); systemd's ``LimitNICE=30`` allows -10. The result is
    clamped to the kernel's range, -20..19.

    Args:
        offset: Niceness to add; 0 changes nothing.

    Returns:
        The thread's niceness afterwards, or None if the system refused it (``EPERM``/``EACCES``:
        no privilege for a negative offset) or has no per-thread niceness (not Linux); then the
        thread keeps its niceness. Never raises for those.
    """
    if not sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS takes a process id, not a thread's
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if offset:
            os.setpriority(os.PRIO_PROCESS, tid, max(-20, min(19, current + offset)))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:  # PermissionError (EPERM, EACCES) included
        return None


def make_this_thread_realtime(priority: int) -> bool:
    """Put the calling thread under ``SCHED_FIFO`` at ``priority``; the process's other threads keep theirs.

    A ``SCHED_FIFO`` thread runs as soon as it is runnable, ahead of every ordinary (``SCHED_OTHER``)
    thread of the host, whatever their niceness; it gives the core back when it blocks (a sleep, a
    wait for the GIL) and the kernel keeps 5 % of every second for the others
    (``/proc/sys/kernel/sched_rt_runtime_us``, 950000 of 1000000). ``SCHED_RESET_ON_FORK`` is set,
    so threads and processes started from this thread are ordinary again. Needs root,
    ``CAP_SYS_NICE`` or an ``RLIMIT_RTPRIO`` of at least ``priority`` (systemd ``LimitRTPRIO=``,
    with ``RestrictRealtime=false``).

    Args:
        priority: 1..99 (``sched_get_priority_min/max(SCHED_FIFO)`` on Linux).

    Returns:
        True if the thread now runs under ``SCHED_FIFO``; False if the system refused it (``EPERM``:
        no privilege, or a seccomp/systemd ``RestrictRealtime`` filter) or has no such policy (not
        Linux); then the thread keeps its policy. Never raises for those.

    Raises:
        ValueError: If ``priority`` is outside 1..99.
    """
    if not 1 <= priority <= 99:
        raise ValueError(f"priority must be 1..99, got {priority}")
    if not sys.platform.startswith("linux"):
        return False
    try:  # pid 0: the calling thread (Linux schedules threads, not processes)
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except OSError:  # PermissionError (EPERM) included
        return False
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
