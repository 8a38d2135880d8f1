"""Clients behind a reverse proxy: ``server.trusted_proxies`` and ``X-Forwarded-For`` (docs/security.md).

Every per-client limit (failed tokens, uploads and mutations per minute, uncached stills, long-lived
connections) keys on the client's address. Behind nginx every request comes from the proxy's
address, so all clients would share one bucket: one guesser locks everybody out, and one client's
uploads count against all. :class:`TrustedProxies` believes ``X-Forwarded-For`` only from peers in
``server.trusted_proxies``, walking the header from the right (the entry the nearest proxy
appended) past every trusted hop to the first address that is not a proxy of ours: a client
cannot forge its address by sending the header itself, since what it sent stays to the left of
what our proxy appended. :class:`ForwardedClientMiddleware` puts that address into the WSGI
environ's ``REMOTE_ADDR`` before the app sees the request (the TCP peer stays in
``latentsync.peer_addr``). Connections from a trusted proxy are exempt from
``server.max_connections_per_ip`` (the proxy carries many clients; ``server.max_connections``
still caps them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PEER_ADDR_KEY", "ForwardedClientMiddleware", "TrustedProxies", "parse_address"]

#: WSGI environ key holding the TCP peer's address once ``REMOTE_ADDR`` names the forwarded client.
PEER_ADDR_KEY = "latentsync.peer_addr"
#: Entries of ``X-Forwarded-For`` read at most (a longer header is cut: the rightmost ones count).
MAX_FORWARDED_HOPS = 32

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> _Address | None:
    """An IP address as a peer or an ``X-Forwarded-For`` entry writes it, or None.

    Accepts ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``, ``[2001:db8::1]:443`` and a
    zone-free IPv4-mapped IPv6 address (returned as IPv4).

    Args:
        text: The address text.

    Returns:
        The address, or None for anything else (``unknown``, obfuscated identifiers, garbage).
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The reverse proxies whose ``X-Forwarded-For`` this server believes (``server.trusted_proxies``).

    Args:
        networks: Addresses or CIDR networks (``10.0.0.5``, ``10.0.0.0/8``, ``::1``); host bits
            are ignored. Empty: no proxy is trusted and ``X-Forwarded-For`` is ignored.

    Raises:
        ValueError: If an entry is not an address or network (the config's validation says which).
    """

    def __init__(self, networks: Iterable[str]):
        self._networks = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str | _Address | None) -> bool:
        """Whether ``address`` (a peer's, as text or parsed) is one of the trusted proxies."""
        if not self._networks or address is None:
            return False
        parsed = parse_address(address) if isinstance(address, str) else address
        return parsed is not None and any(parsed in network for network in self._networks)

    def client_address(self, peer: str, forwarded_for: str | None) -> str:
        """The client's address: the TCP peer, or what trusted proxies say they received from.

        Args:
            peer: The TCP peer's address (``REMOTE_ADDR``).
            forwarded_for: The ``X-Forwarded-For`` header (comma-separated, the nearest hop last;
                several headers joined by commas), or None.

        Returns:
            ``peer`` unless it is a trusted proxy; else, walking ``forwarded_for`` from the right,
            the first address that is not a trusted proxy (the last trusted hop's address when an
            entry cannot be parsed or the list runs out). Always the text of a parsed address or
            ``peer`` itself.
        """
        current = parse_address(peer)
        if current is None or not forwarded_for or not self.trusts(current):
            return peer
        entries = forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]
        for entry in reversed(entries):
            hop = parse_address(entry)
            if hop is None:
                break
            current = hop
            if not self.trusts(current):
                break
        return str(current)


class ForwardedClientMiddleware:
    """WSGI middleware: ``REMOTE_ADDR`` becomes the client's address (:meth:`TrustedProxies.client_address`).

    Args:
        app: The WSGI application.
        proxies: The trusted proxies (none: the middleware passes requests through unchanged).
    """

    def __init__(self, app: Callable[..., Any], proxies: TrustedProxies):
        self.app = app
        self.proxies = proxies

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Rewrite ``REMOTE_ADDR`` (keeping the peer in :data:`PEER_ADDR_KEY`), then call the app."""
        peer = environ.get("REMOTE_ADDR") or ""
        environ[PEER_ADDR_KEY] = peer
        if self.proxies:
            environ["REMOTE_ADDR"] = self.proxies.client_address(peer, environ.get("HTTP_X_FORWARDED_FOR"))
        return self.app(environ, start_response)
