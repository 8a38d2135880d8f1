"""Which of a WHEP viewer's ICE candidates the server checks (``webrtc.allowed_candidate_networks``).

The filter of the offer's ``a=candidate`` lines, the guard on aioice's resolved addresses (mDNS),
and a real hub (no server): an offer naming only an outside address is refused with nothing left
behind, one with a loopback candidate too still gets an answer carrying all our candidates.
"""

from __future__ import annotations

import asyncio
import ipaddress

import aioice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from latentsync.config import ConfigError, WebRtcConfig, load_config
from latentsync.serving.egress.candidates import (
    LOOPBACK_NETWORKS,
    address_allowed,
    allowed_networks,
    filter_offer,
    guard_remote_candidates,
    interface_networks,
)
from latentsync.serving.egress.whep import WebRtcHub, WhepError, allow_loopback_candidates

OUTSIDE = "203.0.113.7"  # TEST-NET-3: never one of ours
NETS = allowed_networks(["local", "192.168.0.0/16", "fd00::/8", "fe80::/10"])


def _cand(host: str, port: int = 50000, n: int = 1) -> str:
    return f"a=candidate:{n} 1 udp 2130706431 {host} {port} typ host"


def _offer(video: list[str], application: list[str] = ()) -> str:
    lines = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "m=video 9 UDP/TLS/RTP/SAVPF 96", *video]
    if application:
        lines += ["m=application 9 UDP/DTLS/SCTP webrtc-datachannel", *application]
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize(
    ("host", "kept"),
    [
        ("127.0.0.1", True),  # loopback: always part of "local"
        ("127.8.9.10", True),
        ("::1", True),
        ("192.168.4.5", True),  # a listed network
        ("fd00::5", True),
        ("fe80::1%eth0", True),  # IPv6 with a zone
        (OUTSIDE, False),
        ("8.8.8.8", False),
        ("2001:db8::1", False),
        ("::ffff:203.0.113.7", False),  # IPv4-mapped: judged as the IPv4 address
        ("::ffff:127.0.0.1", True),
        ("attacker.example", False),  # a name that is not mDNS: aioice could not use it anyway
        ("0c8a3e62-5f7b-4d1e-9e0a-2f6b1c7d9a10.local", True),  # mDNS: checked once resolved
    ],
)
def test_filter_keeps_only_candidates_in_the_allowed_networks(host, kept):
    offer = filter_offer(_offer([_cand(host), "a=end-of-candidates"]), NETS, keep_mdns=True)
    assert (offer.kept, offer.outside, offer.malformed) == ((1, 0, 0) if kept else (0, 1, 0)), host
    assert (_cand(host) in offer.sdp) is kept
    assert "a=end-of-candidates" in offer.sdp and offer.sdp.startswith("v=0\r\n")


def test_filter_drops_malformed_lines_and_mdns_where_it_cannot_be_checked():
    good = _cand("127.0.0.1")
    malformed = [
        "a=candidate:",
        "a=candidate:garbage",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 99999 typ host",  # port out of range
        "a=candidate:1 x udp 2130706431 127.0.0.1 5000 typ host",  # component not a number
        "a=candidate:1 1 sctp 2130706431 127.0.0.1 5000 typ host",  # not udp/tcp
        "a=candidate:1 1 udp 2130706431 127.0.0.1 5000 host",  # no "typ"
    ]
    huge = "a=candidate:1 1 udp 2130706431 " + "9" * 5000 + " 5000 typ host"  # not an address: outside
    mdns = _cand("abc-def.local", n=2)
    offer = filter_offer(_offer([good, *malformed, huge, mdns], application=[mdns]), NETS, keep_mdns=True)
    # the mDNS name is kept in the video section, not in the data-channel one (its transport is not guarded)
    assert (offer.kept, offer.outside, offer.malformed) == (2, 2, len(malformed))
    assert offer.sdp.count("a=candidate:") == 2 and offer.sdp.index(mdns) < offer.sdp.index("m=application")
    # an aioice without the hook: mDNS names are dropped everywhere
    offer = filter_offer(_offer([good, mdns]), NETS, keep_mdns=False)
    assert (offer.kept, offer.outside) == (1, 1)


def test_local_is_loopback_and_our_interfaces():
    nets = allowed_networks(["local"])
    assert set(LOOPBACK_NETWORKS) <= set(nets)
    for network in interface_networks():  # every address of every interface is allowed
        assert network in nets and address_allowed(str(network.network_address), nets)
    assert not address_allowed(OUTSIDE, nets)
    assert allowed_networks(["10.1.2.3/8"]) == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError):
        allowed_networks(["nonsense"])


@pytest.mark.parametrize(
    "override",
    [
        "webrtc.allowed_candidate_networks=[]",
        "webrtc.allowed_candidate_networks=[nonsense]",
        "webrtc.allowed_candidate_networks=[local,10.0.0.0/33]",
    ],
)
def test_bad_allowed_networks_stop_the_server_naming_the_key(override):
    with pytest.raises(ConfigError, match=r"webrtc\.allowed_candidate_networks"):
        load_config(None, [override])
    assert load_config(None, ["webrtc.allowed_candidate_networks=[local,10.8.0.0/16,fd00::/8]"])


def test_guard_ignores_resolved_and_peer_reflexive_addresses_outside_the_networks():
    """An mDNS candidate once aioice resolved it (the address decides, not the name), and a check from outside."""
    drops = []
    connection = aioice.Connection(ice_controlling=False)
    guard_remote_candidates(connection, allowed_networks(["local"]), lambda: drops.append(1))

    def candidate(host: str) -> aioice.Candidate:
        return aioice.Candidate("1", 1, "udp", 2130706431, host, 50000, "host")

    connection._add_remote_candidate(candidate("abc-def.local"), OUTSIDE)
    assert connection.remote_candidates == [] and drops == [1]
    connection._add_remote_candidate(candidate("abc-deg.local"), "127.0.0.1")
    assert [c.host for c in connection.remote_candidates] == ["abc-deg.local"] and drops == [1]
    # an authenticated check from an outside source: no peer-reflexive candidate, no triggered check
    connection.check_incoming(None, (OUTSIDE, 9), None)  # refused before the message is read
    assert [c.host for c in connection.remote_candidates] == ["abc-deg.local"] and drops == [1, 1]


async def _client_offer() -> str:
    allow_loopback_candidates()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def _with_candidates(sdp: str, hosts: list[str]) -> str:
    """``sdp`` with its candidate lines replaced by one per host (in the first section)."""
    lines = [line for line in sdp.splitlines() if not line.startswith("a=candidate:")]
    at = next(i for i, line in enumerate(lines) if line.startswith("a=mid:")) + 1
    lines[at:at] = [_cand(host, 40000 + i, n=i) for i, host in enumerate(hosts)]
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture
def hub():
    hub = WebRtcHub(WebRtcConfig(), fps=25, sample_rate_hz=48000, frame_size=(96, 64))
    hub.start()
    try:
        yield hub
    finally:
        hub.close()


def test_hub_refuses_an_offer_left_without_candidates_and_keeps_nothing(hub):
    offer = asyncio.run(_client_offer())
    for bad in (
        _with_candidates(offer, [OUTSIDE]),
        _with_candidates(offer, [OUTSIDE, "2001:db8::7", "8.8.8.8"]),
        offer.replace("a=candidate:", "a=candidate:x "),  # every candidate line malformed: not a 500
        _with_candidates(offer, []),
    ):
        with pytest.raises(WhepError) as err:
            hub.answer(bad)
        assert err.value.code == "no_allowed_candidate", err.value
    stats = hub.stats()
    # no session: the peer connection that parsed the offer was closed before gathering or checking anything
    assert stats.viewers == stats.viewers_total == 0 and hub._answering == 0
    assert stats.dropped_candidates == 1 + 3 + offer.count("a=candidate:")


def test_hub_checks_only_the_allowed_candidates_and_offers_all_its_own(hub):
    offer = asyncio.run(_client_offer())
    mixed = _with_candidates(offer, [OUTSIDE, "127.0.0.1", "::ffff:198.51.100.1"])
    session_id, answer = hub.answer(mixed)
    viewer = hub._viewers[session_id]
    remote = {c.ip for t in viewer.pc.getTransceivers() for c in t.receiver.transport.transport.getRemoteCandidates()}
    assert remote == {"127.0.0.1"}  # the only address ICE may send checks to
    assert hub.stats().dropped_candidates == 2
    # an mDNS candidate that aioice resolved to an outside address is ignored by the guard on the hub's transports
    connection = viewer.pc.getTransceivers()[0].receiver.transport.transport._connection
    connection._add_remote_candidate(aioice.Candidate("9", 1, "udp", 1, "abc-def.local", 9, "host"), OUTSIDE)
    assert [c.host for c in connection.remote_candidates] == ["127.0.0.1"] and hub.stats().dropped_candidates == 3
    # our own candidates are not filtered: the host's addresses and 127.0.0.1 (webrtc.loopback_candidates)
    ours = [line.split()[4] for line in answer.splitlines() if line.startswith("a=candidate:")]
    assert set(ours) == set(aioice.ice.get_host_addresses(True, True)) and "127.0.0.1" in ours
    assert "a=end-of-candidates" in answer
    assert hub.end(session_id)
