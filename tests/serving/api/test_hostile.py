"""Hostile clients against one real server: the control plane is as safe as the upload path.

Every attack of issue 20's nine classes is made against a running ``infer_serv.py`` (parametric
engine, a real RTMP server, a token) and must get its 4xx answer with nothing happening: no file
outside ``media.root`` opened or written, no outbound connection (tripwire sockets), the server's
RSS bounded, ``/health`` answering within 200 ms and the stream at 0 dropped ticks throughout.
Then the concurrency attacks: 16 simultaneous WHEP offers at 7 viewers for 20 rounds, 8
simultaneous avatar uploads, and one WebSocket client sending deflated, garbage and unread traffic
for 30 s. Each test prints its table (``pytest -s``); docs/security.md lists the threats.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import selectors
import shutil
import socket
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from latentsync.serving.ops import procfs
from tests.datafiles import media_file, other_bytes
from tests.flaky_server import OPTIONS_ENV
from tests.flaky_server import __file__ as FLAKY_SERVER
from tests.speechclient import SpeechClient
from tests.streamtools import FFMPEG, GunicornProcess, ServerProcess
from tests.whep_client import WhepViewer

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

TOKEN = "hostile-matrix-token-5c1e9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_VIEWERS = 8
MAX_LONG_LIVED = 3
AUTH_FAILURES_PER_MIN = 5
MUTATIONS_PER_MIN = 600  # the default
MAX_PREPARING = 2
PROXY = "127.0.0.5"  # server.trusted_proxies: a reverse proxy in front of the server
HEALTH_MAX_S = 0.2  # /health during the matrix (light load; measured ~12 ms)
#: ... while this very process also drives 23 peer connections or floods a socket on the same 2 cores
#: (measured 43-76 ms in this test, once 923 ms in an ad-hoc run): a wedged loop never answers at all
#: (the code before issue 20: the round timed out after 60 s, /health calls timed out after 30 s)
BUSY_HEALTH_MAX_S = 5.0
WS_RSS_GROWTH_MB = 50.0


# ------------------------------------------------------------------------------------------ helpers
def call(
    port: int,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict | None = None,
    source: str = "127.0.0.1",
    auth: bool = True,
) -> tuple[int, dict]:
    """One HTTP request from loopback address ``source``; ``(status, JSON body or {})``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    hdrs = {**(AUTH if auth else {}), **(headers or {})}
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data or b"{}")
    except ValueError:
        return response.status, {"raw": data[:200].decode(errors="replace")}


def code_of(body: dict) -> str | None:
    return (body.get("error") or {}).get("code")


def rss_mb(pid: int) -> float:
    """Resident set size of the server process in MiB (:func:`procfs.rss_mb`); it must still run."""
    found = procfs.rss_mb(pid)
    assert found > 0, f"no VmRSS for {pid}: the server is gone"
    return found


class Tripwire:
    """A listening TCP socket that records every connection made to it (an outbound one would land here)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()[:2]
        self.connections: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class Watch:
    """Polls ``/health`` every 0.1 s and keeps ``(seconds it took, status, body)``."""

    def __init__(self, port: int):
        self.port = port
        self.samples: list[tuple[float, int, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                status, body = call(self.port, "GET", "/health")
            except OSError:
                status, body = 0, {}
            self.samples.append((time.monotonic() - t, status, body))
            self._stop.wait(0.1)

    def close(self) -> dict:
        """Stop; returns the worst latency, the statuses seen and the last dropped-tick count."""
        self._stop.set()
        self._thread.join(5)
        return {
            "max_s": max(s for s, _, _ in self.samples),
            "statuses": {status for _, status, _ in self.samples},
            "dropped": max(b.get("dropped_ticks", -1) for _, _, b in self.samples),
            "n": len(self.samples),
        }


def table(title: str, rows: list[tuple[str, ...]]) -> None:
    """Print rows as a Markdown table (``pytest -s``)."""
    print(f"\n{title}\n| attack | answer | evidence |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def make_clip(path: Path, size: str, rate: int, seconds: float) -> Path:
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error",
         "-f", "lavfi", "-i", f"color=c=gray:s={size}:r={rate}:d={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-y", str(path)],
        check=True,
        timeout=120,
    )  # fmt: skip
    return path


# ------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "tmp").mkdir()
    media = tmp / "media"
    media.mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    presenter = media_file("video/nanmote002.mp4")
    shutil.copy(presenter, media / "presenter.mp4")
    shutil.copy(presenter, outside / "secret.mp4")  # a valid video, but outside media.root
    (media / "notes.mp4").write_text("not a video, only named like one\n")
    (media / "escape.mp4").symlink_to("/etc/passwd")
    make_clip(media / "eightk.mp4", "7680x4320", 120, 0.1)
    make_clip(media / "long.mp4", "64x64", 5, 40.0)
    key = f"hostile-{rtmp_server.port}"
    wrong_flag = tmp / "wrong-faces"  # while it exists, the workers answer faces of the wrong size
    proc = ServerProcess(
        [
            f"avatar.idle_video={presenter}",
            f"avatar.cache_dir={tmp / 'avatars'}",
            "engine.name=parametric",
            f"stream.rtmp_url={rtmp_server.url(key)}",
            f"api.token={TOKEN}",
            f"media.root={media}",
            "media.max_clip_s=30",
            f"channels_file={tmp / 'channels.json'}",
            f"api.max_long_lived={MAX_LONG_LIVED}",
            f"api.auth_failures_per_min={AUTH_FAILURES_PER_MIN}",
            f"server.trusted_proxies=[{PROXY}]",
            f"webrtc.max_viewers={MAX_VIEWERS}",
            f"avatar.max_preparing={MAX_PREPARING}",
            "webrtc.max_height=256",
        ],
        tmp / "server.log",
        tmpdir=tmp / "tmp",
        script=FLAKY_SERVER,  # the parametric engine until wrong_flag exists
    )
    proc.env[OPTIONS_ENV] = json.dumps({"wrong_flag": str(wrong_flag)})
    proc.start()
    proc.tmp, proc.media, proc.outside, proc.rtmp, proc.wrong_flag = tmp, media, outside, rtmp_server, wrong_flag
    try:
        proc.wait_healthy()
        proc.wait_engine_ready()
        yield proc
    finally:
        code, took_s = proc.stop()
    assert code == 0 and took_s < 10.0, proc.log()
    assert TOKEN not in (tmp / "server.log").read_text(errors="replace"), "the token reached the server's log"


def wait_channel(port: int, name: str, states: tuple[str, ...], timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = call(port, "GET", f"/channels/{name}")
        if status == 200 and body.get("status") in states:
            return body
        time.sleep(0.1)
    raise AssertionError(
        f"channel {name} not in {states} within {timeout_s} s: {call(port, 'GET', f'/channels/{name}')}"
    )


# ------------------------------------------------------------------------------------------ the matrix
def test_the_hostile_matrix_is_refused_and_nothing_happens(server):
    port, rtmp = server.port, server.rtmp
    good_url = rtmp.url("hostile-ok")
    trip = Tripwire("127.0.0.1")
    trip_other = Tripwire("127.0.0.2")
    pid = server.proc.pid
    rss_before = rss_mb(pid)
    watch = Watch(port)
    rows: list[tuple[str, ...]] = []
    try:
        # 1. files outside media.root, by path, by .., by symlink; the answer never says whether they exist
        answers = {}
        for label, path in (
            ("/etc/shadow", "/etc/shadow"),
            ("/etc/no-such-file", "/etc/no-such-file"),
            ("../outside/secret.mp4", "../outside/secret.mp4"),
            ("symlink to /etc/passwd", "escape.mp4"),
        ):
            status, body = call(port, "PUT", "/channels/x1", {"rtmp_url": good_url, "idle_video": path})
            assert status == 400, (label, status, body)
            answers[label] = body["error"]["message"]
            assert call(port, "GET", "/channels/x1")[0] == 404, label
        assert answers["/etc/shadow"] == answers["/etc/no-such-file"] == answers["../outside/secret.mp4"]
        assert answers["symlink to /etc/passwd"] == answers["/etc/shadow"]
        assert "shadow" not in answers["/etc/shadow"] and "passwd" not in answers["symlink to /etc/passwd"]
        rows.append(
            (
                "1. PUT channel `idle_video: /etc/shadow`, `../outside/…`, a symlink out",
                "400 (same message for an existing and a missing file)",
                "no channel made; message names no path",
            )
        )
        status, body = call(port, "PUT", "/channels/main", {"idle_video": "/etc/shadow"})
        assert status == 400, body
        assert call(port, "GET", "/channels/main")[1].get("switch") in (None, {}), "a switch was started"
        rows.append(
            ("1. avatar switch of main by path `/etc/shadow`", f"{status} {code_of(body)}", "no switch started")
        )
        status, body = call(port, "PUT", "/channels/x2", {"rtmp_url": good_url, "idle_video": "notes.mp4"})
        assert status == 202, body
        failed = wait_channel(port, "x2", ("failed",))
        reason = failed.get("error") or ""
        assert "Invalid data" not in reason and str(server.media) not in reason and "ffmpeg" not in reason.lower(), (
            reason
        )
        assert call(port, "DELETE", "/channels/x2")[0] == 200
        rows.append(
            (
                "1. a text file inside media.root as `idle_video`",
                "202, channel `failed`",
                f"reason `{reason}` (no FFmpeg text, no path)",
            )
        )

        # 2. outputs: tee injection, record_path, hosts not allowed (a port scanner)
        for label, url in (
            ("tee injection", f"{good_url}|[f=mpegts]tcp://127.0.0.1:{trip.port}"),
            ("backslash", f"rtmp://127.0.0.1:{rtmp.port}/live/a\\b"),
            ("whitespace", f"rtmp://127.0.0.1:{rtmp.port}/live/a b"),
            ("host not allowed", f"rtmp://127.0.0.2:{trip_other.port}/live/x"),
            ("not rtmp", f"tcp://127.0.0.1:{trip.port}"),
        ):
            status, body = call(port, "PUT", "/channels/x3", {"rtmp_url": url, "idle_video": "presenter.mp4"})
            assert status == 400, (label, status, body)
            assert call(port, "GET", "/channels/x3")[0] == 404, label
        rows.append(
            (
                "2. `rtmp_url` with `|[f=mpegts]tcp://…`, `\\`, whitespace, a host not allowed, `tcp://`",
                "400 each",
                "no channel; tripwires on 127.0.0.1 and 127.0.0.2 saw 0 connections",
            )
        )
        target = server.tmp / "owned.flv"
        for name in ("x4", "main"):
            status, body = call(
                port,
                "PUT",
                f"/channels/{name}",
                {"rtmp_url": good_url, "record_path": str(target), "idle_video": "presenter.mp4"},
            )
            assert status == 400, (name, status, body)
        rows.append(("2. `record_path` in a PUT body (new channel and main)", "400 each", "no file written"))

        # 3. budgets before decoding: pixel rate, an 8K 120 fps clip, a clip too long
        status, body = call(
            port,
            "PUT",
            "/channels/x5",
            {"rtmp_url": good_url, "idle_video": "presenter.mp4", "width": 7680, "height": 4320, "fps": 120},
        )
        assert status == 400, body
        rows.append(("3. PUT channel 7680x4320 at 120 fps", f"{status} {code_of(body)}", "no channel made"))
        for name, clip, words in (("x6", "eightk.mp4", "pixels"), ("x7", "long.mp4", "media.max_clip_s")):
            rss_start = rss_mb(pid)
            status, body = call(port, "PUT", f"/channels/{name}", {"rtmp_url": good_url, "idle_video": clip})
            assert status == 202, body
            failed = wait_channel(port, name, ("failed",))
            assert words in (failed.get("error") or ""), failed
            grew = rss_mb(pid) - rss_start
            assert grew < 50, (name, grew)
            assert call(port, "DELETE", f"/channels/{name}")[0] == 200
            rows.append(
                (
                    f"3. `idle_video` {clip}",
                    "202, channel `failed`",
                    f"`{failed['error'][:70]}…`; RSS +{grew:.0f} MB; not kept in channels_file",
                )
            )
        kept = json.loads((server.tmp / "channels.json").read_text()) if (server.tmp / "channels.json").exists() else {}
        assert not any(c["name"].startswith("x") for c in kept.get("created", [])), kept

        # 9. a valid channel: ready, then kept in channels_file with mode 0600
        status, body = call(port, "PUT", "/channels/ok", {"rtmp_url": good_url, "idle_video": "presenter.mp4"})
        assert status == 202, body
        wait_channel(port, "ok", ("ready",), timeout_s=120)
        deadline = time.monotonic() + 10
        while not (server.tmp / "channels.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        mode = (server.tmp / "channels.json").stat().st_mode & 0o777
        assert mode == 0o600, oct(mode)
        assert call(port, "DELETE", "/channels/ok")[0] == 200
        rows.append(("9. channels_file keeps stream keys", "written only once `ready`", f"mode {oct(mode)}"))

        # 6. the token never in a URL
        status, body = call(port, "GET", f"/channels?token={TOKEN}", auth=False)
        assert status == 401, body
        status, _, _ = ws_handshake(port, f"/ws/speech?token={TOKEN}", auth=False)
        assert status == 401
        rows.append(
            (
                "6. `?token=` on `/channels` and `/ws/speech`",
                "401 each",
                "token absent from the server log (checked at stop)",
            )
        )

        # 9. DNS rebinding, failed auth, mutations
        status, body = call(port, "GET", "/channels", headers={"Host": "evil.example"})
        assert status == 421 and code_of(body) == "bad_host", body
        rows.append(("9. `Host: evil.example` (DNS rebinding)", f"{status} {code_of(body)}", "nothing answered"))
        answers = [
            call(port, "GET", "/channels", source="127.0.0.2", headers={"Authorization": "Bearer wrong"})[0]
            for _ in range(AUTH_FAILURES_PER_MIN + 1)
        ]
        assert answers == [401] * AUTH_FAILURES_PER_MIN + [429], answers
        status, body = call(port, "GET", "/channels", source="127.0.0.2")
        assert status == 429 and code_of(body) == "too_many_auth_failures", body
        assert call(port, "GET", "/channels")[0] == 200  # another client is not locked out
        rows.append(
            (
                f"9. {AUTH_FAILURES_PER_MIN + 1} wrong tokens from one address",
                "401 ×5, then 429 `too_many_auth_failures` (the right token too)",
                "another address still served",
            )
        )

        # Behind a reverse proxy (server.trusted_proxies): each forwarded client has its own bucket; a
        # client that reaches the server directly cannot pick its address with X-Forwarded-For.
        def guesses(source: str, forwarded: list[str]) -> list[int]:
            bad = {"Authorization": "Bearer wrong"}
            return [call(port, "GET", "/channels", source=source, headers={**bad, "X-Forwarded-For": f})[0]
                    for f in forwarded]  # fmt: skip

        proxied = guesses(PROXY, ["198.51.100.1"] * (AUTH_FAILURES_PER_MIN + 1))
        other_client = call(port, "GET", "/channels", source=PROXY, headers={"X-Forwarded-For": "198.51.100.2"})[0]
        forged = guesses("127.0.0.6", [f"192.0.2.{i}" for i in range(AUTH_FAILURES_PER_MIN + 1)])
        assert proxied == [401] * AUTH_FAILURES_PER_MIN + [429], proxied
        assert other_client == 200
        assert forged == [401] * AUTH_FAILURES_PER_MIN + [429], forged
        rows.append(
            (
                f"9. {AUTH_FAILURES_PER_MIN + 1} wrong tokens through a trusted proxy; the same from a "
                "direct client forging a new `X-Forwarded-For` each time",
                "proxied client: 401 ×5, then 429 (another one behind the same proxy: 200); forger: 401 ×5, then 429",
                "before (no `server.trusted_proxies`): every client behind a proxy shared its one bucket",
            )
        )
        answers = [call(port, "DELETE", "/tasks/none", source="127.0.0.3")[0] for _ in range(MUTATIONS_PER_MIN + 1)]
        assert set(answers[:MUTATIONS_PER_MIN]) == {404} and answers[-1] == 429, answers[-3:]
        rows.append(
            (
                f"9. {MUTATIONS_PER_MIN + 1} DELETEs in a minute from one address",
                "404 ×600, then 429 `rate_limited`",
                "another address still served",
            )
        )

        # 7. long-lived connections: a cap below the thread count; health, uploads and cancels still served
        streams = [sse_open(port) for _ in range(MAX_LONG_LIVED)]
        try:
            assert all(s[0] == 200 for s in streams), [s[0] for s in streams]
            status, body = call(port, "GET", "/events")
            assert status == 503 and code_of(body) == "too_many_connections", body
            ws_status, _, _ = ws_handshake(port, "/ws/speech")
            assert ws_status == 503
            t = time.monotonic()
            assert call(port, "GET", "/health", auth=False)[0] == 200
            health_s = time.monotonic() - t
            assert health_s <= HEALTH_MAX_S, health_s
            wav = media_file("audio/4s_Wavfile_1719704064_11.wav").read_bytes()
            status, body = upload(port, wav)
            assert status == 202, body
            assert call(port, "DELETE", f"/tasks/{body['task_id']}")[0] == 200
        finally:
            for _, sock in streams:
                sock.close()
        wait_long_lived_free(port)
        rows.append(
            (
                f"7. {MAX_LONG_LIVED} unread event streams (api.max_long_lived) + 1 more, + a WebSocket",
                "503 `too_many_connections` each",
                f"/health in {health_s * 1000:.0f} ms, an upload accepted and cancelled",
            )
        )
    finally:
        summary = watch.close()
        trip.close()
        trip_other.close()
    assert trip.connections == [] and trip_other.connections == [], (trip.connections, trip_other.connections)
    assert not target.exists()
    assert summary["statuses"] == {200}, summary
    assert summary["max_s"] <= HEALTH_MAX_S, summary
    assert summary["dropped"] == 0, summary
    grew = rss_mb(pid) - rss_before
    table(
        f"hostile matrix (/health: {summary['n']} polls, max {summary['max_s'] * 1000:.0f} ms, "
        f"dropped ticks {summary['dropped']}; server RSS {rss_before:.0f} → {rss_before + grew:.0f} MB)",
        rows,
    )


def wait_task(port: int, task_id: str, timeout_s: float = 60.0) -> dict:
    """The task's record once it reached a final state (done, failed, cancelled)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = call(port, "GET", f"/tasks/{task_id}")
        if status == 200 and body.get("status") in ("done", "failed", "cancelled"):
            return body
        assert time.monotonic() < deadline, f"task {task_id} not final within {timeout_s} s: {status} {body}"
        time.sleep(0.1)


def test_a_worker_answering_faces_of_the_wrong_size_fails_its_task_and_the_stream_goes_on(server):
    """A real worker process answers every chunk with faces of half the avatar's side (tests/flaky_engine.py
    ``wrong_flag``, as a worker of another engine build would). Before issue 35 such faces reached the clock
    thread, whose paste-back raised: the stream stopped. Now the pool fails the job with the reason, so the task
    fails, the stream never drops a tick, the worker is kept, and the next upload is spoken whole."""
    port, pid = server.port, server.serving_pid()
    wav = media_file("audio/4s_Wavfile_1719704064_11.wav").read_bytes()
    before = call(port, "GET", "/health")[1]
    watch = Watch(port)
    try:
        server.wrong_flag.touch()
        try:
            status, body = upload(port, wav)
            assert status == 202, body
            failed = wait_task(port, body["task_id"])
        finally:
            server.wrong_flag.unlink()
        status, body = upload(port, wav)
        assert status == 202, body
        spoken = wait_task(port, body["task_id"], timeout_s=90.0)
    finally:
        summary = watch.close()
    assert failed["status"] == "failed", failed
    assert "worker returned faces of shape (" in failed["error"] and ", 3) uint8 for " in failed["error"], failed
    assert "expected (" in failed["error"], failed
    assert spoken["status"] == "done" and spoken["frames_streamed"] == spoken["frames_total"], spoken
    deadline = time.monotonic() + 10  # the crossfade back to the idle loop after the last frame
    while (after := call(port, "GET", "/health")[1])["state"] != "idle" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert summary["statuses"] == {200} and summary["dropped"] == before["dropped_ticks"] == 0, summary
    assert after["state"] == "idle" and after["dropped_ticks"] == 0 and rss_mb(pid) > 0, after
    assert after["workers"]["rebuilds"] == before["workers"]["rebuilds"], (before["workers"], after["workers"])  # kept
    table(
        "a worker's wrong answer (a real worker process, tests/flaky_engine.py)",
        [
            (
                "a worker answers half-size faces for every chunk of an upload",
                f"task failed: {failed['error']}",
                f"dropped ticks {summary['dropped']}, /health max {summary['max_s'] * 1000:.0f} ms; "
                f"the next upload done ({spoken['frames_streamed']} frames on air), worker kept",
            )
        ],
    )


def wait_long_lived_free(port: int, timeout_s: float = 30.0) -> None:
    """Wait until all ``MAX_LONG_LIVED`` slots are free again.

    An event stream's slot is given back when the server notices its client left: at its next
    write (a ``health`` event every second), which fails once the peer's reset came back.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        opened = [ws_handshake(port, "/ws/speech") for _ in range(MAX_LONG_LIVED)]
        for _, sock, _ in opened:
            sock.close()
        if all(status == 101 for status, _, _ in opened):
            return
        assert time.monotonic() < deadline, f"long-lived slots still taken after {timeout_s} s: {opened}"
        time.sleep(0.2)


def upload(port: int, wav: bytes) -> tuple[int, dict]:
    boundary = "----hostile"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio_file"; filename="s.wav"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + wav
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return call(port, "POST", "/generate_video", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def sse_open(port: int) -> tuple[int, socket.socket]:
    """Open ``GET /events`` and never read past the status line (a slow client)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    head = b""
    while b"\r\n" not in head:
        head += sock.recv(1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return int(head.split()[1]), sock


# ------------------------------------------------------------------------------------------ WebSocket
def ws_handshake(port: int, path: str, auth: bool = True, deflate: bool = False) -> tuple[int, socket.socket, str]:
    """Open a WebSocket by hand; ``(status, socket, response head in lower case)`` (the socket is closed unless 101)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
    ]  # fmt: skip
    if deflate:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    if auth:
        lines.append(f"Authorization: Bearer {TOKEN}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split()[1]) if head else 0
    if status != 101:
        sock.close()
    return status, sock, head.split(b"\r\n\r\n")[0].decode(errors="replace").lower()


def ws_frame(opcode: int, payload: bytes, rsv1: bool = False, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame (RFC 6455 5.2); ``length`` overrides the declared payload length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    data = np.frombuffer(payload, dtype=np.uint8)
    masked = (data ^ np.resize(np.frombuffer(mask, dtype=np.uint8), data.size)).tobytes()
    return head + mask + masked


def closed_by_server(sock: socket.socket, timeout_s: float = 10.0) -> int | None:
    """Wait for the server to close the connection; the code of its close frame (0: none), or None if open."""
    sock.settimeout(0.5)
    got = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            at = got.find(b"\x88")  # a server's close frame: FIN + opcode 8, unmasked, code first
            return int.from_bytes(got[at + 2 : at + 4], "big") if at >= 0 and len(got) >= at + 4 else 0
        got += chunk
    return None


def test_a_websocket_client_sending_deflated_garbage_and_unread_traffic_keeps_rss_bounded(server):
    port, pid = server.port, server.proc.pid
    # the baseline is a server that has spoken once over a WebSocket (its first utterance's buffers,
    # resampler and threads are not what the attack costs)
    client = SpeechClient(port, token=TOKEN)
    client.start()
    client.stream((np.sin(np.arange(16000 * 2) / 8) * 8000).astype(np.int16), 16000, speed=4.0)
    client.send_json({"type": "end"})
    client.wait("done", timeout_s=60)
    client.close()
    time.sleep(1.0)
    rss_before = rss_mb(pid)
    peak = [rss_before]
    timeline: list[tuple[float, float, str]] = []
    phase = ["deflate"]
    stop = threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.is_set():
            now = rss_mb(pid)
            peak[0] = max(peak[0], now)
            timeline.append((round(time.monotonic() - t0, 1), round(now - rss_before, 1), phase[0]))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    watch = Watch(port)
    counts = {"deflate": 0, "garbage": 0, "oversized": 0, "unread_bytes": 0, "unread": 0}
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb_payload = bomb.compress(b"\0" * (64 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)  # ~64 KB: 64 MiB inflated
    pcm = (np.sin(np.arange(16000 * 2) / 8) * 8000).astype("<i2").tobytes()  # 2 s at 16 kHz
    garbage = np.random.default_rng(20).bytes(256 << 10)
    oversized = bytes(5 << 18)  # 1.25 MiB, past speech_stream.max_message_bytes
    t_end = time.monotonic() + 30.0
    try:
        while time.monotonic() < t_end:
            # deflate offered: not negotiated; a compressed (RSV1) message is a protocol error
            phase[0] = "deflate"
            status, sock, head = ws_handshake(port, "/ws/speech", deflate=True)
            assert status == 101 and "sec-websocket-extensions" not in head, head
            sock.sendall(ws_frame(0x2, bomb_payload, rsv1=True))
            assert closed_by_server(sock) == 1002, counts  # protocol error
            sock.close()
            counts["deflate"] += 1
            phase[0] = "garbage"
            # garbage bytes after the handshake
            status, sock, _ = ws_handshake(port, "/ws/speech")
            assert status == 101
            try:  # seeded, and led by 0xff (FIN, all RSV bits, reserved opcode 15): a protocol error at once
                sock.sendall(b"\xff" + garbage)
            except OSError:
                pass
            assert closed_by_server(sock) == 1002, counts
            sock.close()
            counts["garbage"] += 1
            phase[0] = "oversized"
            # a frame declaring 1 TiB
            status, sock, _ = ws_handshake(port, "/ws/speech")
            assert status == 101
            try:  # nothing is allocated for the declared length: closed once more than 1 MiB came
                sock.sendall(ws_frame(0x2, oversized, length=1 << 40)[: 14 + len(oversized)])
            except OSError:
                pass
            assert closed_by_server(sock) == 1009, counts  # message too big
            sock.close()
            counts["oversized"] += 1
            phase[0] = "unread"
            # an utterance sent as fast as the socket takes it, the server's events never read
            status, sock, _ = ws_handshake(port, "/ws/speech")
            assert status == 101
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(ws_frame(0x1, json.dumps({"type": "start", "sample_rate": 16000}).encode()))
            sock.settimeout(0.5)
            until = min(t_end, time.monotonic() + 6.0)
            while time.monotonic() < until:
                try:
                    counts["unread_bytes"] += sock.send(ws_frame(0x2, pcm))
                except TimeoutError:
                    continue
                except OSError:
                    break
            sock.close()
            counts["unread"] += 1
    finally:
        stop.set()
        sampler.join(5)
        summary = watch.close()
    growth = peak[0] - rss_before
    assert summary["statuses"] == {200} and summary["dropped"] == 0, summary
    assert summary["max_s"] < BUSY_HEALTH_MAX_S, summary
    assert growth < WS_RSS_GROWTH_MB, (growth, counts, timeline[::5])
    table(
        f"WebSocket abuse for 30 s: server RSS {rss_before:.0f} MB, peak +{growth:.1f} MB; "
        f"/health max {summary['max_s'] * 1000:.0f} ms",
        [
            (
                "permessage-deflate offered, a 64 KB deflate bomb (64 MiB inflated) sent with RSV1",
                "no extension negotiated; connection closed (1002)",
                f"{counts['deflate']} connections",
            ),
            ("256 KiB of random bytes", "connection closed (1002)", f"{counts['garbage']} connections"),
            (
                "a frame declaring 1 TiB, then 1.25 MiB of it",
                "connection closed (1009) past 1 MiB received",
                f"{counts['oversized']} connections",
            ),
            (
                "an utterance's PCM as fast as TCP takes it, events never read",
                "socket not read past speech_stream.max_queued_bytes",
                f"{counts['unread']} connections, {counts['unread_bytes'] / 2**20:.0f} MiB accepted by TCP",
            ),
        ],
    )


# ------------------------------------------------------------------------------------------ WHEP
def test_simultaneous_whep_offers_never_exceed_max_viewers_nor_block_the_loop(server):
    port = server.port
    base = f"http://127.0.0.1:{port}"
    watch = Watch(port)
    seen_viewers: list[int] = []

    async def run() -> list[list[int]]:
        viewers = [WhepViewer(base, headers=AUTH) for _ in range(MAX_VIEWERS - 1)]
        for v in viewers:
            assert (await v.connect())[0] == 201
        rounds = []
        try:
            for _ in range(20):
                offers = [WhepViewer(base, headers=AUTH) for _ in range(16)]
                got = await asyncio.gather(*(o.connect() for o in offers))
                statuses = [g[0] for g in got]
                rounds.append(statuses)
                seen_viewers.append(watch.samples[-1][2].get("webrtc", {}).get("viewers", 0) if watch.samples else 0)
                await asyncio.gather(*(o.close(delete=g[0] == 201) for o, g in zip(offers, got, strict=True)))
        finally:
            for v in viewers:
                await v.close()
        return rounds

    try:
        rounds = asyncio.run(run())
    finally:
        summary = watch.close()
    viewers_seen = [b.get("webrtc", {}).get("viewers", 0) for _, _, b in watch.samples]
    assert max(viewers_seen) <= MAX_VIEWERS, viewers_seen
    for statuses in rounds:
        assert statuses.count(201) == 1 and statuses.count(429) == 15, statuses
    assert summary["statuses"] == {200} and summary["dropped"] == 0, summary
    # the loop never blocks: every poll answered (a CPU shared with 23 peer connections in this
    # process may delay one past the 200 ms of the matrix, never by seconds)
    assert summary["max_s"] < BUSY_HEALTH_MAX_S, summary
    table(
        "WHEP: 16 simultaneous offers at 7 viewers, 20 rounds",
        [
            (
                f"16 offers × 20 at {MAX_VIEWERS - 1}/{MAX_VIEWERS} viewers",
                "1 × 201 and 15 × 429 `too_many_viewers` every round",
                f"viewers never above {max(viewers_seen)}; "
                f"/health {summary['n']} polls, max {summary['max_s'] * 1000:.0f} ms",
            )
        ],
    )


# ------------------------------------------------------------------------------------------ avatar intake
def test_eight_simultaneous_avatar_uploads_never_exceed_max_preparing(server, tmp_path):
    port = server.port
    # eight different files (the same bytes again would be the same avatar, answered 200)
    videos = [other_bytes(media_file("video/2s_GirlMuseum_0730.mp4"), tmp_path, f"u{i}").read_bytes() for i in range(8)]
    boundary = "----hostile-avatar"
    bodies = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="video_file"; filename="a.mp4"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + video
        + f"\r\n--{boundary}--\r\n".encode()
        for video in videos
    ]
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    busy_seen: list[int] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            avatars = call(port, "GET", "/avatars")[1].get("avatars", [])
            busy_seen.append(sum(a["status"] == "preparing" for a in avatars))
            stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    results: list[tuple[int, dict]] = [(0, {})] * 8
    barrier = threading.Barrier(8)

    def send(i: int) -> None:
        barrier.wait(10)
        results[i] = call(port, "POST", "/avatars", bodies[i], headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    accepted = [b["id"] for s, b in results if s == 202]
    try:
        assert 1 <= len(accepted) <= MAX_PREPARING, results
        assert all(s == 429 and code_of(b) == "busy" for s, b in results if s != 202), results
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            states = [call(port, "GET", f"/avatars/{i}")[1]["status"] for i in accepted]
            if all(s in ("ready", "failed") for s in states):
                break
            time.sleep(0.2)
        assert states == ["ready"] * len(accepted), states
    finally:
        stop.set()
        poller.join(5)
        for i in accepted:
            call(port, "DELETE", f"/avatars/{i}")
    assert max(busy_seen) <= MAX_PREPARING, busy_seen
    table(
        "avatar intake: 8 simultaneous uploads",
        [
            (
                "8 × POST /avatars at once",
                f"{len(accepted)} × 202, {8 - len(accepted)} × 429 `busy`",
                f"preparing never above {max(busy_seen)} (avatar.max_preparing = {MAX_PREPARING}); accepted ones ready",
            )
        ],
    )


# ------------------------------------------------------------------------------------------ malformed input
def raw_http(port: int, head: str, body: bytes = b"", chunks: tuple[bytes, ...] = ()) -> tuple[int, bytes]:
    """Send a request by hand (``head``: its request line and headers), then ``body`` or HTTP/1.1 ``chunks``.

    Returns ``(status, the response as far as it came within 10 s)``; sending stops when the server
    closes or answers first (a refusal before the body is read).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(head.encode() + b"\r\n\r\n")
        try:
            if body:
                sock.sendall(body)
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if chunks:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # answered and closed before the whole body: what a cap does
        got = b""
        while b"\r\n\r\n" not in got or b"}" not in got.split(b"\r\n\r\n", 1)[1]:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not chunk:
                break
            got += chunk
    finally:
        sock.close()
    return (int(got.split()[1]) if got else 0), got


def ws_reply(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """What the server sends on an open WebSocket within ``timeout_s`` or until it closes (raw frames)."""
    sock.settimeout(0.5)
    got = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and b"\x88" not in got and b'"error"' not in got:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    return got


def test_malformed_input_is_a_4xx_or_a_close_code_never_a_traceback(server):
    """Issue 35: each malformed request gets its code; the server logs no traceback and no ERROR."""
    port = server.port
    log_path = server.tmp / "server.log"
    log_from = len(log_path.read_text(errors="replace"))
    json_head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json"
    rows: list[tuple[str, ...]] = []

    def row(attack: str, status: int, code: str | None, expected: tuple[int, str]) -> None:
        assert (status, code) == expected, (attack, status, code)
        rows.append((attack, f"{status} `{code}`"))

    for label, data, expected in (
        ("PUT /channels body `'['*100000`", b"[" * 100_000, (413, "too_large")),
        ("PUT /channels body `'['*60000` (under the cap)", b"[" * 60_000, (400, "bad_json")),
        ('PUT /channels `{"width": <5000 digits>}`', b'{"width": ' + b"9" * 5000 + b"}", (400, "bad_json")),
    ):
        status, body = call(port, "PUT", "/channels/m1", data, {"Content-Type": "application/json"})
        row(label, status, code_of(body), expected)
    status, got = raw_http(port, f"PUT /channels/m1 HTTP/1.1\r\n{json_head}\r\nContent-Length: 52428800", b"[" * 65536)
    row(
        "PUT /channels, Content-Length 50 MB",
        status,
        "too_large" if b'"too_large"' in got else None,
        (413, "too_large"),
    )
    status, got = raw_http(
        port, f"POST /speak HTTP/1.1\r\n{json_head}\r\nTransfer-Encoding: chunked", chunks=(b"[" * 40_000,) * 3
    )
    row("POST /speak, 120 kB chunked", status, "too_large" if b'"too_large"' in got else None, (413, "too_large"))
    for label, path in (("`idle_video` of 5000 characters", "a" * 5000), ("`idle_video` with a NUL byte", "a\x00.mp4")):
        for name, fields in (("m1", {"rtmp_url": server.rtmp.url("m1")}), ("main", {})):
            status, body = call(port, "PUT", f"/channels/{name}", {**fields, "idle_video": path})
            row(f"PUT /channels/{name} {label}", status, code_of(body), (400, "bad_channel"))
    assert call(port, "GET", "/channels/m1")[0] == 404

    status, got = raw_http(
        port,
        f"GET /ws/speech HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13",
    )
    row("WebSocket handshake without Sec-WebSocket-Key", status, "bad_handshake" if b"bad_handshake" in got else None,
        (400, "bad_handshake"))  # fmt: skip
    assert call(port, "POST", "/ws/tickets")[0] == 201  # a ticket outstanding: the comparison runs
    status, _, _ = ws_handshake(port, "/ws/speech?ticket=%C3%A9", auth=False)
    row("`/ws/speech?ticket=%C3%A9` (non-ASCII ticket)", status, "unauthorized", (401, "unauthorized"))
    status, body = call(port, "GET", "/events", headers={"Origin": "http://evil.example"})
    row("GET /events with `Origin: http://evil.example`", status, code_of(body), (403, "origin_not_allowed"))

    for label, hello, close in (
        ("/ws/frames hello `'['*3000`", "[" * 3000, 4400),
        ("/ws/frames hello width of 401 digits", '{"type": "hello", "width": ' + "9" * 401 + "}", 4413),
    ):
        status, sock, _ = ws_handshake(port, "/ws/frames")
        assert status == 101, label
        try:
            sock.sendall(ws_frame(0x1, hello.encode()))
            code = closed_by_server(sock)
        finally:
            sock.close()
        assert code == close, (label, code)
        rows.append((label, f"close {code}"))
    status, sock, _ = ws_handshake(port, "/ws/speech")
    assert status == 101
    try:
        sock.sendall(ws_frame(0x1, json.dumps({"type": "start", "sample_rate": 16000, "encoding": []}).encode()))
        got = ws_reply(sock)
    finally:
        sock.close()
    assert b'"bad_encoding"' in got, got[:200]
    rows.append(('/ws/speech `{"type": "start", "encoding": []}`', "`error` event `bad_encoding`"))

    # A 70 s clip whose title tag reads like FFmpeg's own duration line: budgeted by its real length.
    forged = server.tmp / "forged.mp4"
    subprocess.run(
        [FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=gray:s=64x64:r=5:d=70",
         "-metadata", "title=Duration: 00:00:00.04, start: 0.000000, bitrate: 1 kb/s",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-y", str(forged)],
        check=True,
        timeout=120,
    )  # fmt: skip
    boundary = "----hostile-forged"
    status, body = call(
        port,
        "POST",
        "/avatars",
        f'--{boundary}\r\nContent-Disposition: form-data; name="video_file"; filename="forged.mp4"\r\n\r\n'.encode()
        + forged.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode(),
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    row("POST /avatars: 70 s clip titled `Duration: 00:00:00.04` (`upload_max_s` 60)", status, code_of(body),
        (400, "too_long"))  # fmt: skip
    assert not [a for a in call(port, "GET", "/avatars")[1].get("avatars", []) if a.get("name") == "forged"]

    log = log_path.read_text(errors="replace")[log_from:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    table("malformed input (issue 35): no traceback, no ERROR in the server log", rows)


# ------------------------------------------------------------------------------------------ slow loris
LORIS_IDLE = 500  # connections that send nothing
LORIS_HALF = 16  # connections that send half a header and stall
LORIS_HEADER_TIMEOUT_S = 5.0  # server.header_timeout_s (default 10 s); > the ~3 s 516 connections take to open
LORIS_BODY_TIMEOUT_S = 3.0  # server.body_timeout_s (default 30 s)
LORIS_PER_IP = 64  # server.max_connections_per_ip, the default
#: server.max_connections above the spread attack (516), so a fresh client still has room
LORIS_MAX_CONNECTIONS = 600
#: threads beyond the idle server's and the admitted connections' (a WHEP/health thread or two)
LORIS_THREAD_SLACK = 16
LORIS_CLOSE_SLACK_S = 3.0  # a deadline's close is seen within this past it (2 loaded cores)


class WatchFrom(Watch):
    """:class:`Watch` whose ``/health`` calls come from loopback address ``source`` (not the attacker's)."""

    def __init__(self, port: int, source: str):
        self.source = source
        super().__init__(port)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                status, body = call(self.port, "GET", "/health", source=self.source, auth=False)
            except OSError:
                status, body = 0, {}
            self.samples.append((time.monotonic() - t, status, body))
            self._stop.wait(0.1)


def loris_open(port: int, sources: list[str]) -> tuple[list[socket.socket], list[socket.socket], list[float]]:
    """``LORIS_HALF`` connections sending half a header, then ``LORIS_IDLE`` silent ones (``sources`` in turn).

    Returns:
        The half-header sockets, the silent ones, and when each was opened (``time.monotonic()``, s).
    """
    half, idle, opened = [], [], []
    for i in range(LORIS_HALF + LORIS_IDLE):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(sources[i % len(sources)], 0))
        opened.append(time.monotonic())
        if i < LORIS_HALF:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            half.append(sock)
        else:
            idle.append(sock)
    return half, idle, opened


def loris_refused(socks: list[socket.socket]) -> tuple[int, int]:
    """``(answered 503, still open)`` among ``socks`` now (epoll: more descriptors than select() takes)."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    ready = {key.fileobj for key, _ in selector.select(timeout=0)}
    selector.close()
    refused = 0
    for sock in ready:
        try:
            refused += sock.recv(64).startswith(b"HTTP/1.1 503")
        except OSError:
            pass
    return refused, len(socks) - len(ready)


def loris_lifetimes(socks: list[socket.socket], since: list[float], limit_s: float) -> list[float | None]:
    """Seconds from ``since[i]`` until the server closed socket ``i`` (None: still open ``limit_s`` after the last)."""
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        selector.register(sock, selectors.EVENT_READ, i)
    found: list[float | None] = [None] * len(socks)
    deadline = max(since) + limit_s
    while None in found and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            found[key.data] = time.monotonic() - since[key.data]
            selector.unregister(key.fileobj)
    selector.close()
    return found


def fresh_health_s(port: int, source: str = "127.0.0.2") -> tuple[float, int]:
    """One ``/health`` on a new connection from ``source``: ``(seconds, status)``."""
    t = time.monotonic()
    try:
        status, _ = call(port, "GET", "/health", source=source, auth=False)
    except OSError:
        status = 0
    return time.monotonic() - t, status


@pytest.fixture(scope="module", params=["infer_serv", "gunicorn"])
def loris_server(request, rtmp_server, tmp_path_factory):
    """The server as ``make run`` starts it (``infer_serv.py``), then as the systemd unit does (gunicorn)."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"loris-{kind}")
    (tmp / "tmp").mkdir()
    process = GunicornProcess if kind == "gunicorn" else ServerProcess
    proc = process(
        [
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"avatar.cache_dir={tmp / 'avatars'}",
            "engine.name=parametric",
            f"stream.rtmp_url={rtmp_server.url(f'loris-{kind}-{rtmp_server.port}')}",
            f"channels_file={tmp / 'channels.json'}",
            f"server.header_timeout_s={LORIS_HEADER_TIMEOUT_S}",
            f"server.body_timeout_s={LORIS_BODY_TIMEOUT_S}",
            f"server.max_connections_per_ip={LORIS_PER_IP}",
            f"server.max_connections={LORIS_MAX_CONNECTIONS}",
        ],
        tmp / "server.log",
        tmpdir=tmp / "tmp",
    ).start()
    try:
        proc.wait_healthy()
        # the stalled upload must meet the body deadline, not a 503 "starting" (a loaded CI run was that slow)
        proc.wait_engine_ready()
        yield proc
    finally:
        code, took_s = proc.stop()
    assert code == 0 and took_s < 10.0, proc.log()


def test_a_slow_loris_client_is_capped_and_timed_out_and_health_keeps_answering(loris_server):
    """Issue 35: 516 connections (16 half headers) from one address, then from nine; a stalled upload.

    Against both servers: ``infer_serv.py`` (a thread per admitted connection) and gunicorn's
    worker (``GuardedThreadWorker``: a fixed pool of threads, heads gathered in its event loop).

    One address: past ``max_connections_per_ip`` each connection is answered 503 at once, so the
    server's threads stay within the cap. Nine addresses (57 each, under the cap): all 516 are
    admitted, and every one is closed ``header_timeout_s`` later. ``/health`` from another address
    answers within 200 ms throughout, the clock drops no tick.
    """
    port, pid = loris_server.port, loris_server.serving_pid()
    time.sleep(2.0)  # the stream settles (the first health answers come while it starts)
    base_threads = procfs.thread_count(pid)
    watch = WatchFrom(port, "127.0.0.2")
    rows: list[tuple[str, ...]] = []
    try:
        # ---- one address: the per-address cap
        half, idle, opened = loris_open(port, ["127.0.0.1"])
        one_open_s = opened[-1] - opened[0]
        time.sleep(0.5)
        one_threads = procfs.thread_count(pid)
        one_health_s, one_health_status = fresh_health_s(port)
        one_refused, one_open = loris_refused(half + idle)
        one_half_life = loris_lifetimes(half, opened[:LORIS_HALF], LORIS_HEADER_TIMEOUT_S + 8.0)
        for sock in half + idle:
            sock.close()
        answer = f"{one_refused} answered 503, {one_open} held (opened in {one_open_s:.1f} s)"
        rows.append(("516 from 127.0.0.1", answer,
                     f"threads {base_threads} -> {one_threads}; fresh /health {one_health_s * 1000:.0f} ms "
                     f"({one_health_status}); half headers closed after "
                     f"{max((x for x in one_half_life if x is not None), default=float('nan')):.1f} s "
                     f"({one_half_life.count(None)} still open at {LORIS_HEADER_TIMEOUT_S + 8.0:.0f} s)"))  # fmt: skip
        time.sleep(LORIS_HEADER_TIMEOUT_S + 1.0)  # the held ones are gone

        # ---- nine addresses: >= 500 connections held at once, all reaped by the header deadline
        half, idle, opened = loris_open(port, [f"127.0.0.{10 + i}" for i in range(9)])
        many_open_s = opened[-1] - opened[0]
        time.sleep(0.5)
        many_threads = procfs.thread_count(pid)
        many_health_s, many_health_status = fresh_health_s(port)
        many_refused, many_open = loris_refused(half + idle)
        many_life = loris_lifetimes(half + idle, opened, LORIS_HEADER_TIMEOUT_S + 8.0)
        time.sleep(0.5)
        after_threads = procfs.thread_count(pid)
        for sock in half + idle:
            sock.close()
        lived = [x for x in many_life if x is not None]
        answer = f"{many_refused} answered 503, {many_open} held (opened in {many_open_s:.1f} s)"
        rows.append(("516 from 9 addresses", answer,
                     f"threads {base_threads} -> {many_threads} -> {after_threads} after the deadline; "
                     f"fresh /health {many_health_s * 1000:.0f} ms ({many_health_status}); closed after "
                     f"{min(lived, default=float('nan')):.1f}-{max(lived, default=float('nan')):.1f} s "
                     f"({many_life.count(None)} still open at {LORIS_HEADER_TIMEOUT_S + 8.0:.0f} s)"))  # fmt: skip

        # ---- a stalled upload: the first KiB of a declared 100 KiB multipart body, then nothing
        stalled = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0))
        stalled.sendall(
            b"POST /generate_video HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 102400\r\n"
            b"Content-Type: multipart/form-data; boundary=loris\r\n\r\n--loris\r\n"
            b'Content-Disposition: form-data; name="audio_file"; filename="s.wav"\r\n\r\n' + b"\0" * 1024
        )
        upload_life = loris_lifetimes([stalled], [time.monotonic()], LORIS_BODY_TIMEOUT_S + 8.0)[0]
        try:
            upload_answer = stalled.recv(200).split(b"\r\n")[0].decode(errors="replace") or "EOF"
        except OSError as exc:
            upload_answer = type(exc).__name__
        stalled.close()
        rows.append(("stalled upload", f"closed: {upload_answer}" if upload_life is not None else "still open",
                     f"after {upload_life if upload_life is not None else float('nan'):.1f} s "
                     f"(body_timeout_s {LORIS_BODY_TIMEOUT_S:.0f})"))  # fmt: skip
    finally:
        health = watch.close()
    took = sorted(s for s, _, _ in watch.samples)
    p95_s = took[int(0.95 * (len(took) - 1))]
    evidence = (
        f"p50 {took[len(took) // 2] * 1000:.0f} ms, p95 {p95_s * 1000:.0f} ms, max {health['max_s'] * 1000:.0f} ms "
        f"({sum(s >= HEALTH_MAX_S for s in took)} of {health['n']} >= 200 ms); dropped ticks {health['dropped']}"
    )
    rows.append(("/health from 127.0.0.2 every 0.1 s", f"statuses {sorted(health['statuses'])}", evidence))
    table(f"slow loris (issue 35) against {loris_server.__class__.__name__}", rows)

    assert (one_refused, one_open) == (LORIS_HALF + LORIS_IDLE - LORIS_PER_IP, LORIS_PER_IP)
    assert one_threads <= base_threads + LORIS_PER_IP + LORIS_THREAD_SLACK
    assert all(x is not None and x <= LORIS_HEADER_TIMEOUT_S + LORIS_CLOSE_SLACK_S for x in one_half_life)
    assert (many_refused, many_open) == (0, LORIS_HALF + LORIS_IDLE)
    assert many_threads <= base_threads + LORIS_MAX_CONNECTIONS + LORIS_THREAD_SLACK
    assert all(x is not None and x <= LORIS_HEADER_TIMEOUT_S + LORIS_CLOSE_SLACK_S for x in many_life)
    assert after_threads <= base_threads + LORIS_THREAD_SLACK
    assert (
        upload_life is not None
        and LORIS_BODY_TIMEOUT_S - 0.5 <= upload_life <= LORIS_BODY_TIMEOUT_S + LORIS_CLOSE_SLACK_S
    )
    assert (one_health_status, many_health_status) == (200, 200)
    # A fresh /health while the attack holds its connections: within 200 ms (measured 2-5 ms). The
    # 0.1 s poll also runs while this process opens 516 connections and the server starts a thread
    # for each on the same 2 cores: 95 % within 200 ms, none slower than BUSY_HEALTH_MAX_S (measured
    # max 304 ms, once in 202).
    assert max(one_health_s, many_health_s) < HEALTH_MAX_S
    assert p95_s < HEALTH_MAX_S and health["max_s"] < BUSY_HEALTH_MAX_S, health
    assert health["statuses"] == {200} and health["dropped"] == 0, health
