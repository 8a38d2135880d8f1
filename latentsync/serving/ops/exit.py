"""Ending the process when the interpreter's normal exit would crash (a Ray driver left by its cluster).

Ray's driver cannot leave a cluster whose GCS and raylets are gone: ``ray.shutdown()`` aborts the
process (SIGABRT) and, without it, the interpreter's teardown crashes in Ray's threads (SIGSEGV),
so a server that stopped cleanly would still exit with a signal and systemd would count a failure.
:func:`exit_now` ends the process once everything of ours is closed: logs and stdio flushed, then
``os._exit`` with the status the server chose (latentsync.serving.compute.scheduling_pool
``SchedulingPool.exit_unsafe``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

__all__ = ["exit_now"]


def exit_now(code: int) -> NoReturn:
    """Flush the logs and stdio, then end the process with ``code`` without the interpreter's teardown.

    Args:
        code: The exit status (0: a clean stop).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to flush
            pass
    os._exit(code)
