#!/usr/bin/env python3
"""Speech that streams in: latency and underruns of ``/ws/speech`` and ``POST /speak`` (a table).

Starts a private nginx-rtmp (free port) and ``infer_serv.py`` (parametric engine), then:

  * ``pcm 1.0x``: 16 kHz PCM pushed at exactly real time in 20 ms packets: time from the first
    byte sent to the ``on_air`` event (the first speech frame on air), and underrun ticks
    (gap ticks of the utterance + held ticks of the mixer);
  * ``pcm 0.8x``: the same pushed at 0.8x real time, recorded from RTMP: gap ticks, frozen frames
    in the recording (identical consecutive frames: the avatar stopped), and the mouth/audio lag
    on the recording (best lag, in frames, of mouth opening vs the audio envelope);
  * ``speak``: ``POST /speak`` of a 3-sentence text: request to first speech frame on air
    (``time_to_first_frame_s`` of the task).

    .venv/bin/python scripts/bench/stream_in_bench.py [--runs 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from latentsync.media import decode_audio  # noqa: E402
from tests.speechclient import SpeechClient  # noqa: E402
from tests.streamtools import (  # noqa: E402
    Api,
    RtmpServer,
    ServerProcess,
    StreamRecorder,
    decode_recording,
    mouth_openings,
)

SPEECH = ROOT / "tests" / "data" / "media" / "audio" / "7s_shan_0801_01.wav"
IDLE = ROOT / "tests" / "data" / "media" / "video" / "2s_GirlMuseum_0730.mp4"
AVATAR = ROOT / "tests" / "data" / "media" / "video" / "10s_girl_0729_00_formal.mp4"
TEXT = "Good morning, and welcome to the show. Today we talk about streaming speech. Let us begin."
FPS = 25
RATE = 48000


def wait_idle(api: Api, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = api.request("GET", "/health")[1]
        if h.get("state") == "idle" and h.get("on_air_task") is None and h["workers"]["queued"] == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("server never went back to idle")


def push(port: int, pcm: np.ndarray, speed: float) -> dict:
    """Stream ``pcm`` (16 kHz int16) at ``speed`` x real time; returns the measured figures."""
    client = SpeechClient(port)
    client.start(16000, seed=1)
    client.wait("accepted")
    t0 = client.stream(pcm, 16000, 0.02, speed)
    client.send_json({"type": "end"})
    on_air = client.wait("on_air", 30)
    done = client.wait("done", 120)
    client.close()
    return {
        "first_byte_to_air_s": on_air["t"] - t0,
        "server_first_byte_to_air_s": on_air["first_byte_to_air_s"],
        "chunk0_audio_s": on_air["chunk0_audio_s"],
        "chunk0_ready_s": on_air["chunk0_ready_s"],
        "gap_ticks": done["underrun_ticks"],
        "status": done["status"],
    }


def lag_and_freeze(path: Path) -> tuple[int, float, int]:
    """Best mouth/audio lag in frames (positive: mouth late), its correlation, frozen frames while speaking."""
    frames, v0, audio, a0 = decode_recording(path, RATE)
    t = v0 + np.arange(len(frames)) / FPS
    per = RATE // FPS
    env = np.array(
        [
            np.sqrt(np.mean(audio[max(0, int((x - a0) * RATE)) : max(0, int((x - a0) * RATE)) + per] ** 2))
            if 0 <= int((x - a0) * RATE) < len(audio)
            else 0.0
            for x in t
        ]
    )
    speaking = np.flatnonzero(env > 0.02)
    first, last = (speaking[0], speaking[-1]) if len(speaking) else (0, len(frames) - 1)
    sel = np.arange(first, last + 1)
    mouth = np.nan_to_num(mouth_openings(frames[sel]))
    env_sel = env[sel]

    def corr(lag: int) -> float:
        a = mouth[max(lag, 0) : len(sel) + min(lag, 0)]
        b = env_sel[max(-lag, 0) : len(sel) - max(lag, 0)]
        return float(np.corrcoef(a, b)[0, 1])

    lags = {lag: corr(lag) for lag in range(-4, 5)}
    best = max(lags, key=lags.get)
    still = [np.abs(frames[i].astype(np.int16) - frames[i - 1]).mean() < 0.5 for i in sel[1:]]
    longest = run = 0
    for s in still:  # a freeze shows as a run of identical frames (the base video alone has short ones)
        run = run + 1 if s else 0
        longest = max(longest, run)
    return best, lags[best], longest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario (medians and worst reported)")
    parser.add_argument("overrides", nargs="*", help="extra key=value server overrides")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stream-in-bench-"))
    rtmp = RtmpServer(work / "rtmp")
    rtmp.start()
    server = ServerProcess(
        [
            f"avatar.idle_video={IDLE}",
            f"avatar.video={AVATAR}",
            "engine.name=parametric",
            f"avatar.cache_dir={work / 'avatars'}",
            f"stream.rtmp_url={rtmp.url('bench')}",
            "stream.idle_audio=false",
            *args.overrides,
        ],
        work / "server.log",
    )
    server.start()
    rows = []
    try:
        server.wait_healthy()
        server.wait_engine_ready()
        api = Api(server.port)
        pcm = decode_audio(SPEECH, 16000)
        for speed in (1.0, 0.8):
            for run in range(args.runs):
                wait_idle(api)
                before = api.request("GET", "/health")[1]["underrun_ticks"]
                recorder = StreamRecorder(rtmp.url("bench"), work / f"rec-{speed}-{run}.flv")
                time.sleep(2.0)
                figures = push(server.port, pcm, speed)
                time.sleep(1.0)
                figures["held_ticks"] = api.request("GET", "/health")[1]["underrun_ticks"] - before
                figures["lag_frames"], figures["lag_r"], figures["frozen_frames"] = lag_and_freeze(
                    recorder.finish(settle_s=0.5)
                )
                rows.append({"scenario": f"pcm {speed:.1f}x", **figures})
        for _run in range(args.runs):
            wait_idle(api)
            t0 = time.monotonic()
            status, body = api.request(
                "POST", "/speak", json.dumps({"text": TEXT}).encode(), {"Content-Type": "application/json"}
            )
            assert status == 202, body
            while (task := api.task(body["task_id"]))["first_frame_on_air_at"] is None:
                if task["status"] in ("failed", "cancelled"):
                    raise RuntimeError(task)
                time.sleep(0.01)
            client_s = time.monotonic() - t0
            task = api.wait_task(body["task_id"], ("done", "failed", "cancelled"), 60)
            rows.append(
                {
                    "scenario": "speak 3 sentences",
                    "request_to_air_s": task["time_to_first_frame_s"],
                    "polled_s": round(client_s, 3),
                    "status": task["status"],
                    "audio_s": task["audio_duration_s"],
                }
            )
        dropped = api.request("GET", "/health")[1]["dropped_ticks"]
    finally:
        server.stop()
        rtmp.stop()
    print(
        f"\n{'scenario':<18} {'first byte/request -> on air':>28} {'chunk 0 audio/ready':>19} {'gap ticks':>9} "
        f"{'held ticks':>10} {'lag (frames, r)':>16} {'longest still':>13} status"
    )
    for r in rows:
        if r["scenario"].startswith("pcm"):
            latency = f"{r['first_byte_to_air_s'] * 1000:.0f} ms (server {r['server_first_byte_to_air_s'] * 1000:.0f})"
            lag = f"{r['lag_frames']:+d} ({r['lag_r']:.2f})" if "lag_frames" in r else "-"
            frozen = str(r.get("frozen_frames", "-"))
            c0 = f"{r['chunk0_audio_s'] * 1000:.0f}/{r['chunk0_ready_s'] * 1000:.0f} ms"
            print(
                f"{r['scenario']:<18} {latency:>28} {c0:>19} {r['gap_ticks']:>9} {r['held_ticks']:>10} {lag:>16} "
                f"{frozen:>13} {r['status']}"
            )
        else:
            latency = f"{r['request_to_air_s'] * 1000:.0f} ms (polled {r['polled_s'] * 1000:.0f})"
            print(
                f"{r['scenario']:<18} {latency:>28} {'-':>19} {'-':>9} {'-':>10} {'-':>16} {'-':>13} "
                f"{r['status']} ({r['audio_s']:.1f} s)"
            )
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        some = [r for r in rows if r["scenario"] == scenario]
        key = "first_byte_to_air_s" if scenario.startswith("pcm") else "request_to_air_s"
        median_ms = statistics.median(r[key] for r in some) * 1000
        gaps = sum(r.get("gap_ticks", 0) for r in some)
        print(f"{scenario}: median {median_ms:.0f} ms over {len(some)} runs, gap ticks {gaps} in all")
    print(f"dropped ticks over the whole bench: {dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
