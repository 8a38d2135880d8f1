"""The HTTP listener ``infer_serv.py`` runs: werkzeug's threaded server with deadlines and connection caps.

werkzeug's ``ThreadedWSGIServer`` spends a thread on every accepted connection and never times a
socket out, so a client that opens a few hundred connections and sends nothing (or half a header)
holds as many threads forever and takes the API down, ``/health`` included (issue 35). Here:

- **header deadline**: while a connection sends its request line and headers, and while it idles
  between keep-alive requests, each read may wait at most ``server.header_timeout_s``; past it the
  connection is closed;
- **body deadline**: once the headers are in, reads (an upload's body) and writes wait at most
  ``server.body_timeout_s`` for a byte to move. Long-lived streams set their own deadline on the
  socket once their request is in (``GET /events`` and WebSockets: ``api.send_timeout_s``, and a
  WebSocket reader waits in ``select()`` with its own idle rules), which replaces this one;
- **connection caps**: at most ``server.max_connections_per_ip`` open connections per client
  address (a reverse proxy in ``server.trusted_proxies`` is exempt) and ``server.max_connections``
  in all. A connection past either is answered a bare ``503`` (without reading its request) and
  closed in the accepting thread, before a thread is spent on it.

The deadlines are per read: a client trickling one header byte every few seconds keeps its
connection, but only up to its address's cap (docs/security.md: a reverse proxy's total header
deadline is the complete answer).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from typing import Any

from werkzeug.serving import ThreadedWSGIServer

from latentsync.config.server import ServerConfig
from latentsync.serving.api.proxies import TrustedProxies
from latentsync.serving.ops.logs import QueryRedactingRequestHandler

logger = logging.getLogger(__name__)

#: What a refused connection gets: sent without reading the request, then the socket is closed.
_REFUSAL_BODY = b'{"error": {"code": "too_many_connections", "message": "retry later"}}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)
#: Seconds between two warnings about refused connections (an attack must not flood the log).
REFUSAL_LOG_INTERVAL_S = 10.0


class AddressSlots:
    """Open connections per client address, at most ``max_per_ip`` each (thread-safe).

    Shared by both listeners: :class:`GuardedWSGIServer` (``infer_serv.py``) and gunicorn's
    :class:`~latentsync.serving.api.gunicorn_worker.GuardedThreadWorker`.

    Args:
        max_per_ip: ``server.max_connections_per_ip``.
        trusted_proxies: Addresses exempt from the cap (``server.trusted_proxies``: a proxy carries
            many clients); their connections are still counted.
    """

    def __init__(self, max_per_ip: int, trusted_proxies: TrustedProxies | None = None):
        self.max_per_ip = max_per_ip
        self.trusted_proxies = trusted_proxies or TrustedProxies([])
        self._lock = threading.Lock()
        self._per_ip: Counter[str] = Counter()

    def take(self, ip: str) -> bool:
        """Take a place for a new connection from ``ip``; False when its address is at the cap."""
        with self._lock:
            if self._per_ip[ip] >= self.max_per_ip and not self.trusted_proxies.trusts(ip):
                return False
            self._per_ip[ip] += 1
            return True

    def give_back(self, ip: str) -> None:
        """Give back a place of ``ip`` (one of its connections closed)."""
        with self._lock:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]


class Refusals:
    """Answers connections over a cap with :data:`REFUSAL`, counts them, and logs at most one line per interval.

    Args:
        limits: How the log line names the caps (``"64 per address, 512 in all"``).
        interval_s: Seconds between two log lines (:data:`REFUSAL_LOG_INTERVAL_S`; an attack must
            not flood the log).

    Attributes:
        count: Connections refused so far.
    """

    def __init__(self, limits: str, interval_s: float = REFUSAL_LOG_INTERVAL_S):
        self._limits = limits
        self._interval_s = interval_s
        self._logged_at = 0.0
        self._since_log = 0
        self.count = 0

    def refuse(self, sock: socket.socket, ip: str) -> None:
        """Send :data:`REFUSAL` without waiting (the caller closes ``sock``) and count it; never raises."""
        self.count += 1
        try:
            sock.setblocking(False)  # never wait in the accepting thread or the event loop
            sock.send(REFUSAL)
        except OSError:
            pass
        now = time.monotonic()
        self._since_log += 1
        if now - self._logged_at >= self._interval_s:
            logger.warning(
                "refused %d connection(s) over the caps (last from %s; %s)", self._since_log, ip, self._limits
            )
            self._logged_at = now
            self._since_log = 0


def is_stream_request(upgrade: str | None, accept: str | None) -> bool:
    """Whether a request opens a long-lived stream: a WebSocket (``Upgrade``) or server-sent events (``Accept``).

    A stream lasts as long as its client wants; :meth:`GuardedWSGIServer.drain` does not wait for it.
    """
    return bool(upgrade) or "text/event-stream" in (accept or "")


class DeadlineRequestHandler(QueryRedactingRequestHandler):
    """Request handler whose socket reads and writes have deadlines (see the module docstring).

    The deadlines come from the server (:class:`GuardedWSGIServer`): ``header_timeout_s`` until a
    request's headers are parsed, ``body_timeout_s`` from then until the response is sent.
    """

    server: GuardedWSGIServer

    _answering = False

    def handle_one_request(self) -> None:
        """Read one request under the header deadline (it also bounds the idle time before it) and answer it.

        From its parsed headers to its last byte written, a request that is not a stream counts as in
        flight (:meth:`GuardedWSGIServer.drain`).
        """
        self.connection.settimeout(self.server.header_timeout_s)
        try:
            super().handle_one_request()
        finally:
            if self._answering:
                self._answering = False
                self.server.request_ended()

    def parse_request(self) -> bool:
        """Parse the request line and headers, then switch the socket to the body deadline."""
        ok = super().parse_request()
        if ok:
            self.connection.settimeout(self.server.body_timeout_s)
            if not is_stream_request(self.headers.get("Upgrade"), self.headers.get("Accept")):
                self._answering = True
                self.server.request_started()
        return ok

    def connection_dropped(self, error: BaseException, environ: Any = None) -> None:
        """A deadline passed or the client went away mid-request: never read this socket again."""
        self.close_connection = True

    def log_error(self, format: str, *args: Any) -> None:
        """Log a header deadline that passed at debug level (an attack would flood the log); others as usual."""
        if format.startswith("Request timed out"):
            logger.debug("closed %s: request timed out", self.address_string())
            return
        super().log_error(format, *args)


class GuardedWSGIServer(ThreadedWSGIServer):
    """werkzeug's threaded WSGI server with connection caps and socket deadlines.

    Args:
        host: Listen address.
        port: Listen port.
        app: The WSGI application.
        header_timeout_s: Seconds each read of a request line or header, or an idle keep-alive
            connection, may wait (``server.header_timeout_s``).
        body_timeout_s: Seconds each read or write after the headers may wait for a byte
            (``server.body_timeout_s``).
        max_connections_per_ip: Open connections one client address may hold.
        max_connections: Open connections in all.
        trusted_proxies: Reverse proxies (``server.trusted_proxies``): their connections are exempt
            from ``max_connections_per_ip`` (they carry many clients), not from ``max_connections``.
        handler: The request handler class (a :class:`DeadlineRequestHandler`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        app: Any,
        *,
        header_timeout_s: float,
        body_timeout_s: float,
        max_connections_per_ip: int,
        max_connections: int,
        trusted_proxies: TrustedProxies | None = None,
        handler: type[DeadlineRequestHandler] = DeadlineRequestHandler,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections_per_ip = max_connections_per_ip
        self.max_connections = max_connections
        self._slots = AddressSlots(max_connections_per_ip, trusted_proxies)
        self._refusals = Refusals(f"{max_connections_per_ip} per address, {max_connections} in all")
        self._lock = threading.Lock()
        self._open: dict[Any, str] = {}  # socket -> its client address
        self._answering = 0  # requests between their parsed headers and their last byte written
        self._all_answered = threading.Condition(self._lock)
        super().__init__(host, port, app, handler)

    @property
    def refused(self) -> int:
        """Connections answered 503 over the caps so far."""
        return self._refusals.count

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        with self._lock:
            return len(self._open)

    def request_started(self) -> None:
        """A request's headers are parsed (its handler thread): it is in flight until :meth:`request_ended`."""
        with self._lock:
            self._answering += 1

    def request_ended(self) -> None:
        """A request counted by :meth:`request_started` is answered, or its connection was lost."""
        with self._lock:
            self._answering -= 1
            if self._answering == 0:
                self._all_answered.notify_all()

    def drain(self, timeout_s: float) -> int:
        """Wait for the requests in flight to be answered, after :meth:`shutdown` stopped accepting new ones.

        The handler threads are daemons: a process that exits while one writes cuts its client off
        after the headers (``IncompleteRead``), and a ``PUT`` applied is never confirmed. WebSockets and
        server-sent events are not waited for (:func:`is_stream_request`).

        Args:
            timeout_s: Seconds to wait at most.

        Returns:
            The requests still in flight when it returned (0: all answered).
        """
        with self._lock:
            self._all_answered.wait_for(lambda: self._answering == 0, timeout_s)
            return self._answering

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a new connection if its address and the server are under their caps (accepting thread).

        A refused one is answered :data:`REFUSAL` without its request being read; socketserver
        then closes it (``shutdown_request``) without starting a thread.
        """
        ip = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        with self._lock:
            if len(self._open) < self.max_connections and self._slots.take(ip):
                self._open[request] = ip
                return True
        self._refusals.refuse(request, ip)
        return False

    def shutdown_request(self, request: Any) -> None:
        """Close a connection and give its place back to its address's count."""
        with self._lock:
            ip = self._open.pop(request, None)
        if ip is not None:
            self._slots.give_back(ip)
        super().shutdown_request(request)


def make_guarded_server(host: str, port: int, app: Any, server_config: ServerConfig) -> GuardedWSGIServer:
    """The listener for ``infer_serv.py`` from the ``server`` config section.

    Args:
        host: Listen address.
        port: Listen port.
        app: The WSGI application.
        server_config: The ``server`` section (its timeouts and caps).

    Returns:
        The server, bound and listening; run it with ``serve_forever()``.
    """
    return GuardedWSGIServer(
        host,
        port,
        app,
        header_timeout_s=server_config.header_timeout_s,
        body_timeout_s=server_config.body_timeout_s,
        max_connections_per_ip=server_config.max_connections_per_ip,
        max_connections=server_config.max_connections,
        trusted_proxies=TrustedProxies(server_config.trusted_proxies),
    )
