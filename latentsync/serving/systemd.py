"""systemd service notifications (``sd_notify`` protocol) and the watchdog.

The protocol is one datagram per message to the UNIX socket named by ``$NOTIFY_SOCKET``
(``man sd_notify``); outside systemd every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STOPPING=1"``) to systemd.

    Returns:
        True if it was sent; False outside systemd or on a socket error (never raises).
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        logger.warning("sd_notify(%s) failed: %s", message, exc)
        return False


def watchdog_interval_s() -> float | None:
    """Half the ``WatchdogSec`` systemd gave this process (``$WATCHDOG_USEC``), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Pings systemd's watchdog only while ``alive()`` says the output clock is ticking.

    A frozen StreamingController stops the pings, so systemd (``WatchdogSec=``) restarts the service.

    Args:
        alive: True while the controller has ticked recently.
        interval_s: Seconds between pings (None: from ``$WATCHDOG_USEC``; no thread when off).
    """

    def __init__(self, alive: Callable[[], bool], interval_s: float | None = None):
        self._alive = alive
        self._interval_s = interval_s if interval_s is not None else watchdog_interval_s()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start pinging (no-op when the watchdog is off). Safe to call twice."""
        if self._interval_s is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop pinging. Safe to call twice or before start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _run(self) -> None:
        assert self._interval_s is not None
        while not self._stop.wait(self._interval_s):
            if self._alive():
                sd_notify("WATCHDOG=1")
            else:
                logger.error("output clock stalled: withholding the systemd watchdog ping")
