"""The frames stream's reconnects, against a tiny in-process WebSocket server (no LatentSync server).

The fake serves the documented protocol: it answers the hello with ``ready``, sends a few ticks (headers
packed by the server's own encoder), then closes with 1001 ``going_away`` as a stopping channel does.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.server import ServerConnection, serve

from latentsync.serving.egress import frames_protocol as wire
from latentsync_client import Backoff, Disconnected, Frame, FramesStream, NotFound, Reconnected, StreamClosed

READY = {
    "type": "ready",
    "version": 1,
    "header_bytes": 64,
    "channel": "main",
    "format": "jpeg",
    "width": 16,
    "height": 16,
    "audio": "pcm_s16le",
    "fps": 25,
    "sample_rate_hz": 16000,
}


def tick_message(tick: int) -> bytes:
    audio = bytes(2 * (((tick + 1) * 16000 // 25) - (tick * 16000 // 25)))
    header = wire.FrameHeader(
        tick=tick,
        pts_us=tick * 1_000_000 // 25,
        state=wire.TickState.idle,
        format=wire.VideoFormat.jpeg,
        flags=wire.FLAG_KEYFRAME,
        audio_format=wire.AudioFormat.pcm_s16le,
        width=16,
        height=16,
        task_id=bytes(16),
        dropped_ticks=0,
        video_bytes=4,
        audio_bytes=len(audio),
        sample_rate_hz=16000,
    )
    return header.pack() + b"\xff\xd8\xff\xd9" + audio


async def run_fake(handler, body):
    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        return await body(f"ws://127.0.0.1:{port}/ws/frames")


def test_reconnect_says_so_in_events_and_ticks_go_on():
    connections = []

    async def handler(ws: ServerConnection) -> None:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        connections.append(ws.request.headers.get("Authorization"))
        await ws.send(json.dumps(READY))
        base = 10 * len(connections)
        for k in range(3):
            await ws.send(tick_message(base + k))
        await ws.close(1001, "going_away: the channel's stream stopped")

    async def body(url):
        stream = FramesStream.from_url(url, token="t", reconnect=True, backoff=Backoff(initial_s=0.05, jitter=0))
        got = []
        async with stream:
            async for item in stream:
                got.append(item)
                if sum(isinstance(g, Frame) for g in got) == 6:
                    break
        return got, stream.reconnects

    got, reconnects = asyncio.run(run_fake(handler, body))
    kinds = [type(g).__name__ for g in got]
    assert kinds == ["Frame"] * 3 + ["Disconnected", "Reconnected"] + ["Frame"] * 3, kinds
    lost = got[3]
    assert isinstance(lost, Disconnected) and isinstance(lost.error, StreamClosed)
    assert lost.error.close_code == 1001 and lost.error.code == "going_away" and lost.attempt == 1
    assert isinstance(got[4], Reconnected) and got[4].ready.sample_rate_hz == 16000 and reconnects == 1
    assert [g.tick for g in got if isinstance(g, Frame)] == [10, 11, 12, 20, 21, 22]
    assert connections == ["Bearer t", "Bearer t"]


def test_without_reconnect_a_going_away_close_raises_with_its_code():
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        await ws.send(tick_message(0))
        await ws.close(1001, "going_away: stopping")

    async def body(url):
        frames = []
        with pytest.raises(StreamClosed) as closed:
            async with FramesStream.from_url(url) as stream:
                async for item in stream:
                    frames.append(item)
        return frames, closed.value

    frames, closed = asyncio.run(run_fake(handler, body))
    assert len(frames) == 1 and closed.close_code == 1001


def test_a_refusal_no_retry_can_fix_is_raised_even_with_reconnect():
    async def body(url):
        async def not_found(connection, request):
            return connection.respond(404, '{"error": {"code": "no_channel", "message": "no channel \'x\'"}}\n')

        async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=not_found) as server:
            port = server.sockets[0].getsockname()[1]
            stream = FramesStream.from_url(f"ws://127.0.0.1:{port}/ws/frames", reconnect=True)
            with pytest.raises(NotFound) as refused:
                async for _ in stream:
                    pass
            return refused.value

    refused = asyncio.run(body(None))
    assert refused.status == 404 and refused.code == "no_channel"


def test_max_attempts_gives_up_with_the_last_error():
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps(READY))
        await ws.close(1001, "going_away: stopping")

    async def body(url):
        events = []
        stream = FramesStream.from_url(url, reconnect=True, backoff=Backoff(initial_s=0.01, jitter=0, max_attempts=2))
        with pytest.raises(StreamClosed):
            async for item in stream:
                events.append(item)
        await stream.close()
        return events

    events = asyncio.run(run_fake(handler, body))
    assert [type(e).__name__ for e in events] == ["Disconnected", "Reconnected", "Disconnected", "Reconnected"]
    assert [e.attempt for e in events if isinstance(e, Disconnected)] == [1, 2]
