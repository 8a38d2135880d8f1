#!/usr/bin/env python3
"""Time-to-first-frame benchmark: POST speech repeatedly to a real server and measure

  (a) POST → 202 answer,
  (b) POST → first speech frame leaving the controller (the task's ``first_frame_on_air_at``),
  (c) POST → first speech sample heard by an RTMP client (FFmpeg decoding the live stream),

then print median and max over ``--posts`` requests, per upload length with ``--lengths``
(the speech looped to 5, 60, 300 s...: time to first frame must not grow with the upload's length),
and with ``--rss`` the server's resident memory added by a 300 s upload that waits its turn.

    scripts/rtmp_server.sh start
    .venv/bin/python scripts/bench/ttff_bench.py --posts 10 [key=value ...]
    .venv/bin/python scripts/bench/ttff_bench.py --posts 5 --lengths 5,60,300 --rss

The bench starts its own ``infer_serv.py`` (parametric engine unless overridden, idle audio off so
the first speech sample is unmistakable in the stream) and stops it at the end. Times are wall-clock
on this one machine (server, client and bench share the clock).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import soundfile as sf
from benchclient import free_port, http, multipart, publish_url  # noqa: E402  (scripts/bench/)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from latentsync.serving.ops.procfs import children, command_line  # noqa: E402

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
        self.bytes_read = 0
        self.loud_times: list[float] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        pending = b""
        while chunk := self.proc.stdout.read(BLOCK * 2):
            self.bytes_read += len(chunk)
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


def looped_speech(source: Path, seconds: float, folder: Path) -> Path:
    """A WAV of ``source`` looped to ``seconds`` (same rate and channels), written into ``folder``."""
    data, rate = sf.read(source, dtype="int16", always_2d=True)
    n = int(round(seconds * rate))
    reps = -(-n // len(data))
    out = folder / f"{source.stem}-{seconds:g}s.wav"
    sf.write(out, np.tile(data, (reps, 1))[:n], rate, subtype="PCM_16")
    return out


def rss_mib(pid: int) -> float:
    """Proportional resident memory of a process in MiB (``Pss``: pages shared with other processes,
    e.g. the FFmpeg binary's, count by their share, so several processes add up correctly)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=10)
    parser.add_argument("--audio", type=Path, default=DATA / "audio" / "4s_Wavfile_1719704064_11.wav")
    parser.add_argument("--rtmp-port", type=int, default=1935)
    parser.add_argument("--lengths", default="", help="comma-separated seconds: loop --audio to each length")
    parser.add_argument("--rss", action="store_true", help="also measure the RSS each waiting 300 s upload adds")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not args.audio.is_file():
        print(f"speech file missing: {args.audio} (give one with --audio)", file=sys.stderr)
        return 2
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
        for _attempt in range(5):  # a client that connects as the stream (re)starts may find no audio yet
            listener = OnsetListener(url)
            time.sleep(3.0)  # client connected and past its first keyframe
            if listener.proc.poll() is None and listener.bytes_read > 0:
                break
            listener.close()
        else:
            print("no RTMP client could read the stream's audio", file=sys.stderr)
            return 1
        onset = onset_offset_s(decode_audio(args.audio, 48000), 48000)
        tmp = Path(tempfile.mkdtemp(prefix="ttff-bench-"))
        lengths = [float(x) for x in args.lengths.split(",") if x.strip()]
        files = [looped_speech(args.audio, s, tmp) for s in lengths] or [args.audio]
        results = []
        for audio in files:
            figures = post_many(base, listener, audio, onset, args.posts)
            if figures is None:
                return 1
            results.append((audio, figures))
        rss = measure_waiting_rss(base, server.pid, looped_speech(args.audio, 300, tmp)) if args.rss else None
    finally:
        if listener is not None:
            listener.close()
        server.terminate()
        server.wait(15)

    def row(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return f"| {name:<46} | {statistics.median(ms):8.0f} | {max(ms):8.0f} |"

    for audio, (a, b, c, d) in results:
        print(f"TTFF over {len(a)} posts of {audio.name} ({' '.join(args.overrides) or 'defaults'})")
        print(f"| {'measure':<46} | {'median ms':>8} | {'max ms':>8} |")
        print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|")
        print(row("(a) POST -> 202", a))
        print(row("(b) POST -> first speech frame leaves controller", b))
        print(row("(b') time_to_first_frame_s of GET /tasks", d))
        print(row("(c) POST -> first speech heard by RTMP client", c))
    if rss is not None:
        print(f"RSS added by each waiting 300 s upload (server process and its decoder): {rss:.1f} MiB")
    return 0


def post_many(base: str, listener: OnsetListener, audio: Path, onset: float, posts: int):
    """POST ``audio`` ``posts`` times, one at a time from idle; ``(a, b, c, d)`` lists in seconds, None on error."""
    content = audio.read_bytes()
    a, b, c, d = [], [], [], []
    for _ in range(posts):
        while http("GET", base + "/health")[1].get("state") != "idle":
            time.sleep(0.05)
        time.sleep(0.3)
        body, headers = multipart(content, audio.name)
        t0 = time.time()
        status, accepted = http("POST", base + "/generate_video", body, headers)
        t_accept = time.time()
        if status != 202:
            print(f"POST answered {status}: {accepted}", file=sys.stderr)
            return None
        heard = listener.first_loud_after(t0, 30.0)
        task = {}
        while task.get("first_frame_on_air_at") is None and task.get("status") not in ("done", "failed", "cancelled"):
            time.sleep(0.05)
            task = http("GET", base + accepted["status_url"])[1]
        if task.get("first_frame_on_air_at") is None:
            print(f"task ended without going on air: {task}", file=sys.stderr)
            return None
        if heard is None:
            dead = listener.proc.poll() is not None
            reason = listener.proc.stderr.read().decode(errors="replace") if dead else ""
            print(f"post {len(a) + 1}: the RTMP client heard no speech within 30 s {reason}", file=sys.stderr)
        a.append(t_accept - t0)
        b.append(task["first_frame_on_air_at"] - t0)
        c.append((heard - onset - t0) if heard else float("nan"))
        d.append(task["time_to_first_frame_s"])
        http("DELETE", base + accepted["status_url"])  # only the start matters: back to idle at once
    return a, b, c, d


def children_rss_mib(pid: int, name: str) -> float:
    """Resident memory in MiB of ``pid``'s child processes whose command line names ``name``."""
    return sum(rss_mib(child) for child in children(pid) if name in command_line(child))


def measure_waiting_rss(base: str, pid: int, audio: Path, waiting: int = 4) -> float:
    """MiB (PSS) each 300 s upload adds while it waits (server process + its decoding FFmpeg, if any).

    Two uploads first (on air, and the next one admitted: tasks.generate_ahead = 1), then
    ``waiting`` more that wait their turn; the difference over ``waiting``.
    """
    body, headers = multipart(audio.read_bytes(), audio.name)
    urls = [http("POST", base + "/generate_video", body, headers)[1]["status_url"] for _ in range(2)]
    time.sleep(3.0)

    def total() -> float:
        return rss_mib(pid) + children_rss_mib(pid, "fd:")  # the confined decoders read "-i fd:"

    before = total()
    urls += [http("POST", base + "/generate_video", body, headers)[1]["status_url"] for _ in range(waiting)]
    time.sleep(3.0)
    after = total()
    for url in urls:
        http("DELETE", base + url)
    return (after - before) / waiting


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
