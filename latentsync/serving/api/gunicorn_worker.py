"""gunicorn's threaded worker with a header deadline and a cap per client address (issue 35).

gunicorn's ``gthread`` worker hands every accepted connection to its thread pool, where a thread
waits up to 5 s for a first byte and then parses the request with blocking reads that never time
out. Its pool has ``api.max_long_lived + RESERVED_THREADS`` threads (``configs/gunicorn.conf.py``),
so a few hundred silent connections queue ``/health`` behind them for minutes, and a handful that
send half a header hold every thread until they disconnect.

:class:`GuardedThreadWorker` (``worker_class`` in ``configs/gunicorn.conf.py``) keeps a connection
out of the thread pool until its request line and headers are complete:

- the worker's event loop reads the head of each new (and each kept-alive) connection without
  blocking, and hands it to a thread only once the blank line that ends the headers has arrived
  (or :data:`MAX_HEAD_BYTES` have, which gunicorn's parser then refuses);
- **header deadline**: a connection whose head is not complete ``server.header_timeout_s`` after
  it was accepted (or became readable again after a keep-alive response) is closed;
- **body deadline**: in the thread, each read and write on the socket waits at most
  ``server.body_timeout_s`` (a WebSocket or ``GET /events`` sets its own once its request is in);
- **per-address cap**: at most ``server.max_connections_per_ip`` open connections per client
  address (a reverse proxy in ``server.trusted_proxies`` is exempt); one past it is answered a
  bare ``503`` (:data:`latentsync.serving.api.http_server.REFUSAL`) without its request being
  read. ``server.max_connections`` is gunicorn's ``worker_connections``: past it the worker stops
  accepting.

Plain HTTP only (TLS is a reverse proxy's job, docs/security.md): with gunicorn's own TLS
(``certfile``) the worker behaves as gthread does, with the per-address cap and the body deadline.
"""

from __future__ import annotations

import errno
import logging
import selectors
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from latentsync.config import load_config_from_environment
from latentsync.serving.api.http_server import AddressSlots, Refusals
from latentsync.serving.api.proxies import TrustedProxies

__all__ = ["MAX_HEAD_BYTES", "GuardedConnection", "GuardedThreadWorker"]

logger = logging.getLogger(__name__)

#: Head bytes read without a blank line before the connection goes to a thread anyway, where
#: gunicorn's parser refuses it (``limit_request_line``, ``limit_request_fields``: 400/431).
MAX_HEAD_BYTES = 64 * 1024
#: Bytes asked of the socket per read while a head comes in.
_READ_BYTES = 16 * 1024


class GuardedConnection(TConn):
    """A gthread connection that gathers its head in the event loop and counts against its address.

    Attributes:
        ip: The client address (the per-address count it holds).
        head: Bytes read in the event loop, not yet given to the parser.
        deadline: ``time.monotonic()`` by which the head must be complete (seconds).
    """

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any, *, worker: GuardedThreadWorker, ip: str):
        super().__init__(cfg, sock, client, server)
        self.ip = ip
        self.head = bytearray()
        self.deadline = 0.0
        self._worker = worker
        self._released = False

    def init(self) -> None:
        """Build the parser (first time), give it the head read so far, and set the body deadline.

        Runs in a pool thread each time the connection is handled (gunicorn made the socket
        blocking just before; a timeout makes each read or write wait at most ``body_timeout_s``).
        """
        super().init()
        if self.parser is not None and self.head:
            self.parser.unreader.unread(bytes(self.head))
            self.head.clear()
        self.sock.settimeout(self._worker.body_timeout_s)

    def close(self, graceful: bool = False) -> None:
        """Close the socket and give the address's place back (once)."""
        try:
            super().close(graceful)
        finally:
            if not self._released:
                self._released = True
                self._worker.release(self.ip)


class GuardedThreadWorker(ThreadWorker):
    """gunicorn's ``gthread`` worker with the guards of the module docstring.

    The limits come from the app's config, loaded as the app loads it
    (:func:`latentsync.config.load_config_from_environment`): :attr:`header_timeout_s`,
    :attr:`body_timeout_s` (seconds), :attr:`max_connections_per_ip` and :attr:`trusted_proxies`
    (exempt from that cap).

    Attributes:
        timed_out: Connections closed because their head was not complete in time.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        server_config = load_config_from_environment().server
        self.header_timeout_s = float(server_config.header_timeout_s)
        self.body_timeout_s = float(server_config.body_timeout_s)
        self.max_connections_per_ip = int(server_config.max_connections_per_ip)
        self._slots = AddressSlots(self.max_connections_per_ip, TrustedProxies(server_config.trusted_proxies))
        self._refusals = Refusals(f"server.max_connections_per_ip = {self.max_connections_per_ip}")
        self._heads: dict[GuardedConnection, None] = {}  # insertion order = deadline order
        self.timed_out = 0

    @property
    def refused(self) -> int:
        """Connections answered 503 over the per-address cap since the worker started."""
        return self._refusals.count

    # ------------------------------------------------------------------ admission
    def accept(self, listener: Any) -> None:
        """Accept one connection: refuse it over the per-address cap, else wait for its head."""
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        ip = client[0] if isinstance(client, tuple) else str(client)
        if not self._slots.take(ip):
            self._refusals.refuse(sock, ip)
            sock.close()
            return
        self.nr_conns += 1
        conn = GuardedConnection(self.cfg, sock, client, listener.getsockname(), worker=self, ip=ip)
        if self.cfg.is_ssl:  # TLS bytes cannot be read ahead here: gthread's own path
            conn.data_ready = False
            self.enqueue_req(conn)
            return
        self._await_head(conn)

    def release(self, ip: str) -> None:
        """Give back one of ``ip``'s places (a connection closed)."""
        self._slots.give_back(ip)

    # ------------------------------------------------------------------ heads in the event loop
    def _await_head(self, conn: GuardedConnection) -> None:
        conn.sock.setblocking(False)
        conn.deadline = time.monotonic() + self.header_timeout_s
        self._heads[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _on_head_readable(self, conn: GuardedConnection, _sock: Any) -> None:
        try:
            data = conn.sock.recv(_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self._drop_head(conn)
            return
        conn.head += data
        if b"\r\n\r\n" not in conn.head and len(conn.head) < MAX_HEAD_BYTES:
            return
        self._heads.pop(conn, None)
        self.poller.unregister(conn.sock)
        conn.data_ready = True  # a thread never waits for a first byte
        self.enqueue_req(conn)

    def _drop_head(self, conn: GuardedConnection) -> None:
        self._heads.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        self.nr_conns -= 1
        conn.close()

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection sends its next request: gather that head in the event loop too."""
        if not isinstance(conn, GuardedConnection) or self.cfg.is_ssl:
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_head(conn)

    def murder_pending(self) -> None:
        """Close deferred connections past gunicorn's wait, and heads past ``header_timeout_s``."""
        super().murder_pending()
        now = time.monotonic()
        while self._heads:
            conn = next(iter(self._heads))
            if conn.deadline > now:
                break
            self.timed_out += 1
            logger.debug("closed %s: no complete request head in %.0f s", conn.ip, self.header_timeout_s)
            self._drop_head(conn)
