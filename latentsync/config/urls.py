"""Host names and web origins the ``server`` and ``api`` sections name (output URLs: :mod:`latentsync.output_urls`)."""

from __future__ import annotations

import ipaddress
import re

#: A host name or an IP literal (IPv6 with or without brackets): ``server.allowed_hosts``,
#: ``server.public_name``, ``stream.allowed_rtmp_hosts``.
HOST_RE = re.compile(r"[A-Za-z0-9.\-]+|\[?[0-9A-Fa-f:.]+\]?")
#: A web origin, ``scheme://host[:port]`` without a path: ``api.allowed_origins``.
ORIGIN_RE = re.compile(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``), including ``[::1]``.

    Args:
        host: A listen address or a URL's host part.
    """
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
