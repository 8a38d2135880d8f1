"""Fixtures of the agent-integration tests: a real LatentSync-Realtime server started from the server's venv.

These tests run in the agents' virtualenv (``.venv-agents``: pipecat-ai, no torch, no mediapipe),
which cannot import the server. The server runs as a subprocess of the server's own interpreter
(``.venv/bin/python infer_serv.py engine.name=parametric ...``, or ``$LATENTSYNC_SERVER_PYTHON``),
with a private nginx-rtmp (``scripts/rtmp_server.sh``) as its RTMP output, one per test module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed: run scripts/agents_venv.sh (.venv-agents)")

import soundfile as sf  # noqa: E402  (a pipecat-ai dependency)

REPO = Path(__file__).resolve().parents[3]
SERVER_PYTHON = Path(os.environ.get("LATENTSYNC_SERVER_PYTHON", REPO / ".venv" / "bin" / "python"))
RTMP_SCRIPT = REPO / "scripts" / "rtmp_server.sh"
MEDIA = REPO / "tests" / "data" / "media"
TOKEN = "agents-test-token-5c1e"
CROSSFADE_FRAMES = 2
SPEECH_IDLE_TIMEOUT_S = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def established_to(port: int) -> int:
    """TCP connections in state ESTABLISHED whose remote end is 127.0.0.1:``port`` (this host's clients of it)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def speech_pcm(seconds: float, rate_hz: int, channels: int = 1, offset_s: float = 0.0) -> np.ndarray:
    """``seconds`` of a real speech recording as int16 at ``rate_hz``: ``(n,)`` mono or ``(n, channels)``."""
    audio, source_rate = sf.read(MEDIA / "audio" / "7s_shan_0801_01.wav", dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    start = int(offset_s * source_rate)
    need = start + int(seconds * source_rate) + 1
    audio = np.tile(audio, need // len(audio) + 1)[start:need]
    n = int(seconds * rate_hz)
    resampled = np.interp(np.arange(n) * source_rate / rate_hz, np.arange(len(audio)), audio)
    samples = (np.clip(resampled, -1, 1) * 32767).astype(np.int16)
    return samples if channels == 1 else np.repeat(samples[:, None], channels, axis=1)


def task_info(url: str, task_id: str) -> dict:
    """``GET /tasks/<id>`` of the server at ``url``."""
    request = urllib.request.Request(f"{url}/tasks/{task_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return dict(json.loads(r.read()))


def task_status(url: str, task_id: str) -> str:
    """The server's status of ``task_id``: queued, processing, done, cancelled, failed."""
    return str(task_info(url, task_id)["status"])


class RtmpServer:
    """A private nginx-rtmp on free loopback ports (scripts/rtmp_server.sh), the server's RTMP output."""

    def __init__(self, run_dir: Path):
        self.port = free_port()
        self.env = dict(
            os.environ, RTMP_PORT=str(self.port), RTMP_HTTP_PORT=str(free_port()), RTMP_RUN_DIR=str(run_dir)
        )
        self.run_dir = run_dir

    def _script(self, verb: str) -> None:
        subprocess.run(["bash", str(RTMP_SCRIPT), verb], env=self.env, check=True, capture_output=True, timeout=60)

    def start(self) -> RtmpServer:
        self._script("start")
        return self

    def stop(self) -> None:
        self._script("stop")

    def url(self, key: str) -> str:
        secret = (self.run_dir / "publish.secret").read_text().strip()
        return f"rtmp://127.0.0.1:{self.port}/live/{key}?secret={secret}"


class LatentSyncServer:
    """``infer_serv.py`` (parametric engine) as a subprocess of the server's venv; :meth:`restart` keeps its port."""

    def __init__(self, overrides: list[str], tmp: Path):
        self.port = free_port()
        self.overrides = overrides
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: object = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.tmp / f"server-{self.starts}.log"

    def start(self) -> LatentSyncServer:
        self.starts += 1
        (self.tmp / "tmp").mkdir(exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [str(SERVER_PYTHON), str(REPO / "infer_serv.py"), f"server.port={self.port}", *self.overrides],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(self.tmp / "tmp")),
        )
        return self

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}")
        except (OSError, ValueError):
            return {}

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"server exited:\n{self.log()}"
            if self.health().get("engine_ready"):
                return
            time.sleep(0.2)
        raise AssertionError(f"server not ready within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (SIGKILL past ``timeout_s``); the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._log.close()  # type: ignore[attr-defined]
        return proc.returncode

    def restart(self) -> None:
        self.stop()
        self.start().wait_ready()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (token :data:`TOKEN`, ``stream.crossfade_frames`` :data:`CROSSFADE_FRAMES`)."""
    if not SERVER_PYTHON.exists():
        pytest.skip(f"no server interpreter at {SERVER_PYTHON} (make setup, or set LATENTSYNC_SERVER_PYTHON)")
    if not (shutil.which("nginx") and Path("/usr/lib/nginx/modules/ngx_rtmp_module.so").is_file()):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("nginx + libnginx-mod-rtmp not installed (scripts/rtmp_server.sh install)")
        pytest.skip("nginx + libnginx-mod-rtmp not installed (scripts/rtmp_server.sh install)")
    tmp = tmp_path_factory.mktemp("agents")
    rtmp = RtmpServer(tmp / "rtmp").start()
    proc = LatentSyncServer(
        [
            f"avatar.idle_video={MEDIA / 'video' / 'nanmote002.mp4'}",
            f"avatar.cache_dir={tmp / 'avatars'}",
            "engine.name=parametric",
            f"stream.rtmp_url={rtmp.url('agents')}",
            f"api.token={TOKEN}",
            "api.auth_failures_per_min=1000",
            f"stream.crossfade_frames={CROSSFADE_FRAMES}",
            f"speech_stream.idle_timeout_s={SPEECH_IDLE_TIMEOUT_S}",  # an idle /ws/speech is closed soon
            "webrtc.enabled=false",
        ],
        tmp,
    )
    try:
        proc.start().wait_ready()
        yield proc
    finally:
        code = proc.stop()
        rtmp.stop()
        assert code in (0, None), proc.log()
