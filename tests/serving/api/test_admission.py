"""Unit tests of the admission of long-lived connections (latentsync/serving/api/admission.py)."""

from __future__ import annotations

import threading

import pytest

from latentsync.config import load_config
from latentsync.serving.api.admission import (
    EXTENSION,
    Admission,
    AdmissionRefused,
    ConnectionKind,
    KindRule,
    Limit,
    rules_from_config,
)
from latentsync.serving.api.errors import HTTP_STATUS

SPEECH, FRAMES, EVENTS = ConnectionKind.speech, ConnectionKind.frames, ConnectionKind.events


def admission(max_long_lived: int = 8, speech: int = 2, frames: int = 2, events: int = 2) -> Admission:
    config = load_config(
        None,
        [
            f"api.max_long_lived={max_long_lived}",
            f"speech_stream.max_open={speech}",
            f"frames.max_clients={frames}",
            f"ui.max_event_clients={events}",
        ],
    )
    return Admission.from_config(config)


def refused(adm: Admission, kind: ConnectionKind, channel: str) -> AdmissionRefused:
    with pytest.raises(AdmissionRefused) as info:
        adm.admit(kind, channel)
    return info.value


def test_per_channel_limits_count_each_channel_apart():
    adm = admission(frames=2, events=1)
    held = [adm.admit(FRAMES, "main"), adm.admit(FRAMES, "main")]
    err = refused(adm, FRAMES, "main")
    assert (err.code, err.limit.key) == ("too_many_clients", "frames.max_clients")
    assert err.message == "2 frames clients already on 'main' (frames.max_clients)"
    held.append(adm.admit(FRAMES, "hall"))  # another channel has its own places
    held.append(adm.admit(EVENTS, "main"))  # and another kind
    err = refused(adm, EVENTS, "main")
    assert (err.code, err.kind, err.channel) == ("too_many_event_clients", EVENTS, "main")
    assert adm.open() == 4 and adm.open(FRAMES) == 3 and adm.open(FRAMES, "main") == 2
    held[0].release()
    adm.admit(FRAMES, "main").release()  # its place is free again
    for slot in held:
        slot.release()
    assert adm.open() == 0 and adm._by_channel == {}  # no entry is kept for a channel


def test_server_wide_limits_count_every_channel_together():
    adm = admission(max_long_lived=4, speech=2)
    speech = [adm.admit(SPEECH, "main"), adm.admit(SPEECH, "hall")]
    err = refused(adm, SPEECH, "other")  # speech_stream.max_open counts every channel
    assert (err.code, err.limit.key) == ("too_many_connections", "speech_stream.max_open")
    assert err.message == "2 speech WebSockets already open (speech_stream.max_open)"
    others = [adm.admit(FRAMES, "main"), adm.admit(EVENTS, "hall")]
    for kind in ConnectionKind:  # api.max_long_lived: every kind and channel together
        err = refused(adm, kind, "third")
        assert err.code == "too_many_connections"
    err = refused(adm, FRAMES, "third")
    assert err.limit.key == "api.max_long_lived"
    assert err.message == "4 long-lived connections (event streams, WebSockets) already open (api.max_long_lived)"
    for slot in speech + others:
        slot.release()
    assert adm.open() == 0


def test_the_kinds_own_limit_is_named_before_the_shared_one():
    adm = admission(max_long_lived=2, frames=2)
    held = [adm.admit(FRAMES, "main"), adm.admit(FRAMES, "main")]
    assert refused(adm, FRAMES, "main").code == "too_many_clients"  # both are full: the specific one
    assert refused(adm, FRAMES, "hall").code == "too_many_connections"
    for slot in held:
        slot.release()


def test_a_slot_is_released_once_whatever_happens():
    adm = admission(max_long_lived=2, frames=1)
    with pytest.raises(RuntimeError):
        with adm.admit(FRAMES, "main"):
            assert adm.open() == 1
            raise RuntimeError("the connection failed")
    assert adm.open() == 0
    slot = adm.admit(FRAMES, "main")
    slot.release()
    slot.release()  # twice: nothing more is given back
    assert adm.open() == 0
    with adm.admit(EVENTS, "main"):
        assert adm.open() == 1
    assert adm.open() == 0


def test_leaving_the_kind_frees_its_place_but_not_the_thread():
    adm = admission(max_long_lived=2, frames=1)
    slot = adm.admit(FRAMES, "main")
    slot.leave_kind()
    slot.leave_kind()
    assert adm.open(FRAMES, "main") == 0 and adm.open() == 1  # the thread still works
    again = adm.admit(FRAMES, "main")  # a client told "closed" reconnects at once
    assert refused(adm, EVENTS, "main").code == "too_many_connections"
    slot.release()
    again.release()
    assert adm.open() == 0 and adm.open(FRAMES) == 0


def test_concurrent_admissions_never_pass_a_limit():
    adm = admission(max_long_lived=64, speech=5)
    admitted: list = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def connect() -> None:
        start.wait()
        for _ in range(50):
            try:
                slot = adm.admit(SPEECH, "main")
            except AdmissionRefused:
                continue
            with lock:
                admitted.append(adm.open(SPEECH))
            slot.release()

    threads = [threading.Thread(target=connect) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admitted and max(admitted) <= 5 and adm.open() == 0


def test_every_refusal_code_has_one_http_status():
    codes = {rule.code for rule in rules_from_config(load_config(None, [])).values()} | {"too_many_connections"}
    assert {code: HTTP_STATUS.get(code) for code in codes} == {
        "too_many_connections": 503,
        "too_many_clients": 429,
        "too_many_event_clients": 503,
    }
    bare = Admission(max_long_lived=1, rules={})  # a kind without a rule: the shared limit only
    held = bare.admit(EVENTS, "main")
    assert refused(bare, EVENTS, "main").code == "too_many_connections"
    held.release()
    rule = KindRule(noun="x", code="too_many_clients", per_channel=Limit(1, "x.max"))
    assert Admission(max_long_lived=4, rules={FRAMES: rule}).admit(FRAMES, "a").kind == FRAMES


def test_the_app_answers_a_refusal_with_the_one_body_and_releases_request_slots():
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    runtime = Runtime(load_config(None, ["ui.max_event_clients=1", "speech_stream.max_open=1"]))
    app = create_app(runtime)
    adm = app.extensions[EXTENSION]
    client = app.test_client()
    first = client.get("/events", buffered=False)
    assert first.status_code == 200 and adm.open(EVENTS, "main") == 1
    second = client.get("/events")
    assert second.status_code == 503
    assert second.json == {
        "error": {
            "code": "too_many_event_clients",
            "message": "1 event streams already on 'main' (ui.max_event_clients)",
        }
    }
    first.close()  # the client went away: its slot is free
    assert adm.open() == 0
    # a WebSocket's slot is taken before the handshake and released when the request is torn down,
    # here a plain GET that the WebSocket route then refuses
    assert client.get("/ws/speech").status_code == 400 and adm.open() == 0
    held = adm.admit(SPEECH, "hall")
    refusal = client.get("/ws/speech")
    assert refusal.status_code == 503
    assert refusal.json == {
        "error": {
            "code": "too_many_connections",
            "message": "1 speech WebSockets already open (speech_stream.max_open)",
        }
    }
    held.release()
    assert adm.open() == 0
    missing = client.get("/channels/nope/ws/speech")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "no_channel"
    runtime.events.close()
