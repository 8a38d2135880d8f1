"""The frames WebSocket end to end: the reference client against the real server, a slow client, bad input.

One server (infer_serv.py) for the module, pushing to the private nginx-rtmp; a real RTMP client
records the same program the frames clients get, and the tests compare them tick by tick.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import simple_websocket

from latentsync.media.timing import samples_in_frame
from latentsync.serving.egress.frames_protocol import split_message
from tests.datafiles import make_moving_bar_video, media_file, speech_wav
from tests.frames_ws import RawWebSocket
from tests.streamtools import REPO, Api, ServerProcess, StreamRecorder, analyse_recording, decode_recording

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

FPS = 25
RATE = 48000
SIZE = (256, 456)  # the idle clip's (width, height): the channel's size
MAX_CLIENTS = 3
HELLO_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frames")
    key = f"frames-{tmp.name}"
    # Idle loop: a moving bar, so every tick differs clearly from its neighbours (the tests align
    # frames with the RTMP recording).
    idle = make_moving_bar_video(tmp / "moving_bar.mp4")
    proc = ServerProcess(
        [
            f"avatar.idle_video={idle}",
            f"avatar.video={media_file('video/nanmote002.mp4')}",
            f"stream.rtmp_url={rtmp_server.url(key)}",
            f"frames.max_clients={MAX_CLIENTS}",
            f"frames.hello_timeout_s={HELLO_TIMEOUT_S}",
            "webrtc.enabled=false",
        ],
        tmp / "server.log",
    ).start()
    proc.rtmp_url = rtmp_server.url(key)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        code, _ = proc.stop()
        assert code == 0, proc.log()


def health(server) -> dict:
    status, body = server.health()
    assert status == 200, body
    return body


def wait_no_frames_client(server, timeout_s: float) -> dict:
    """Poll ``/health`` until no frames client is on the channel (at most ``timeout_s``); its last body.

    The server learns that a client closed from the client's close frame, a little after the
    client's own close returns.
    """
    deadline = time.monotonic() + timeout_s
    body = health(server)
    while body["frames"]["clients"] and time.monotonic() < deadline:
        time.sleep(0.05)
        body = health(server)
    return body


@pytest.fixture(autouse=True)
def no_frames_client_left(server):
    """Each test starts with no frames client on the channel (the previous test's may linger)."""
    assert wait_no_frames_client(server, 10)["frames"]["clients"] == 0


def run_client(server, tmp_path: Path, fmt: str, seconds: float) -> tuple[dict, list[dict], Path, Path]:
    """The reference client as a user runs it; returns its summary, its header index, the MP4 and the WAV."""
    out, index, wav = tmp_path / f"{fmt}.mp4", tmp_path / f"{fmt}.jsonl", tmp_path / f"{fmt}.wav"
    cmd = [sys.executable, str(REPO / "scripts" / "frames_client.py"), "--url", f"ws://127.0.0.1:{server.port}/ws/frames",
           "--format", fmt, "--seconds", str(seconds), "--out", str(out), "--index", str(index), "--wav", str(wav),
           "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    summary = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    return summary, rows, out, wav


def tick_offset(rtmp: np.ndarray, ours: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Where ``ours`` (consecutive ticks) sits in the RTMP recording ``rtmp``, whole.

    The idle clip loops, so a short run of frames matches several places; the whole sequence at
    one offset does not. Returns the best offset, the per-frame mean abs error there, and the mean
    errors at every offset tried (0..255 scale).
    """
    probe = slice(None, None, 5), slice(None, None, 2), slice(None, None, 2)
    ours_small = ours[probe].astype(np.float32)
    offsets = range(len(rtmp) - len(ours) + 1)
    errors = np.array([np.abs(rtmp[o : o + len(ours)][probe].astype(np.float32) - ours_small).mean() for o in offsets])
    best = int(np.argmin(errors))
    per_frame = np.abs(rtmp[best : best + len(ours)].astype(np.float32) - ours).mean(axis=(1, 2, 3))
    return best, per_frame, errors


@pytest.mark.parametrize("fmt", ["jpeg", "h264"])
def test_ten_seconds_reassembled_into_a_file_match_the_rtmp_recording_tick_for_tick(server, tmp_path, fmt):
    before = health(server)
    recorder = StreamRecorder(server.rtmp_url, tmp_path / "pull.flv", max_s=17)
    time.sleep(3.0)  # the recording starts at a keyframe (every 2 s): it must hold the client's first tick
    summary, rows, mp4, wav = run_client(server, tmp_path, fmt, 10.0)
    path = recorder.wait_end(timeout_s=40)
    after = health(server)

    # 250 ticks, numbered without a hole, PTS on the 25 fps clock, every one with its exact audio
    ticks = np.array([r["tick"] for r in rows])
    assert len(rows) == summary["ticks"] == 250 and summary["lost_ticks"] == 0
    assert np.all(np.diff(ticks) == 1) and all(r["dropped_ticks"] == 0 for r in rows)
    assert all(r["pts_us"] == r["tick"] * 1_000_000 // FPS for r in rows)
    assert all((r["width"], r["height"]) == SIZE and r["sample_rate_hz"] == RATE for r in rows)
    assert all(r["audio_bytes"] == 2 * samples_in_frame(r["tick"], RATE, FPS) for r in rows)
    with wave.open(str(wav)) as w:
        assert w.getnframes() == sum(samples_in_frame(int(t), RATE, FPS) for t in ticks)
    if fmt == "h264":
        assert rows[0]["keyframe"]  # a joining client starts at a keyframe
    # the file: 25.0 fps, every tick a frame, audio along (AAC: whole 1024-sample frames)
    rec = analyse_recording(mp4)
    assert rec.video_codec == {"jpeg": "mjpeg", "h264": "h264"}[fmt] and (rec.width, rec.height) == SIZE
    assert len(rec.video_pts_ms) == 250 and rec.fps == pytest.approx(25.0, abs=1e-6)
    assert rec.audio_samples == pytest.approx(250 * RATE / FPS, abs=2048)

    # the frames are the RTMP recording's at the same ticks: all 250 sit on 250 consecutive frames of
    # the recording at one offset (nothing skipped, repeated or reordered), each within codec error
    rtmp, _, _, _ = decode_recording(path, RATE)
    ours, _, _, _ = decode_recording(mp4, RATE)
    assert ours.shape == (250, SIZE[1], SIZE[0], 3) and len(rtmp) >= 250, rtmp.shape
    best, per_frame, errors = tick_offset(rtmp, ours)
    assert per_frame.max() < 3.0, (fmt, per_frame.max(), int(per_frame.argmax()))  # two lossy encodes
    beside = [errors[i] for i in (best - 1, best + 1) if 0 <= i < len(errors)]
    assert errors[best] < 0.5 * min(beside), (errors[best], beside)  # one tick off fits clearly worse
    # the stream was untouched; what was sent is counted
    assert after["dropped_ticks"] == before["dropped_ticks"] == 0
    assert after["frames"]["ticks_sent"] - before["frames"]["ticks_sent"] >= 250
    assert after["frames"]["client_dropped_ticks"] == before["frames"]["client_dropped_ticks"]


def test_a_client_that_stops_reading_loses_whole_ticks_and_nobody_else_does(server):
    before = health(server)
    fast_rows: list = []
    stop = threading.Event()

    def fast_client() -> None:
        ws = simple_websocket.Client.connect(f"ws://127.0.0.1:{server.port}/channels/main/ws/frames")
        try:
            ws.send(json.dumps({"type": "hello", "format": "jpeg", "width": 128}))
            assert json.loads(ws.receive(timeout=10))["height"] == 228
            while not stop.is_set():
                header, _, _ = split_message(ws.receive(timeout=10))
                fast_rows.append((header.tick, header.dropped_ticks))
        finally:
            ws.close()

    fast = threading.Thread(target=fast_client)
    fast.start()
    slow = RawWebSocket(server.port, "/ws/frames")
    try:
        slow.send_json({"type": "hello", "format": "rgb24"})  # 350 kB a tick: the socket buffers fill in ~1 s
        ready = json.loads(slow.receive())
        assert ready["format"] == "rgb24" and ready["header_bytes"] == 64
        first, _, _ = split_message(slow.receive())
        time.sleep(5.0)  # reads nothing
        headers = [first]
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            headers.append(split_message(slow.receive())[0])
        during = health(server)
    finally:
        slow.close()
        stop.set()
        fast.join(15)
    # whole ticks lost, each loss reported in the next header: the tick numbers jump by exactly that much
    for previous, header in zip(headers, headers[1:], strict=False):
        assert header.tick - previous.tick - 1 == header.dropped_ticks, (previous.tick, header.tick)
    lost = sum(h.dropped_ticks for h in headers)
    assert lost >= 50, lost  # ~5 s of the 125 ticks it did not read
    assert slow.close_code is None  # lost ticks, not the connection (api.send_timeout_s is 10 s)
    assert during["frames"]["client_dropped_ticks"] - before["frames"]["client_dropped_ticks"] >= lost
    # the other client and the RTMP stream did not notice
    assert len(fast_rows) >= 150 and all(d == 0 for _, d in fast_rows), fast_rows[:5]
    assert np.all(np.diff([t for t, _ in fast_rows]) == 1)
    assert during["dropped_ticks"] == before["dropped_ticks"] == 0
    assert during["frames"]["inbox_dropped_ticks"] == before["frames"]["inbox_dropped_ticks"]


def test_the_header_names_the_task_on_air_and_the_state_it_is_in(server):
    server.wait_engine_ready()  # the stream runs before the engine takes uploads
    api = Api(server.port)
    ws = simple_websocket.Client.connect(f"ws://127.0.0.1:{server.port}/ws/frames")
    seen: list = []
    try:
        ws.send(json.dumps({"type": "hello", "format": "jpeg", "width": 64, "audio": "none"}))
        json.loads(ws.receive(timeout=10))
        status, body = api.post_audio(speech_wav(2.0))
        assert status == 202, body
        task_id = body["task_id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            header, _, audio = split_message(ws.receive(timeout=10))
            assert len(audio) == 0 and header.audio_bytes == 0
            seen.append((header.state.name, header.task))
            if len(seen) > 50 and seen[-1][0] == "idle" and any(s == "speaking" for s, _ in seen):
                break
    finally:
        ws.close()
    states = [s for s, _ in seen]
    assert {"idle", "fade_in", "speaking", "fade_out"} <= set(states), set(states)
    assert {t for s, t in seen if s in ("fade_in", "speaking")} == {task_id}
    assert {t for s, t in seen if s == "fade_out"} <= {task_id, None}  # a finished program's continuation
    assert {t for s, t in seen if s == "idle"} == {None}
    api.wait_task(task_id, ("done",))


def handshake_error(server, path: str, headers: dict | None = None) -> tuple[int, dict]:
    with pytest.raises(ConnectionError) as info:
        RawWebSocket(server.port, path, headers)
    return info.value.status, json.loads(info.value.body.decode())["error"]


def closed_with(server, *messages) -> tuple[int, str]:
    ws = RawWebSocket(server.port, "/ws/frames")
    try:
        for message in messages:
            ws.send_bytes(message) if isinstance(message, bytes) else ws.send_json(message)
        assert ws.receive(HELLO_TIMEOUT_S + 5) is None
        return ws.close_code, ws.close_reason
    finally:
        ws.close()


def test_bad_hellos_and_refused_handshakes_leave_the_stream_untouched(server):
    before = health(server)
    # All places but one taken: every bad hello below must find the one its predecessor gave back
    # (the server frees a place before it sends the close, so an immediate reconnect is admitted).
    others = [RawWebSocket(server.port, "/ws/frames") for _ in range(MAX_CLIENTS - 1)]
    for ws in others:
        ws.send_json({"type": "hello", "format": "jpeg", "width": 64, "audio": "none"})
        assert json.loads(ws.receive())["type"] == "ready"
    cases = [
        ((b"\x00\x01",), 4400, "bad_hello"),
        (({"type": "start"},), 4400, "bad_hello"),
        (({"type": "hello", "format": "png"},), 4415, "unknown_format"),
        (({"type": "hello", "audio": "opus"},), 4415, "unknown_audio"),
        (({"type": "hello", "width": SIZE[0] + 2},), 4413, "too_large"),
        (({"type": "hello", "height": 0},), 4400, "bad_size"),
        ((), 4408, "hello_timeout"),  # nothing sent for frames.hello_timeout_s
    ]
    try:
        for messages, code, word in cases:
            got_code, reason = closed_with(server, *messages)
            assert (got_code, reason.split(":")[0]) == (code, word), (messages, got_code, reason)
    finally:
        for ws in others:
            ws.close()
    wait_no_frames_client(server, 10)
    status, error = handshake_error(server, "/channels/nope/ws/frames")
    assert (status, error["code"]) == (404, "no_channel")
    status, error = handshake_error(server, "/ws/frames", {"Origin": "https://evil.example"})
    assert (status, error["code"]) == (403, "origin_not_allowed")
    # frames.max_clients per channel: one more is refused before the handshake
    held = [RawWebSocket(server.port, "/ws/frames") for _ in range(MAX_CLIENTS)]
    try:
        status, error = handshake_error(server, "/ws/frames")
        assert (status, error["code"]) == (429, "too_many_clients")
    finally:
        for ws in held:
            ws.close()
    after = wait_no_frames_client(server, 5)
    assert after["frames"]["clients"] == 0 and after["dropped_ticks"] == before["dropped_ticks"] == 0
    assert after["state"] == "idle" and after["streaming"]
