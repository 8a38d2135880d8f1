"""LatentSyncVideoGenerator (LiveKit's avatar VideoGenerator) against a real server, without a room.

What ``AvatarRunner`` does with a generator is done here by hand: push the agent's audio in 20 ms
frames as fast as the generator takes it (as ``DataStreamAudioReceiver`` does), ``AudioSegmentEnd``
at each segment's end, ``clear_buffer`` on an interruption, and iterate the frames out. No LiveKit
server runs here: the room, the data streams and the RPCs are not exercised.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="livekit-agents is not installed: run scripts/agents_venv.sh")

from conftest import (  # noqa: E402
    CROSSFADE_FRAMES,
    SPEECH_IDLE_TIMEOUT_S,
    TOKEN,
    established_to,
    speech_pcm,
    task_status,
)
from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd  # noqa: E402

from latentsync_client import NotFound, Unauthorized  # noqa: E402
from latentsync_client.livekit import USERDATA_KEY, LatentSyncVideoGenerator  # noqa: E402

FPS = 25
pytestmark = pytest.mark.timeout(120)


@dataclass
class Out:
    """Everything the generator put out, with ``time.monotonic()`` of arrival."""

    ticks: list[tuple[float, rtc.VideoFrame, rtc.AudioFrame]] = field(default_factory=list)
    ends: list[tuple[float, int]] = field(default_factory=list)  # (time, ticks before it)

    def info(self, i: int) -> dict:
        return self.ticks[i][2].userdata[USERDATA_KEY]

    def speaking(self) -> list[int]:
        return [i for i in range(len(self.ticks)) if self.info(i)["state"] != "idle"]


def rms(frame: rtc.AudioFrame) -> float:
    samples = np.frombuffer(bytes(frame.data.cast("B")), "<i2").astype(np.float32) / 32768.0
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


async def collect(gen: LatentSyncVideoGenerator, out: Out) -> None:
    video: rtc.VideoFrame | None = None
    async for item in gen:
        if isinstance(item, AudioSegmentEnd):
            out.ends.append((time.monotonic(), len(out.ticks)))
        elif isinstance(item, rtc.VideoFrame):
            video = item
        else:
            assert video is not None, "audio before its video"
            out.ticks.append((time.monotonic(), video, item))
            video = None


async def push(gen: LatentSyncVideoGenerator, pcm: np.ndarray, rate: int, *, end: bool = True) -> float:
    """Push ``pcm`` (int16 ``(n,)`` or ``(n, channels)``) in 20 ms frames; the time of the first frame."""
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    step = rate // 50
    first = time.monotonic()
    for i in range(0, len(pcm), step):
        chunk = np.ascontiguousarray(pcm[i : i + step])
        await gen.push_audio(rtc.AudioFrame(chunk.tobytes(), rate, channels, len(chunk)))
    if end:
        await gen.push_audio(AudioSegmentEnd())
    return first


async def until(predicate, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


def generator(server, **kwargs) -> LatentSyncVideoGenerator:
    return LatentSyncVideoGenerator(url=server.url, token=TOKEN, **kwargs)


async def closed_after(server, timeout_s: float = 3.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (left := established_to(server.port)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


# ------------------------------------------------------------------------------------------------ tests
def test_segment_in_frames_out_at_25_fps_then_segment_end_and_idle(server):
    rate, seconds = 24000, 2.0

    async def main() -> tuple[Out, float, LatentSyncVideoGenerator]:
        gen = generator(server)
        options = await gen.start()
        assert (options.video_fps, options.audio_channels) == (FPS, 1)
        out = Out()
        consumer = asyncio.create_task(collect(gen, out))
        try:
            await until(lambda: len(out.ticks) >= 10)
            first_in = await push(gen, speech_pcm(seconds, rate), rate)
            await until(lambda: out.ends)
            await until(lambda: len(out.ticks) >= out.ends[0][1] + FPS)  # a second of idle after
            # what AvatarRunner hands LiveKit: the frames fit its video source (RGB24 -> I420 natively)
            source = rtc.VideoSource(options.video_width, options.video_height)
            for _, video, _ in out.ticks[:5]:
                source.capture_frame(video)
            await source.aclose()
        finally:
            await gen.aclose()
            await asyncio.wait_for(consumer, 3.0)
        assert await closed_after(server) == 0
        return out, first_in, gen

    out, first_in, gen = asyncio.run(main())
    numbers = [out.info(i)["tick"] for i in range(len(out.ticks))]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "ticks lost or out of order"
    times = np.array([t for t, *_ in out.ticks])
    assert 0.036 < np.median(np.diff(times)) < 0.044, np.median(np.diff(times))
    options = gen.options
    for _, video, audio in out.ticks:
        assert (video.width, video.height, video.type) == (options.video_width, options.video_height, 4)
        assert len(video.data) == options.video_width * options.video_height * 3
        assert (audio.sample_rate, audio.num_channels) == (options.audio_sample_rate, 1)
        assert audio.samples_per_channel == options.audio_sample_rate // FPS
    on_air = out.speaking()
    assert len(on_air) == pytest.approx(seconds * FPS + 2 * CROSSFADE_FRAMES, abs=4), len(on_air)
    loud = [rms(out.ticks[i][2]) for i in on_air if out.info(i)["state"] == "speaking"]
    assert np.median(loud) > 0.02, "no speech in the audio out"
    # the face moves: the speaking pictures differ from tick to tick
    assert len({bytes(out.ticks[i][1].data) for i in on_air}) > len(on_air) // 2
    # one AudioSegmentEnd, after the last tick of the segment (its fade-out included), before the idle ones
    assert len(out.ends) == 1
    end_time, ticks_before = out.ends[0]
    assert ticks_before == on_air[-1] + 1, (ticks_before, on_air[-1])
    assert end_time - out.ticks[on_air[-1]][0] < 0.1
    after = range(ticks_before, len(out.ticks))
    assert all(out.info(i)["state"] == "idle" and rms(out.ticks[i][2]) < 1e-3 for i in after)
    # latency: first audio frame in -> first lip-synced frame out
    (metrics,) = gen.segment_metrics
    measured = out.ticks[on_air[0]][0] - first_in
    print(f"first audio in -> first lip-synced frame out: {metrics.first_audio_to_first_frame_s * 1000:.0f} ms")
    assert metrics.first_audio_to_first_frame_s == pytest.approx(measured, abs=0.02)
    assert metrics.first_audio_to_first_frame_s < 1.0


def test_rates_stereo_back_to_back_and_empty_segments(server):
    formats = [(8000, 1), (16000, 1), (24000, 1), (44100, 1), (48000, 2)]
    seconds = 0.8

    async def main() -> tuple[Out, list[float]]:
        gen = generator(server)
        await gen.start()
        out = Out()
        consumer = asyncio.create_task(collect(gen, out))
        pushed: list[float] = []
        try:
            await gen.push_audio(rtc.AudioFrame(b"", 16000, 1, 0))  # empty: ignored
            await gen.push_audio(AudioSegmentEnd())  # a segment without audio ends at once
            await until(lambda: len(out.ends) == 1, 1.0)
            for i, (rate, channels) in enumerate(formats):
                await push(gen, speech_pcm(seconds, rate, channels, offset_s=i * 0.7), rate)
                pushed.append(time.monotonic())
            await until(lambda: len(out.ends) == 1 + len(formats), 30.0)
            # the server closes the idle /ws/speech: the next segment reconnects and plays
            await asyncio.sleep(SPEECH_IDLE_TIMEOUT_S + 0.5)
            await push(gen, speech_pcm(seconds, 16000), 16000)
            await until(lambda: len(out.ends) == 2 + len(formats), 10.0)
        finally:
            await gen.aclose()
            await asyncio.wait_for(consumer, 3.0)
        assert gen.last_error is None, gen.last_error
        assert await closed_after(server) == 0
        return out, pushed

    out, _ = asyncio.run(main())
    formats.append((16000, 1))
    tasks: list[str] = []
    for i in out.speaking():
        task = out.info(i)["task_id"]
        if not tasks or tasks[-1] != task:
            tasks.append(task)
    assert len(tasks) == len(formats), "segments interleaved or missing"
    print(f"{len(tasks)} segments at {formats} played in order, each followed by its AudioSegmentEnd")
    for task, end in zip(tasks, out.ends[1:], strict=True):
        ticks = [i for i in range(len(out.ticks)) if out.info(i)["task_id"] == task]
        loud = [rms(out.ticks[i][2]) for i in ticks if out.info(i)["state"] == "speaking"]
        assert len(ticks) >= seconds * FPS - 2 and np.median(loud) > 0.02, (task, len(ticks))
        assert end[1] > ticks[-1], "AudioSegmentEnd before the segment's last tick"


def test_clear_buffer_mid_segment_stops_audio_at_once_and_the_face_goes_idle(server):
    rate = 16000

    async def main() -> tuple[Out, float, float]:
        gen = generator(server)
        await gen.start()
        out = Out()
        consumer = asyncio.create_task(collect(gen, out))
        try:
            pusher = asyncio.create_task(push(gen, speech_pcm(6.0, rate), rate, end=False))
            await until(lambda: any(out.info(i)["state"] == "speaking" for i in range(len(out.ticks))))
            await asyncio.sleep(0.6)
            t_clear = time.monotonic()
            await gen.clear_buffer()
            t_cleared = time.monotonic()
            pusher.cancel()
            await asyncio.wait([pusher], timeout=1.0)
            await gen.push_audio(AudioSegmentEnd())  # DataStreamAudioReceiver ends the cut segment: swallowed
            await asyncio.sleep(1.0)
            await push(gen, speech_pcm(1.0, rate, offset_s=3.0), rate)  # the agent answers again
            await until(lambda: out.ends, 10.0)
            await until(lambda: len(out.ticks) >= out.ends[0][1] + 5)
        finally:
            await gen.aclose()
            await asyncio.wait_for(consumer, 3.0)
        assert await closed_after(server) == 0
        return out, t_clear, t_cleared

    out, t_clear, t_cleared = asyncio.run(main())
    print(f"clear_buffer() returned in {(t_cleared - t_clear) * 1000:.1f} ms")
    first_task = next(out.info(i)["task_id"] for i in out.speaking())
    before = [i for i in range(len(out.ticks)) if out.ticks[i][0] < t_clear and out.info(i)["task_id"] == first_task]
    assert before and max(rms(out.ticks[i][2]) for i in before) > 0.02, "not on air before the clear"
    # audio: every tick put out after clear_buffer() returned is silent (queued ticks included)
    after = [i for i in range(len(out.ticks)) if out.ticks[i][0] > t_cleared]
    cut = [i for i in after if out.info(i)["task_id"] == first_task]
    assert all(rms(out.ticks[i][2]) == 0.0 and out.info(i)["muted"] for i in cut), [out.info(i) for i in cut]
    # face: idle within crossfade_frames (+2 ticks: the cancel's round trip and the tick in flight)
    first_idle = next(n for n, i in enumerate(after) if out.info(i)["state"] == "idle")
    idle_ms = (out.ticks[after[first_idle]][0] - t_clear) * 1000
    print(f"face idle after {first_idle} ticks ({idle_ms:.0f} ms)")
    assert first_idle <= CROSSFADE_FRAMES + 2
    # no AudioSegmentEnd for the cut segment; the next one plays and ends
    assert len(out.ends) == 1
    later = {out.info(i)["task_id"] for i in out.speaking()} - {first_task}
    assert len(later) == 1
    loud = [rms(out.ticks[i][2]) for i in out.speaking() if out.info(i)["task_id"] in later]
    assert np.median(loud) > 0.02


def test_a_ten_minute_segment_is_taken_at_the_pace_of_playback_and_clear_buffer_ends_it(server):
    """An agent pushing 10 minutes as fast as it can: push_audio holds it back (bounded lead and queue)."""
    rate = 16000
    lead_s, packets = 2.0, 50  # at most 2 s sent ahead of playback, 1 s queued for the sender
    pushed: list[float] = []  # time.monotonic() of each 20 ms frame taken

    async def push_all(gen: LatentSyncVideoGenerator, pcm: np.ndarray) -> None:
        for i in range(0, len(pcm), rate // 50):
            chunk = pcm[i : i + rate // 50]
            await gen.push_audio(rtc.AudioFrame(chunk.tobytes(), rate, 1, len(chunk)))
            pushed.append(time.monotonic())

    # made before the generator starts: 10 minutes of speech take ~2 s to synthesise, which on the event
    # loop would keep the generator's frames reader from its ticks past its 2 s receive timeout
    ten_minutes = speech_pcm(600.0, rate)

    async def main() -> tuple[Out, dict[str, float]]:
        gen = generator(server, max_lead_s=lead_s, max_queued_packets=packets)
        await gen.start()
        out = Out()
        consumer = asyncio.create_task(collect(gen, out))
        seen: dict[str, float] = {}
        try:
            pusher = asyncio.create_task(push_all(gen, ten_minutes))
            await until(lambda: any(out.info(i)["state"] == "speaking" for i in range(len(out.ticks))))
            await asyncio.sleep(4.0)
            seen["elapsed_s"] = time.monotonic() - pushed[0]
            seen["taken_s"] = len(pushed) * 0.02
            seen["t_clear"] = time.monotonic()
            await gen.clear_buffer()
            pusher.cancel()  # the runner stops pushing the interrupted speech
            await asyncio.wait([pusher], timeout=1.0)
            await asyncio.sleep(1.0)
        finally:
            await gen.aclose()
            await asyncio.wait_for(consumer, 3.0)
        seen["left"] = await closed_after(server)
        return out, seen

    out, seen = asyncio.run(main())
    print(seen)
    assert seen["elapsed_s"] - 0.5 <= seen["taken_s"] <= seen["elapsed_s"] + lead_s + packets * 0.02 + 0.5, seen
    task = next(out.info(i)["task_id"] for i in out.speaking())
    assert task_status(server.url, task) == "cancelled"
    after = [i for i in range(len(out.ticks)) if out.ticks[i][0] > seen["t_clear"] + 0.04]
    assert all(rms(out.ticks[i][2]) == 0.0 for i in after if out.info(i)["task_id"] == task)
    assert not out.ends  # no AudioSegmentEnd for a cleared segment
    assert seen["left"] == 0


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"token": "wrong"}, Unauthorized, "token"),
        ({"token": TOKEN, "channel": "no-such-channel"}, NotFound, "no-such-channel"),
    ],
    ids=["wrong-token", "unknown-channel"],
)
def test_refusal_at_start_is_a_clear_error_and_leaves_nothing_open(server, options, error, words):
    async def main() -> int:
        gen = LatentSyncVideoGenerator(url=server.url, **options)
        with pytest.raises(error) as info:
            await gen.start()
        print(f"{error.__name__}: {info.value}")
        assert words in str(info.value).lower() or words in repr(info.value).lower(), str(info.value)
        with pytest.raises(RuntimeError, match="start"):
            await gen.push_audio(AudioSegmentEnd())
        await gen.aclose()
        return await closed_after(server)

    assert asyncio.run(main()) == 0


def test_audio_the_server_cannot_take_is_a_value_error_and_nothing_is_sent(server):
    async def main() -> tuple[int, int]:
        gen = generator(server)
        await gen.start()
        out = Out()
        consumer = asyncio.create_task(collect(gen, out))
        try:
            with pytest.raises(ValueError, match="4000 Hz"):
                await gen.push_audio(rtc.AudioFrame(bytes(160), 4000, 1, 80))
            with pytest.raises(ValueError, match="200000 Hz"):
                await gen.push_audio(rtc.AudioFrame(bytes(8000), 200000, 1, 4000))
            with pytest.raises(ValueError, match="9 channels"):
                await gen.push_audio(rtc.AudioFrame(bytes(16000 // 50 * 18), 16000, 9, 16000 // 50))
            await asyncio.sleep(0.5)
            speaking = len(out.speaking())
        finally:
            await gen.aclose()
            await asyncio.wait_for(consumer, 3.0)
        return speaking, await closed_after(server)

    speaking, left = asyncio.run(main())
    assert speaking == 0
    assert left == 0
