"""Which ICE candidates of a WHEP offer the server may check (``webrtc.allowed_candidate_networks``).

ICE sends STUN connectivity checks to every remote candidate, so an offer naming any address would
make the server send packets there (a reflection and scanning primitive). Two layers keep the
checks inside the allowed networks (docs/webrtc.md, docs/security.md):

* :func:`filter_offer` removes the offer's ``a=candidate`` lines outside them (and malformed ones)
  before aiortc parses the SDP; an offer left without any candidate is refused.
* :func:`guard_remote_candidates` wraps one aioice connection so that an address it is about to
  check is tested again: that is where an mDNS (``<uuid>.local``) candidate arrives, once aioice has
  resolved it on the local link, and where a check from an unknown address would make it a
  peer-reflexive candidate (and send it a triggered check).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aioice
import ifaddr
from aioice import mdns

from latentsync.config.webrtc import candidate_network

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Always part of ``"local"``.
LOOPBACK_NETWORKS: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
#: Where aioice adds a remote candidate with the address it will check (mDNS ones after resolving)
#: and where it takes an incoming check; without them (another aioice) mDNS candidates cannot be
#: checked and are dropped from offers.
MDNS_CHECKABLE = hasattr(aioice.Connection, "_add_remote_candidate") and hasattr(aioice.Connection, "check_incoming")
CANDIDATE_PREFIX = "a=candidate:"
MEDIA_KINDS = ("audio", "video")


def interface_networks() -> tuple[Network, ...]:
    """The networks of the server's own interfaces (each address with its prefix length), via ifaddr.

    Returns:
        One network per interface address, e.g. ``192.0.2.0/24``, ``fd00::/64``, ``fe80::/64``;
        empty when the interfaces cannot be read.
    """
    networks: list[Network] = []
    try:
        adapters = ifaddr.get_adapters()
    except OSError:
        logger.warning("webrtc: cannot list the network interfaces; only loopback counts as local")
        return ()
    for adapter in adapters:
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]  # IPv6: (address, flowinfo, scope_id)
            try:
                networks.append(ipaddress.ip_network(f"{address}/{ip.network_prefix}", strict=False))
            except ValueError:
                continue
    return tuple(networks)


def allowed_networks(entries: Sequence[str]) -> tuple[Network, ...]:
    """The networks ``webrtc.allowed_candidate_networks`` stands for now.

    Args:
        entries: The setting's entries: ``"local"`` (loopback and :func:`interface_networks`, read
            now) and/or CIDR networks.

    Returns:
        The networks, loopback first when ``"local"`` is among the entries.

    Raises:
        ValueError: On an entry that is neither (the configuration's validation refuses those first).
    """
    networks: list[Network] = []
    for entry in entries:
        network = candidate_network(entry)
        if network is None:
            networks += LOOPBACK_NETWORKS + interface_networks()
        else:
            networks.append(network)
    return tuple(networks)


def address_allowed(host: str, networks: Iterable[Network]) -> bool:
    """Whether an IP address (a candidate's, or an mDNS name's resolved one) is in one of ``networks``.

    Args:
        host: An IPv4 or IPv6 address (``fe80::1%eth0`` zones and ``::ffff:a.b.c.d`` mapped IPv4
            are understood); anything else (a name) is not allowed.
        networks: From :func:`allowed_networks`.

    Returns:
        True when the address is in one of them.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == n.version and address in n for n in networks)


@dataclass(frozen=True, kw_only=True)
class FilteredOffer:
    """An offer with its candidates sorted out (:func:`filter_offer`).

    Attributes:
        sdp: The offer without the dropped ``a=candidate`` lines (line ends CRLF).
        kept: Candidate lines left.
        outside: Candidates dropped because their address is outside the allowed networks (or an
            mDNS name where it cannot be checked).
        malformed: Candidate lines dropped because they cannot be parsed.
    """

    sdp: str
    kept: int
    outside: int
    malformed: int

    @property
    def dropped(self) -> int:
        """Candidate lines removed (``outside + malformed``)."""
        return self.outside + self.malformed


def _candidate_host(value: str) -> str | None:
    """The connection address of an ``a=candidate:`` value, or None when the line is malformed (RFC 8839)."""
    parts = value.split()
    if len(parts) < 8 or parts[6] != "typ" or parts[2].lower() not in ("udp", "tcp"):
        return None
    if not (parts[1].isdigit() and parts[3].isdigit() and parts[5].isdigit() and int(parts[5]) <= 65535):
        return None
    return parts[4]


def filter_offer(sdp: str, networks: Sequence[Network], keep_mdns: bool = MDNS_CHECKABLE) -> FilteredOffer:
    """Remove the offer's ICE candidates the server must not check, before aiortc parses the offer.

    A candidate is kept when its address is in ``networks``, or when it is an mDNS host name
    (``<name>.local``) in an audio or video section and ``keep_mdns`` is true: aioice resolves it
    by multicast on the server's own link and :func:`guard_remote_candidates` then checks the
    address. mDNS names elsewhere (a data-channel section, whose transport is not guarded; WHEP
    needs none) are dropped. Malformed candidate lines are dropped too (aiortc would fail on them).
    Each dropped line is logged at DEBUG only: the sender chooses how many there are.

    Args:
        sdp: The offer as received.
        networks: From :func:`allowed_networks`.
        keep_mdns: Whether mDNS candidates can be checked after resolution (:data:`MDNS_CHECKABLE`).

    Returns:
        The filtered offer and its counts; ``kept == 0`` means nothing the server may check is left.
    """
    lines: list[str] = []
    kind: str | None = None
    kept = outside = malformed = 0
    for line in sdp.splitlines():
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
        if not line.startswith(CANDIDATE_PREFIX):
            lines.append(line)
            continue
        host = _candidate_host(line[len(CANDIDATE_PREFIX) :])
        if host is None:
            malformed += 1
            logger.debug("webrtc: malformed ICE candidate dropped: %.200r", line)
            continue
        if mdns.is_mdns_hostname(host):
            allowed = keep_mdns and kind in MEDIA_KINDS
        else:
            allowed = address_allowed(host, networks)
        if not allowed:
            outside += 1
            logger.debug("webrtc: ICE candidate %.100r not in webrtc.allowed_candidate_networks: dropped", host)
            continue
        kept += 1
        lines.append(line)
    return FilteredOffer(sdp="\r\n".join(lines) + "\r\n", kept=kept, outside=outside, malformed=malformed)


def guard_remote_candidates(
    connection: aioice.Connection, networks: Sequence[Network], on_drop: Callable[[], None]
) -> None:
    """Make one aioice connection ignore remote addresses outside ``networks``.

    aioice adds every signalled remote candidate through ``Connection._add_remote_candidate(
    candidate, address)``, an mDNS one with the address it resolved to, and hands every
    authenticated incoming check to ``Connection.check_incoming(message, addr, protocol)``, which
    learns an unknown source as a peer-reflexive candidate and sends it a triggered check. Both are
    wrapped on this one connection (aioice has no public hook): a candidate refused by the first is
    never paired, so never checked; a check from outside gets its STUN response (sent before, to
    the request's source, as any UDP service answers) but no pair, no triggered check and no
    connection. Without those methods (another aioice) nothing is wrapped and :func:`filter_offer`
    drops mDNS candidates instead (:data:`MDNS_CHECKABLE`).

    Args:
        connection: The ICE connection of one of the viewer's transports (before the offer is applied).
        networks: From :func:`allowed_networks`.
        on_drop: Called (on the event loop) for each candidate or incoming check refused, to count it.
    """
    if not MDNS_CHECKABLE:
        return
    original = connection._add_remote_candidate

    def guarded(remote_candidate: aioice.Candidate, network_host: str) -> None:
        if not address_allowed(network_host, networks):
            logger.debug(
                "webrtc: ICE candidate %.100r (%.60s) not in webrtc.allowed_candidate_networks: ignored",
                remote_candidate.host,
                network_host,
            )
            on_drop()
            return
        original(remote_candidate, network_host)

    original_incoming = connection.check_incoming

    def guarded_incoming(message: Any, addr: tuple[str, int], protocol: Any) -> None:
        if not address_allowed(addr[0], networks):
            logger.debug("webrtc: ICE check from %.60s not in webrtc.allowed_candidate_networks: ignored", addr[0])
            on_drop()
            return
        original_incoming(message, addr, protocol)

    connection._add_remote_candidate = guarded  # type: ignore[method-assign]  # aioice has no hook for this
    connection.check_incoming = guarded_incoming  # type: ignore[method-assign]
