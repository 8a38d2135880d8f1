"""Channels sharing one job queue (fakes at its seam, tests/fakes.py): avatars and deadlines; channel config units.

Two channels' TaskManagers talk to one recording pool, as in the server: every job names its
channel's avatar. A long upload on one channel must not push the deadlines of another channel's
speech: each channel has its own timeline on the same ``time.monotonic()`` clock, so the shared
earliest-deadline queue serves the other channel's first chunk before the long upload's later chunks.
"""

from __future__ import annotations

import re
import time
import weakref

import pytest

from latentsync.config import ConfigError, channel_configs, load_config
from latentsync.serving.tasks.task_manager import TaskManager
from tests.fakes import FPS, FakeAvatar, FakeJob, FakePlaylist, FakePool, fake_manager, submit_upload, wait_for


class EdfPool(FakePool):
    """The fake pool, read in the order the real WorkerPool serves it (earliest ``due_at`` first)."""

    def edf(self) -> list[FakeJob]:
        with self.lock:
            return sorted(self.jobs, key=lambda j: j.due_at)


def manager(pool: EdfPool, path: str) -> tuple[TaskManager, FakePlaylist]:
    avatar = FakeAvatar()
    avatar.path = path
    return fake_manager(pool, avatar)


def test_a_long_upload_on_one_channel_never_pushes_another_channels_deadlines():
    pool = EdfPool()
    shop, _ = manager(pool, "/avatars/shop")
    hall, _ = manager(pool, "/avatars/hall")
    try:
        long_task, _ = submit_upload(shop, 300.0)  # 5 minutes on channel shop
        wait_for(lambda: len(pool.of(long_task.task_id)) >= 8, "its chunks queued")
        same_channel, _ = submit_upload(shop, 7.0)  # waits behind the long one: due in ~300 s
        short, _ = submit_upload(hall, 7.0)  # the other channel: due now
        wait_for(lambda: pool.of(short.task_id) and pool.of(same_channel.task_id), "both 7 s uploads' chunks")

        # Every job names its own channel's avatar.
        for job in pool.edf():
            expected = "/avatars/hall" if job.task_id == short.task_id else "/avatars/shop"
            assert job.job.avatar == expected, job

        first = next(j for j in pool.of(short.task_id) if j.chunk_index == 0)
        long_first = next(j for j in pool.of(long_task.task_id) if j.chunk_index == 0)
        same_first = next(j for j in pool.of(same_channel.task_id) if j.chunk_index == 0)
        # The same channel's next upload is due after the 300 s on air before it; the other channel's
        # first chunk is due at once: the long upload's backlog is not in its timeline.
        assert same_first.due_at - long_first.due_at == pytest.approx(long_task.num_frames / FPS, abs=1.0)
        assert first.due_at - long_first.due_at < 5.0
        # In the shared earliest-deadline queue, the long upload's chunks queued ahead of the other
        # channel's first chunk are only those genuinely due before it (a bounded window, not 5 minutes).
        order = pool.edf()
        ahead = order[: order.index(first)]
        assert all(j.due_at <= first.due_at for j in ahead)
        assert all(j.task_id == long_task.task_id for j in ahead)
        long_chunks = [j for j in order if j.task_id == long_task.task_id]
        assert len(ahead) < len(long_chunks)  # the rest of the long upload's chunks wait behind it
        later = [j for j in pool.of(short.task_id) if j.chunk_index > 0]
        # a chunk starting before frame 125 has its feature window from frame 0: its first row is its first frame
        early = [j for j in later if j.job.rows[0] < 125]
        assert early and all(j.due_at - first.due_at == pytest.approx(j.job.rows[0] / FPS, abs=0.5) for j in early)
    finally:
        shop.close()
        hall.close()


def test_channel_configs_inherit_the_top_level_keys_and_validate_once(tmp_path):
    config = load_config(
        None,
        [
            "stream.fps=30",
            "stream.width=256",
            "stream.height=456",
            'channels=[{name: hall, rtmp_url: "rtmp://127.0.0.1:1935/live/hall", fps: 25}]',
        ],
    )
    by_name = channel_configs(config)
    assert list(by_name) == ["main", "hall"]
    assert by_name["main"].stream.rtmp_url == config.stream.rtmp_url and by_name["main"].channels == []
    hall = by_name["hall"].stream
    assert (hall.fps, hall.width, hall.height, hall.rtmp_url) == (25, 256, 456, "rtmp://127.0.0.1:1935/live/hall")
    bad = {
        'channels=[{name: "Bad Name", rtmp_url: "rtmp://h/live/x"}]': "channels[0].name",
        'channels=[{name: main, rtmp_url: "rtmp://h/live/x"}]': "channels[0].name",
        'channels=[{name: a, rtmp_url: "rtmp://h/live/x"}, {name: a, rtmp_url: "rtmp://h/live/y"}]': "channels[1].name",
        "channels=[{name: a}]": "channels[0].rtmp_url",
        'channels=[{name: a, rtmp_url: "rtmp://127.0.0.1:1935/live/avatar"}]': "channels[0].rtmp_url",
        'channels=[{name: a, rtmp_url: "rtmp://h/live/x", width: 255, height: 456}]': "channels[0] (a): stream.width",
        'channels=[{name: a, rtmp_url: "rtmp://h/live/x", idle_video: /no/such.mp4}]': "(a): avatar.idle_video",
        "max_channels=0": "max_channels",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="at most max_channels"):
        load_config(None, ["max_channels=1", 'channels=[{name: a, rtmp_url: "rtmp://h/live/x"}]'])
    with pytest.raises(ConfigError, match="engine.max_avatars_per_worker"):
        load_config(None, ["engine.max_avatars_per_worker=0"])


def test_channel_routes_of_a_server_not_started_answer_without_redirects():
    """``/channels/main/...`` is served, never redirected to the old path (a 308 would re-send uploads)."""
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    config = load_config(None, ['channels=[{name: hall, rtmp_url: "rtmp://127.0.0.1:1935/live/hall"}]'])
    client = create_app(Runtime(config)).test_client()  # built, never started
    for path in ("/generate_video", "/channels/main/generate_video", "/channels/hall/generate_video"):
        response = client.post(path, data={})
        assert response.status_code == 503 and response.json["error"]["code"] == "starting", path
    response = client.post("/channels/nope/generate_video", data={})
    assert response.status_code == 404 and response.json["error"]["code"] == "no_channel"
    for path in ("/channels/main/tasks", "/channels/hall/tasks", "/tasks"):
        assert client.get(path).json == {"tasks": []}, path
    for path in ("/channels/main/whep", "/channels/hall/whep"):
        response = client.post(path, data="v=0", content_type="application/sdp")
        assert response.status_code == 503 and response.json["error"]["code"] == "webrtc_off", path
    assert client.post("/channels/nope/whep", data="v=0", content_type="application/sdp").status_code == 404
    listed = client.get("/channels").json["channels"]
    assert [c["name"] for c in listed] == ["main", "hall"] and not any(c["streaming"] for c in listed)
    assert client.get("/channels/hall/health").json["channel"] == "hall"
    assert client.get("/channels/hall").json["status"] == "created"  # built, not started
    put = client.put("/channels/popup", json={"rtmp_url": "rtmp://127.0.0.1:1935/live/popup"})
    assert put.status_code == 202 and put.json["status"] == "created"  # accepted: it starts with the others
    assert [c["name"] for c in client.get("/channels").json["channels"]] == ["main", "hall", "popup"]
    switch = client.put("/channels/hall", json={"idle_pingpong": True})
    assert switch.status_code == 409 and switch.json["error"]["code"] == "channel_not_ready"
    assert client.put("/channels/popup", data="nope").json["error"]["code"] == "bad_channel"
    assert client.delete("/channels/main").json["error"]["code"] == "main_channel"


def test_channels_with_the_same_idle_video_share_one_decoded_clip_until_the_last_is_gone():
    import gc

    from latentsync.serving.runtime.clips import ClipCache
    from tests.datafiles import media_file

    cache, video = ClipCache(), media_file("video/nanmote002.mp4")
    a = cache.load(video, 25, 48000, None, True)
    b = cache.load(video, 25, 48000, None, True)
    assert a is b and not a.frames.flags.writeable  # one copy, read-only for every channel
    with pytest.raises(ValueError):
        a.frames[0, 0, 0, 0] = 1
    other = cache.load(video, 25, 48000, (128, 228), True)  # another format: its own decode
    assert other is not a and other.size == (128, 228)
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None and len(cache._clips) == 1  # the last user went: the clip is freed
    again = cache.load(video, 25, 48000, None, True)  # decoded afresh
    assert again.frames.shape[1:3] == (456, 256) and not again.frames.flags.writeable


def test_channels_file_brings_back_what_the_api_changed_and_skips_what_no_longer_holds(tmp_path, caplog):
    import json

    from latentsync.config import uploaded_avatar_video
    from latentsync.serving.runtime.runtime import Runtime
    from tests.datafiles import MEDIA, media_file

    video = str(media_file("video/nanmote002.mp4"))
    cache = tmp_path / "avatars"
    upload = uploaded_avatar_video(cache, "av-0123456789ab")
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"a prepared upload's video")  # only its existence is checked before the start
    state = tmp_path / "channels.json"
    config = load_config(
        None,
        [
            f"channels_file={state}",
            f"avatar.cache_dir={cache}",
            f"media.root={MEDIA}",
            "max_channels=3",
            'channels=[{name: hall, rtmp_url: "rtmp://h/live/hall"}, {name: lobby, rtmp_url: "rtmp://h/live/lobby"}]',
        ],
    )
    created = [
        {"name": "gone", "rtmp_url": "rtmp://h/live/gone", "idle_video": f"{MEDIA}/gone.mp4"},  # deleted since
        {"name": "sneaky", "rtmp_url": "rtmp://h/live/sneaky", "idle_video": "/etc/passwd"},  # not under media.root
        {"name": "away", "rtmp_url": "rtmp://elsewhere.example/live/away"},  # not an allowed RTMP host
        {"name": "popup", "rtmp_url": "rtmp://h/live/popup", "idle_video": video, "fps": 20},
        {"name": "hall", "rtmp_url": "rtmp://h/live/other"},  # the config has a hall (not deleted): config wins
        {"name": "extra", "rtmp_url": "rtmp://h/live/extra"},  # past max_channels = 3
    ]
    live = {"main": {"avatar": "av-0123456789ab"}, "hall": {"idle_video": video, "idle_pingpong": True}}
    state.write_text(json.dumps({"version": 1, "created": created, "deleted": ["lobby"], "live": live}))
    runtime = Runtime(config)
    assert list(runtime.channels) == ["main", "hall", "popup"]
    assert runtime.channels["main"].config.avatar.idle_video == str(upload)
    hall = runtime.channels["hall"].config
    assert (
        hall.avatar.idle_video == video and hall.stream.idle_pingpong and hall.stream.rtmp_url == "rtmp://h/live/hall"
    )
    popup = runtime.channels["popup"].config
    assert popup.stream.fps == 20 and popup.stream.rtmp_url == "rtmp://h/live/popup"
    assert "channel gone skipped: idle_video: no such file under media.root" in caplog.text
    assert "channel sneaky skipped: idle_video: must name a file under media.root" in caplog.text
    assert "channel away skipped: rtmp_url: 'elsewhere.example' is not in stream.allowed_rtmp_hosts" in caplog.text
    assert "channel extra skipped" in caplog.text and "max_channels" in caplog.text
    # The next change rewrites the file with what is kept: a deleted configured channel stays deleted.
    with runtime._channels_lock:
        runtime._persist()
    kept = json.loads(state.read_text())
    assert [c["name"] for c in kept["created"]] == ["popup"] and kept["deleted"] == ["lobby"]
    hall_live = {"avatar": None, "idle_video": video, "video": None, "idle_pingpong": True}  # the avatar as a whole
    assert kept["live"] == {"main": live["main"], "hall": hall_live}
    state.write_text("{not json")
    assert list(Runtime(config).channels) == ["main", "hall", "lobby"]  # an unreadable file changes nothing
    for malformed, why in (  # each was a TypeError/AttributeError/RecursionError that stopped the start
        ({"version": 1, "deleted": 5}, "deleted: not a list"),
        ({"version": 1, "deleted": [["lobby"]]}, "deleted: not a list"),
        ({"version": 1, "live": [1]}, "live: not an object"),
        ({"version": 1, "live": {"main": 1, "hall": []}}, "live: not an object"),
        ({"version": 1, "created": 5}, "created: not a list"),
        ("[" * 100_000, "unreadable"),
    ):
        caplog.clear()
        state.write_text(malformed if isinstance(malformed, str) else json.dumps(malformed))
        assert list(Runtime(config).channels) == ["main", "hall", "lobby"], malformed
        assert why in caplog.text and str(state) in caplog.text, caplog.text


def test_avatar_uploads_have_their_own_size_limit_and_the_rate_limit(tmp_path):
    """``POST /avatars`` takes videos up to ``avatar.upload_max_mb`` (not ``api.max_upload_mb``), 413 past it."""
    import io

    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime
    from tests.datafiles import media_file

    video = media_file("video/nanmote002.mp4").read_bytes()  # 473 KiB
    config = load_config(
        None,
        [
            f"avatar.cache_dir={tmp_path / 'avatars'}",
            "api.max_upload_mb=0.1",  # audio uploads: 100 kB
            "avatar.upload_max_mb=0.4",  # videos: 400 kB
            "api.rate_limit_per_min=3",
        ],
    )
    runtime = Runtime(config)  # built, never started: its store queues what it accepts
    client = create_app(runtime).test_client()
    response = client.post("/avatars", data={"video_file": (io.BytesIO(video), "big.mp4")})
    assert response.status_code == 413 and response.json["error"]["code"] == "too_large"
    assert "avatar.upload_max_mb = 0.4" in response.json["error"]["message"]
    response = client.post("/avatars", data={"video_file": (io.BytesIO(video[: 300 * 1024]), "cut.mp4")})
    assert response.status_code == 400 and response.json["error"]["code"] == "not_video"  # 300 kB passed the limit
    response = client.post("/avatars", data={})
    assert response.status_code == 400 and response.json["error"]["code"] == "no_file"
    for expected in (400, 429):  # the 3rd counted upload this minute is read, the 4th refused before its body
        response = client.post("/avatars", data={"video_file": (io.BytesIO(video[: 300 * 1024]), "again.mp4")})
        assert response.status_code == expected, response.json
    assert response.json["error"]["code"] == "rate_limited"
    assert client.get("/avatars").json == {"avatars": []}
    assert client.get("/avatars/av-000000000000").status_code == 404
    assert [p.name for p in (tmp_path / "avatars" / "uploads").iterdir()] == [".incoming"]
    assert list((tmp_path / "avatars" / "uploads" / ".incoming").iterdir()) == []


@pytest.mark.slow  # face tracking of a real video, twice over: 5 s
def test_channels_preparing_the_same_avatar_run_one_face_tracking_and_a_closing_channel_stops_its_own(
    tmp_path, monkeypatch
):
    """Two channels starting with one base video: one preparation, the other loads it from the cache.

    The spy sits at the seam (``Avatar.prepare``, called by :class:`AvatarPreparations`) and counts
    the calls that run at the same time; the preparation itself is the real one.
    """
    import threading

    from latentsync.avatar import Avatar, AvatarSettings
    from latentsync.serving.runtime import clips
    from tests.datafiles import media_file

    video = media_file("video/nanmote002.mp4")
    settings = AvatarSettings(fps=FPS)
    running, most = [0], [0]
    lock = threading.Lock()
    real_prepare = Avatar.prepare

    def spy(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return real_prepare(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(clips.Avatar, "prepare", spy)
    preparations = clips.AvatarPreparations()
    asked = []

    def closed_while_tracking() -> bool:  # the channel closes during the face tracking
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(clips.PreparationCancelled):  # stopped there: nothing cached, no temporary folder left
        preparations.prepare(video, settings, tmp_path / "cancelled", stopping=closed_while_tracking)
    assert most[0] == 1 and not list((tmp_path / "cancelled").glob("*"))
    most[0] = 0
    results: list = []
    threads = [
        threading.Thread(
            target=lambda: results.append(preparations.prepare(video, settings, tmp_path / "cache", lambda: False))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 3 and len({a.path for a in results}) == 1 and most[0] == 1
    assert not preparations._flights  # nothing kept once nobody prepares


def test_channels_file_brings_back_outputs_changed_through_the_api_and_skips_hostile_ones(tmp_path, caplog):
    import json

    from latentsync.config import channel_outputs
    from latentsync.serving.runtime.runtime import Runtime

    state = tmp_path / "channels.json"
    config = load_config(
        None,
        [
            f"channels_file={state}",
            "stream.rtmp_url=rtmp://h/live/main",
            f"stream.record_dir={tmp_path}",
            'channels=[{name: hall, rtmp_url: "rtmp://h/live/hall"}]',
        ],
    )
    main_outputs = [{"url": "rtmp://h/live/main"}, {"url": "srt://h:9000", "required": False}]
    created = [
        {"name": "shop", "outputs": [{"url": "rtmp://h/live/shop", "name": "a"}, {"url": "record:shop.mkv"}]},
        {"name": "evil", "outputs": [{"url": "rtmp://evil.example/live/x"}]},  # not an allowed host
    ]
    live = {
        "main": {"outputs": main_outputs},
        "hall": {"outputs": [{"url": "rtmp://h/live/hall"}, {"url": "https://elsewhere.example/whip"}]},  # host
    }
    state.write_text(json.dumps({"version": 1, "created": created, "deleted": [], "live": live}))
    runtime = Runtime(config)
    assert list(runtime.channels) == ["main", "hall", "shop"]
    main = channel_outputs(runtime.channels["main"].config)
    assert [(t.name, t.url.url, t.required) for t in main] == [
        ("rtmp", "rtmp://h/live/main", True),
        ("srt", "srt://h:9000", False),
    ]
    assert [t.name for t in channel_outputs(runtime.channels["shop"].config)] == ["a", "record"]
    assert [t.url.url for t in channel_outputs(runtime.channels["hall"].config)] == ["rtmp://h/live/hall"]
    assert "channel evil skipped: outputs[0].url: 'evil.example' is not in stream.allowed_rtmp_hosts" in caplog.text
    assert "hall's live changes skipped: outputs[1].url: 'elsewhere.example'" in caplog.text


def test_an_avatar_being_prepared_for_a_switch_is_in_use_from_the_put_on(tmp_path, monkeypatch):
    """Issue 35: the target of a switch counted as in use only once prepared, so DELETE /avatars could remove it."""
    import dataclasses
    import threading

    from latentsync.serving.runtime.channel import ChannelState
    from latentsync.serving.runtime.runtime import Runtime

    runtime = Runtime(load_config(None, [f"avatar.cache_dir={tmp_path / 'avatars'}"]))  # built, never started
    channel = runtime.channels["main"]
    channel._machine.move(ChannelState.starting)
    channel._machine.move(ChannelState.ready)
    channel.pool = object()  # a ready channel has its pool; the switch below never reaches it
    preparing = threading.Event()
    release = threading.Event()

    def prepare_slowly(config, generation, on_done):  # stands for the decode and the face search
        preparing.set()
        release.wait(10)

    monkeypatch.setattr(channel, "_switch_to", prepare_slowly)
    video = tmp_path / "avatars" / "uploads" / "av-0123456789ab" / "av-0123456789ab.mkv"
    target = dataclasses.replace(
        channel.config, avatar=dataclasses.replace(channel.config.avatar, video=str(video), idle_video=str(video))
    )
    channel.switch_avatar(target, "av-0123456789ab")
    assert preparing.wait(5)
    assert runtime._avatars_in_use().get(video.resolve()) == ["main"]  # what DELETE /avatars checks
    release.set()
    deadline = time.monotonic() + 5
    while video.resolve() in runtime._avatars_in_use() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert video.resolve() not in runtime._avatars_in_use()  # the switch ended: no longer held for it


def test_channels_made_through_the_api_never_record_to_another_channels_file(tmp_path):
    """A PUT whose recording would write (or prune) another channel's files is ``bad_channel``, naming the clash."""
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    config = load_config(
        None,
        [
            "stream.rtmp_url=rtmp://h/live/main",
            f"stream.record_dir={tmp_path}",
            "stream.record_path=show.mkv",
            'channels=[{name: hall, rtmp_url: "rtmp://h/live/hall"}]',
        ],
    )
    client = create_app(Runtime(config)).test_client()  # built, never started
    for file in ("show.mkv", "hall-show.mkv", "show-2.mkv"):
        put = client.put("/channels/popup", json={"outputs": [{"url": "rtmp://h/live/p"}, {"url": f"record:{file}"}]})
        assert put.status_code == 400 and put.json["error"]["code"] == "bad_channel", file
        assert f"record:{file} (output record) would write the files of channel" in put.json["error"]["message"]
    put = client.put("/channels/popup", json={"rtmp_url": "rtmp://h/live/popup"})  # inherits: popup-show.mkv
    assert put.status_code == 202
    outputs = [{"url": "rtmp://h/live/o"}, {"url": "record:popup-show.mkv"}]
    put = client.put("/channels/other", json={"outputs": outputs})
    assert put.status_code == 400 and "channel popup's record:popup-show.mkv" in put.json["error"]["message"]


def test_a_base_video_alone_is_the_idle_loop_too():
    """``avatar.video`` without ``avatar.idle_video``: one person, idle and speaking (issue 40), for channels too."""
    from tests.datafiles import media_file

    presenter, other = str(media_file("video/nanmote002.mp4")), str(media_file("video/2s_GirlMuseum_0730.mp4"))
    config = load_config(
        None,
        [
            f"avatar.video={presenter}",
            f'channels=[{{name: hall, rtmp_url: "rtmp://h/live/hall", video: "{other}"}}, '
            f'{{name: lobby, rtmp_url: "rtmp://h/live/lobby"}}]',
        ],
    )
    assert (config.avatar.idle_video, config.avatar.video) == (presenter, presenter)
    by_name = channel_configs(config)
    assert (by_name["hall"].avatar.idle_video, by_name["hall"].avatar.video) == (other, other)
    assert (by_name["lobby"].avatar.idle_video, by_name["lobby"].avatar.video) == (presenter, presenter)
    both = load_config(None, [f"avatar.idle_video={other}", f"avatar.video={presenter}"])
    assert (both.avatar.idle_video, both.avatar.video) == (other, presenter)  # an idle loop given is kept


def test_a_channel_is_reported_ready_only_once_its_required_outputs_have_been_live():
    """A destination that refuses from the start keeps the channel ``starting``; one that connects late does not."""
    from latentsync.serving.runtime.channel import Channel, ChannelState

    channel = Channel("main", load_config(None, []))
    never = [{"name": "main", "required": True, "last_progress_s": None}]
    optional = [{"name": "extra", "required": False, "last_progress_s": None}]
    live = [{"name": "main", "required": True, "last_progress_s": 0.1}]
    assert channel.reported_status(never) == "created"  # only a ready channel is held back
    channel._machine.move(ChannelState.starting)
    channel._machine.move(ChannelState.ready)
    assert channel.reported_status(never) == "starting"
    assert channel.reported_status(optional) == "ready"
    assert channel.reported_status(live) == "ready"  # it connected late
    assert channel.reported_status(never) == "ready"  # and stays ready: /health tells what its outputs do now
