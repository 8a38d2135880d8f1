"""The Python client (clients/python, ``latentsync_client``) against one real server.

One ``infer_serv.py`` per module (parametric engine, a token, the session's nginx-rtmp): the REST round
trip, the speech stream's events to ``done`` and a cancel mid-utterance, the frames stream's parsed
headers at 25 fps with each tick's PCM, and bad input (PCM at 8/16/24/44.1/48 kHz and stereo, an
empty segment, a channel that does not exist, a wrong token) answered by typed exceptions, with the
server's descriptors, threads and frames clients back to their level afterwards.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time

import numpy as np
import pytest
import soundfile as sf

from latentsync.serving.ops.procfs import descriptor_kinds, thread_count
from latentsync_client import (
    Accepted,
    AsyncClient,
    BadRequest,
    Done,
    Frame,
    NotFound,
    OnAir,
    Progress,
    StreamRefused,
    TickState,
    Unauthorized,
    VideoFormat,
    samples_in_tick,
)
from tests.datafiles import media_file, speech_wav
from tests.streamtools import ServerProcess

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

TOKEN = "client-test-token-8d2f"
TOLERANCE = 2  # descriptors and threads (tests/serving/test_leaks.py's tolerance)


@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    (tmp / "tmp").mkdir()
    proc = ServerProcess(
        [
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"avatar.cache_dir={tmp / 'avatars'}",
            "engine.name=parametric",
            f"stream.rtmp_url={rtmp_server.url(f'client-{rtmp_server.port}')}",
            f"api.token={TOKEN}",
            "api.auth_failures_per_min=1000",
            "stream.crossfade_frames=2",
            "webrtc.enabled=false",
        ],
        tmp / "server.log",
        tmpdir=tmp / "tmp",
    ).start()
    try:
        proc.wait_healthy()
        proc.wait_engine_ready()
        yield proc
    finally:
        code, _ = proc.stop()
        assert code == 0, proc.log()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def pcm(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """``seconds`` of speech as int16 at ``rate`` Hz, ``(n,)`` mono or ``(n, channels)``."""
    audio, source_rate = sf.read(io.BytesIO(speech_wav(seconds)), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    n = int(seconds * rate)
    resampled = np.interp(np.arange(n) * source_rate / rate, np.arange(len(audio)), audio)
    samples = (np.clip(resampled, -1, 1) * 32767).astype(np.int16)
    return samples if channels == 1 else np.repeat(samples[:, None], channels, axis=1)


async def collect_until_done(stream, timeout_s: float = 60.0) -> list:
    events = []
    async with asyncio.timeout(timeout_s):
        async for event in stream:
            events.append(event)
            if isinstance(event, Done):
                return events
    raise AssertionError(f"closed before done: {events}")


# ------------------------------------------------------------------------------------------------ REST
def test_rest_round_trip_upload_to_done(server):
    async def run():
        async with AsyncClient(url(server), token=TOKEN) as client:
            health = await client.health(ready=True)
            assert health.ok and health.body["engine_ready"]
            assert [c["name"] for c in await client.channels()] == ["main"]
            assert (await client.get_channel("main"))["name"] == "main"
            assert isinstance(await client.avatars(), list)
            accepted = await client.generate_video(speech_wav(1.5), filename="hello.wav", seed=3)
            assert accepted.status == "queued" and accepted.status_url.endswith(accepted.task_id)
            on_air = await client.wait_task(accepted.task_id, states={"streaming"}, timeout_s=30)
            assert on_air.status in ("streaming", "done") and on_air.source == "upload"
            done = await client.wait_task(accepted.task_id, timeout_s=60)
            assert done.status == "done" and done.frames_streamed > 0 and done.time_to_first_frame_s is not None
            assert accepted.task_id in [t.task_id for t in await client.tasks()]
            with pytest.raises(NotFound) as missing:
                await client.task("0" * 32)
            assert missing.value.status == 404 and missing.value.code == "not_found"
            with pytest.raises(BadRequest) as bad:
                await client.generate_video(b"this is not audio at all" * 40, filename="x.wav")
            assert bad.value.code == "not_audio"
            if shutil.which("espeak-ng"):
                spoken = await client.speak("Hello there.", voice="en-us", rate_wpm=200)
                assert (await client.wait_task(spoken.task_id, timeout_s=60)).status == "done"
            # a cancel of an on-air upload
            long = await client.generate_video(speech_wav(6.0), filename="long.wav")
            await client.wait_task(long.task_id, states={"streaming"}, timeout_s=30)
            cancelled = await client.cancel_task(long.task_id)
            assert cancelled.task_id == long.task_id
            assert (await client.wait_task(long.task_id, timeout_s=30)).status == "cancelled"

    asyncio.run(run())


# ------------------------------------------------------------------------------------------------ speech
def test_speech_stream_events_in_order_to_done(server):
    async def run():
        async with AsyncClient(url(server), token=TOKEN) as client:
            async with client.speech() as stream:
                accepted = await stream.start(16000, seed=7)
                assert isinstance(accepted, Accepted)
                await stream.stream_pcm(pcm(2.0, 16000), packet_s=0.02, speed=1.0)
                await stream.end()
                events = await collect_until_done(stream)
            kinds = [type(e).__name__ for e in events]
            assert kinds.count("OnAir") == 1 and kinds[-1] == "Done", kinds
            assert kinds.index("OnAir") < len(kinds) - 1
            on_air = next(e for e in events if isinstance(e, OnAir))
            assert on_air.task_id == accepted.task_id and 0 < (on_air.first_byte_to_air_s or 0) < 3
            progress = [e for e in events if isinstance(e, Progress)]
            assert progress and progress[-1].received_s == pytest.approx(2.0, abs=0.05)
            done = events[-1]
            assert done.status == "done" and done.error is None and done.frames_streamed >= 45
            assert (await client.task(accepted.task_id)).source == "stream"

    asyncio.run(run())


def test_speech_cancel_mid_utterance(server):
    async def run():
        async with AsyncClient(url(server), token=TOKEN) as client:
            stream = await client.speech()  # awaited rather than entered: closed below
            try:
                accepted = await stream.start(24000)
                audio = pcm(4.0, 24000)
                sender = asyncio.create_task(stream.stream_pcm(audio, speed=1.0))
                await stream.wait_for(OnAir, timeout_s=10)
                await asyncio.sleep(0.3)
                t = time.monotonic()
                await stream.cancel()
                done = await stream.wait_for(Done, timeout_s=10)
                took = time.monotonic() - t
                await asyncio.wait_for(sender, 1.0)  # stream_pcm stops by itself at its next packet
                assert done.status == "cancelled" and done.task_id == accepted.task_id, done
                assert took < 3.0
                assert (await client.task(accepted.task_id)).status == "cancelled"
                # the connection stays usable: a second utterance after the cancelled one
                again = await stream.start(16000)
                await stream.send_pcm(pcm(0.5, 16000))
                await stream.end()
                assert (await stream.wait_for(Done, timeout_s=30)).task_id == again.task_id
            finally:
                await stream.close()
            assert stream.closed

    asyncio.run(run())


# ------------------------------------------------------------------------------------------------ frames
def test_frames_stream_headers_pts_and_pcm_per_tick(server):
    async def run():
        async with AsyncClient(url(server), token=TOKEN, use_tickets=True) as client:
            frames: list[Frame] = []
            async with client.frames(format="jpeg", width=128) as stream:
                ready = stream.ready
                assert ready is not None and ready.fps == 25 and ready.width == 128
                t0 = time.monotonic()
                async for item in stream:
                    assert isinstance(item, Frame)
                    frames.append(item)
                    if len(frames) == 50:
                        break
                elapsed = time.monotonic() - t0
            rgb = []
            async with client.frames(format=VideoFormat.rgb24, height=64, audio="none") as stream:
                async for item in stream:
                    assert isinstance(item, Frame)
                    rgb.append(item)
                    if len(rgb) == 3:
                        break
            return ready, frames, elapsed, rgb

    ready, frames, elapsed, rgb = asyncio.run(run())
    fps, rate = ready.fps, ready.sample_rate_hz
    ticks = [f.tick for f in frames]
    assert all(b > a for a, b in zip(ticks, ticks[1:], strict=False)), ticks
    assert sum(f.header.dropped_ticks for f in frames) == sum(b - a - 1 for a, b in zip(ticks, ticks[1:], strict=False))
    assert ticks[-1] - ticks[0] <= 49 + 5  # at most a few lost on this shared machine
    for f in frames:
        h = f.header
        assert h.pts_us == h.tick * 1_000_000 // fps
        assert h.format is VideoFormat.jpeg and h.keyframe and (h.width, h.height) == (ready.width, ready.height)
        assert f.video[:2] == b"\xff\xd8" and len(f.video) == h.video_bytes
        assert h.sample_rate_hz == rate and h.audio_samples == samples_in_tick(h.tick, rate, fps)
        assert len(f.audio) == 2 * samples_in_tick(h.tick, rate, fps)
        assert h.state in (TickState.idle, TickState.speaking, TickState.fade_in, TickState.fade_out)
    assert (ticks[-1] - ticks[0]) / elapsed == pytest.approx(fps, rel=0.25)
    for f in rgb:
        assert f.header.format is VideoFormat.rgb24 and f.header.height == 64
        assert len(f.video) == f.header.width * 64 * 3 and f.audio == b"" and f.header.audio_samples == 0


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 1), (24000, 1), (44100, 1), (48000, 1), (48000, 2)])
def test_pcm_rates_and_stereo_are_played(server, rate, channels):
    async def run():
        async with AsyncClient(url(server), token=TOKEN) as client:
            async with client.speech() as stream:
                accepted = await stream.start(rate, channels=channels)
                await stream.send_pcm(pcm(0.6, rate, channels))
                await stream.end()
                done = await stream.wait_for(Done, timeout_s=30, task_id=accepted.task_id)
                task = await client.task(accepted.task_id)
        assert done.status == "done", done
        assert task.audio_duration_s == pytest.approx(0.6, abs=0.05)

    asyncio.run(run())


def test_bad_formats_empty_segment_refused_clearly(server):
    async def run():
        async with AsyncClient(url(server), token=TOKEN) as client:
            async with client.speech() as stream:
                for kwargs, code in (
                    ({"sample_rate_hz": 7999}, "bad_sample_rate"),
                    ({"sample_rate_hz": 16000, "channels": 9}, "bad_channels"),
                ):
                    with pytest.raises(StreamRefused) as refused:
                        await stream.start(**kwargs)
                    assert refused.value.code == code
                with pytest.raises(ValueError, match="encoding"):
                    await stream.start(16000, encoding="mp3")  # type: ignore[arg-type]
                # an empty segment: started and ended with no audio
                accepted = await stream.start(16000)
                await stream.end()
                done = await stream.wait_for(Done, timeout_s=10)
                assert done.task_id == accepted.task_id and done.status == "failed" and "empty" in (done.error or "")
                # a whole number of sample frames is checked before anything is sent
                await stream.start(16000, channels=2)
                with pytest.raises(ValueError, match="whole number"):
                    await stream.send_pcm(b"\x00" * 6)
                with pytest.raises(ValueError, match="want int16"):
                    await stream.send_pcm(np.zeros(10, np.float32))
                await stream.cancel()
                assert (await stream.wait_for(Done, timeout_s=10)).status in ("cancelled", "failed")

    asyncio.run(run())


async def refusals(port: int) -> None:
    """A channel that does not exist and a wrong token, on every door: typed exceptions."""
    base = f"http://127.0.0.1:{port}"
    async with AsyncClient(base, token=TOKEN) as client:
        with pytest.raises(NotFound) as e:
            await client.speech(channel="nowhere")
        assert (e.value.status, e.value.code) == (404, "no_channel")
        with pytest.raises(NotFound) as e:
            await client.frames(channel="nowhere").connect()
        assert e.value.code == "no_channel"
        with pytest.raises(NotFound):
            await client.speak("hello", channel="nowhere")
        with pytest.raises(NotFound):
            await client.generate_video(speech_wav(0.5), channel="nowhere")
        with pytest.raises(NotFound):
            await client.delete_channel("nowhere")
    for use_tickets in (False, True):
        async with AsyncClient(base, token="wrong-token", use_tickets=use_tickets) as wrong:
            with pytest.raises(Unauthorized) as e:
                await wrong.speech()
            assert (e.value.status, e.value.code) == (401, "unauthorized")
            with pytest.raises(Unauthorized):
                await wrong.frames().connect()
    async with AsyncClient(base, token="wrong-token") as wrong:
        with pytest.raises(Unauthorized):
            await wrong.health()
        with pytest.raises(Unauthorized):
            await wrong.generate_video(speech_wav(0.5))
        with pytest.raises(Unauthorized):
            await wrong.tasks()
    async with AsyncClient(base) as no_token:
        with pytest.raises(Unauthorized):
            await no_token.speech()
        assert (await no_token.health()).ok  # /health's public part needs no token


def test_no_channel_and_wrong_token_are_typed_and_nothing_is_left_open(server):
    async def settle(before: tuple[dict, int], timeout_s: float = 20.0) -> tuple[dict, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            now = descriptor_kinds(server.proc.pid), thread_count(server.proc.pid)
            back = sum(now[0].values()) <= sum(before[0].values()) + TOLERANCE and now[1] <= before[1] + TOLERANCE
            if back or time.monotonic() > deadline:
                return now
            await asyncio.sleep(0.2)

    async def round_of_everything(client: AsyncClient) -> None:
        await refusals(server.port)
        async with client.speech() as stream:  # a refused start, then an utterance dropped mid-way
            with pytest.raises(StreamRefused):
                await stream.start(100)
            await stream.start(16000)
            await stream.send_pcm(pcm(0.3, 16000))
        async with client.frames(width=64) as frames:
            async for _ in frames:
                break

    async def run():
        async with AsyncClient(url(server), token=TOKEN) as client:
            await round_of_everything(client)  # warm-up: threads and encoders that stay by design
            await asyncio.sleep(1.0)
            before = await settle((descriptor_kinds(server.proc.pid), thread_count(server.proc.pid)), 5.0)
            for _ in range(5):
                await round_of_everything(client)
            fds, threads = await settle(before)
            assert sum(fds.values()) <= sum(before[0].values()) + TOLERANCE, (before[0], fds)
            assert threads <= before[1] + TOLERANCE, (before[1], threads)
            deadline = time.monotonic() + 10
            while (await client.health()).body["frames"]["clients"] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert (await client.health()).body["frames"]["clients"] == 0

    asyncio.run(run())
