#!/usr/bin/env python3
"""Agent integrations benchmark (issue 36): the avatar's latency behind Pipecat and LiveKit Agents.

Runs in the agents' virtualenv (``.venv-agents``: pipecat-ai, livekit-agents) against a server with
the parametric engine, which it starts from the server's venv (``.venv/bin/python infer_serv.py``,
RTMP output to ``scripts/rtmp_server.sh``) unless ``--url`` names a running one. For each integration,
``--runs`` times (median printed):

* latency: a 1.5 s speech segment pushed in 20 ms frames (as fast as the integration takes them,
  like a TTS) → the first lip-synced (not idle) picture out of the integration;
* interruption, 0.6 s into a 4 s segment: → the first audio tick out that is silent (of that segment),
  and → the first idle picture out;
* heard (``--heard-runs``, default ``--runs``): ``examples/pipecat_bot.py`` with Chromium as its
  WebRTC peer, one sentence at a time: the bot's TTS puts out its first audio → the page hears speech;
* a conversation (``--conversation-s 600``: the issue's 10 minutes, 40 turns, 10 interruptions)
  through the Pipecat service, its TTS streaming 0.1 s chunks at ``--tts-speed`` (5) x real time:
  gaps between two images out (0 over 80 ms is the goal).

    bash scripts/agents_venv.sh && bash scripts/rtmp_server.sh start
    .venv-agents/bin/python scripts/bench/agent_bench.py [--runs 10] [--conversation-s 600] [--url URL --token T]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from benchclient import free_port, http, stop_server  # scripts/bench/
from livekit import rtc
from livekit.agents.voice.avatar import AudioSegmentEnd
from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from latentsync_client.livekit import USERDATA_KEY, LatentSyncVideoGenerator
from latentsync_client.pipecat import METADATA_KEY, LatentSyncVideoService

ROOT = Path(__file__).resolve().parents[2]
SPEECH = ROOT / "tests" / "data" / "media" / "audio" / "7s_shan_0801_01.wav"
IDLE_VIDEO = ROOT / "tests" / "data" / "media" / "video" / "nanmote002.mp4"
RATE_HZ = 16000
FRAME_S = 0.02
TURN_S = 15.0  # one turn of the conversation: 40 in 10 minutes
#: The conversation's TTS: seconds of audio per push (a streaming TTS's chunk, e.g. one WebSocket
#: message) and how much faster than real time its chunks come (default of ``--tts-speed``).
TTS_CHUNK_S = 0.1
TTS_SPEED = 5.0


def speech(seconds: float, offset_s: float = 0.0) -> bytes:
    """``seconds`` of the test recording as mono s16le at :data:`RATE_HZ`."""
    audio, rate = sf.read(SPEECH, dtype="float32")
    audio = audio.mean(axis=1) if audio.ndim > 1 else audio
    audio = np.tile(audio, 4)[int(offset_s * rate) : int((offset_s + seconds) * rate)]
    n = int(seconds * RATE_HZ)
    resampled = np.interp(np.arange(n) * rate / RATE_HZ, np.arange(len(audio)), audio)
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def frames_of(pcm: bytes) -> list[bytes]:
    step = int(RATE_HZ * FRAME_S) * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


async def until(predicate: Callable[..., bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------------------ LiveKit
async def livekit_runs(url: str, token: str | None, runs: int) -> dict[str, list[float]]:
    """The generator driven as ``AvatarRunner`` drives it; every tick out timed on arrival."""
    out: list[tuple[float, dict]] = []  # (time, tick info) per audio frame (one per tick)
    gen = LatentSyncVideoGenerator(url=url, token=token)
    await gen.start()

    async def consume() -> None:
        async for item in gen:
            if isinstance(item, rtc.AudioFrame):
                info = dict(item.userdata[USERDATA_KEY])
                info["silent"] = not any(bytes(item.data.cast("B")))
                out.append((time.monotonic(), info))

    consumer = asyncio.create_task(consume())
    result: dict[str, list[float]] = {"latency": [], "audio_stop": [], "face_idle": []}
    try:
        for run in range(runs):
            await asyncio.sleep(0.5)
            start = len(out)
            t_in = time.monotonic()
            for chunk in frames_of(speech(1.5, offset_s=run * 0.3)):
                await gen.push_audio(rtc.AudioFrame(chunk, RATE_HZ, 1, len(chunk) // 2))
            await gen.push_audio(AudioSegmentEnd())
            await until(lambda start=start: any(i["state"] != "idle" for _, i in out[start:]), 10.0)
            result["latency"].append(next(t for t, i in out[start:] if i["state"] != "idle") - t_in)
            await until(lambda: out[-1][1]["state"] == "idle", 10.0)
            # interruption
            await asyncio.sleep(0.5)
            start = len(out)
            pusher = asyncio.create_task(push_livekit(gen, speech(4.0, offset_s=1.0)))
            await until(lambda start=start: any(i["state"] == "speaking" for _, i in out[start:]), 10.0)
            await asyncio.sleep(0.6)
            task_id = next(i["task_id"] for _, i in reversed(out) if i["state"] == "speaking")
            t_int = time.monotonic()
            await gen.clear_buffer()
            pusher.cancel()
            await asyncio.wait([pusher], timeout=1.0)
            await until(lambda t_int=t_int: any(t > t_int and i["state"] == "idle" for t, i in out), 5.0)
            after = [(t, i) for t, i in out if t > t_int]
            result["audio_stop"].append(next(t for t, i in after if i["task_id"] != task_id or i["silent"]) - t_int)
            result["face_idle"].append(next(t for t, i in after if i["state"] == "idle") - t_int)
    finally:
        await gen.aclose()
        await asyncio.wait_for(consumer, 3.0)
    return result


async def push_livekit(gen: LatentSyncVideoGenerator, pcm: bytes) -> None:
    for chunk in frames_of(pcm):
        await gen.push_audio(rtc.AudioFrame(chunk, RATE_HZ, 1, len(chunk) // 2))


# ------------------------------------------------------------------------------------------------ Pipecat
class Recorder(FrameProcessor):
    """After the service: times each image and audio frame it emits, with its tick info."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[float, str, str | None]] = []  # (time, state, task id)
        self.ticks: list[tuple[int, float]] = []  # the server tick and its PTS (s) of each of ``images``
        self.audio: list[tuple[float, bool, str | None]] = []  # (time, silent, task id)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        info = frame.metadata.get(METADATA_KEY)
        if isinstance(frame, OutputImageRawFrame) and info is not None:
            self.images.append((time.monotonic(), info.state, info.task_id))
            self.ticks.append((info.tick, info.pts_s))
        elif isinstance(frame, SpeechOutputAudioRawFrame) and info is not None:
            self.audio.append((time.monotonic(), not any(frame.audio), info.task_id))
        await self.push_frame(frame, direction)


async def pipecat_runs(url: str, token: str | None, runs: int) -> dict[str, list[float]]:
    """The service in a pipeline ``[service, recorder]``; TTS frames queued as a TTS would push them."""
    recorder = Recorder()
    service = LatentSyncVideoService(url=url, token=token)
    worker = PipelineWorker(Pipeline([service, recorder]), params=PipelineParams(enable_metrics=True))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    result: dict[str, list[float]] = {"latency": [], "audio_stop": [], "face_idle": []}
    try:
        await until(lambda: len(recorder.images) > 10, 20.0)
        for run in range(runs):
            await asyncio.sleep(0.5)
            start = len(recorder.images)
            t_in = time.monotonic()
            await worker.queue_frames([TTSStartedFrame(), *tts_frames(speech(1.5, offset_s=run * 0.3))])
            await worker.queue_frames([TTSStoppedFrame()])
            await until(lambda start=start: any(s != "idle" for _, s, _ in recorder.images[start:]), 10.0)
            result["latency"].append(next(t for t, s, _ in recorder.images[start:] if s != "idle") - t_in)
            await until(lambda: recorder.images[-1][1] == "idle", 10.0)
            await asyncio.sleep(0.5)
            start = len(recorder.images)
            await worker.queue_frames([TTSStartedFrame(), *tts_frames(speech(4.0, offset_s=1.0))])
            await until(lambda start=start: any(s == "speaking" for _, s, _ in recorder.images[start:]), 10.0)
            await asyncio.sleep(0.6)
            task_id = next(k for _, s, k in reversed(recorder.images) if s == "speaking")
            t_int = time.monotonic()
            await worker.queue_frames([InterruptionFrame()])
            await until(lambda t_int=t_int: any(t > t_int and s == "idle" for t, s, _ in recorder.images), 5.0)
            audio = [(t, silent, k) for t, silent, k in recorder.audio if t > t_int]
            result["audio_stop"].append(next(t for t, silent, k in audio if k != task_id or silent) - t_int)
            result["face_idle"].append(next(t for t, s, _ in recorder.images if t > t_int and s == "idle") - t_int)
    finally:
        await worker.cancel()
        await asyncio.wait([running], timeout=10.0)
    return result


async def pipecat_conversation(
    url: str, token: str | None, seconds: float, freeze: bool = True, tts_speed: float = TTS_SPEED
) -> dict[str, float | str]:
    """A conversation of ``seconds`` through the service: a turn every 15 s, every 4th one interrupted.

    Each turn the bot says 3 to 8 s of speech, streamed as a streaming TTS service pushes it:
    :data:`TTS_CHUNK_S` of audio (in 20 ms frames) at a time, ``tts_speed`` times faster than real time
    (0: the whole segment in one ``queue_frames`` call, a burst no streaming TTS makes: Pipecat's own
    worker and RTVI processor then hold the event loop for tens of ms); a barge-in stops the TTS, as
    Pipecat's interruption does. The images the service emits are timed on arrival. Returns the
    turns, the interruptions, the images out, their rate, and the gaps between two images (longest;
    how many over 80 ms, two ticks). ``freeze``: ``gc.freeze()`` the heap first, as a bot should
    (else a full collection stalls the loop).
    """
    recorder = Recorder()
    service = LatentSyncVideoService(url=url, token=token)
    # no transport here emits the frames Pipecat's idle detection waits for: it would cancel the run at 5 min
    worker = PipelineWorker(
        Pipeline([service, recorder]), params=PipelineParams(enable_metrics=True), idle_timeout_secs=None
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    running = asyncio.create_task(runner.run())
    rng = np.random.default_rng(36)
    pauses: list[tuple[float, float]] = []  # (time.monotonic() at its end, seconds) of each gen-2 collection
    started = [0.0]

    def timed_gc(phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[0] = time.monotonic()
        else:
            pauses.append((time.monotonic(), time.monotonic() - started[0]))

    gc.callbacks.append(timed_gc)
    lags: list[tuple[float, float]] = []  # (time.monotonic(), s) of each late wake-up of a 10 ms sleeper

    async def loop_lag() -> None:  # the client's event loop: was it busy when an image came late?
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.010)
            late_s = time.monotonic() - before - 0.010
            if late_s > 0.020:
                lags.append((time.monotonic(), late_s))

    watching = asyncio.create_task(loop_lag())
    health = http("GET", url + "/health", headers={"Authorization": f"Bearer {token}"} if token else None)[1]
    before = health
    turns = max(1, round(seconds / TURN_S))
    if freeze:  # as examples/pipecat_bot.py does once it is set up (docs/agents.md, "Smooth video")
        gc.collect()
        gc.freeze()
    lengths = [float(rng.uniform(3.0, 8.0)) for _ in range(turns)]
    said = [speech(length_s, offset_s=turn * 0.7 % 20) for turn, length_s in enumerate(lengths)]  # made before
    interrupted = 0
    try:
        await until(lambda: len(recorder.images) > 10, 20.0)
        t0 = time.monotonic()
        first_image = len(recorder.images)
        for turn, length_s in enumerate(lengths):
            speaking = asyncio.create_task(tts(worker, said[turn], tts_speed))
            if turn % 4 == 3:  # the user barges in
                await asyncio.sleep(length_s * float(rng.uniform(0.4, 0.7)))
                speaking.cancel()  # the TTS stops
                await worker.queue_frames([InterruptionFrame()])
                interrupted += 1
            await asyncio.wait([speaking], timeout=TURN_S)
            await asyncio.sleep(max(0.0, t0 + (turn + 1) * TURN_S - time.monotonic()))
        times = np.array([t for t, _, _ in recorder.images[first_image:]])
        ticks = np.array([k for k, _ in recorder.ticks[first_image:]])
        pts = np.array([p for _, p in recorder.ticks[first_image:]])
    finally:
        watching.cancel()
        gc.callbacks.remove(timed_gc)
        await worker.cancel()
        await asyncio.wait([running], timeout=10.0)
    health = http("GET", url + "/health", headers={"Authorization": f"Bearer {token}"} if token else None)[1]
    gaps = np.diff(times)
    late = np.flatnonzero(gaps > 0.080)
    # an image's lateness on the server's clock: its arrival minus the earliest arrival of any image
    # for its PTS; ticks skipped = images the server never sent this client
    lateness = times - pts
    lateness -= lateness.min()

    def lag_near(t: float) -> float:
        return max((d for w, d in lags if t - 0.3 <= w <= t + 0.05), default=0.0)

    events = ", ".join(
        f"{times[i] - t0:.1f} s: {gaps[i] * 1000:.0f} ms (tick +{ticks[i + 1] - ticks[i]}, "
        f"{lateness[i + 1] * 1000:.0f} ms late on the stream clock, "
        f"client loop late {lag_near(times[i + 1]) * 1000:.0f} ms)"
        for i in late[:20]
    )
    long_gc = [(t - t0, d) for t, d in pauses if d > 0.020]
    return {
        "gaps": events,
        "server": f"{health.get('late_ticks', 0) - before.get('late_ticks', 0)} ticks late by over half a frame "
        f"(worst since start {health.get('max_tick_lateness_ms', 0):.0f} ms), "
        f"{health.get('dropped_ticks', 0) - before.get('dropped_ticks', 0)} dropped",
        "loop": f"{len(lags)} late wake-ups of the client's loop over 20 ms, longest "
        f"{max((d for _, d in lags), default=0) * 1000:.0f} ms",
        "gc": f"{len(pauses)} full collections, longest {max((d for _, d in pauses), default=0) * 1000:.0f} ms"
        + "".join(f"; {t:.1f} s: {d * 1000:.0f} ms" for t, d in long_gc[:10]),
        "turns": turns,
        "interruptions": interrupted,
        "images": len(times),
        "fps": (len(times) - 1) / (times[-1] - times[0]),
        "max_gap_ms": float(gaps.max()) * 1000,
        "gaps_over_80ms": int((gaps > 0.080).sum()),
        "tasks": len({k for _, _, k in recorder.images[first_image:] if k is not None}),
    }


async def tts(worker: PipelineWorker, pcm: bytes, speed: float) -> None:
    """Push ``pcm`` as a streaming TTS does: started, :data:`TTS_CHUNK_S` chunks at ``speed`` x real time, stopped."""
    frames = tts_frames(pcm)
    if speed <= 0:
        await worker.queue_frames([TTSStartedFrame(), *frames, TTSStoppedFrame()])
        return
    per_chunk = max(1, round(TTS_CHUNK_S / FRAME_S))
    await worker.queue_frames([TTSStartedFrame()])
    for i in range(0, len(frames), per_chunk):
        await worker.queue_frames(frames[i : i + per_chunk])
        await asyncio.sleep(per_chunk * FRAME_S / speed)
    await worker.queue_frames([TTSStoppedFrame()])


def tts_frames(pcm: bytes) -> list[TTSAudioRawFrame]:
    return [TTSAudioRawFrame(audio=chunk, sample_rate=RATE_HZ, num_channels=1) for chunk in frames_of(pcm)]


# ------------------------------------------------------------------------------------------------ Chromium
#: Run by the server venv's Python (Playwright): connect the bot's page, make the bot say SENTENCES
#: one at a time (POST /api/say), print the page's speech onsets as epoch seconds.
HEARD_DRIVER = r"""
import json, sys, time, urllib.request
from playwright.sync_api import sync_playwright
page_url, chromium, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from tests.browsertools import launch_chromium
sentences = ["The weather is lovely today.", "I can help you with that right away.", "Let me look it up for you."]
with sync_playwright() as pw:
    browser = launch_chromium(pw, chromium)
    try:
        page = browser.new_page()
        page.goto(page_url)
        page.click("#connect")
        page.wait_for_function("window.stats.connected", timeout=20000)
        time.sleep(6.0)  # the greeting plays
        for run in range(runs):
            body = json.dumps({"text": sentences[run % len(sentences)]}).encode()
            request = urllib.request.Request(page_url + "api/say", body, {"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).read()
            time.sleep(4.5)  # it plays, then 0.7 s of silence before the next
        stats = page.evaluate("({onsets: window.stats.onsets, timeOrigin: performance.timeOrigin})")
        print(json.dumps([(stats["timeOrigin"] + t) / 1000 for t in stats["onsets"]]))
    finally:
        browser.close()
"""


def chromium_heard(url: str, token: str | None, runs: int) -> tuple[list[float], str]:
    """First TTS audio out of the example bot's TTS → speech heard in a headless Chromium peer, per sentence.

    Runs ``examples/pipecat_bot.py`` (SmallWebRTCTransport, espeak-ng) and Chromium on this machine,
    so both sides read one wall clock. The greeting (the session's first utterance) is not counted.

    Returns:
        The seconds per sentence (``runs`` of them, fewer when one was not heard), and why none were
        measured ('' when some were).
    """
    import shutil
    import tempfile

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    python = os.environ.get("LATENTSYNC_SERVER_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    if chromium is None or shutil.which("espeak-ng") is None:
        return [], "needs chromium and espeak-ng (scripts/chromium.sh install, scripts/tts.sh install)"
    if subprocess.run([python, "-c", "import playwright"], capture_output=True, timeout=60).returncode != 0:
        return [], "needs playwright in the server's venv"
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"LATENTSYNC_TOKEN": token} if token else {}))
    with tempfile.NamedTemporaryFile("w+b", suffix=".log") as log:
        cmd = [sys.executable, str(ROOT / "examples" / "pipecat_bot.py"), "--server", url, "--port", str(port)]
        bot = subprocess.Popen([*cmd, "--greeting", "Hello."], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                        break
                except OSError:
                    if bot.poll() is not None or time.monotonic() > deadline:
                        return [], "the example bot did not start"
                    time.sleep(0.3)
            driver = [python, "-c", HEARD_DRIVER, f"http://127.0.0.1:{port}/", chromium, str(runs), str(ROOT)]
            run = subprocess.run(driver, capture_output=True, text=True, timeout=60 + 6 * runs)
            if run.returncode != 0:
                return [], f"the Chromium driver failed: {run.stderr[-500:]}"
            onsets = json.loads(run.stdout.strip().splitlines()[-1])
        finally:
            stop_server(bot, 15)
        log.seek(0)
        text = log.read().decode(errors="replace")
    tts_out = [float(m) for m in re.findall(r"TTS audio out at epoch ([0-9.]+)", text)][1:]  # not the greeting
    heard = []
    for t in tts_out:
        after = [o - t for o in onsets if 0 < o - t < 3.0]
        if after:
            heard.append(min(after))
    return heard, ""


# ------------------------------------------------------------------------------------------------ main
def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    python = os.environ.get("LATENTSYNC_SERVER_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    rtmp_url = subprocess.run(
        ["bash", str(ROOT / "scripts" / "rtmp_server.sh"), "publish-url", "agent-bench"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    port = free_port()
    cmd = [
        python,
        str(ROOT / "infer_serv.py"),
        f"server.port={port}",
        "engine.name=parametric",
        f"avatar.idle_video={IDLE_VIDEO}",
        f"stream.rtmp_url={rtmp_url}",
        "webrtc.enabled=false",
        f"stream.crossfade_frames={args.crossfade_frames}",
        *args.overrides,
    ]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if http("GET", base + "/health", timeout_s=2)[1].get("engine_ready"):
                return server, base
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server, 10)
            raise SystemExit("server did not start")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measurements per figure (median printed)")
    parser.add_argument("--url", default="", help="a running server (default: start one, parametric engine)")
    parser.add_argument("--token", default=os.environ.get("LATENTSYNC_TOKEN"), help="its api.token")
    parser.add_argument(
        "--crossfade-frames", type=int, default=5, help="stream.crossfade_frames (of the server it starts; 5 default)"
    )
    parser.add_argument(
        "--heard-runs", type=int, default=None, help="sentences heard in Chromium (default: --runs; 0: skip)"
    )
    parser.add_argument(
        "--conversation-s",
        type=float,
        default=0.0,
        help="seconds of conversation through the Pipecat service (a turn every 15 s, every 4th interrupted; "
        "600: the issue's 10 minutes; default 0: not run)",
    )
    parser.add_argument(
        "--no-gc-freeze", action="store_true", help="do not gc.freeze() before the conversation (see its stalls)"
    )
    parser.add_argument(
        "--tts-speed",
        type=float,
        default=TTS_SPEED,
        help=f"the conversation's TTS: {TTS_CHUNK_S:g} s chunks this many times faster than real time "
        f"(default {TTS_SPEED:g}; 0: each segment in one burst)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value for the server the bench starts")
    args = parser.parse_args()
    server, url = (None, args.url) if args.url else start_server(args)
    try:
        results = {
            "Pipecat service": asyncio.run(pipecat_runs(url, args.token, args.runs)),
            "LiveKit generator": asyncio.run(livekit_runs(url, args.token, args.runs)),
        }
        heard_runs = args.runs if args.heard_runs is None else args.heard_runs
        heard, why_not = chromium_heard(url, args.token, heard_runs) if heard_runs > 0 else ([], "skipped")
        talk = (
            asyncio.run(
                pipecat_conversation(
                    url, args.token, args.conversation_s, freeze=not args.no_gc_freeze, tts_speed=args.tts_speed
                )
            )
            if args.conversation_s
            else None
        )
    finally:
        if server is not None:
            stop_server(server, 15)
    print(f"agent_bench: median of {args.runs}, parametric engine, {os.cpu_count()} CPUs, {url}")
    header = f"{'figure':<66} | {'Pipecat service':>15} | {'LiveKit generator':>17} | goal"
    print(header)
    print("-" * len(header))
    fade_ms = args.crossfade_frames * 40
    rows = [
        ("first TTS audio frame in -> first lip-synced image out", "latency", "<= 0.35 s"),
        ("interruption -> audio out silent", "audio_stop", "<= 40 ms (one tick)"),
        ("interruption -> face idle", "face_idle", f"<= crossfade ({args.crossfade_frames} frames, {fade_ms} ms)"),
    ]
    for name, key, goal in rows:
        cells = [f"{statistics.median(results[k][key]) * 1000:>12.0f} ms" for k in results]
        print(f"{name:<66} | {cells[0]:>15} | {cells[1]:>17} | {goal}")
    name = f"first TTS audio frame -> speech heard in a Chromium peer ({len(heard)} of {heard_runs})"
    cell = f"{statistics.median(heard) * 1000:>12.0f} ms" if heard else why_not or "none heard"
    print(f"{name:<66} | {cell:>15} | {'-':>17} | <= 0.50 s (examples/pipecat_bot.py, SmallWebRTCTransport)")
    if talk is None:
        print(
            f"{'conversation, gaps > 80 ms in images out':<66} | {'not run':>15} | {'-':>17} | 0 (--conversation-s 600)"
        )
    else:
        name = f"{args.conversation_s / 60:g}-minute conversation, gaps > 80 ms in images out"
        print(f"{name:<66} | {talk['gaps_over_80ms']:>15} | {'-':>17} | 0")
        print(
            f"  {talk['turns']} turns ({talk['tasks']} on air), {talk['interruptions']} interruptions, "
            f"{talk['images']} images at {talk['fps']:.2f} fps, longest gap {talk['max_gap_ms']:.0f} ms"
        )
        print(f"  the server's clock: {talk['server']}; this process: {talk['gc']}; {talk['loop']}")
        if talk["gaps"]:
            print(f"  gaps over 80 ms (time into the conversation: gap): {talk['gaps']}")
    if heard:
        print("  heard per sentence (ms): " + " ".join(f"{h * 1000:.0f}" for h in heard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
