"""Helpers shared by the benchmarks (stdlib only): free port, JSON requests, multipart uploads, RTMP publish URLs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.error
import urllib.request

HTTP_TIMEOUT_S = 60.0
RTMP_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "rtmp_server.sh")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout_s: float = HTTP_TIMEOUT_S
) -> tuple[int, dict]:
    """One request; returns ``(status, JSON body)`` for any HTTP status (non-JSON bodies wrapped)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}")
        except ValueError:
            return e.code, {"error": {"code": "non_json", "message": raw[:200].decode(errors="replace")}}


def multipart(content: bytes, filename: str) -> tuple[bytes, dict]:
    """A multipart/form-data body with one ``audio_file`` part, and its headers."""
    boundary = "----latentsync-bench"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio_file"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def publish_url(rtmp_port: int, key: str, env: dict | None = None) -> str:
    """The URL our FFmpeg publishes to on the local nginx-rtmp of ``scripts/rtmp_server.sh``.

    That server refuses publishers without its secret (``rtmp_server.sh publish-url`` prints the
    URL with it). ``env`` carries ``RTMP_RUN_DIR`` etc. for a server started with them.
    """
    run_env = dict(env if env is not None else os.environ, RTMP_PORT=str(rtmp_port))
    out = subprocess.run(
        ["bash", RTMP_SCRIPT, "publish-url", key], env=run_env, capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip()


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM a server started by a bench and wait ``timeout_s`` seconds for it; SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def steal_ms() -> float:
    """Time the hypervisor ran something else while this machine's vCPUs were runnable, all vCPUs summed, ms.

    The ``steal`` column (8th value) of ``/proc/stat``'s ``cpu`` line, in USER_HZ ticks (10 ms
    resolution); 0 on bare metal. A vCPU taken away for 20 ms makes a clock on it late with nothing
    in the guest to blame.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
