"""The ``server`` section: the HTTP API's listener and the native threads of the server process."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class ServerConfig:
    """HTTP API listener.

    A ``host`` that is not loopback (``0.0.0.0``, a LAN address, a name other than ``localhost``)
    needs ``api.token``, or ``allow_public_without_token: true`` to say the exposure is meant
    (e.g. behind an authenticating reverse proxy); otherwise the server refuses to start.
    ``allowed_hosts``: names the ``Host`` header may carry (any other gets 421 ``bad_host``, so a
    DNS-rebinding page cannot read the API); null: the loopback names, ``public_name``, ``host``
    (unless a wildcard) and the hosts of ``api.allowed_origins``. ``public_name``: the name
    clients reach the server by (``avatars.example.com``), or null.
    ``native_threads``: threads the native pools of the server process (OpenCV, BLAS) may use
    (latentsync.serving.ops.threads.limit_native_threads; engine workers always use 1). 1: every
    channel already works on threads of its own, and the pools' spinning threads cost more CPU
    than they save (docs/performance.md); 0: the libraries' defaults (one per core).
    ``header_timeout_s``: seconds a connection may take to send each piece of its request line and
    headers, and may stay idle between keep-alive requests; past it the server closes it (a
    slow-loris client holding connections open). ``body_timeout_s``: seconds a request body upload
    or a response may stall without a byte moving before the connection is closed; long-lived
    streams (``GET /events``, WebSockets) set their own deadlines once their request is in.
    ``max_connections_per_ip``: open connections one client address may hold; ``max_connections``:
    open connections in all. Past either, a new connection gets a bare 503 and is closed before a
    thread is spent on it (latentsync.serving.api.http_server; docs/security.md).
    ``trusted_proxies``: addresses or CIDR networks of reverse proxies in front of the server
    (``["127.0.0.1", "10.0.0.0/8"]``); from them ``X-Forwarded-For`` names the client, so every
    per-client limit keys on the real client, and their connections are exempt from
    ``max_connections_per_ip``. Empty (default): the header is ignored (latentsync.serving.api.proxies).
    """

    host: str = "127.0.0.1"
    port: int = 11001
    allow_public_without_token: bool = False
    allowed_hosts: list[str] | None = None
    public_name: str | None = None
    native_threads: int = 1
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections_per_ip: int = 64
    max_connections: int = 512
    trusted_proxies: list[str] = field(default_factory=list)
