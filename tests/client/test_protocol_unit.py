"""The client's own pieces without a server: the frames header parser, the hello, events, the error map.

The header bytes are laid out here by hand from docs/frames-protocol.md's byte table (offsets, not the
struct format), and checked against the server's encoder (``FrameHeader.pack``), so the client agrees
with both the document and the server.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from latentsync.serving.egress import frames_protocol as server_protocol
from latentsync_client import (
    AudioFormat,
    BadRequest,
    LatentSyncError,
    NotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    TickState,
    Unauthorized,
    Unavailable,
    VideoFormat,
    error_from_response,
    parse_header,
    samples_in_tick,
    split_message,
)
from latentsync_client.errors import Conflict, InsufficientStorage, StreamClosed
from latentsync_client.frames import Backoff
from latentsync_client.frames_protocol import Ready, hello_message
from latentsync_client.speech import Accepted, Done, ErrorEvent, OnAir, Progress, SlowDown, UnknownEvent, parse_event

TASK = bytes(range(16))


def header_bytes_by_table(**over) -> bytearray:
    """A 64-byte header written field by field at the offsets of the document's table."""
    f = dict(
        magic=b"LSRF",
        version=1,
        header_bytes=64,
        tick=1234567890123,
        pts_us=49382715604920,
        state=2,
        format=3,
        flags=1,
        audio_format=1,
        width=832,
        height=1248,
        task_id=TASK,
        dropped=7,
        video_bytes=6,
        audio_bytes=4,
        sample_rate=48000,
    )
    f.update(over)
    b = bytearray(64)
    b[0:4] = f["magic"]
    b[4:6] = f["version"].to_bytes(2, "little")
    b[6:8] = f["header_bytes"].to_bytes(2, "little")
    b[8:16] = f["tick"].to_bytes(8, "little")
    b[16:24] = f["pts_us"].to_bytes(8, "little")
    b[24], b[25], b[26], b[27] = f["state"], f["format"], f["flags"], f["audio_format"]
    b[28:30] = f["width"].to_bytes(2, "little")
    b[30:32] = f["height"].to_bytes(2, "little")
    b[32:48] = f["task_id"]
    b[48:52] = f["dropped"].to_bytes(4, "little")
    b[52:56] = f["video_bytes"].to_bytes(4, "little")
    b[56:60] = f["audio_bytes"].to_bytes(4, "little")
    b[60:64] = f["sample_rate"].to_bytes(4, "little")
    return b


def test_header_parsed_at_the_documented_offsets():
    h = parse_header(header_bytes_by_table())
    assert (h.version, h.header_bytes, h.tick, h.pts_us) == (1, 64, 1234567890123, 49382715604920)
    assert (h.state, h.format, h.audio_format) == (TickState.fade_in, VideoFormat.rgb24, AudioFormat.pcm_s16le)
    assert h.keyframe and (h.width, h.height) == (832, 1248)
    assert h.task_id == TASK.hex() and h.dropped_ticks == 7
    assert (h.video_bytes, h.audio_bytes, h.sample_rate_hz, h.audio_samples) == (6, 4, 48000, 2)
    assert h.pts_s == pytest.approx(49382715.604920)
    idle = parse_header(header_bytes_by_table(task_id=bytes(16), flags=0, state=0))
    assert idle.task_id is None and not idle.keyframe and idle.state is TickState.idle


def test_header_agrees_with_the_servers_encoder():
    packed = server_protocol.FrameHeader(
        tick=99,
        pts_us=99 * 1_000_000 // 25,
        state=server_protocol.TickState.speaking,
        format=server_protocol.VideoFormat.h264,
        flags=server_protocol.FLAG_KEYFRAME,
        audio_format=server_protocol.AudioFormat.pcm_s16le,
        width=256,
        height=384,
        task_id=TASK,
        dropped_ticks=3,
        video_bytes=5,
        audio_bytes=3840,
        sample_rate_hz=48000,
    ).pack()
    message = packed + b"\x00\x00\x00\x01\x65" + bytes(3840)
    h, video, audio = split_message(message)
    assert (h.tick, h.pts_us, h.state, h.format, h.keyframe) == (
        99,
        3960000,
        TickState.speaking,
        VideoFormat.h264,
        True,
    )
    assert (h.width, h.height, h.task_id, h.dropped_ticks, h.sample_rate_hz) == (256, 384, TASK.hex(), 3, 48000)
    assert bytes(video) == b"\x00\x00\x00\x01\x65" and len(audio) == 3840 and h.audio_samples == 1920


def test_payloads_start_at_header_bytes_of_a_longer_header():
    b = header_bytes_by_table(header_bytes=72, video_bytes=3, audio_bytes=2) + b"EXTRAXXX" + b"vid" + b"au"
    h, video, audio = split_message(b)
    assert h.header_bytes == 72 and bytes(video) == b"vid" and bytes(audio) == b"au"


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (header_bytes_by_table()[:63], "shorter"),
        (header_bytes_by_table(magic=b"LSRX"), "magic"),
        (header_bytes_by_table(version=2), "version"),
        (header_bytes_by_table(header_bytes=32), "header_bytes"),
        (header_bytes_by_table(format=9), "unknown"),
        (header_bytes_by_table(state=4), "unknown"),
        (header_bytes_by_table(audio_format=2), "unknown"),
    ],
)
def test_bad_headers_are_protocol_errors(message, words):
    with pytest.raises(ProtocolError, match=words):
        parse_header(bytes(message))


def test_message_length_must_match_the_header():
    head = header_bytes_by_table(video_bytes=6, audio_bytes=4)
    with pytest.raises(ProtocolError, match="its header says 74"):
        split_message(bytes(head) + b"x" * 9)
    split_message(bytes(head) + b"x" * 10)


def test_samples_per_tick_carry_the_remainder():
    assert [samples_in_tick(k, 44100, 25) for k in range(3)] == [1764, 1764, 1764]
    counts = [samples_in_tick(k, 22050, 30) for k in range(30)]
    assert sum(counts) == 22050 and set(counts) == {735}
    counts = [samples_in_tick(k, 16000, 24) for k in range(24)]
    assert sum(counts) == 16000 and set(counts) == {666, 667}


def test_hello_and_ready():
    assert hello_message() == {"type": "hello", "format": "jpeg", "audio": "pcm_s16le"}
    assert hello_message("h264", width=256, audio="none") == {
        "type": "hello",
        "format": "h264",
        "audio": "none",
        "width": 256,
    }
    with pytest.raises(ValueError, match="unknown format"):
        hello_message("png")
    with pytest.raises(ValueError, match="at least 16"):
        hello_message(height=8)
    ready = Ready.from_json(
        {
            "type": "ready",
            "version": 1,
            "header_bytes": 64,
            "channel": "main",
            "format": "jpeg",
            "width": 256,
            "height": 256,
            "audio": "pcm_s16le",
            "fps": 25,
            "sample_rate_hz": 48000,
        }
    )
    assert (ready.format, ready.fps, ready.sample_rate_hz) == (VideoFormat.jpeg, 25, 48000)
    with pytest.raises(ProtocolError):
        Ready.from_json({"type": "ready", "format": "jpeg"})


def test_speech_events_parse_to_their_dataclasses():
    assert parse_event({"type": "accepted", "task_id": "t", "status_url": "/tasks/t"}) == Accepted("t", "/tasks/t")
    on_air = parse_event(
        {"type": "on_air", "task_id": "t", "first_byte_to_air_s": 0.4, "chunk0_audio_s": 0.2, "chunk0_ready_s": 0.3}
    )
    assert on_air == OnAir("t", 0.4, 0.2, 0.3)
    progress = parse_event(
        {
            "type": "progress",
            "task_id": "t",
            "status": "streaming",
            "frames_streamed": 5,
            "received_s": 1.5,
            "buffered_s": 0.5,
            "underrun_ticks": 0,
        }
    )
    assert progress == Progress("t", "streaming", 5, 1.5, 0.5, 0)
    assert parse_event({"type": "slow_down", "task_id": "t", "buffered_s": 16, "max_buffered_s": 30}) == SlowDown(
        "t", 16.0, 30.0
    )
    done = parse_event({"type": "done", "task_id": "t", "status": "failed", "error": "empty utterance"})
    assert done == Done("t", "failed", "empty utterance", 0, 0)
    assert parse_event({"type": "error", "code": "odd_length", "message": "m"}) == ErrorEvent("odd_length", "m")
    assert parse_event({"type": "later", "x": 1}) == UnknownEvent("later")
    with pytest.raises(ProtocolError):
        parse_event({"type": "accepted"})


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "not_audio", BadRequest),
        (401, "unauthorized", Unauthorized),
        (404, "no_channel", NotFound),
        (409, "avatar_in_use", Conflict),
        (429, "queue_full", RateLimited),
        (500, "internal", ServerError),
        (502, None, ServerError),
        (503, "starting", Unavailable),
        (507, "quota_exceeded", InsufficientStorage),
        (418, "teapot", LatentSyncError),
    ],
)
def test_error_map(status, code, cls):
    body = b'{"error": {"code": "%s", "message": "why"}}' % (code or "").encode() if code else b"<html>bad gateway"
    exc = error_from_response(status, body, {"Retry-After": "2"})
    assert type(exc) is cls and exc.status == status
    if code:
        assert exc.code == code and exc.message == "why" and str(exc) == f"{status} {code}: why"
    else:
        assert exc.code is None and "bad gateway" in exc.message
    if cls in (RateLimited, Unavailable):
        assert exc.retry_after_s == 2.0


def test_stream_closed_carries_code_and_word():
    exc = StreamClosed(4413, "too_large: width 9000 > 832")
    assert exc.close_code == 4413 and exc.code == "too_large" and "9000" in str(exc)


def test_backoff_grows_to_its_cap():
    b = Backoff(initial_s=0.5, factor=2, max_s=3, jitter=0)
    assert [b.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_package_imports_without_numpy_or_server_code():
    code = (
        "import sys, latentsync_client; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'torch', 'cv2', 'latentsync', 'flask', 'av', 'mediapipe')); print(bad)"
    )
    import subprocess
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(src)}, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_send_pcm_checks_whole_sample_frames_and_dtype():
    np = pytest.importorskip("numpy")
    from latentsync_client.speech import SpeechStream

    stream = SpeechStream.from_url("ws://127.0.0.1:1/ws/speech")
    sent: list = []

    async def fake_send(data):
        sent.append(data)

    stream._send = fake_send  # type: ignore[method-assign]

    async def run():
        with pytest.raises(RuntimeError, match="start"):
            await stream.send_pcm(b"\x00\x00")
        await stream.start(16000, channels=2, wait=False)
        with pytest.raises(ValueError, match="whole number"):
            await stream.send_pcm(b"\x00" * 6)
        with pytest.raises(ValueError, match="want int16"):
            await stream.send_pcm(np.zeros(4, np.float32))
        await stream.send_pcm(np.array([[1, -1], [2, -2]], np.int16))
        await stream.send_pcm(b"")

    asyncio.run(run())
    assert sent[-1] == np.array([1, -1, 2, -2], "<i2").tobytes()
    assert len(sent) == 2  # the start message and one PCM message; nothing for empty input


@pytest.mark.parametrize("name", ["max_lead_s", "max_queued_packets", "queue_timeout_s", "open_timeout_s"])
def test_speech_session_options_refuse_a_bound_not_positive(name):
    from latentsync_client.speech_session import SessionOptions

    with pytest.raises(ValueError, match=f"{name} 0: must be positive"):
        SessionOptions(**{name: 0})
    assert getattr(SessionOptions(), name) > 0
