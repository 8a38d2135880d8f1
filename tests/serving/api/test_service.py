"""Running it like a service: gunicorn, SIGTERM, metrics, health levels, token, rate limit, JSON logs,
and faults that must lose nothing (hung worker, full temp disk). Real processes, real RTMP server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from latentsync.serving.api.app import PUBLIC_HEALTH_KEYS
from latentsync.serving.ops.procfs import is_alive
from tests.datafiles import media_file
from tests.speechclient import SpeechClient
from tests.streamtools import Api, GunicornProcess, ServerProcess

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

TOKEN = "s3cret-token-for-the-tests-0123456789"
SPEECH = "audio/4s_Wavfile_1719704064_11.wav"


def children_of(health: dict) -> list[int]:
    return [p for p in [health.get("ffmpeg_pid"), *health.get("workers", {}).get("pids", [])] if p]


def base_overrides(rtmp_server, key: str, tmp_path_factory) -> list[str]:
    return [
        f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
        f"avatar.cache_dir={tmp_path_factory.getbasetemp() / 'avatars'}",
        f"stream.rtmp_url={rtmp_server.url(key)}",
    ]


# --------------------------------------------------------------------------- hardened API
@pytest.fixture(scope="module")
def guarded(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guarded")
    server = ServerProcess(
        [
            *base_overrides(rtmp_server, "guarded", tmp_path_factory),
            f"api.token={TOKEN}",
            "api.rate_limit_per_min=2",
            "log.json=true",
        ],
        tmp / "server.log",
    ).start()
    server.wait_healthy()
    server.wait_engine_ready()
    yield server
    code, _ = server.stop()
    assert code == 0, server.log()


def authed(port: int) -> Api:
    api = Api(port)
    plain = api.request

    def request(method, path, body=None, headers=None):
        return plain(method, path, body, {**(headers or {}), "Authorization": f"Bearer {TOKEN}"})

    api.request = request
    return api


def test_token_guards_everything_but_health(guarded):
    anonymous = Api(guarded.port)
    for method, path in (("GET", "/tasks"), ("GET", "/metrics"), ("DELETE", "/tasks/x")):
        status, body = anonymous.request(method, path)
        assert status == 401 and body["error"]["code"] == "unauthorized", (path, body)
    status, body = anonymous.post_audio(media_file(SPEECH).read_bytes())
    assert status == 401
    wrong = Api(guarded.port).request("GET", "/tasks", headers={"Authorization": "Bearer nope"})
    assert wrong[0] == 401
    assert guarded.health()[0] == 200  # health stays open for load balancers and systemd checks
    assert authed(guarded.port).request("GET", "/tasks")[0] == 200
    assert TOKEN not in guarded.log()


def test_foreign_origins_are_refused_and_health_tells_strangers_the_state_only(guarded):
    api = authed(guarded.port)
    evil = {"Origin": "http://evil.example"}
    status, body = api.request("POST", "/generate_video", b"", evil)  # refused before the body is looked at
    assert status == 403 and body["error"]["code"] == "origin_not_allowed", body
    assert api.request("DELETE", "/tasks/nope", headers=evil)[0] == 403
    rebinding = {"Origin": f"http://evil.example:{guarded.port}", "Host": f"evil.example:{guarded.port}"}
    # same-origin by its own account, but a name that is not ours: the Host allowlist answers first
    # (the Origin rule behind it is tested in test_service_units)
    status, body = api.request("DELETE", "/tasks/nope", headers=rebinding)
    assert status == 421 and body["error"]["code"] == "bad_host", body
    assert api.request("GET", "/health", headers={"Host": f"evil.example:{guarded.port}"})[0] == 421
    ours = {"Origin": f"http://127.0.0.1:{guarded.port}"}
    assert api.request("DELETE", "/tasks/nope", headers=ours)[0] == 404  # our own page: through to the route
    assert api.request("DELETE", "/tasks/nope")[0] == 404  # no Origin (curl): allowed
    status, stranger = guarded.health()
    assert status == 200 and set(stranger) <= set(PUBLIC_HEALTH_KEYS) and stranger["state"] == "idle", stranger
    status, full = api.request("GET", "/health")
    assert status == 200 and full["workers"]["pids"] and "ffmpeg_pid" in full


def test_rate_limit_and_json_logs_with_task_ids(guarded):
    api = authed(guarded.port)
    answers = [api.post_audio(media_file(SPEECH).read_bytes()) for _ in range(3)]
    assert [s for s, _ in answers[:2]] == [202, 202]
    assert answers[2][0] == 429 and answers[2][1]["error"]["code"] == "rate_limited"
    # over the limit, the body is not even looked at: no "no_file" for a body without the field
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    status, refused = api.request("POST", "/generate_video", b"--x--\r\n", multipart)
    assert status == 429 and refused["error"]["code"] == "rate_limited", refused
    for _, body in answers[:2]:
        api.request("DELETE", f"/tasks/{body['task_id']}")
    lines = [json.loads(line) for line in guarded.log().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    accepted = [line for line in lines if line.get("task_id") == answers[0][1]["task_id"]]
    assert accepted, "no log line carries the task id"


def test_metrics_and_health_levels(guarded):
    api = authed(guarded.port)
    req = urllib.request.Request(f"{api.base}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    for name in (
        "latentsync_ticks_emitted_total",
        "latentsync_ticks_late_total",
        "latentsync_ticks_dropped_total",
        "latentsync_ticks_underrun_total",
        'latentsync_stream_state{channel="main",state="idle"}',
        "latentsync_ffmpeg_restarts_total",
        'latentsync_queue_depth{channel="main",queue="tasks_waiting"}',
        'latentsync_tasks_total{channel="main",state="cancelled"}',
        "latentsync_chunk_generation_seconds_bucket",
        "latentsync_time_to_first_frame_seconds_bucket",
        "latentsync_generation_fps",
        "latentsync_worker_restarts_total",
    ):
        assert name in text, name
    emitted = float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith("latentsync_ticks_emitted_total"))
    )
    assert emitted > 0
    for query in ("", "?ready=1", "?live=1"):
        with urllib.request.urlopen(f"{api.base}/health{query}", timeout=5) as r:
            assert r.status == 200


# --------------------------------------------------------------------------- faults
@pytest.fixture
def tmpfs_dir(tmp_path):
    """A 4 MiB tmpfs (root), so uploads hit a full disk; None when this machine cannot mount one."""
    target = tmp_path / "tmpfs"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)], capture_output=True).returncode:
        yield None
        return
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_full_temp_disk_on_upload_is_a_clear_error_and_the_stream_carries_on(
    rtmp_server, tmp_path, tmp_path_factory, tmpfs_dir
):
    if tmpfs_dir is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("cannot mount a tmpfs for the full-disk test (needs root)")
        pytest.skip("cannot mount a tmpfs (needs root)")
    server = ServerProcess(
        base_overrides(rtmp_server, "diskfull", tmp_path_factory), tmp_path / "server.log", tmpdir=tmpfs_dir
    ).start()
    try:
        server.wait_healthy()
        server.wait_engine_ready()
        api = Api(server.port)
        big = np.random.default_rng(6).bytes(6 * 1024 * 1024)  # larger than the 4 MiB disk
        status, body = api.post_audio(big, "big.wav")
        assert status == 507 and body["error"]["code"] == "insufficient_storage", body
        assert "space" in body["error"]["message"]
        time.sleep(1.0)
        status, health = server.health()
        assert status == 200 and health["dropped_ticks"] == 0
        status, body = api.post_audio(media_file(SPEECH).read_bytes())  # a normal upload still fits
        assert status == 202, body
        assert api.wait_task(body["task_id"], ("done", "failed"), 60)["status"] == "done"
    finally:
        code, _ = server.stop()
    assert code == 0, server.log()
    assert list(tmpfs_dir.iterdir()) == []


def test_hung_worker_is_replaced_and_the_next_task_succeeds(rtmp_server, tmp_path, tmp_path_factory):
    deadline_s = 4.0
    server = ServerProcess(
        [
            *base_overrides(rtmp_server, "hung", tmp_path_factory),
            f"engine.chunk_deadline_s={deadline_s}",
            "engine.workers=1",  # the one worker: the stopped one is the one the chunk goes to
        ],
        tmp_path / "server.log",
    ).start()
    stopped = None
    try:
        server.wait_healthy()
        server.wait_engine_ready()
        api = Api(server.port)
        stopped = server.health()[1]["workers"]["pids"][0]
        os.kill(stopped, signal.SIGSTOP)  # hang: alive but never answers
        status, body = api.post_audio(media_file("audio/7s_shan_0801_01.wav").read_bytes())
        assert status == 202
        t = time.monotonic()
        while server.health()[1]["workers"]["rebuilds"] == 0:  # the hang is noticed at the deadline
            assert time.monotonic() - t < deadline_s + 2.0, "hung worker not replaced within the chunk deadline"
            time.sleep(0.05)
        final = api.wait_task(body["task_id"], ("done", "failed"), timeout_s=4 * deadline_s + 60)
        assert final["status"] == "done" or final["error"], final
        assert time.monotonic() - t < 4 * deadline_s + 60
        health = server.health()[1]
        assert health["workers"]["rebuilds"] >= 1 and not is_alive(stopped)
        status, nxt = api.post_audio(media_file(SPEECH).read_bytes())
        assert status == 202 and api.wait_task(nxt["task_id"], ("done", "failed"), 60)["status"] == "done"
        assert server.health()[1]["dropped_ticks"] == 0
    finally:
        if stopped and is_alive(stopped):
            os.kill(stopped, signal.SIGKILL)
        code, _ = server.stop()
    assert code == 0, server.log()


def test_sigterm_mid_speech_exits_cleanly_leaving_nothing_behind(rtmp_server, tmp_path, tmp_path_factory):
    (tmp_path / "tmp").mkdir()
    server = ServerProcess(
        base_overrides(rtmp_server, "sigterm", tmp_path_factory), tmp_path / "server.log", tmpdir=tmp_path / "tmp"
    ).start()
    server.wait_healthy()
    server.wait_engine_ready()
    api = Api(server.port)
    status, body = api.post_audio(media_file("audio/7s_shan_0801_01.wav").read_bytes())
    assert status == 202
    api.wait_task(body["task_id"], ("streaming",), 30)
    children = children_of(server.health()[1])
    assert len(children) >= 2
    code, took_s = server.stop(timeout_s=10.0)
    assert code == 0 and took_s < 10.0, (code, took_s, server.log())
    assert not [p for p in children if is_alive(p)], "child processes survived"
    assert list((tmp_path / "tmp").iterdir()) == [], "FIFOs or temp files left behind"
    assert "faded out for shutdown (stream idle)" in server.log()  # speech cut with a fade, not mid-frame


# --------------------------------------------------------------------------- gunicorn
def test_gunicorn_serves_the_app_with_one_worker_and_stops_cleanly(rtmp_server, tmp_path, tmp_path_factory):
    (tmp_path / "tmp").mkdir()
    server = GunicornProcess(
        base_overrides(rtmp_server, "guni", tmp_path_factory), tmp_path / "gunicorn.log", tmpdir=tmp_path / "tmp"
    ).start()
    port, proc = server.port, server.proc
    try:
        server.wait_engine_ready()
        api = Api(port)
        status, body = api.post_audio(media_file(SPEECH).read_bytes())
        assert status == 202
        assert api.wait_task(body["task_id"], ("done", "failed"), 60)["status"] == "done"
        ws = SpeechClient(port)  # the WebSocket works under gunicorn's gthread worker too
        ws.start(16000)
        ws.wait("accepted")
        ws.stream((np.sin(np.arange(16000) * 0.05) * 8000).astype(np.int16), 16000)
        ws.send_json({"type": "end"})
        assert ws.wait("done", 30)["status"] == "done"
        ws.close()
        health = server.health()[1]
        worker_pids = [
            int(p)
            for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        ]
        assert len(worker_pids) == 1, worker_pids  # exactly one gunicorn worker process
        children = children_of(health) + worker_pids
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        took_s = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert code == 0 and took_s < 10.0, (code, took_s)
    assert not [p for p in children if is_alive(p)]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert "runtime stopped" in (tmp_path / "gunicorn.log").read_text()


def test_sigterm_during_a_long_first_start_still_exits_within_10_s(rtmp_server, tmp_path):
    # A fresh avatar cache: face preparation of the 10 s base video takes far longer than the stop budget.
    server = ServerProcess(
        [
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"avatar.video={media_file('video/10s_girl_0729_00_formal.mp4')}",
            f"avatar.cache_dir={tmp_path / 'avatars'}",
            f"stream.rtmp_url={rtmp_server.url('slowstart')}",
        ],
        tmp_path / "server.log",
    ).start()
    server.wait_healthy()  # streaming the idle loop while the avatar is still being prepared
    assert not server.health()[1]["engine_ready"]
    status, body = Api(server.port).post_audio(media_file(SPEECH).read_bytes())
    assert status == 503 and body["error"]["code"] == "starting"
    code, took_s = server.stop(timeout_s=10.0)
    assert code == 0 and took_s < 10.0, (code, took_s, server.log())
