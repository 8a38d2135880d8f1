"""Two channels in ONE server process, each on its own real nginx-rtmp: routes, fairness, isolation.

Channel ``main`` (the top-level keys) publishes to the session's RTMP server; channel ``hall``
publishes to a second private nginx-rtmp that the tests stop and start. Both share one worker pool
(parametric engine). What one channel suffers (its RTMP server gone, its FFmpeg SIGKILLed, a bad
upload) must leave the other channel's ticks untouched: no dropped tick, no FFmpeg restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from latentsync.engines import CHUNK_FRAMES  # an upload's chunks after its first: 16 frames
from latentsync.serving.ops import procfs
from tests.datafiles import MEDIA, media_file, speech_wav
from tests.streamtools import Api, RtmpServer, ServerProcess, require_rtmp_tools, seconds_until

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

VIDEO = "video/nanmote002.mp4"  # 256x456: small, so two channels fit on two shared cores
SPEECH = "audio/7s_shan_0801_01.wav"
LONG_UPLOAD_S = 60.0


@pytest.fixture(scope="module")
def hall_rtmp(tmp_path_factory):
    """The second channel's own nginx-rtmp (a second private instance, stopped and started by tests)."""
    require_rtmp_tools()
    server = RtmpServer(tmp_path_factory.mktemp("rtmp-hall"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_channels(rtmp_server, hall_rtmp, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("channels")
    video = media_file(VIDEO)
    hall_url = hall_rtmp.url("hall")
    server = ServerProcess(
        [
            f"avatar.idle_video={video}",
            f"stream.rtmp_url={rtmp_server.url('main-ch')}",
            "engine.name=parametric",
            f'channels=[{{name: hall, rtmp_url: "{hall_url}", idle_video: "{video}"}}]',
            "webrtc.enabled=false",
            f"avatar.cache_dir={tmp / 'avatars'}",  # uploaded avatars stay out of the repository's cache
            f"channels_file={tmp / 'channels.json'}",
            f"media.root={MEDIA}",  # PUT may name the test videos by path
            # Two channels, two x264 encoders and one engine worker share two (CI) cores: the slack an
            # operator gives such a host, so that a scheduling hiccup of the machine is not an underrun.
            "speech_stream.start_margin_s=0.5",
        ],
        tmp / "server.log",
    ).start()
    server.wait_healthy()
    server.wait_engine_ready()
    api = Api(server.port)
    assert seconds_until(lambda: rtmp_server.publishing("main-ch") and hall_rtmp.publishing("hall"), 15), server.log()
    assert seconds_until(lambda: api.request("GET", "/channels/hall/health")[1].get("engine_ready"), 30), server.log()
    server.tmp = tmp
    yield server, api
    code, took_s = server.stop()
    assert code == 0 and took_s < 15.0, server.log()


def health(api: Api, name: str) -> dict:
    status, body = api.request("GET", f"/channels/{name}/health")
    assert body.get("channel") == name, body
    return body


def speak_until_done(api: Api, name: str, seconds: float) -> dict:
    """Upload ``seconds`` of speech to channel ``name`` and wait (60 s at most) for the task to end ``done``."""
    status, task = api.post_audio(speech_wav(seconds), path=f"/channels/{name}/generate_video")
    assert status == 202, task
    deadline = time.monotonic() + 60
    while (got := api.request("GET", task["status_url"])[1])["status"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, got
        time.sleep(0.1)
    assert got["status"] == "done", got
    return got


def test_channels_are_listed_and_routed_and_unknown_ones_are_404(two_channels):
    server, api = two_channels
    status, body = api.request("GET", "/channels")
    assert status == 200 and [c["name"] for c in body["channels"]] == ["main", "hall"]
    assert all(c["streaming"] and c["engine_ready"] for c in body["channels"]), body
    assert all(c["stream"]["width"] == 256 and c["stream"]["height"] == 456 for c in body["channels"]), body
    # the outputs are listed, their URLs without stream keys or secrets
    assert [
        o["url"].endswith("/live/***") and o["state"] == "live" for c in body["channels"] for o in c["outputs"]
    ] == [
        True,
        True,
    ]
    assert "secret" not in str(body) and "main-ch" not in str(body) and "/live/hall" not in str(body)
    assert server.health()[1]["channel"] == "main"  # the old path is channel main
    main, hall = health(api, "main"), health(api, "hall")
    assert main["ffmpeg_pid"] != hall["ffmpeg_pid"] and main["workers"]["pids"] == hall["workers"]["pids"]
    for method, path in (
        ("GET", "/channels/nope/health"),
        ("GET", "/channels/nope/tasks"),
        ("GET", "/channels/nope/tasks/x"),
        ("DELETE", "/channels/nope/tasks/x"),
        ("GET", "/channels/nope/events"),
    ):
        status, body = api.request(method, path)
        assert status == 404 and body["error"]["code"] == "no_channel", (path, body)
    status, body = api.post_audio(speech_wav(1.0), path="/channels/nope/generate_video")
    assert status == 404 and body["error"]["code"] == "no_channel"
    with urllib.request.urlopen(f"{api.base}/metrics", timeout=10) as r:
        text = r.read().decode()
    for series in (
        'latentsync_ticks_handled_total{channel="main"}',
        'latentsync_ticks_handled_total{channel="hall"}',
        'latentsync_stream_state{channel="hall",state="idle"}',
        "latentsync_worker_restarts_total ",
    ):
        assert series in text, series


def test_a_long_upload_on_main_never_makes_halls_speech_underrun(two_channels):
    server, api = two_channels
    status, long_task = api.post_audio(speech_wav(LONG_UPLOAD_S))
    assert status == 202 and long_task["status_url"] == f"/tasks/{long_task['task_id']}", long_task
    api.wait_task(long_task["task_id"], ("streaming",), timeout_s=60)
    hall_before, main_before = health(api, "hall"), health(api, "main")
    status, short = api.post_audio(speech_wav(7.0), path="/channels/hall/generate_video")
    assert status == 202, short
    url = f"/channels/hall/tasks/{short['task_id']}"
    assert short["status_url"] == url
    assert api.request("GET", f"/tasks/{short['task_id']}")[0] == 404  # a task lives on its own channel
    deadline = time.monotonic() + 60
    while (task := api.request("GET", url)[1])["status"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, task
        time.sleep(0.1)
    assert task["status"] == "done", task
    hall, main = health(api, "hall"), health(api, "main")
    assert hall["tasks_final"]["done"] == hall_before["tasks_final"]["done"] + 1
    hall_underruns = hall["underrun_ticks"] - hall_before["underrun_ticks"]
    main_underruns = main["underrun_ticks"] - main_before["underrun_ticks"]
    if main_underruns == 0:
        # While main was speaking its 60 s, every chunk of hall's speech was on air in time.
        assert hall_underruns == 0, (hall, main)
    else:
        # A host too slow for two speaking channels (main starved too): the earliest deadline first
        # queue serves both channels' chunks by deadline, so the two fall behind together, their
        # lateness apart by at most the chunk in generation (16 frames): never the newcomer alone.
        assert hall_underruns <= main_underruns + CHUNK_FRAMES, (hall, main)
    assert hall["dropped_ticks"] == hall_before["dropped_ticks"], hall
    assert api.request("DELETE", f"/tasks/{long_task['task_id']}")[0] == 200
    assert api.request("GET", "/channels/main/tasks")[1]["tasks"][-1]["task_id"] == long_task["task_id"]


def test_a_bad_upload_on_hall_leaves_main_untouched(two_channels):
    server, api = two_channels
    before_main, before_hall = health(api, "main"), health(api, "hall")
    status, body = api.post_audio(b"\x00garbage" * 500, path="/channels/hall/generate_video")
    assert status == 400 and body["error"]["code"] == "not_audio", body
    time.sleep(1.0)
    main, hall = health(api, "main"), health(api, "hall")
    assert main["ticks"] > before_main["ticks"] and main["dropped_ticks"] == before_main["dropped_ticks"]
    assert main["tasks_final"] == before_main["tasks_final"] and hall["tasks_final"] == before_hall["tasks_final"]
    assert hall["streaming"] and hall["tasks_waiting"] == 0


def test_halls_ffmpeg_killed_never_touches_mains_ticks(two_channels, rtmp_server, hall_rtmp):
    server, api = two_channels
    before_main, before_hall = health(api, "main"), health(api, "hall")
    os.kill(before_hall["ffmpeg_pid"], signal.SIGKILL)

    def hall_back() -> bool:
        h = health(api, "hall")
        new_pid = h["ffmpeg_pid"] not in (None, before_hall["ffmpeg_pid"])
        return new_pid and h["ffmpeg_up"] and hall_rtmp.publishing("hall")

    assert seconds_until(hall_back, 15) is not None, server.log()
    assert seconds_until(lambda: health(api, "main")["ticks"] > before_main["ticks"] + 50, 10) is not None  # 2 s on
    main = health(api, "main")
    assert main["dropped_ticks"] == before_main["dropped_ticks"], main
    assert (main["ffmpeg_pid"], main["ffmpeg_restarts"]) == (before_main["ffmpeg_pid"], before_main["ffmpeg_restarts"])
    assert health(api, "hall")["ffmpeg_restarts"] == before_hall["ffmpeg_restarts"] + 1
    assert rtmp_server.publishing("main-ch")


def test_halls_rtmp_server_gone_never_touches_mains_ticks(two_channels, rtmp_server, hall_rtmp):
    server, api = two_channels
    before_main, before_hall = health(api, "main"), health(api, "hall")
    hall_rtmp.stop()
    try:
        assert seconds_until(lambda: health(api, "hall")["outputs"][0]["state"] != "live", 10) is not None
        time.sleep(3.0)
        during_main, during_hall = health(api, "main"), health(api, "hall")
        # hall's clock and encoder go on (nothing dropped), its output backs off and says why
        assert during_hall["ticking"] and during_hall["dropped_ticks"] == before_hall["dropped_ticks"]
        assert during_hall["outputs"][0]["state"] in ("backoff", "connecting") and not during_hall["streaming"]
        assert api.request("GET", "/channels/hall/health")[0] == 503 and server.health()[0] == 200
        assert during_main["dropped_ticks"] == before_main["dropped_ticks"], during_main
        assert during_main["ffmpeg_restarts"] == before_main["ffmpeg_restarts"] and rtmp_server.publishing("main-ch")
    finally:
        hall_rtmp.start()
    assert seconds_until(lambda: hall_rtmp.publishing("hall"), 20) is not None, server.log()
    main = health(api, "main")
    assert main["dropped_ticks"] == before_main["dropped_ticks"] and main["ticks"] > during_main["ticks"]


def test_a_channel_created_and_deleted_at_run_time(two_channels, hall_rtmp, rtmp_server):
    server, api = two_channels
    before_main = health(api, "main")
    url = hall_rtmp.url("popup")
    for body, status, code in (
        ({"rtmp_url": url, "nope": 1}, 400, "bad_channel"),
        ({"rtmp_url": url, "fps": "x"}, 400, "bad_channel"),
        ({"rtmp_url": hall_rtmp.url("hall")}, 400, "bad_channel"),
        ({}, 400, "bad_channel"),  # URL taken / none
        ({"rtmp_url": url, "idle_video": "/no/such.mp4"}, 400, "bad_channel"),
    ):
        got = api.request("PUT", "/channels/popup", json.dumps(body).encode(), {"Content-Type": "application/json"})
        assert got[0] == status and got[1]["error"]["code"] == code, (body, got)
    status, body = api.request(
        "PUT", "/channels/hall", b'{"rtmp_url": "rtmp://h/live/z"}', {"Content-Type": "application/json"}
    )
    assert status == 409 and body["error"]["code"] == "restart_needed" and "rtmp_url" in body["error"]["message"]
    assert api.request("DELETE", "/channels/main")[1]["error"]["code"] == "main_channel"
    assert api.request("DELETE", "/channels/nope")[0] == 404
    assert [c["name"] for c in api.request("GET", "/channels")[1]["channels"]] == ["main", "hall"]

    files_before = procfs.descriptor_kinds(server.serving_pid()).get("file", 0)  # memory maps: avatars' arrays
    body = json.dumps({"rtmp_url": url, "idle_video": str(media_file(VIDEO)), "fps": 20}).encode()
    status, created = api.request("PUT", "/channels/popup", body, {"Content-Type": "application/json"})
    assert status == 202 and created["name"] == "popup" and created["status"] in ("starting", "ready"), created
    assert seconds_until(lambda: api.request("GET", "/channels/popup")[1]["status"] == "ready", 60), server.log()
    assert seconds_until(lambda: hall_rtmp.publishing("popup"), 15) is not None, server.log()
    popup = health(api, "popup")
    assert popup["stream"]["fps"] == 20 and popup["workers"]["pids"] == health(api, "main")["workers"]["pids"]
    speak_until_done(api, "popup", 2.0)

    status, deleted = api.request("DELETE", "/channels/popup")
    assert status == 200 and deleted == {"name": "popup", "status": "stopped"}
    assert seconds_until(lambda: not hall_rtmp.publishing("popup"), 10) is not None  # its FFmpeg flushed and left
    assert api.request("GET", "/channels/popup/health")[0] == 404
    assert [c["name"] for c in api.request("GET", "/channels")[1]["channels"]] == ["main", "hall"]
    # freed by the deletion's own collection (its avatar's 10 memory-mapped arrays among them), not by the next one
    files_after = procfs.descriptor_kinds(server.serving_pid()).get("file", 0)
    assert files_after <= files_before, (files_before, files_after)
    main = health(api, "main")
    assert main["dropped_ticks"] == before_main["dropped_ticks"] and main["ffmpeg_pid"] == before_main["ffmpeg_pid"]
    assert hall_rtmp.publishing("hall") and rtmp_server.publishing("main-ch")
    # popup was made after the start-up freeze: its cycles were found by a collection of the unfrozen heap only,
    # not by the full unfreeze-collect-freeze that paused every clock for 75-90 ms (ops/memory.py HeapFreezer)
    whole_log = server.log_path.read_text(errors="replace")
    assert "heap frozen (started)" in whole_log and "channel popup deleted: heap collected" in whole_log
    assert "deleted: heap refrozen" not in whole_log


NEW_AVATAR = "video/2s_GirlMuseum_0730.mp4"  # another person: the switch is visible on air


def put_json(api: Api, path: str, body: dict):
    return api.request("PUT", path, json.dumps(body).encode(), {"Content-Type": "application/json"})


def maps_of(server: ServerProcess, folder: str) -> list[str]:
    """The server's open descriptors on files under a prepared avatar's folder (its memory-mapped arrays)."""
    fd_dir = Path(f"/proc/{server.serving_pid()}/fd")
    found = []
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if f"/{folder}/" in target:
            found.append(target)
    return found


def nearest_frame_error(frames: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute grey-level difference of each frame to its nearest reference frame, averaged."""
    grey = frames.astype(np.float32).mean(axis=3)
    ref = reference.astype(np.float32).mean(axis=3)
    return float(np.mean([np.abs(ref - g).mean(axis=(1, 2)).min() for g in grey]))


def test_an_uploaded_avatar_replaces_halls_at_its_next_idle_moment(two_channels, hall_rtmp, tmp_path):
    from latentsync.framing_plan import load_clip
    from tests.streamtools import decode_recording, pull_stream

    server, api = two_channels
    before_main = health(api, "main")
    # Bad uploads: 4xx naming the problem, nothing listed.
    status, body = api.post_audio(speech_wav(1.0), "speech.wav", path="/avatars", field="video_file")
    assert status == 400 and body["error"]["code"] == "not_video", body
    status, body = api.post_audio(None, path="/avatars", field="video_file")
    assert status == 400 and body["error"]["code"] == "no_file", body
    assert api.request("GET", "/avatars")[1] == {"avatars": []}
    assert api.request("GET", "/avatars/av-000000000000")[0] == 404

    video = media_file(NEW_AVATAR).read_bytes()
    status, record = api.post_audio(video, "museum.mp4", {"name": "Museum"}, path="/avatars", field="video_file")
    assert status == 202 and record["status"] == "preparing" and record["name"] == "Museum", record
    avatar_id = record["id"]
    status, body = put_json(api, "/channels/hall", {"avatar": avatar_id})
    assert status == 409 and body["error"]["code"] == "avatar_not_ready", body
    assert seconds_until(lambda: api.request("GET", record["status_url"])[1]["status"] != "preparing", 120), (
        server.log()
    )
    ready = api.request("GET", record["status_url"])[1]
    assert ready["status"] == "ready" and ready["progress"] == 1.0 and ready["num_frames"] == 50, ready
    # prepared at its own size (main has none configured): its face is wide enough there
    assert ready["source_size"] == [832, 1248] and ready["face_px"] > 150 and ready["warnings"] == [], ready
    # the still the page shows: framed as hall would show it (256x456, cover), the face kept round
    import urllib.request

    import cv2

    with urllib.request.urlopen(f"{api.base}/avatars/{avatar_id}/still?channel=hall", timeout=60) as r:
        assert r.headers["Content-Type"] == "image/jpeg"
        still = cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR)
    assert still.shape == (456, 256, 3)
    framed = load_clip(
        media_file(NEW_AVATAR), 1, 48000, (256, 456), with_audio=False, fit="cover", min_face_px=96
    ).frames[1]
    assert np.abs(still[:, :, ::-1].astype(float) - framed).mean() < 4  # the same framing, JPEG apart
    assert api.request("GET", f"/avatars/{avatar_id}/still?channel=nope")[1]["error"]["code"] == "no_channel"
    assert api.request("GET", "/avatars/av-000000000000/still")[0] == 404

    for body, status, code in (
        ({"avatar": "av-000000000000"}, 400, "no_avatar"),
        ({"avatar": avatar_id, "idle_video": str(media_file(VIDEO))}, 400, "bad_channel"),
        ({"avatar": avatar_id, "width": 512, "height": 512}, 409, "restart_needed"),
        ({"avatar": avatar_id, "force": "yes"}, 400, "bad_channel"),
    ):
        got = put_json(api, "/channels/hall", body)
        assert got[0] == status and got[1]["error"]["code"] == code, (body, got)
    # The same bytes again are that avatar (200), not a second preparation; other bytes under the same
    # name are another avatar. That one (hall's own video: a 58 px face at 256x456) cannot reach
    # avatar.min_face_px on hall without upscaling: 409 naming the most it allows. (The museum guide,
    # ~64 px there with the largest window, is framed tighter now: ~96 px, accepted without force.)
    status, again = api.post_audio(video, "museum.mp4", {"name": "Museum"}, path="/avatars", field="video_file")
    assert status == 200 and again["id"] == avatar_id and again["status"] == "ready", again
    small = media_file(VIDEO).read_bytes()
    status, other = api.post_audio(small, "museum.mp4", {"name": "Museum"}, path="/avatars", field="video_file")
    assert status == 202 and other["id"] != avatar_id and other["name"] == "Museum", other
    assert seconds_until(lambda: api.request("GET", other["status_url"])[1]["status"] != "preparing", 120)
    assert api.request("GET", other["status_url"])[1]["status"] == "ready", server.log()
    status, body = put_json(api, "/channels/hall", {"avatar": other["id"]})
    assert status == 409 and body["error"]["code"] == "face_too_small", body
    largest = re.search(r"without upscaling is (\d+) px", body["error"]["message"])
    assert largest and 45 <= int(largest.group(1)) < 96, body  # its face's own width: ~58 px
    assert api.request("DELETE", f"/avatars/{other['id']}")[0] == 200
    assert [a["id"] for a in api.request("GET", "/avatars")[1]["avatars"]] == [avatar_id]
    assert put_json(api, "/channels/hall", {"idle_video": str(media_file(VIDEO))})[0] == 200  # nothing changes

    # Ask for the switch while hall speaks: the speech plays to its end with the old avatar first.
    status, task = api.post_audio(speech_wav(3.0), path="/channels/hall/generate_video")
    assert status == 202, task
    assert seconds_until(lambda: api.request("GET", task["status_url"])[1]["status"] == "streaming", 30), server.log()
    # (without "force": cover frames the guide's face ~96 px wide on hall, enough)
    outgoing = api.request("GET", "/channels/hall")[1]["avatar"]  # its prepared folder's name (main's too)
    mapped = len(maps_of(server, outgoing))  # 10 arrays, memory-mapped, for each channel's Avatar of it
    assert mapped >= 10, maps_of(server, outgoing)
    status, body = put_json(api, "/channels/hall", {"avatar": avatar_id, "name": "hall"})
    assert status == 202 and body["switch"]["avatar"] == avatar_id, body
    deadline = time.monotonic() + 60
    while True:
        switch = api.request("GET", "/channels/hall")[1]["switch"]  # first: "done" here means the task ended
        task_status = api.request("GET", task["status_url"])[1]["status"]
        assert switch["state"] != "failed", switch
        if switch["state"] == "done":
            assert task_status == "done", "the avatar switched while the speech was still on air"
            break
        assert time.monotonic() < deadline, (switch, task_status, server.log())
        time.sleep(0.05)
    assert api.request("GET", "/avatars")[1]["avatars"][0]["used_by"] == ["hall"]
    # The outgoing avatar's 10 memory-mapped arrays went with the switch: the tasks that played it may hold it in
    # reference cycles (an upload's processor, utterance, decoder and program refer to each other), which the
    # switch's collection frees at once (issue 38's soak: they stayed until some later collection, and the
    # descriptors measured around a channel deletion moved by 10).
    assert seconds_until(lambda: len(maps_of(server, outgoing)) <= mapped - 10, 10) is not None, (
        mapped,
        maps_of(server, outgoing),
    )
    assert "channel hall switched its avatar: heap collected" in server.log_path.read_text(errors="replace")
    status, body = api.request("DELETE", f"/avatars/{avatar_id}")
    assert status == 409 and body["error"]["code"] == "avatar_in_use", body

    # On air: hall's stream now shows the new person, idle and speaking; main never noticed.
    time.sleep(0.5)  # past the idle crossfade
    # 4 s: two GOPs (a keyframe every 2 s), so a keyframe and the frames after it are always in it
    # (2 s could end just before the first keyframe: nothing decodable, "unspecified size")
    recording = pull_stream(hall_rtmp.url("hall"), 4.0, tmp_path / "hall.flv")
    frames = decode_recording(recording, 48000)[0]
    size = (256, 456)
    new = load_clip(
        media_file(NEW_AVATAR), 25, 48000, size, with_audio=False, fit="cover", min_face_px=96
    ).frames  # framed as hall frames it (the window sized on the face), not stretched
    old = load_clip(media_file(VIDEO), 25, 48000, size, with_audio=False).frames
    to_new, to_old = nearest_frame_error(frames, new), nearest_frame_error(frames, old)
    assert to_new * 3 < to_old, (to_new, to_old)
    speak_until_done(api, "hall", 2.0)
    main = health(api, "main")
    assert main["dropped_ticks"] == before_main["dropped_ticks"] and main["ffmpeg_pid"] == before_main["ffmpeg_pid"]
    # cover framed the switch and the still on a face found in a child process: MediaPipe's native library was
    # never loaded into the server (it would be ~59,000 objects every full collection visits: ops/face_search.py)
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "_framework_bindings" not in maps and "mediapipe" not in maps


def test_a_restart_brings_back_the_channels_and_avatars_the_api_changed(two_channels, rtmp_server, hall_rtmp, tmp_path):
    """Runs after the avatar switch: hall's new avatar and a channel created by PUT survive a restart."""
    import shutil

    server, api = two_channels
    status, body = put_json(
        api, "/channels/kept", {"rtmp_url": hall_rtmp.url("kept"), "idle_video": str(media_file(VIDEO))}
    )
    assert status == 202, body
    assert seconds_until(lambda: api.request("GET", "/channels/kept")[1]["status"] == "ready", 60), server.log()
    state = json.loads((server.tmp / "channels.json").read_text())
    hall_avatar = api.request("GET", "/channels/hall")[1]["avatar"]
    assert [c["name"] for c in state["created"]] == ["kept"] and state["deleted"] == []
    assert state["live"]["hall"]["avatar"] == hall_avatar.rsplit("-", 1)[0]  # the uploaded avatar on hall
    shutil.copy(server.tmp / "channels.json", tmp_path / "channels.json")
    assert api.request("DELETE", "/channels/kept")[0] == 200  # the first server lets go of kept's stream key
    assert json.loads((server.tmp / "channels.json").read_text())["created"] == []
    assert seconds_until(lambda: not hall_rtmp.publishing("kept"), 10) is not None

    video = media_file(VIDEO)
    again = ServerProcess(
        [
            f"avatar.idle_video={video}",
            f"stream.rtmp_url={rtmp_server.url('main-restarted')}",
            "engine.name=parametric",
            f'channels=[{{name: hall, rtmp_url: "{hall_rtmp.url("hall-restarted")}", idle_video: "{video}"}}]',
            "webrtc.enabled=false",
            f"avatar.cache_dir={server.tmp / 'avatars'}",
            f"channels_file={tmp_path / 'channels.json'}",
            f"media.root={MEDIA}",
        ],
        tmp_path / "restarted.log",
    ).start()
    try:
        again.wait_engine_ready()
        other = Api(again.port)
        assert seconds_until(lambda: other.request("GET", "/channels/kept")[1].get("status") == "ready", 60), (
            again.log()
        )
        channels = {c["name"]: c for c in other.request("GET", "/channels")[1]["channels"]}
        assert list(channels) == ["main", "hall", "kept"]
        assert channels["hall"]["avatar"] == hall_avatar  # the same prepared avatar as before the restart
        assert seconds_until(lambda: hall_rtmp.publishing("kept") and hall_rtmp.publishing("hall-restarted"), 15)
    finally:
        code, _ = again.stop()
    assert code == 0, again.log()
