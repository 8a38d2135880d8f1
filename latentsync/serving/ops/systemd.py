"""systemd service notifications (``sd_notify`` protocol) and the watchdog.

The protocol is one datagram per message to the UNIX socket named by ``$NOTIFY_SOCKET``
(``man sd_notify``); outside systemd every call is a no-op.

Under gunicorn the main process systemd watches is gunicorn's master, but the stream lives in its
one worker: the master would send ``READY=1`` as soon as it listens (before the stream is up), so
``configs/gunicorn.conf.py`` moves ``$NOTIFY_SOCKET`` out of its sight into
``$LATENTSYNC_NOTIFY_SOCKET`` (:func:`take_notify_socket`), and the worker sends ``READY=1`` and the
watchdog pings itself (the unit has ``NotifyAccess=all``), although ``$WATCHDOG_PID`` names the master.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
from collections.abc import Callable, MutableMapping

logger = logging.getLogger(__name__)

#: Where :func:`take_notify_socket` keeps the notify socket address away from gunicorn's master.
PRIVATE_NOTIFY_ENV = "LATENTSYNC_NOTIFY_SOCKET"
_PR_SET_NAME = 15  # prctl(2) option: name the calling thread (<linux/prctl.h>)


def take_notify_socket(environ: MutableMapping[str, str] = os.environ) -> None:
    """Move ``$NOTIFY_SOCKET`` to ``$LATENTSYNC_NOTIFY_SOCKET`` so gunicorn's master never notifies.

    gunicorn's arbiter sends ``READY=1`` when it starts listening; with the address moved, only
    this package's :func:`sd_notify` (in the worker, once the stream is on air) can reach systemd.
    """
    address = environ.pop("NOTIFY_SOCKET", None)
    if address:
        environ[PRIVATE_NOTIFY_ENV] = address


def name_this_thread(name: str) -> None:
    """Give the calling thread an OS-visible name (``top -H``, ``/proc/<pid>/task/<tid>/comm``).

    Linux only (prctl ``PR_SET_NAME``, at most 15 bytes); a no-op elsewhere or on failure.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STOPPING=1"``) to systemd.

    Returns:
        True if it was sent; False outside systemd or on a socket error (never raises).
    """
    address = os.environ.get(PRIVATE_NOTIFY_ENV) or os.environ.get("NOTIFY_SOCKET")
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
    """Seconds between watchdog pings: a quarter of ``WatchdogSec`` (``$WATCHDOG_USEC``), or None when off.

    systemd wants a ping at least every ``WatchdogSec`` and advises every half of it
    (``sd_watchdog_enabled(3)``); a quarter keeps the half even on a loaded machine. The watchdog
    is on when ``$WATCHDOG_PID`` is unset or names this process or its parent (gunicorn's master,
    the unit's main process: this worker pings on its behalf, ``NotifyAccess=all``).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid not in (str(os.getpid()), str(os.getppid()))):
        return None
    return int(usec) / 4e6


class Watchdog:
    """Pings systemd's watchdog only while ``alive()`` says the output clocks tick and egress is supervised.

    A frozen StreamingController, or a deadlocked encoder or output supervisor, stops the pings,
    so systemd (``WatchdogSec=``) restarts the service; a destination that is down does not.

    Args:
        alive: True while every clock has ticked recently and every egress supervisor loops.
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
                logger.error("output clock stalled or egress supervisor dead: withholding the systemd watchdog ping")
