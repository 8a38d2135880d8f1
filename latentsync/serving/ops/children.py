"""What a helper process the server spawns sets first: the server alone stops it, and it leaves nothing behind.

A process started with ``multiprocessing`` (spawn) is in the server's process group, so a terminal's
Ctrl-C reaches it too, and its named semaphores are registered with the server's
``multiprocessing`` resource tracker. Such a helper must not die of that SIGINT on its own (a
``KeyboardInterrupt`` traceback in the server's log; the server stops its helpers itself, in order),
and a semaphore it creates is unregistered only if it exits normally: one the server terminates
(SIGTERM, SIGKILL) leaves it registered, and the tracker warns ``There appear to be 1 leaked semaphore
objects to clean up at shutdown`` when the server exits. tqdm is where ours came from: its first bar
creates a ``multiprocessing.RLock``, so a preparation stopped mid-way leaked one.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["become_helper_process"]


def become_helper_process() -> None:
    """Ignore SIGINT and keep tqdm's lock inside this process (call first in a spawned helper's body).

    After this, the process ends only when the server stops it (or it returns), and creates no named
    semaphore for tqdm's progress bars (they take a ``threading.RLock``), so a SIGTERM or SIGKILL from
    the server leaves nothing registered with the resource tracker. Never raises: without tqdm
    installed only SIGINT is ignored.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())
