"""WebRTC egress units: a stalled viewer's bounded queue, the never-blocking tap, the event broadcaster."""

from __future__ import annotations

import asyncio
import fractions
import types

import numpy as np
import pytest

from latentsync.config import VideoCodec, WebRtcConfig
from latentsync.serving.egress.whep import INBOX_TICKS, WebRtcHub, _Viewer, preview_size
from latentsync.serving.playout.tap import TappedSink
from latentsync.serving.telemetry.events import EventBroadcaster


def _frames(n: int, h: int = 64, w: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_preview_size_keeps_aspect_and_even_sizes():
    assert preview_size(832, 1248, 720) == (480, 720)
    assert preview_size(256, 456, 720) == (256, 456)
    assert preview_size(1920, 1080, 720) == (1280, 720)


@pytest.mark.parametrize("codec", list(VideoCodec))
def test_stalled_viewer_drops_its_backlog_and_resumes_at_a_keyframe(codec):
    hub = WebRtcHub(WebRtcConfig(video_codec=codec), fps=25, sample_rate_hz=48000, frame_size=(96, 64))
    hub._last_forced_key = -1.0  # the forced-keyframe spacing is measured on the monotonic clock

    async def run():
        loop = asyncio.get_running_loop()
        viewer = _Viewer(hub, "v", max_video=5, max_audio=10)
        viewer.started = True
        encoder, opus = hub._new_encoder(), hub._new_audio_encoder()
        hub.request_keyframe()
        wants = []
        for i, frame in enumerate(_frames(30)):  # the same steps as the encoder thread; nobody reads
            packets = hub._encode_video(encoder, i, frame)
            wants.append(viewer.push(packets, hub._encode_audio(opus, np.zeros(1920, np.int16)), loop))
            if wants[-1]:
                hub.request_keyframe()
                hub._last_forced_key = -1.0
            assert len(viewer.video) <= 5 and len(viewer.audio) <= 10  # bounded, whatever the stall
            assert not viewer.video or viewer.video[0].is_keyframe  # what it has queued starts at a keyframe
        await viewer.pc.close()
        return viewer, wants

    viewer, wants = asyncio.run(run())
    assert viewer.dropped_packets > 0  # the backlog was dropped, not grown
    assert any(wants)  # and a keyframe was asked for to resume
    assert wants.count(True) >= 3  # it dropped and resumed again and again


def test_tap_never_blocks_and_counts_what_it_could_not_take():
    hub = WebRtcHub(WebRtcConfig(), fps=25, sample_rate_hz=48000, frame_size=(96, 64))
    hub._viewers["x"] = types.SimpleNamespace(dropped_packets=0)  # a viewer; no encoder thread drains
    frame = _frames(1)[0]
    for i in range(INBOX_TICKS + 6):
        hub.on_tick(i, frame, np.zeros(1920, np.int16))
    assert hub.stats().inbox_dropped_ticks == 6


class _Sink:
    def __init__(self, accept: list[bool]):
        self.accept = accept

    def offer(self, video, audio) -> bool:
        return self.accept.pop(0)


def test_tapped_sink_shows_every_tick_whatever_the_encoders_say_and_survives_a_failing_observer():
    seen = []

    def broken(*_):
        raise RuntimeError("boom")

    sink = TappedSink(_Sink([True, False, True, True]), [broken, lambda i, v, a: seen.append(i)])
    results = [sink.offer(np.zeros((2, 2, 3), np.uint8), np.zeros(4, np.int16)) for _ in range(4)]
    assert results == [True, False, True, True]  # the encoders' answer, for the clock's dropped count
    assert seen == [0, 1, 2, 3]  # the programme: a tick the encoders refused is still shown


def test_event_broadcaster_is_bounded():
    events = EventBroadcaster(max_clients=2)
    a, b = events.subscribe(), events.subscribe()
    assert events.subscribe() is None  # the (max + 1)th client is refused
    events.publish("state", {"state": "speaking"})
    assert b"speaking" in a.get(0.1) and b"speaking" in b.get(0.1)
    for i in range(300):  # a client that never reads loses events instead of growing a queue
        events.publish("task", {"i": i}, key=f"task:{i}")
    assert a.queue.qsize() <= 256 and a.lost > 0
    a.close()
    c = events.subscribe()
    assert c is not None and b"speaking" in c.get(0.1)  # a new client first gets the latest state
    events.close()
    assert events.subscribe() is None


def test_whep_routes_token_cors_and_page_without_a_running_stream():
    from latentsync.config import load_config
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    token = "t" * 20
    app = create_app(Runtime(load_config(None, [f"api.token={token}"])))  # built, never started
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    # the API token applies to WHEP and the event feed
    r = client.post("/whep", data="v=0\r\n", content_type="application/sdp")
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    assert client.get("/events").status_code == 401
    # pre-flights carry no credentials: answered before the token check
    r = client.options("/whep", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204 and "Authorization" in r.headers["Access-Control-Allow-Headers"]
    # the page and its files are public (no secret in them); nothing else became public
    assert client.get("/").status_code == 200 and b"/ui/app.js" in client.get("/").data
    assert client.get("/ui/app.js").status_code == 200
    assert client.get("/tasks").status_code == 401
    # with the token, WHEP answers a JSON 503 while the stream is not up
    r = client.post("/whep", data="v=0\r\n", content_type="application/sdp", headers=auth)
    assert r.status_code == 503 and r.json["error"]["code"] == "webrtc_off"
    r = client.patch("/whep/x", headers=auth)
    assert r.status_code == 405 and r.json["error"]["code"] == "no_trickle"


def test_event_stream_is_bounded_with_a_json_503():
    from latentsync.config import load_config
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    runtime = Runtime(load_config(None, ["ui.max_event_clients=1"]))
    client = create_app(runtime).test_client()
    first = client.get("/events", buffered=False)
    assert first.status_code == 200 and first.mimetype == "text/event-stream"
    assert next(first.response) == b"retry: 2000\n\n"
    runtime.events.publish("state", {"state": "speaking"})
    assert b"event: state" in next(first.response)
    second = client.get("/events")
    assert second.status_code == 503 and second.json["error"]["code"] == "too_many_event_clients"
    first.close()  # the client goes away: its slot frees
    assert runtime.events.clients == 0
    third = client.get("/events", buffered=False)
    assert third.status_code == 200
    runtime.events.close()  # shutdown ends open streams (list() would block forever otherwise)
    assert list(third.response)[-1:] != [] and runtime.events.clients == 0


@pytest.mark.parametrize(
    "override",
    [
        "webrtc.max_viewers=0",
        "webrtc.max_height=721",
        "webrtc.video_codec=av1",
        "ui.max_event_clients=0",
        "webrtc.keyframe_interval_s=0",
    ],
)
def test_bad_webrtc_settings_stop_the_server_naming_the_key(override):
    from latentsync.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("rate", [48000, 44100])
def test_audio_is_encoded_once_into_20ms_opus_packets(rate):
    hub = WebRtcHub(WebRtcConfig(), fps=25, sample_rate_hz=rate, frame_size=(96, 64))
    opus = hub._new_audio_encoder()
    t = np.arange(rate * 2) / rate
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    per_tick = rate // 25
    packets = [p for k in range(50) for p in hub._encode_audio(opus, tone[k * per_tick : (k + 1) * per_tick])]
    pts = np.array([p.pts for p in packets])
    assert set(np.diff(pts)) == {960} and pts[0] == 0  # 20 ms apart on the 48 kHz Opus clock
    assert 2 * 50 - 3 <= len(packets) <= 2 * 50  # 2 s in, 2 s out (the resampler/encoder hold < 60 ms)
    assert all(p.time_base == fractions.Fraction(1, 48000) for p in packets)
