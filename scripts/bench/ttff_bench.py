#!/usr/bin/env python3
"""Time-to-first-frame benchmark: POST speech repeatedly to a real server and measure

  (a) POST → 202 answer,
  (b) POST → first speech frame leaving the controller (the task's ``first_frame_on_air_at``),
  (c) POST → first speech sample heard by an RTMP client (FFmpeg decoding the live stream),

then print median and max over ``--posts`` requests.

    scripts/rtmp_server.sh start
    .venv/bin/python scripts/bench/ttff_bench.py --posts 10 [key=value ...]

The bench starts its own ``infer_serv.py`` (parametric engine unless overridden, idle audio off so
the first speech sample is unmistakable in the stream) and stops it at the end. Times are wall-clock
on this one machine (server, client and bench share the clock).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from benchclient import free_port, http, multipart, publish_url  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "media"
CLIENT_RATE = 16000
BLOCK = CLIENT_RATE // 100  # 10 ms
ONSET_RMS = 0.02  # a 10 ms block louder than this (full scale 1.0) is speech


class OnsetListener:
    """A live RTMP client (FFmpeg) decoding the stream's audio; records when loud blocks arrive."""

    def __init__(self, url: str):
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-fflags",
            "nobuffer",
            "-flags",
            "low_delay",
            "-analyzeduration",
            "0",
            "-probesize",
            "32768",
            "-i",
            url,
            "-map",
            "0:a:0",
            "-ac",
            "1",
            "-ar",
            str(CLIENT_RATE),
            "-flush_packets",
            "1",
            "-f",
            "s16le",
            "pipe:1",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.loud_times: list[float] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        while chunk := self.proc.stdout.read(BLOCK * 2):
            pending += chunk
            now = time.time()
            while len(pending) >= BLOCK * 2:
                block = np.frombuffer(pending[: BLOCK * 2], "<i2").astype(np.float32) / 32768.0
                pending = pending[BLOCK * 2 :]
                if np.sqrt(np.mean(block**2)) > ONSET_RMS:
                    with self._lock:
                        self.loud_times.append(now)

    def first_loud_after(self, t0: float, timeout_s: float) -> float | None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            with self._lock:
                later = [t for t in self.loud_times if t > t0]
            if later:
                return later[0]
            time.sleep(0.005)
        return None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def onset_offset_s(samples: np.ndarray, rate: int) -> float:
    """Seconds from the clip's start to its first block louder than ONSET_RMS."""
    block = rate // 100
    x = samples.astype(np.float32) / 32768.0
    n = len(x) // block
    rms = np.sqrt(np.mean(x[: n * block].reshape(n, block) ** 2, axis=1))
    return float(np.argmax(rms > ONSET_RMS)) * block / rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=10)
    parser.add_argument("--audio", type=Path, default=DATA / "audio" / "4s_Wavfile_1719704064_11.wav")
    parser.add_argument("--rtmp-port", type=int, default=1935)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not args.audio.is_file():
        print(f"speech file missing: {args.audio} (give one with --audio)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from latentsync.media import decode_audio

    port = free_port()
    key = f"ttff{port}"
    url = publish_url(args.rtmp_port, key)
    base = f"http://127.0.0.1:{port}"
    overrides = [f"server.port={port}", f"stream.rtmp_url={url}", "stream.idle_audio=false", *args.overrides]
    log = open(ROOT / ".cache" / "ttff_bench_server.log", "wb") if (ROOT / ".cache").is_dir() else subprocess.DEVNULL
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "infer_serv.py"), *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    listener = None
    try:
        deadline = time.time() + 300
        while not (_up(base) and http("GET", base + "/health")[1].get("engine_ready")):
            if time.time() > deadline or server.poll() is not None:
                print("server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.3)
        listener = OnsetListener(url)
        time.sleep(3.0)  # client connected and past its first keyframe
        content = args.audio.read_bytes()
        onset = onset_offset_s(decode_audio(args.audio, 48000), 48000)
        a, b, c = [], [], []
        for _ in range(args.posts):
            while http("GET", base + "/health")[1].get("state") != "idle":
                time.sleep(0.05)
            time.sleep(0.3)
            body, headers = multipart(content, args.audio.name)
            t0 = time.time()
            status, accepted = http("POST", base + "/generate_video", body, headers)
            t_accept = time.time()
            if status != 202:
                print(f"POST answered {status}: {accepted}", file=sys.stderr)
                return 1
            heard = listener.first_loud_after(t0, 30.0)
            task = {}
            while task.get("status") not in ("done", "failed", "cancelled"):
                time.sleep(0.1)
                task = http("GET", base + accepted["status_url"])[1]
            if heard is None:
                dead = listener.proc.poll() is not None
                reason = listener.proc.stderr.read().decode(errors="replace") if dead else ""
                print(f"post {len(a) + 1}: the RTMP client heard no speech within 30 s {reason}", file=sys.stderr)
            a.append(t_accept - t0)
            b.append(task["first_frame_on_air_at"] - t0)
            c.append((heard - onset - t0) if heard else float("nan"))
    finally:
        if listener is not None:
            listener.close()
        server.terminate()
        server.wait(15)

    def row(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return f"| {name:<46} | {statistics.median(ms):8.0f} | {max(ms):8.0f} |"

    print(f"TTFF over {len(a)} posts of {args.audio.name} ({' '.join(args.overrides) or 'defaults'})")
    print(f"| {'measure':<46} | {'median ms':>8} | {'max ms':>8} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|")
    print(row("(a) POST -> 202", a))
    print(row("(b) POST -> first speech frame leaves controller", b))
    print(row("(c) POST -> first speech heard by RTMP client", c))
    return 0


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
