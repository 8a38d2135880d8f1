"""Who may talk to the API, how often, and for how long (docs/security.md).

- :func:`origin_allowed`: state-changing requests from browser pages of other origins (CSRF);
- :func:`host_allowed`: the ``Host`` header against ``server.allowed_hosts`` (DNS rebinding);
- :class:`RateLimiter`: a sliding one-minute window per client address (uploads, every
  state-changing request, failed authentications);
- :class:`TicketBook`: single-use WebSocket tickets, so a browser never puts the token in a URL.

How many connections that hold a thread (event streams, WebSockets) may be open at once is
:mod:`latentsync.serving.api.admission`'s.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import secrets
import threading
import time
from urllib.parse import urlsplit

from latentsync.config import AppConfig, is_loopback_host

#: Seconds a WebSocket ticket (``POST /ws/tickets``) stays valid.
TICKET_TTL_S = 30.0
#: Tickets outstanding at once (older ones are forgotten first).
MAX_TICKETS = 256
#: Host names always accepted in the ``Host`` header (the server on this machine).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def origin_allowed(origin: str | None, host: str, scheme: str, allowed: frozenset[str]) -> bool:
    """Whether a state-changing request with this ``Origin`` header may proceed.

    Allowed: no ``Origin`` (not a browser page: curl, scripts, server-to-server), an origin in
    ``allowed`` (``api.allowed_origins``), or a same-origin page (``Origin`` equals
    ``scheme://Host``) whose host is loopback (``127.0.0.1``, ``[::1]``, ``localhost``). A
    same-origin page under any other name is only trusted when listed: a DNS-rebinding page
    (``http://evil.example:11001`` resolving to 127.0.0.1) is same-origin by its own account.

    Args:
        origin: The request's ``Origin`` header (None when absent).
        host: The request's ``Host`` header (``host[:port]``).
        scheme: ``http`` or ``https`` as the request arrived.
        allowed: Origins from ``api.allowed_origins``, lower-case, without a trailing slash.
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed:
        return True
    if origin != f"{scheme}://{host}".lower():
        return False
    return is_loopback_host(urlsplit(origin).hostname or "")


def allowed_hosts(config: AppConfig) -> frozenset[str]:
    """Host names the API answers to (``server.allowed_hosts``).

    Null: the loopback names, ``server.public_name``, ``server.host`` unless it is a wildcard
    (``0.0.0.0``, ``::``), and the hosts of ``api.allowed_origins``.
    """
    server = config.server
    if server.allowed_hosts is not None:
        return frozenset(h.strip("[]").lower() for h in server.allowed_hosts)
    names = set(LOOPBACK_NAMES)
    if server.public_name:
        names.add(server.public_name.lower())
    if server.host not in ("0.0.0.0", "::", ""):
        names.add(server.host.strip("[]").lower())
    names.update((urlsplit(o).hostname or "").lower() for o in config.api.allowed_origins)
    return frozenset(n for n in names if n)


def host_allowed(host_header: str | None, allowed: frozenset[str], any_ip: bool = True) -> bool:
    """Whether a request's ``Host`` header (``name[:port]``, ``[v6]:port``) names one of ``allowed``.

    A page served by a DNS-rebinding attacker (``evil.example`` resolving to this server) sends
    ``Host: evil.example``: refused, so it cannot read even the routes that need no token. An IP
    address is no name an attacker can rebind, so with ``any_ip`` (``server.allowed_hosts`` null)
    a client reaching the server by its address is answered.
    """
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in allowed:
        return True
    if not any_ip:
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RateLimiter:
    """Sliding one-minute window of counted events per client address (bounded memory).

    Args:
        per_minute: Events allowed per address per 60 s (0: unlimited).
        max_clients: Addresses tracked at once; the least recently seen are forgotten first.
    """

    def __init__(self, per_minute: int, max_clients: int = 4096):
        self._per_minute = per_minute
        self._max_clients = max_clients
        self._lock = threading.Lock()
        self._seen: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def allow(self, client: str) -> bool:
        """Count one event from ``client``; False (not counted) when it is over its limit."""
        if self._per_minute <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            stamps = self._seen.pop(client, None) or collections.deque()
            self._seen[client] = stamps
            while stamps and now - stamps[0] > 60.0:
                stamps.popleft()
            if len(self._seen) > self._max_clients:
                self._seen.popitem(last=False)
            if len(stamps) >= self._per_minute:
                return False
            stamps.append(now)
            return True

    def over(self, client: str) -> bool:
        """True while ``client`` has used up its minute (nothing is counted)."""
        if self._per_minute <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            stamps = self._seen.get(client)
            return stamps is not None and len([t for t in stamps if now - t <= 60.0]) >= self._per_minute


class TicketBook:
    """Single-use, short-lived tickets that stand for the API token in a WebSocket handshake.

    A browser's WebSocket cannot send an ``Authorization`` header; rather than the token in the
    URL (where access logs and proxies keep it), the page asks ``POST /ws/tickets`` (with the
    token) for a ticket and connects with ``?ticket=``. A ticket opens one connection, within
    :data:`TICKET_TTL_S`.
    """

    def __init__(self, ttl_s: float = TICKET_TTL_S, max_tickets: int = MAX_TICKETS):
        self._ttl_s = ttl_s
        self._max = max_tickets
        self._lock = threading.Lock()
        self._tickets: collections.OrderedDict[str, float] = collections.OrderedDict()

    def issue(self) -> str:
        """A new ticket (32 hex digits of ``secrets``)."""
        ticket = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            self._tickets[ticket] = now + self._ttl_s
            while len(self._tickets) > self._max:
                self._tickets.popitem(last=False)
        return ticket

    def redeem(self, ticket: str) -> bool:
        """True once for a ticket issued less than ``ttl_s`` ago (it is then spent); any other text is False."""
        now = time.monotonic()
        with self._lock:
            for known in list(self._tickets):
                if self._tickets[known] < now:
                    del self._tickets[known]
            given = ticket.encode("utf-8", "replace")  # compare_digest takes str of ASCII only: bytes
            match = next((t for t in self._tickets if hmac.compare_digest(t.encode(), given)), None)
            if match is None:
                return False
            del self._tickets[match]
            return True
