"""The frames egress without a server: the hello, the header, a client's queue, the hub's encode-once."""

from __future__ import annotations

import json
import time

import av
import cv2
import numpy as np
import pytest

from latentsync.config import FramesConfig
from latentsync.serving.egress.frames import EncodedTick, FramesClient, FramesHub
from latentsync.serving.egress.frames_protocol import (
    CLOSE_BAD_HELLO,
    CLOSE_TOO_LARGE,
    CLOSE_UNSUPPORTED,
    HEADER_BYTES,
    AudioFormat,
    FrameHeader,
    HelloRefused,
    Subscription,
    TickState,
    VideoFormat,
    parse_hello,
    split_message,
)


def hello(**fields) -> str:
    return json.dumps({"type": "hello", **fields})


@pytest.mark.parametrize(
    ("message", "code", "word"),
    [
        (b'{"type": "hello"}', CLOSE_BAD_HELLO, "bad_hello"),  # binary first
        ("not json", CLOSE_BAD_HELLO, "bad_hello"),
        ("[1, 2]", CLOSE_BAD_HELLO, "bad_hello"),
        (json.dumps({"type": "start"}), CLOSE_BAD_HELLO, "bad_hello"),
        (hello(format="png"), CLOSE_UNSUPPORTED, "unknown_format"),
        (hello(format=3), CLOSE_UNSUPPORTED, "unknown_format"),
        (hello(audio="opus"), CLOSE_UNSUPPORTED, "unknown_audio"),
        (hello(width=641), CLOSE_TOO_LARGE, "too_large"),
        (hello(width=320, height=481), CLOSE_TOO_LARGE, "too_large"),
        (hello(width=8), CLOSE_BAD_HELLO, "bad_size"),
        (hello(height="480"), CLOSE_BAD_HELLO, "bad_size"),
        (hello(width=True), CLOSE_BAD_HELLO, "bad_size"),
    ],
)
def test_a_bad_hello_is_refused_with_its_close_code(message, code, word):
    with pytest.raises(HelloRefused) as info:
        parse_hello(message, 640, 480)
    assert info.value.code == code and info.value.reason.startswith(word + ":"), info.value.reason
    assert len(info.value.reason.encode()) <= 123  # a close frame's reason limit (RFC 6455 5.5)


def test_hello_sizes_default_to_the_channel_keep_its_aspect_and_are_even_for_h264():
    assert parse_hello(hello(), 640, 480) == Subscription(VideoFormat.jpeg, 640, 480, AudioFormat.pcm_s16le)
    assert parse_hello(hello(width=320), 640, 480).height == 240
    assert parse_hello(hello(height=120, audio="none"), 640, 480) == Subscription(
        VideoFormat.jpeg, 160, 120, AudioFormat.none
    )
    assert parse_hello(hello(format="h264", width=321, height=241), 640, 480).key == (VideoFormat.h264, 320, 240)
    assert parse_hello(hello(format="rgb24", width=321, height=241), 640, 480).key == (VideoFormat.rgb24, 321, 241)


def test_header_round_trip_and_byte_layout():
    task = bytes.fromhex("0123456789abcdef0123456789abcdef")
    header = FrameHeader(
        tick=7,
        pts_us=280000,
        state=TickState.speaking,
        format=VideoFormat.h264,
        flags=1,
        audio_format=AudioFormat.pcm_s16le,
        width=512,
        height=288,
        task_id=task,
        dropped_ticks=3,
        video_bytes=5,
        audio_bytes=4,
        sample_rate_hz=48000,
    )
    raw = header.pack()
    assert len(raw) == HEADER_BYTES == 64
    # the byte table of docs/frames-protocol.md, offset by offset
    assert raw[0:4] == b"LSRF" and raw[4:6] == (1).to_bytes(2, "little") and raw[6:8] == (64).to_bytes(2, "little")
    assert int.from_bytes(raw[8:16], "little") == 7 and int.from_bytes(raw[16:24], "little") == 280000
    assert raw[24:28] == bytes([1, 2, 1, 1])  # state, format, flags, audio_format
    assert int.from_bytes(raw[28:30], "little") == 512 and int.from_bytes(raw[30:32], "little") == 288
    assert raw[32:48] == task
    assert [int.from_bytes(raw[i : i + 4], "little") for i in (48, 52, 56, 60)] == [3, 5, 4, 48000]
    message = raw + b"VIDEO" + b"\x01\x00\x02\x00"
    parsed, video, audio = split_message(message)
    assert parsed == header and parsed.task == task.hex() and parsed.keyframe
    assert bytes(video) == b"VIDEO" and np.frombuffer(audio, "<i2").tolist() == [1, 2]
    for bad in (raw[:63], b"XXXX" + raw[4:] + b"VIDEO\x01\x00\x02\x00", raw + b"VIDEO"):
        with pytest.raises(ValueError):
            FrameHeader.unpack(bad)


def tick(index: int, keyframe: bool = True) -> EncodedTick:
    return EncodedTick(
        index=index,
        state=TickState.idle,
        task_id=bytes(16),
        video=b"v%d" % index,
        keyframe=keyframe,
        audio=b"\x00\x00" * 4,
    )


def test_a_slow_client_loses_its_whole_backlog_and_the_next_header_says_how_many():
    client = FramesClient(Subscription(VideoFormat.jpeg, 64, 64, AudioFormat.pcm_s16le), 3, 25, 100)
    for i in range(3):
        assert not client.offer(tick(i))
    header, _, _ = split_message(client.next_message(0.1))
    assert (header.tick, header.dropped_ticks) == (0, 0)
    for i in range(3, 7):  # queue: 1, 2, then 3 (full), 4 clears 1, 2, 3
        client.offer(tick(i))
    got = [split_message(m)[0] for m in iter(lambda: client.next_message(0.01), None)]
    assert [(h.tick, h.dropped_ticks) for h in got] == [(4, 3), (5, 0), (6, 0)]
    assert client.dropped == 3 and client.sent == 4


def test_an_h264_client_starts_and_resumes_at_a_keyframe():
    client = FramesClient(Subscription(VideoFormat.h264, 64, 64, AudioFormat.none), 2, 25, 100)
    assert client.offer(tick(0, keyframe=False))  # wants a keyframe; not counted as lost (never its)
    assert not client.offer(tick(1, keyframe=True))
    client.offer(tick(2, keyframe=False))
    client.offer(tick(3, keyframe=False))  # full: 1, 2 lost; 3 is no keyframe: lost too
    assert client.dropped == 3
    assert client.offer(tick(4, keyframe=False))
    client.offer(tick(5, keyframe=True))
    got = [split_message(m) for m in iter(lambda: client.next_message(0.01), None)]
    assert [(h.tick, h.dropped_ticks, h.keyframe, len(a)) for h, _, a in got] == [(5, 0, True, 0)]
    assert client.dropped == 4


def run_hub(hub: FramesHub, frames: list[np.ndarray]) -> None:
    hub.start()
    for i, frame in enumerate(frames):
        hub.on_tick(i, frame, np.full(4, i, np.int16))
        time.sleep(0.01)  # the encoder thread keeps up (INBOX_TICKS would drop otherwise)


def test_the_hub_encodes_once_per_format_and_size_for_every_client():
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
    frames = [np.roll(base, 3 * i, axis=1) for i in range(10)]
    task = "ab" * 16
    hub = FramesHub(
        FramesConfig(client_queue_s=2.0),
        fps=25,
        sample_rate_hz=100,
        frame_size=(160, 120),
        on_air=lambda: ("speaking", task),
    )
    subs = [
        Subscription(VideoFormat.jpeg, 160, 120, AudioFormat.pcm_s16le),
        Subscription(VideoFormat.jpeg, 160, 120, AudioFormat.none),
        Subscription(VideoFormat.jpeg, 160, 120, AudioFormat.pcm_s16le),
        Subscription(VideoFormat.rgb24, 80, 60, AudioFormat.pcm_s16le),
        Subscription(VideoFormat.h264, 160, 120, AudioFormat.pcm_s16le),
    ]
    clients = [hub.subscribe(s) for s in subs]
    try:
        run_hub(hub, frames)
        deadline = time.monotonic() + 5
        while hub.stats().frames_encoded < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = hub.stats()
        assert stats.encoders == 3 and stats.frames_encoded == 30 and stats.inbox_dropped_ticks == 0
        received = [[split_message(m) for m in iter(lambda c=c: c.next_message(0.05), None)] for c in clients]
    finally:
        hub.close()
    for got in received:
        assert [h.tick for h, _, _ in got] == list(range(10))
        assert all(h.state is TickState.speaking and h.task == task for h, _, _ in got)
    assert bytes(received[0][4][1]) == bytes(received[2][4][1])  # one JPEG, shared
    assert [len(a) for _, _, a in received[1]] == [0] * 10 and np.frombuffer(received[0][7][2], "<i2").tolist() == [
        7
    ] * 4
    for i, (_, video, _) in enumerate(received[0]):
        decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(video, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(decoded.astype(float) - frames[i]).mean() < 6, i  # JPEG error, right frame, RGB order
    small = np.frombuffer(received[3][2][1], np.uint8).reshape(60, 80, 3)
    assert np.abs(small.astype(float) - cv2.resize(frames[2], (80, 60), interpolation=cv2.INTER_AREA)).max() == 0
    codec = av.CodecContext.create("h264", "r")
    assert received[4][0][0].keyframe
    for i, (_, video, _) in enumerate(received[4]):
        (picture,) = codec.decode(av.Packet(bytes(video)))
        assert np.abs(picture.to_ndarray(format="rgb24").astype(float) - frames[i]).mean() < 12, i


def test_sizes_asked_for_one_after_another_leave_nothing_behind():
    """Issue 35: every H.264 size ever asked for kept an encoder's keyframe state; only watched ones stay."""
    frame = np.zeros((120, 160, 3), np.uint8)
    hub = FramesHub(
        FramesConfig(client_queue_s=2.0),
        fps=25,
        sample_rate_hz=100,
        frame_size=(160, 120),
        on_air=lambda: ("idle", None),
    )
    hub.start()
    try:
        for i in range(12):
            client = hub.subscribe(Subscription(VideoFormat.h264, 16 + 2 * i, 16, AudioFormat.none))
            hub.on_tick(i, frame, np.zeros(4, np.int16))
            assert client.next_message(5.0) is not None  # encoded at its size (a keyframe was forced)
            hub.unsubscribe(client)
        hub.on_tick(12, frame, np.zeros(4, np.int16))
        deadline = time.monotonic() + 5
        while (hub._last_forced or hub._want_keyframe) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not hub._last_forced and not hub._want_keyframe
    finally:
        hub.close()
