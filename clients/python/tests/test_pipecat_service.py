"""``LatentSyncVideoService`` in Pipecat's own test harness (``pipecat.tests.utils.run_test``) against a real server.

One ``infer_serv.py`` (parametric engine) for the module, started from the server's venv
(conftest.py). Every pipeline is ``[gate, inlog, service, outlog]``: ``inlog`` and ``outlog`` stamp
each frame with ``time.monotonic()`` as it enters and leaves the service; ``gate`` holds the frames
behind a :class:`WaitFrame` until the test lets them go. The last test stops and restarts the server.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CROSSFADE_FRAMES,
    REPO,
    SERVER_PYTHON,
    SPEECH_IDLE_TIMEOUT_S,
    TOKEN,
    established_to,
    speech_pcm,
    task_info,
    task_status,
)
from pipecat.frames.frames import (
    CancelFrame,
    ControlFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    InterruptionWorkerFrame,
    MetricsFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.errors import ErrorCategory

from latentsync_client import Backoff
from latentsync_client.pipecat import LatentSyncVideoService, TickInfo

FPS = 25
PACKET_S = 0.02  # a TTS frame: 20 ms


# ------------------------------------------------------------------------------------------------ harness
@dataclass
class WaitFrame(ControlFrame):
    """Held by :class:`Gate` until ``event`` is set (then dropped); the frames behind it wait too."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    timeout_s: float = 30.0


class Gate(FrameProcessor):
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, WaitFrame):
            await asyncio.wait_for(frame.event.wait(), frame.timeout_s)
            return
        await self.push_frame(frame, direction)


class Log(FrameProcessor):
    """Records ``(time.monotonic(), direction, frame)`` of every frame passing (direct mode: no queue)."""

    def __init__(self):
        super().__init__(enable_direct_mode=True)
        self.entries: list[tuple[float, FrameDirection, Frame]] = []
        self.errors = asyncio.Event()
        self.image = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.entries.append((time.monotonic(), direction, frame))
        if isinstance(frame, ErrorFrame):
            self.errors.set()
        if isinstance(frame, OutputImageRawFrame):
            self.image.set()
        await self.push_frame(frame, direction)

    def of(self, kind: type, direction: FrameDirection = FrameDirection.DOWNSTREAM) -> list[tuple[float, Frame]]:
        return [(t, f) for t, d, f in self.entries if isinstance(f, kind) and d == direction]


@dataclass
class Run:
    service: LatentSyncVideoService
    inlog: Log
    outlog: Log
    down: list[Frame]
    up: list[Frame]

    def ticks(self) -> list[tuple[float, OutputImageRawFrame, SpeechOutputAudioRawFrame, TickInfo]]:
        """Each tick out: (time, image, its audio, info), in order; asserts the pairing image -> audio."""
        out = []
        pending: tuple[float, OutputImageRawFrame] | None = None
        for t, d, f in self.outlog.entries:
            if d != FrameDirection.DOWNSTREAM:
                continue
            if isinstance(f, OutputImageRawFrame):
                assert pending is None, "an image without its audio"
                pending = (t, f)
            elif isinstance(f, OutputAudioRawFrame):
                assert pending is not None, f"audio without its image: {f}"
                assert isinstance(f, SpeechOutputAudioRawFrame), f"not the server's audio: {f}"
                info = f.metadata["latentsync"]
                assert pending[1].metadata["latentsync"] == info
                out.append((pending[0], pending[1], f, info))
                pending = None
        return out

    def ours(self) -> list[tuple[float, OutputImageRawFrame, SpeechOutputAudioRawFrame, TickInfo]]:
        """:meth:`ticks` from the first TTS audio into the service on (an earlier test's fade-out is not ours)."""
        first_audio = self.inlog.of(TTSAudioRawFrame)[0][0]
        return [tick for tick in self.ticks() if tick[0] >= first_audio]

    def errors(self) -> list[ErrorFrame]:
        return [f for f in self.up if isinstance(f, ErrorFrame)]


@pytest.fixture(autouse=True)
def idle_at_start(request):
    """Each test starts with the channel idle: an earlier test's task still fading out is never heard as ours."""
    if "server" not in request.fixturenames:
        return
    server = request.getfixturevalue("server")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 30.0
    health: dict = {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(urllib.request.Request(f"{server.url}/health", headers=headers), timeout=5) as r:
            health = json.loads(r.read())
        if health.get("state") == "idle" and health.get("on_air_task") is None:
            return
        time.sleep(0.1)
    raise AssertionError(f"the channel is not idle before the test: {health}")


def service_for(server, **kwargs) -> LatentSyncVideoService:
    options = {"url": server.url, "token": TOKEN, "backoff": Backoff(initial_s=0.3, max_s=1.0)}
    options.update(kwargs)
    return LatentSyncVideoService(**options)


def run(
    service: LatentSyncVideoService, frames: list[Frame], controller=None, timeout_s: float = 60.0, end: bool = True
) -> Run:
    """``run_test`` of ``[gate, inlog, service, outlog]``; ``controller(inlog, outlog)`` runs beside it."""
    inlog, outlog = Log(), Log()
    pipeline = Pipeline([Gate(), inlog, service, outlog])

    async def go():
        async with asyncio.timeout(timeout_s):
            test = run_test(
                pipeline,
                frames_to_send=frames,
                pipeline_params=PipelineParams(enable_metrics=True),
                send_end_frame=end,
            )
            if controller is None:
                return await test
            return (await asyncio.gather(test, controller(inlog, outlog)))[0]

    down, up = asyncio.run(go())
    return Run(service, inlog, outlog, list(down), list(up))


async def until(predicate, timeout_s: float = 20.0, poll_s: float = 0.01) -> float:
    """Wait until ``predicate()`` holds; the ``time.monotonic()`` it was seen."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(poll_s)
    return time.monotonic()


def on_air(log: Log) -> bool:
    """A tick of an utterance (not idle) came out."""
    return any(f.metadata["latentsync"].state == "speaking" for _, f in log.of(OutputImageRawFrame))


def idle_after_speech(log: Log, ticks: int) -> bool:
    """An utterance was on air, and the last ``ticks`` ticks out are idle."""
    states = [f.metadata["latentsync"].state for _, f in log.of(OutputImageRawFrame)]
    return "speaking" in states and len(states) > ticks and set(states[-ticks:]) == {"idle"}


def release_when(gate: WaitFrame, predicate, timeout_s: float = 30.0):
    """A controller for :func:`run`: lets ``gate`` go once ``predicate(outlog)`` holds."""

    async def controller(inlog: Log, outlog: Log):
        await until(lambda: predicate(outlog), timeout_s)
        gate.event.set()

    return controller


def segment(pcm: np.ndarray, rate_hz: int) -> list[Frame]:
    """A TTS segment as Pipecat's TTS services send it: started, 20 ms audio frames (at once), stopped."""
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    step = int(rate_hz * PACKET_S)
    audio = [
        TTSAudioRawFrame(audio=pcm[i : i + step].tobytes(), sample_rate=rate_hz, num_channels=channels)
        for i in range(0, len(pcm), step)
    ]
    return [TTSStartedFrame(), *audio, TTSStoppedFrame()]


def rms(audio: bytes) -> float:
    samples = np.frombuffer(audio, "<i2").astype(np.float32) / 32768.0
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


def wait_closed(server, timeout_s: float = 3.0) -> int:
    """ESTABLISHED connections to the server left after ``timeout_s`` at most (0 once all are closed)."""
    deadline = time.monotonic() + timeout_s
    while (left := established_to(server.port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def mouth_openings(images: list[OutputImageRawFrame], tmp_path: Path) -> np.ndarray:
    """Inner-lip gap / face height per image, by tests/streamtools.mouth_openings (MediaPipe) in the server's venv."""
    width, height = images[0].size
    stack = np.stack([np.frombuffer(f.image, np.uint8).reshape(height, width, 3) for f in images])
    np.save(tmp_path / "frames.npy", stack)
    code = (
        "import sys, numpy as np; from tests.streamtools import mouth_openings; "
        "np.save(sys.argv[2], mouth_openings(np.load(sys.argv[1])))"
    )
    subprocess.run(
        [str(SERVER_PYTHON), "-c", code, str(tmp_path / "frames.npy"), str(tmp_path / "open.npy")],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return np.load(tmp_path / "open.npy")


def best_lag_r(mouth: np.ndarray, envelope: np.ndarray, lags=(-1, 0, 1)) -> float:
    def corr(lag: int) -> float:
        a = mouth[max(lag, 0) : len(mouth) + min(lag, 0)]
        b = envelope[max(-lag, 0) : len(envelope) - max(lag, 0)]
        return float(np.corrcoef(a, b)[0, 1])

    return max(corr(lag) for lag in lags)


# ------------------------------------------------------------------------------------------------ tests
def test_segment_lip_synced_at_25_fps_then_idle(server, tmp_path):
    rate = 24000
    seconds = 2.5
    gate = WaitFrame()  # EndFrame waits behind it until a second of idle ticks followed the speech
    r = run(
        service_for(server),
        [*segment(speech_pcm(seconds, rate), rate), gate],
        release_when(gate, lambda log: idle_after_speech(log, FPS + 2)),
    )
    assert not r.errors(), r.errors()
    # the TTS's own audio never goes on: every audio frame out is the server's, paired with its image
    assert not any(isinstance(f, TTSAudioRawFrame) for f in r.down)
    ticks = r.ticks()
    assert len(ticks) >= (seconds + 1.0) * FPS, len(ticks)
    numbers = [info.tick for *_, info in ticks]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "ticks lost or out of order"
    times = np.array([t for t, *_ in ticks])
    assert 0.036 < np.median(np.diff(times)) < 0.044, np.median(np.diff(times))
    assert (times[-1] - times[0]) == pytest.approx((len(ticks) - 1) / FPS, rel=0.05)

    task_ids = {info.task_id for *_, info in r.ours() if info.task_id}
    assert len(task_ids) == 1, task_ids
    (task_id,) = task_ids
    assert task_status(server.url, task_id) == "done"
    on_air = [i for i, (*_, info) in enumerate(ticks) if info.task_id == task_id]
    assert len(on_air) == pytest.approx(seconds * FPS + 2 * CROSSFADE_FRAMES, abs=4), len(on_air)
    # idle before and after: the face never freezes, the audio is silent
    after = ticks[on_air[-1] + 1 :]
    assert len(after) >= FPS and all(info.state == "idle" for *_, info in after)
    assert max(rms(a.audio) for _, _, a, _ in after) < 1e-3
    # the mouth follows the voice of the same ticks
    speaking = [ticks[i] for i in on_air if ticks[i][3].state == "speaking"]
    envelope = np.array([rms(a.audio) for _, _, a, _ in speaking])
    assert envelope.max() > 0.02, "no speech in the audio out"
    opening = mouth_openings([img for _, img, _, _ in speaking], tmp_path)
    assert not np.isnan(opening).any()
    r_best = best_lag_r(opening, envelope)
    print(f"mouth opening vs audio envelope: r = {r_best:.2f} over {len(speaking)} ticks")
    assert r_best >= 0.6
    # ... and the idle face is the idle clip playing, not a frozen picture
    assert len({img.image for _, img, _, _ in after[:FPS]}) > FPS // 2
    # TTFB: first TTS audio in -> first lip-synced frame out
    ttfb = [d.value for f in r.down if isinstance(f, MetricsFrame) for d in f.data if isinstance(d, TTFBMetricsData)]
    ttfb = [v for v in ttfb if v > 0]
    assert len(ttfb) == 1 and ttfb[0] < 1.0, ttfb
    first_audio_in = r.inlog.of(TTSAudioRawFrame)[0][0]
    first_out = next(t for t, _, _, info in ticks if info.task_id == task_id)
    print(f"TTFB {ttfb[0] * 1000:.0f} ms (metrics), {(first_out - first_audio_in) * 1000:.0f} ms (measured)")
    assert wait_closed(server) == 0


def test_interruption_stops_audio_at_once_and_face_goes_idle(server):
    rate = 16000
    gate = WaitFrame()
    interrupted: list[float] = []

    async def interrupt(inlog: Log, outlog: Log):
        await until(lambda: on_air(outlog))
        await asyncio.sleep(0.5)
        interrupted.append(time.monotonic())
        await inlog.push_frame(InterruptionFrame())  # as the user barges in: straight to the service
        await asyncio.sleep(1.0)
        gate.event.set()  # then the bot answers again

    frames = [
        TTSStartedFrame(),
        *segment(speech_pcm(5.0, rate), rate)[1:-1],  # the TTS is cut: no TTSStoppedFrame for it
        gate,
        *segment(speech_pcm(1.2, rate, offset_s=2.0), rate),
        SleepFrame(sleep=0.5),
    ]
    r = run(service_for(server), frames, interrupt)
    assert not r.errors(), r.errors()
    t_int = interrupted[0]
    ticks = r.ticks()
    first_task = next(info.task_id for *_, info in r.ours() if info.task_id)
    # audio: nothing of the interrupted utterance is heard 40 ms after the interruption
    loud_after = [
        t - t_int for t, _, a, info in ticks if t > t_int + 0.040 and info.task_id == first_task and rms(a.audio)
    ]
    assert not loud_after, (loud_after, [(round(t - t_int, 3), info) for t, _, a, info in ticks if t > t_int - 0.1][:8])
    before = [t for t, _, a, info in ticks if t < t_int and info.task_id == first_task and rms(a.audio) > 0.01]
    assert before, "the utterance was not on air before the interruption"
    # face: idle within crossfade_frames (+2 ticks: the cancel's round trip and the tick in flight)
    after = [(t, info) for t, _, _, info in ticks if t > t_int]
    first_idle = next(i for i, (_, info) in enumerate(after) if info.state == "idle")
    print(f"face idle after {first_idle} ticks ({(after[first_idle][0] - t_int) * 1000:.0f} ms)")
    assert first_idle <= CROSSFADE_FRAMES + 2, [info.state for _, info in after[: first_idle + 1]]
    assert task_status(server.url, first_task) == "cancelled"
    # the next segment plays normally
    later = {info.task_id for t, _, a, info in ticks if info.task_id not in (None, first_task) and rms(a.audio) > 0.01}
    assert len(later) == 1, later
    assert task_status(server.url, later.pop()) == "done"
    assert wait_closed(server) == 0


def test_a_ten_minute_segment_is_sent_at_the_pace_of_playback_and_an_interruption_drops_the_rest(server):
    """A TTS handing over 10 minutes at once: the server gets it paced (a bounded lead); a barge-in ends it."""
    rate = 16000
    lead_s = 2.0  # audio sent ahead of playback at most
    seen: dict = {}
    gate = WaitFrame(timeout_s=60.0)  # holds the pipeline open (then its EndFrame) while the test feeds it
    # made before the pipeline runs: 10 minutes of speech take ~2 s to synthesise, which on the event
    # loop kept the service's frames reader from its ticks past its 2 s receive timeout (a CI failure)
    frames = segment(speech_pcm(600.0, rate), rate)[:-1]

    async def barge_in(inlog: Log, outlog: Log):
        await until(outlog.image.is_set)  # the service is up: its frames flow
        # 30,000 frames handed over at once (cut: no TTSStoppedFrame), as fast as the service's queue takes
        # them; a turn of the loop every 100 so this harness does not hold the loop for seconds itself
        for i, frame in enumerate(frames):
            await inlog.push_frame(frame)
            if i % 100 == 0:
                await asyncio.sleep(0)
        await until(lambda: on_air(outlog))
        t_air = time.monotonic()
        task = next(
            f.metadata["latentsync"].task_id
            for _, f in outlog.of(OutputImageRawFrame)
            if f.metadata["latentsync"].state == "speaking"
        )
        await asyncio.sleep(4.0)
        seen["task"], seen["played_s"] = task, time.monotonic() - t_air
        info = await asyncio.to_thread(task_info, server.url, task)
        seen["received_s"], seen["open_s"] = info["audio_duration_s"], time.time() - info["received_at"]
        seen["t_int"] = time.monotonic()
        # as Pipecat's user-turn handling does: the worker sends an InterruptionFrame from the source,
        # which drops the TTS audio still queued in front of the service
        await inlog.push_frame(InterruptionWorkerFrame(), FrameDirection.UPSTREAM)
        await asyncio.sleep(1.5)
        seen["after"] = await asyncio.to_thread(task_info, server.url, task)
        gate.event.set()

    r = run(service_for(server, max_lead_s=lead_s), [gate], barge_in, timeout_s=60.0)
    print({k: v for k, v in seen.items() if k != "after"}, seen["after"]["audio_duration_s"])
    assert not r.errors(), r.errors()
    # paced: the sender keeps real time from its first packet plus at most the lead, so the server has
    # received no more than the time since it opened the utterance + the lead (+0.3 s: the packet in
    # flight, the query), and no less than what played
    assert seen["played_s"] <= seen["received_s"] <= seen["open_s"] + lead_s + 0.3, seen
    # the rest of the 10 minutes is dropped: nothing more reached the server, no new utterance began
    assert seen["after"]["status"] == "cancelled"
    assert seen["after"]["audio_duration_s"] <= seen["received_s"] + 0.1, seen["after"]
    assert {info.task_id for t, *_, info in r.ticks() if t > seen["t_int"] + 0.2} <= {None, seen["task"]}
    loud_after = [
        t for t, _, a, info in r.ticks() if t > seen["t_int"] + 0.040 and info.task_id == seen["task"] and rms(a.audio)
    ]
    assert not loud_after
    assert wait_closed(server) == 0


def test_cancel_frame_cancels_on_the_server_and_closes_everything(server):
    rate = 16000
    r = run(
        service_for(server), [*segment(speech_pcm(4.0, rate), rate)[:-1], SleepFrame(2.0), CancelFrame()], end=False
    )
    assert not r.errors(), r.errors()
    task_ids = {info.task_id for *_, info in r.ours() if info.task_id}
    assert len(task_ids) == 1, task_ids
    deadline = time.monotonic() + 5
    while (status := task_status(server.url, next(iter(task_ids)))) != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == "cancelled"
    assert wait_closed(server) == 0


def test_a_segment_after_the_server_closed_the_idle_connection_plays(server):
    rate = 16000
    frames = [
        *segment(speech_pcm(0.6, rate), rate),
        SleepFrame(sleep=0.6 + SPEECH_IDLE_TIMEOUT_S + 1.5),  # the server closes /ws/speech (idle_timeout)
        *segment(speech_pcm(0.6, rate, offset_s=2.0), rate),
        SleepFrame(sleep=1.0),
    ]
    r = run(service_for(server), frames)
    assert not r.errors(), r.errors()
    heard = list(dict.fromkeys(info.task_id for _, _, a, info in r.ours() if info.task_id and rms(a.audio) > 0.01))
    assert len(heard) == 2 and [task_status(server.url, t) for t in heard] == ["done", "done"], heard
    assert wait_closed(server) == 0


def test_two_segments_back_to_back_play_in_order(server):
    rate = 22050
    frames = [
        *segment(speech_pcm(1.5, rate), rate),
        *segment(speech_pcm(1.5, rate, offset_s=3.0), rate),
        SleepFrame(sleep=4.5),
    ]
    r = run(service_for(server), frames)
    assert not r.errors(), r.errors()
    ticks = r.ticks()
    order = [info.task_id for *_, info in r.ours() if info.task_id]
    first, second = dict.fromkeys(order)  # two tasks, in order of first appearance
    assert order == [first] * order.count(first) + [second] * order.count(second), "interleaved"
    for task_id in (first, second):
        assert order.count(task_id) >= 1.5 * FPS - 2
        assert task_status(server.url, task_id) == "done"
    # no idle gap between them beyond the crossfades
    i_last_first = max(i for i, (*_, info) in enumerate(ticks) if info.task_id == first)
    i_first_second = min(i for i, (*_, info) in enumerate(ticks) if info.task_id == second)
    assert i_first_second - i_last_first <= 2 * CROSSFADE_FRAMES + 4
    assert wait_closed(server) == 0


def test_any_rate_and_stereo_play_an_empty_segment_sends_nothing(server):
    cases = [(8000, 1), (16000, 1), (24000, 1), (44100, 1), (48000, 1), (48000, 2)]
    frames: list[Frame] = []
    for k, (rate, channels) in enumerate(cases):
        frames += segment(speech_pcm(0.6, rate, channels, offset_s=0.5 * k), rate)
    frames += [TTSStartedFrame(), TTSStoppedFrame(), SleepFrame(sleep=0.6 * len(cases) + 1.5)]
    r = run(service_for(server), frames)
    assert not r.errors(), r.errors()
    heard = list(dict.fromkeys(info.task_id for _, _, a, info in r.ours() if info.task_id and rms(a.audio) > 0.01))
    assert len(heard) == len(cases), heard  # the empty segment opened no utterance
    assert [task_status(server.url, t) for t in heard] == ["done"] * len(cases)
    assert wait_closed(server) == 0


def test_unusable_tts_audio_is_a_clear_error_and_the_next_segment_plays(server):
    rate = 16000
    good = speech_pcm(0.8, rate)
    bad = [
        [
            TTSStartedFrame(),
            TTSAudioRawFrame(audio=good.tobytes(), sample_rate=4000, num_channels=1),
            TTSStoppedFrame(),
        ],
        [TTSStartedFrame(), TTSAudioRawFrame(audio=b"\x00" * 642, sample_rate=rate, num_channels=9), TTSStoppedFrame()],
        [TTSStartedFrame(), TTSAudioRawFrame(audio=b"\x00" * 643, sample_rate=rate, num_channels=1), TTSStoppedFrame()],
    ]
    r = run(service_for(server), [*(f for s in bad for f in s), *segment(good, rate), SleepFrame(sleep=2.0)])
    errors = r.errors()
    assert [e.category for e in errors] == [ErrorCategory.APPLICATION] * 3, errors
    assert "4000 Hz" in errors[0].error and "9 channels" in errors[1].error and "643 bytes" in errors[2].error
    assert not any(e.fatal for e in errors)
    heard = {info.task_id for _, _, a, info in r.ours() if info.task_id and rms(a.audio) > 0.01}
    assert len(heard) == 1 and task_status(server.url, heard.pop()) == "done"
    assert wait_closed(server) == 0


def test_jpeg_frames_come_out_as_rgb_of_the_asked_size(server):
    r = run(service_for(server, video_format="jpeg", width=128), [SleepFrame(sleep=1.0)])
    assert not r.errors(), r.errors()
    ticks = r.ticks()
    assert len(ticks) >= 0.8 * FPS
    for _, image, _, _ in ticks:
        width, height = image.size
        assert width == 128 and image.format == "RGB" and len(image.image) == width * height * 3
    assert wait_closed(server) == 0


@pytest.mark.parametrize(
    ("options", "category", "words"),
    [
        ({"channel": "nowhere"}, ErrorCategory.INVALID_REQUEST, "no_channel"),
        ({"token": "wrong-token"}, ErrorCategory.AUTHENTICATION, "401"),
    ],
    ids=["unknown-channel", "wrong-token"],
)
def test_refusal_is_a_clear_error_and_leaves_nothing_open(server, options, category, words):
    rate = 16000
    r = run(service_for(server, **options), [SleepFrame(sleep=0.5), *segment(speech_pcm(0.5, rate), rate)])
    errors = r.errors()
    assert errors, "no ErrorFrame"
    assert errors[0].category == category and words in errors[0].error, errors[0]
    assert not errors[0].fatal
    assert not r.outlog.of(OutputImageRawFrame) and not r.outlog.of(OutputAudioRawFrame)
    assert wait_closed(server) == 0


def test_server_gone_is_an_error_and_the_service_recovers(server):
    rate = 16000
    gate = WaitFrame(timeout_s=60)
    frames = [gate, *segment(speech_pcm(1.0, rate), rate), SleepFrame(sleep=2.5)]
    service = service_for(server)
    inlog, outlog = Log(), Log()
    pipeline = Pipeline([Gate(), inlog, service, outlog])

    async def outage():
        await asyncio.wait_for(outlog.image.wait(), 10)
        await asyncio.sleep(0.5)
        t_stop = time.monotonic()
        await asyncio.to_thread(server.stop)
        await asyncio.wait_for(inlog.errors.wait(), 10)
        t_error = time.monotonic()
        await asyncio.to_thread(server.start().wait_ready)
        outlog.image.clear()
        await asyncio.wait_for(outlog.image.wait(), 10)
        gate.event.set()
        return t_stop, t_error, time.monotonic()

    async def go():
        async with asyncio.timeout(90):
            outcome, result = await asyncio.gather(
                outage(), run_test(pipeline, frames_to_send=frames, pipeline_params=PipelineParams(enable_metrics=True))
            )
            return outcome, result

    (t_stop, t_error, t_back), (down, up) = asyncio.run(go())
    r = Run(service, inlog, outlog, list(down), list(up))
    errors = r.errors()
    assert errors and errors[0].category == ErrorCategory.CONNECTIVITY and not errors[0].fatal, errors
    assert t_error - t_stop < 3.0
    print(f"error {t_error - t_stop:.2f} s after the stop; frames again {t_back - t_stop:.1f} s after it")
    ticks = r.ticks()
    heard = {info.task_id for t, _, a, info in ticks if t > t_back and info.task_id and rms(a.audio) > 0.01}
    assert len(heard) == 1, "the segment after the restart did not play"
    assert task_status(server.url, heard.pop()) == "done"
    assert wait_closed(server) == 0
