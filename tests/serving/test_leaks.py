"""Nothing a task, a client or an upload holds outlives it: the server's descriptors and threads come back.

One real server (parametric engine) on the real nginx-rtmp. For each kind of work — uploads played
and cancelled, ``/speak`` played and cancelled, ``/ws/speech`` utterances, ``/ws/frames`` clients,
WHEP sessions, avatar uploads — the test runs it many times, waits for the server to settle, and
compares the server process's open descriptors (``/proc/<pid>/fd``, by kind) and threads with their
level before (± 2). A descriptor kept per task ran a 24/7 server out of descriptors within a day
(two pipes per upload, held by the finished task's decoder).

Each kind runs :data:`OPS` times (40: anything kept once in 20 operations or more often passes the
tolerance; avatar uploads a fifth of that, each prepares in a child). ``LEAK_TEST_OPS=100 pytest
tests/serving/test_leaks.py -s`` runs issue 41's proof (100 of each, 20 avatar uploads).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np
import pytest

from latentsync.serving.ops.procfs import descriptor_kinds, thread_count
from tests.datafiles import make_moving_bar_video, media_file, speech_wav
from tests.frames_ws import RawWebSocket
from tests.speechclient import SpeechClient
from tests.streamtools import Api, ServerProcess
from tests.whep_client import WhepViewer

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

TOLERANCE = 2
#: Operations of each kind (``LEAK_TEST_OPS``; a multiple of 10).
OPS = int(os.environ.get("LEAK_TEST_OPS", "40"))
FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaks")
    proc = ServerProcess(
        [
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"stream.rtmp_url={rtmp_server.url('leaks')}",
            f"avatar.cache_dir={tmp / 'avatars'}",
            "stream.crossfade_frames=2",
            "api.rate_limit_per_min=0",
            "api.mutations_per_min=0",
            "tasks.max_finished=1000",  # every finished task is kept: what it holds must not be a descriptor
            "webrtc.max_viewers=2",
        ],
        tmp / "server.log",
    ).start()
    proc.api = Api(proc.port)
    proc.tmp = tmp
    try:
        proc.wait_engine_ready()
        yield proc
    finally:
        code, _ = proc.stop()
        assert code == 0, proc.log()


def resources(server) -> tuple[dict[str, int], int]:
    return descriptor_kinds(server.proc.pid), thread_count(server.proc.pid)


def settled(server, before: tuple[dict[str, int], int], timeout_s: float = 20.0) -> tuple[dict[str, int], int]:
    """The server's descriptors and threads once back within the tolerance of ``before`` (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        fds, threads = resources(server)
        back = sum(fds.values()) <= sum(before[0].values()) + TOLERANCE and threads <= before[1] + TOLERANCE
        if back or time.monotonic() > deadline:
            return fds, threads
        time.sleep(0.2)


def check(server, kind: str, count: int, work) -> None:
    """Run ``work()`` once to warm up, then ``count`` times; the descriptors and threads come back."""
    work()
    time.sleep(0.5)
    before = settled(server, resources(server), timeout_s=5.0)
    t = time.monotonic()
    for _ in range(count):
        work()
    fds, threads = settled(server, before)
    print(
        f"\n{kind} x{count} ({time.monotonic() - t:.1f} s): descriptors {sum(before[0].values())}"
        f" -> {sum(fds.values())} ({before[0]} -> {fds}), threads {before[1]} -> {threads}"
    )
    assert sum(fds.values()) <= sum(before[0].values()) + TOLERANCE, (kind, before[0], fds)
    assert threads <= before[1] + TOLERANCE, (kind, before[1], threads)


def wait_final(api: Api, task_ids: list[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for task_id in task_ids:
        while api.task(task_id).get("status") not in FINAL:
            assert time.monotonic() < deadline, api.task(task_id)
            time.sleep(0.05)


def test_uploads_played_and_cancelled(server):
    short = speech_wav(0.3)

    def work() -> None:
        played, cancelled = [], []
        for i in range(10):
            status, body = server.api.post_audio(short)
            assert status == 202, body
            (cancelled if i % 2 else played).append(body["task_id"])
        for task_id in cancelled:
            server.api.request("DELETE", f"/tasks/{task_id}")
        wait_final(server.api, played + cancelled)

    check(server, "uploads (half cancelled)", OPS // 10, work)  # 10 tasks each


def test_speak_played_and_cancelled(server):
    def work() -> None:
        ids = []
        for i in range(10):
            status, body = server.api.request(
                "POST", "/speak", json.dumps({"text": "Hi."}).encode(), {"Content-Type": "application/json"}
            )
            assert status == 202, body
            ids.append(body["task_id"])
            if i % 2:
                server.api.request("DELETE", f"/tasks/{body['task_id']}")
        wait_final(server.api, ids)

    check(server, "/speak (half cancelled)", OPS // 10, work)  # 10 tasks each


def test_speech_websocket_utterances(server):
    pcm = (np.sin(np.arange(3200) / 5) * 8000).astype(np.int16)  # 0.2 s at 16 kHz

    def work() -> None:
        client = SpeechClient(server.port)
        try:
            for i in range(5):
                client.start(16000)
                task_id = client.wait("accepted")["task_id"]
                client.send_pcm(pcm.tobytes())
                client.send_json({"type": "cancel" if i % 2 else "end"})
                client.wait("done", 30, task_id=task_id)
        finally:
            client.close()

    check(server, "/ws/speech utterances (5 per connection, some cancelled)", OPS // 5, work)


def test_frames_clients(server):
    size = server.health()[1]["stream"]

    def work() -> None:
        ws = RawWebSocket(server.port, "/ws/frames")
        ws.send_json({"type": "hello", "format": "jpeg", "width": size["width"], "height": size["height"]})
        while isinstance(ws.receive(10), str):  # the hello's answer, then ticks
            pass
        ws.close()
        deadline = time.monotonic() + 10
        while server.health()[1]["frames"]["clients"] and time.monotonic() < deadline:
            time.sleep(0.02)

    check(server, "/ws/frames clients", OPS, work)


def test_whep_sessions(server):
    async def session() -> None:
        viewer = WhepViewer(server.base)
        status, _, body = await viewer.connect()
        assert status == 201, body
        await viewer.receive(3)
        await viewer.close()

    server.base = f"http://127.0.0.1:{server.port}"

    def work() -> None:
        asyncio.run(session())
        deadline = time.monotonic() + 10
        while server.health()[1]["webrtc"]["viewers"] and time.monotonic() < deadline:
            time.sleep(0.02)

    check(server, "WHEP sessions", OPS, work)


def test_avatar_uploads(server, tmp_path):
    video = make_moving_bar_video(tmp_path / "bar.mp4")  # no face: prepared, then failed with no_face
    content = video.read_bytes()

    def work() -> None:
        status, body = server.api.post_audio(content, "bar.mp4", path="/avatars", field="video_file")
        assert status == 202, body
        deadline = time.monotonic() + 60
        while (record := server.api.request("GET", f"/avatars/{body['id']}")[1])["status"] == "preparing":
            assert time.monotonic() < deadline, record
            time.sleep(0.1)
        assert server.api.request("DELETE", f"/avatars/{body['id']}")[0] == 200

    # OPS / 5 here (each preparation runs MediaPipe in the preparation child: 1.6 s); 100 once by hand:
    # 39 -> 39 descriptors, 19 -> 19 threads, 159 s
    check(server, "avatar uploads", OPS // 5, work)
