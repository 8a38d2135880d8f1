"""WHEP egress end to end with a pure-Python aiortc viewer: protocol, bad input, and the tap.

One server (infer_serv.py) for the module, pushing to the private nginx-rtmp; a real RTMP client
records the same program the WebRTC viewers get.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from tests.datafiles import make_moving_bar_video, media_file
from tests.streamtools import FFMPEG, Api, ServerProcess, StreamRecorder, decode_recording
from tests.whep_client import WhepViewer, http

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

MAX_VIEWERS = 2


@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whep")
    key = f"whep-{tmp.name}"
    # Idle loop: a white bar that moves several pixels every frame over flat grey, so each tick differs
    # clearly from its neighbours (the tap test aligns frames) and both lossy encodes stay near exact.
    # Speech plays on the real presenter (the base video).
    idle = make_moving_bar_video(tmp / "moving_bar.mp4")
    proc = ServerProcess(
        [
            f"avatar.idle_video={idle}",
            f"avatar.video={media_file('video/nanmote002.mp4')}",
            f"stream.rtmp_url={rtmp_server.url(key)}",
            f"webrtc.max_viewers={MAX_VIEWERS}",
            "webrtc.max_height=456",
        ],
        tmp / "server.log",
    ).start()
    proc.rtmp_url = rtmp_server.url(key)
    proc.base = f"http://127.0.0.1:{proc.port}"
    try:
        proc.wait_healthy()
        yield proc
    finally:
        code, _ = proc.stop()
        assert code == 0, proc.log()


def _json_error(body: bytes) -> dict:
    return json.loads(body)["error"]


def test_protocol_answers_and_bad_input(server):
    base = server.base
    # CORS pre-flight and trickle ICE
    status, headers, _ = http(
        "OPTIONS", base + "/whep", None, {"Origin": "http://player.example", "Access-Control-Request-Method": "POST"}
    )
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert "Location" in headers["Access-Control-Expose-Headers"]
    status, headers, body = http(
        "PATCH", base + "/whep/abc", b"a=candidate:x", {"Content-Type": "application/trickle-ice-sdpfrag"}
    )
    assert status == 405 and _json_error(body)["code"] == "no_trickle"
    # unknown session, wrong type, malformed SDP
    status, _, body = http("DELETE", base + "/whep/0123456789abcdef")
    assert status == 404 and _json_error(body)["code"] == "not_found"
    status, _, body = http("POST", base + "/whep", b"v=0\r\n", {"Content-Type": "application/json"})
    assert status == 415 and _json_error(body)["code"] == "not_sdp"
    status, _, body = http("POST", base + "/whep", b"hello", {"Content-Type": "application/sdp"})
    assert status == 400 and _json_error(body)["code"] == "bad_sdp"
    garbled = b"v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:x\r\n"
    status, _, body = http("POST", base + "/whep", garbled, {"Content-Type": "application/sdp"})
    assert status == 400 and _json_error(body)["code"] in ("bad_sdp", "unsupported_offer"), body

    async def no_media_offer() -> str:  # a data channel only: no audio, no video section
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("x")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    status, _, body = http(
        "POST", base + "/whep", asyncio.run(no_media_offer()).encode(), {"Content-Type": "application/sdp"}
    )
    assert status == 400 and _json_error(body)["code"] == "no_media", body
    health = json.loads(http("GET", base + "/health")[2])
    assert health["webrtc"]["viewers"] == 0 and health["state"] == "idle"


#: What commit 7405d0e did with that offer (the same request, and the server's aioice check list read in process).
OUTSIDE_CANDIDATE_BEFORE = (
    "201 with an answer; the server's ICE paired 203.0.113.7:9 and sent it STUN checks (pairs `IN_PROGRESS` "
    "2 s later); the session stayed until `webrtc.connect_timeout_s` (15 s)"
)


def test_an_offer_naming_only_an_outside_address_is_refused(server):
    """Issue 35: the server sends ICE checks only to webrtc.allowed_candidate_networks (default: local ones)."""

    async def outside_offer() -> str:  # a real offer whose candidates all name 203.0.113.7 (TEST-NET-3)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        lines = []
        for line in sdp.splitlines():
            if line.startswith("a=candidate:"):
                parts = line.split()
                parts[4], parts[5] = "203.0.113.7", "9"
                line = " ".join(parts)
            lines.append(line)
        return "\r\n".join(lines) + "\r\n"

    offer = asyncio.run(outside_offer())
    before = json.loads(http("GET", server.base + "/health")[2])["webrtc"]
    status, _, body = http("POST", server.base + "/whep", offer.encode(), {"Content-Type": "application/sdp"})
    after = json.loads(http("GET", server.base + "/health")[2])["webrtc"]
    code = _json_error(body)["code"] if status >= 400 else None
    assert (status, code) == (400, "no_allowed_candidate"), (status, body[:300])
    # no session (the peer connection that parsed the offer was closed before ICE started); the drops are counted
    assert after["viewers"] == 0 and after["viewers_total"] == before["viewers_total"]
    dropped = after["dropped_candidates"] - before["dropped_candidates"]
    assert dropped == offer.count("a=candidate:") > 0
    print(
        "\n| attack | before | after |\n|---|---|---|\n"
        f"| WHEP offer whose only ICE candidates name 203.0.113.7:9 (TEST-NET-3) | {OUTSIDE_CANDIDATE_BEFORE} "
        f"| {status} `{code}`, no session (ICE never started), `webrtc.dropped_candidates` +{dropped} |"
    )


def test_viewers_get_every_tick_and_the_extra_viewer_is_refused(server):
    async def run():
        viewers = [WhepViewer(server.base) for _ in range(MAX_VIEWERS)]
        for v in viewers:
            status, headers, body = await v.connect()
            assert status == 201, body
            assert headers["Content-Type"] == "application/sdp"
            assert headers["Location"].startswith("/whep/")
            assert "a=end-of-candidates" in body.decode()  # no trickle: every candidate in the answer
        extra = WhepViewer(server.base)
        status, _, body = await extra.connect()
        await extra.close(delete=False)
        assert status == 429 and _json_error(body)["code"] == "too_many_viewers"
        # bad requests while they watch: refused with JSON, the viewers below still get every tick
        for method, path, data in (("POST", "/whep", b"v=0\r\nm=garbage\r\n"), ("DELETE", "/whep/nope", None)):
            status, _, body = await asyncio.to_thread(
                http, method, server.base + path, data, {"Content-Type": "application/sdp"}
            )
            assert 400 <= status < 500 and "code" in _json_error(body)
        got = await asyncio.gather(*(v.receive(100) for v in viewers))
        statuses = [await v.close() for v in viewers]
        return got, statuses

    before = json.loads(http("GET", server.base + "/health")[2])
    got, statuses = asyncio.run(run())
    after = json.loads(http("GET", server.base + "/health")[2])
    assert statuses == [200] * MAX_VIEWERS
    # Every emitted tick, in order, on the RTP video clock (90 kHz / 25 fps = 3600 per tick). A tick the
    # shared encoder could not take in time (a CPU starved by other work) is skipped for every viewer and
    # counted by the server: nothing may go missing without being counted.
    skipped_by_server = after["webrtc"]["inbox_dropped_ticks"] - before["webrtc"]["inbox_dropped_ticks"]
    for r in got:
        steps = np.diff(r.video_pts)
        assert len(r.video_pts) == 100 and np.all(steps > 0) and np.all(steps % 3600 == 0), steps
        assert int((steps // 3600 - 1).sum()) <= skipped_by_server, (steps, skipped_by_server)
        assert r.audio_rate_hz == 48000
        # audio rides with the video: ~4 s of frames came with ~4 s of audio (receive started together)
        assert r.audio_samples / 48000 == pytest.approx(len(r.video_pts) / 25, abs=0.5)
    # the stream was untouched: no dropped ticks, FFmpeg never restarted, the shared encoder kept up
    assert after["dropped_ticks"] == before["dropped_ticks"] == 0
    assert after["ffmpeg_restarts"] == 0
    # encode once: frames encoded grow with the stream, not with the number of viewers
    encoded = after["webrtc"]["frames_encoded"] - before["webrtc"]["frames_encoded"]
    assert encoded <= after["frames_emitted"] - before["frames_emitted"]
    deadline = time.monotonic() + 5
    while json.loads(http("GET", server.base + "/health")[2])["webrtc"]["viewers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(http("GET", server.base + "/health")[2])["webrtc"]["viewers"] == 0


def test_webrtc_frames_match_the_rtmp_recording(server, tmp_path):
    recorder = StreamRecorder(server.rtmp_url, tmp_path / "pull.flv", max_s=8)

    async def run():
        viewer = WhepViewer(server.base)
        status, _, body = await viewer.connect()
        assert status == 201, body
        received = await viewer.receive(40, keep_frames=40)
        await viewer.close()
        return received

    time.sleep(1.0)
    received = asyncio.run(run())
    path = recorder.wait_end(timeout_s=30)
    rtmp_frames, _, _, _ = decode_recording(path, 48000)
    web = np.stack(received.frames[-10:]).astype(np.float32)  # 10 consecutive ticks, well after the keyframe
    assert web.shape[1:] == rtmp_frames.shape[1:] == (456, 256, 3)
    # slide the 10-tick run along the RTMP recording: it must sit on one run of 10 consecutive RTMP frames
    errors = [np.abs(rtmp_frames[i : i + 10].astype(np.float32) - web).mean() for i in range(len(rtmp_frames) - 10)]
    best = int(np.argmin(errors))
    assert errors[best] < 1.5, (best, errors[best])  # two lossy encodes of the same pixels (0..255 scale)
    # and it is that very alignment, not a similar-looking one: one tick earlier or later fits clearly worse
    neighbours = [errors[i] for i in (best - 1, best + 1) if 0 <= i < len(errors)]
    assert errors[best] < 0.8 * min(neighbours), (best, errors[max(0, best - 2) : best + 3])


def test_webm_opus_upload_is_accepted_and_plays(server, tmp_path):
    """What the page's microphone recorder sends (MediaRecorder: WebM/Opus) goes through the upload path."""
    webm = tmp_path / "mic.webm"
    subprocess.run(
        [
            FFMPEG,
            "-hide_banner",
            "-loglevel",
            "error",
            "-i",
            str(media_file("audio/7s_shan_0801_01.wav")),
            "-t",
            "1.5",
            "-c:a",
            "libopus",
            "-f",
            "webm",
            "-y",
            str(webm),
        ],
        check=True,
        timeout=60,
    )
    server.wait_engine_ready()
    api = Api(server.port)
    status, body = api.post_audio(webm.read_bytes(), filename="microphone.webm")
    assert status == 202, body
    task = api.wait_task(body["task_id"], ("done", "failed"), timeout_s=60)
    assert task["status"] == "done" and task["audio_duration_s"] == pytest.approx(1.5, abs=0.05)
