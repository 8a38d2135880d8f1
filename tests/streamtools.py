"""Test helpers: a private nginx-rtmp server, the server under test as a real process, and a real
RTMP client (FFmpeg) that records and measures the stream."""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from latentsync.serving.ops import procfs

REPO = Path(__file__).resolve().parents[1]
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
RTMP_SCRIPT = REPO / "scripts" / "rtmp_server.sh"


def seconds_until(predicate, timeout_s: float, poll_s: float = 0.05) -> float | None:
    """Seconds until predicate() is true, or None on timeout."""
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        if predicate():
            return time.monotonic() - t
        time.sleep(poll_s)
    return None


def thread_niceness(tid: int | None = None, pid: int | None = None) -> int:
    """A thread's niceness as the kernel reports it: ``nice`` of ``/proc/<pid>/task/<tid>/stat``.

    Defaults: the calling thread (``threading.get_native_id()``) of this process.

    Raises:
        ProcessLookupError: If the thread is gone.
    """
    tid = tid or threading.get_native_id()
    thread = procfs.read_stat(pid or "self", tid)
    if thread is None:
        raise ProcessLookupError(f"no thread {tid} in process {pid or 'self'}")
    return thread.nice


def sched_policy(tid: int = 0) -> int:
    """Scheduling policy of thread ``tid`` (0: the calling one), ``os.SCHED_*``, without ``SCHED_RESET_ON_FORK``."""
    return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK


def may_use_fifo(priority: int, pid: int | None = None) -> bool:
    """Whether process ``pid`` (default: this one) may put a thread under SCHED_FIFO at ``priority``.

    The kernel allows it with CAP_SYS_NICE (bit 23 of ``CapEff`` in ``/proc/<pid>/status``) or an
    RLIMIT_RTPRIO of at least ``priority`` (sched_setscheduler(2)).
    """
    effective = procfs.effective_capabilities(pid or "self")
    return bool(effective >> 23 & 1) or resource.prlimit(pid or 0, resource.RLIMIT_RTPRIO)[0] >= priority


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_rtmp_tools() -> None:
    """Skip locally when nginx-rtmp is absent; under CI=true a missing tool is a failure."""
    if Path("/usr/lib/nginx/modules/ngx_rtmp_module.so").is_file() and shutil.which("nginx"):
        return
    message = "nginx + libnginx-mod-rtmp not installed (run scripts/rtmp_server.sh install)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class RtmpServer:
    """A private nginx-rtmp instance on a free loopback port, run by scripts/rtmp_server.sh."""

    def __init__(self, run_dir: Path, push_url_file: Path | None = None):
        self.port = free_port()
        self.http_port = free_port()
        self.run_dir = run_dir
        self.env = dict(
            os.environ, RTMP_PORT=str(self.port), RTMP_HTTP_PORT=str(self.http_port), RTMP_RUN_DIR=str(run_dir)
        )
        if push_url_file is not None:  # relay everything published here to the URL in that file
            self.env["RTMP_PUSH_URL_FILE"] = str(push_url_file)

    def _script(self, verb: str) -> None:
        subprocess.run(["bash", str(RTMP_SCRIPT), verb], env=self.env, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")

    def url(self, key: str = "avatar") -> str:
        """The publish URL of ``live/<key>``, with the server's publish secret (plays too)."""
        secret = (self.run_dir / "publish.secret").read_text().strip()
        return f"rtmp://127.0.0.1:{self.port}/live/{key}?secret={secret}"

    def nginx_pids(self) -> tuple[int, list[int]]:
        """nginx's master pid and its worker pids."""
        master = int((self.run_dir / "nginx.pid").read_text())
        out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
        return master, [int(p) for p in out]

    def publishing(self, key: str = "avatar") -> bool:
        """True when nginx reports a client publishing to ``live/<key>`` (its /stat page)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/stat", timeout=2) as r:
                root = ET.fromstring(r.read())
        except (OSError, ET.ParseError):
            return False
        for stream in root.iter("stream"):
            if stream.findtext("name") == key and any(c.find("publishing") is not None for c in stream.iter("client")):
                return True
        return False


class ServerProcess:
    """``infer_serv.py`` as a subprocess with its own port and RTMP key."""

    def __init__(self, overrides: list[str], log_path: Path, tmpdir: Path | None = None, script: Path | None = None):
        """``script``: what runs instead of ``infer_serv.py`` with the same arguments (tests/flaky_server.py)."""
        self.port = free_port()
        self.script = script or REPO / "infer_serv.py"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if tmpdir is not None:
            self.env["TMPDIR"] = str(tmpdir)  # the server's private FIFO directory goes here
        self.overrides = [f"server.port={self.port}", *overrides]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), *self.overrides],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        return self

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except OSError:
            return 0, {}

    def wait_healthy(self, timeout_s: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"server exited:\n{self.log()}"
            status, body = self.health()
            if status == 200:
                return body
            time.sleep(0.2)
        raise AssertionError(f"server not healthy within {timeout_s} s:\n{self.log()}")

    def wait_engine_ready(self, timeout_s: float = 180.0) -> dict:
        """Wait until ``/health`` reports the engine ready (uploads accepted); returns that health body."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"server exited:\n{self.log()}"
            body = self.health()[1]
            if body.get("engine_ready"):
                return body
            time.sleep(0.2)
        raise AssertionError(f"engine not ready within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def serving_pid(self) -> int:
        """The process that serves requests and owns the stream (here: the one started)."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout_s: float = 10.0) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code, seconds it took). Kills it if it overruns."""
        if self.proc is None:
            return None, 0.0
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                self._log.close()
                return None, time.monotonic() - t
        self._log.close()
        return self.proc.returncode, time.monotonic() - t


class GunicornProcess(ServerProcess):
    """The app under gunicorn as ``configs/gunicorn.conf.py`` runs it (one worker), with its own port and overrides.

    The overrides reach the worker as the shipped unit gives them (``$LATENTSYNC_OVERRIDES``);
    :attr:`proc` is gunicorn's master (SIGTERM stops it and its worker).
    """

    def start(self) -> GunicornProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(self.env, LATENTSYNC_OVERRIDES=" ".join(shlex.quote(o) for o in self.overrides))
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("gunicorn")), "-c", "configs/gunicorn.conf.py",
             "latentsync.serving.api.app:create_app()"],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        return self

    def serving_pid(self) -> int:
        """gunicorn's one worker process (the master only supervises it)."""
        assert self.proc is not None
        workers = procfs.children(self.proc.pid)
        assert len(workers) == 1, workers
        return workers[0]


def pull_stream(url: str, seconds: float, out_path: Path) -> Path:
    """Record ``seconds`` of an RTMP stream with FFmpeg (stream copy into FLV)."""
    cmd = [
        FFMPEG,
        "-hide_banner",
        "-loglevel",
        "error",
        "-rw_timeout",
        "10000000",
        "-i",
        url,
        "-t",
        f"{seconds}",
        "-c",
        "copy",
        "-y",
        str(out_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, timeout=seconds + 30, check=False)
    assert proc.returncode == 0 and out_path.stat().st_size > 0, proc.stderr.decode(errors="replace")[-2000:]
    return out_path


class StreamRecorder:
    """A real RTMP client (FFmpeg) recording a stream into FLV in the background.

    Started before the publisher, it waits on nginx (``idle_streams`` is on) and captures the stream
    from its very first packet; :meth:`finish` ends it (SIGINT: FFmpeg finalises the file).
    """

    def __init__(self, url: str, out_path: Path, rw_timeout_s: float = 60.0, max_s: float = 120.0):
        self.out_path = out_path
        cmd = [
            FFMPEG,
            "-hide_banner",
            "-loglevel",
            "error",
            "-rw_timeout",
            str(int(rw_timeout_s * 1e6)),
            "-i",
            url,
            "-t",
            str(max_s),
            "-c",
            "copy",
            "-y",
            str(out_path),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self, settle_s: float = 2.5, timeout_s: float = 15.0) -> Path:
        """Stop recording ``settle_s`` after the publisher is gone (SIGINT); returns the file.

        SIGINT may lose the last packets the client had not muxed yet: use :meth:`wait_end` when
        the tail matters.
        """
        time.sleep(settle_s)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait_end(timeout_s)

    def wait_end(self, timeout_s: float = 30.0) -> Path:
        """Wait until the client ends by itself (``rw_timeout_s`` after the publisher stops).

        Unlike :meth:`finish` this loses nothing: FFmpeg has read and written every packet.
        """
        try:
            _, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        assert self.out_path.exists() and self.out_path.stat().st_size > 0, err.decode(errors="replace")[-2000:]
        return self.out_path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Recording:
    """What a recorded stream holds."""

    video_codec: str
    width: int
    height: int
    video_pts_ms: np.ndarray
    audio_codec: str
    audio_rate_hz: int
    audio_samples: int

    @property
    def fps(self) -> float:
        pts = self.video_pts_ms
        return (len(pts) - 1) / ((pts[-1] - pts[0]) / 1000.0)

    @property
    def video_duration_s(self) -> float:
        return len(self.video_pts_ms) / self.fps

    @property
    def audio_duration_s(self) -> float:
        return self.audio_samples / self.audio_rate_hz


_STREAM_RE = re.compile(r"Stream #0:(\d+).*?: (Video|Audio): (\w+)[^,]*,(.*)")


def analyse_recording(path: Path) -> Recording:
    """Read codecs and sizes from the container, packet PTS (framecrc) and the decoded audio length."""
    info = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, timeout=30).stderr.decode()
    video = audio = None
    for m in _STREAM_RE.finditer(info):
        if m.group(2) == "Video":
            size = re.search(r"(\d{2,5})x(\d{2,5})", m.group(4))
            video = (m.group(3), int(size.group(1)), int(size.group(2)))
        else:
            audio = (m.group(3), int(re.search(r"(\d+) Hz", m.group(4)).group(1)))
    assert video and audio, f"recording lacks a stream:\n{info}"
    pts_ms = np.rint(packet_pts_s(path, "v") * 1000).astype(np.int64)  # FLV's time base is 1/1000 s
    pcm = ffmpeg_stdout(path, "-map", "0:a:0", "-ac", "1", "-f", "s16le")
    return Recording(video[0], video[1], video[2], np.sort(pts_ms), audio[0], audio[1], len(pcm) // 2)


def ffmpeg_stdout(path: Path, *output_args: str, timeout_s: float = 60.0) -> bytes:
    """What ``ffmpeg -i path <output_args> -`` writes to stdout (fails the test if FFmpeg fails)."""
    cmd = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), *output_args, "-"]
    return subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=True).stdout


def packet_pts_s(path: Path, stream: str, timeout_s: float = 60.0) -> np.ndarray:
    """PTS in seconds of every packet of the first ``stream`` ("v" or "a"), in file order (no decode)."""
    crc = ffmpeg_stdout(path, "-map", f"0:{stream}:0", "-c", "copy", "-f", "framecrc", timeout_s=timeout_s).decode()
    tb, pts = 1 / 1000, []
    for line in crc.splitlines():
        if line.startswith("#tb"):
            num, den = line.split(":")[1].strip().split("/")
            tb = int(num) / int(den)
        elif line and not line.startswith("#"):
            pts.append(int(line.split(",")[2]) * tb)
    return np.array(pts, dtype=np.float64)


def first_pts_s(path: Path, stream: str) -> float:
    """PTS of the first packet of ``stream`` ("v" or "a") in seconds."""
    pts = packet_pts_s(path, stream)
    if not len(pts):
        raise AssertionError(f"no {stream} packets in {path}")
    return float(pts[0])


def decode_recording(path: Path, sample_rate_hz: int) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Frames ``(F, H, W, 3) uint8`` with the first frame's time, and mono audio with its first sample's time."""
    # passthrough: no frames duplicated to pad the video back to t=0 (it starts at its first keyframe)
    gen = imageio_ffmpeg.read_frames(str(path), output_params=["-fps_mode", "passthrough"])
    meta = next(gen)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in gen])
    pcm = ffmpeg_stdout(path, "-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate_hz), "-f", "s16le")
    audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    return frames, first_pts_s(path, "v"), audio, first_pts_s(path, "a")


def mouth_openings(frames: np.ndarray) -> np.ndarray:
    """Inner-lip distance / face height per frame from a fresh MediaPipe face mesh (NaN where no face)."""
    import mediapipe as mp

    out = np.full(len(frames), np.nan)
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True) as mesh:
        for i, frame in enumerate(frames):
            found = mesh.process(frame).multi_face_landmarks
            if found:
                lm = np.array([(p.x * frame.shape[1], p.y * frame.shape[0]) for p in found[0].landmark])
                out[i] = np.linalg.norm(lm[13] - lm[14]) / np.linalg.norm(lm[10] - lm[152])
    return out


def rms_envelope(audio: np.ndarray, hop: int) -> np.ndarray:
    """RMS of consecutive ``hop``-sample blocks."""
    n = len(audio) // hop
    return np.sqrt(np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1))


class Api:
    """Minimal HTTP client for the server under test (urllib, multipart by hand)."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def post_audio(
        self,
        content: bytes | None,
        filename: str = "speech.wav",
        fields: dict | None = None,
        path: str = "/generate_video",
        field: str = "audio_file",
        headers: dict | None = None,
    ):
        boundary = "----latentsync-test-boundary"
        parts = []
        for name, value in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        if content is not None:
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n".encode()
                + content
                + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
        return self.request("POST", path, body, {**(headers or {}), "Content-Type": content_type})

    def task(self, task_id: str) -> dict:
        return self.request("GET", f"/tasks/{task_id}")[1]

    def wait_task(self, task_id: str, states: tuple[str, ...], timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            t = self.task(task_id)
            if t.get("status") in states:
                return t
            time.sleep(0.05)
        raise AssertionError(f"task {task_id} not in {states} within {timeout_s} s: {self.task(task_id)}")
