"""SupervisingThread: the one thread that supervises an encoder or an output, with its heartbeat.

An :class:`~latentsync.serving.egress.encoder.Encoder` and an
:class:`~latentsync.serving.egress.outputs.Output` each run their FFmpeg from one thread of their
own. That thread must be started once, stopped by an event, and vouched for: it beats
(:meth:`SupervisingThread.beat`) every time round its loop, and :meth:`SupervisingThread.alive`
says whether it still does, which the systemd watchdog asks (docs/architecture.md "Health"): a
destination that is down never makes it False, a supervisor that died or deadlocked does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class SupervisingThread:
    """A daemon thread running ``target`` once started, with a stop event and a heartbeat.

    Args:
        target: The supervising loop; it checks :attr:`stop` and calls :meth:`beat` as it goes.
        name: The thread's name.
    """

    def __init__(self, target: Callable[[], None], name: str):
        self._target = target
        self._name = name
        self.stop = threading.Event()  # set: the loop ends as soon as it can
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._beat = time.monotonic()

    def start(self) -> bool:
        """Start the thread; False (nothing started) if it was started or stopped before."""
        with self._lock:
            if self._thread is not None or self.stop.is_set():
                return False
            self._beat = time.monotonic()
            self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
            self._thread.start()
            return True

    def request_stop(self) -> None:
        """Set :attr:`stop` (under the lock: a :meth:`start` racing with it starts nothing)."""
        with self._lock:
            self.stop.set()

    def beat(self) -> None:
        """The loop is still going round (called by the thread itself)."""
        self._beat = time.monotonic()

    def alive(self, now: float, stale_s: float) -> bool:
        """True unless the thread died or has not beaten for ``stale_s`` seconds; a stopped one counts as alive."""
        thread = self._thread
        if thread is None or self.stop.is_set():
            return True
        return thread.is_alive() and now - self._beat < stale_s

    @property
    def running(self) -> bool:
        """True while the thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread (if started); True when it has ended (or never started)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()
