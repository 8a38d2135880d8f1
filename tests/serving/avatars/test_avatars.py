"""AvatarStore (POST /avatars): confined intake, background preparation, failures, disk quota, restart."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from latentsync.avatar import Avatar, AvatarSettings
from latentsync.config import AppConfig, uploaded_avatar_video
from latentsync.serving.api.errors import HTTP_STATUS
from latentsync.serving.avatars import AvatarError, AvatarStore, lost_face_warnings
from tests.datafiles import make_faceless_video, media_file, other_bytes

FACE_VIDEO = media_file("video/2s_GirlMuseum_0730.mp4")
SPEECH = media_file("audio/7s_shan_0801_01.wav")
PREPARE_WAIT_S = 180.0
MIB = 2**20


def config_for(cache_dir: Path, **avatar) -> AppConfig:
    base = AppConfig()
    return dataclasses.replace(base, avatar=dataclasses.replace(base.avatar, cache_dir=str(cache_dir), **avatar))


def upload_of(source: Path, tmp_path: Path, name: str = "upload") -> Path:
    """A copy of ``source`` as the route leaves it: alone in a private folder."""
    folder = tmp_path / f"in-{name}-{time.monotonic_ns()}"
    folder.mkdir()
    shutil.copy(source, folder / "upload")
    return folder / "upload"


def wait_until_done(store: AvatarStore, avatar_id: str) -> dict:
    deadline = time.monotonic() + PREPARE_WAIT_S
    progress = []
    while True:
        record = store.get(avatar_id)
        progress.append(record["progress"])
        if record["status"] != "preparing":
            record["seen_progress"] = progress
            return record
        assert time.monotonic() < deadline, f"avatar {avatar_id} still preparing after {PREPARE_WAIT_S} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def faceless_video(tmp_path_factory) -> Path:
    """2 s of FFmpeg's test pattern (colour bars, no face), H.264 in MP4."""
    return make_faceless_video(tmp_path_factory.mktemp("faceless") / "bars.mp4")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One store that prepared the face video (shared: a preparation takes seconds)."""
    root = tmp_path_factory.mktemp("avatars")
    cache = root / "cache"
    store = AvatarStore(config_for(cache), lambda: {})
    store.start()
    record, created = store.add(upload_of(FACE_VIDEO, root), "Museum guide")
    assert created and record["status"] == "preparing" and record["name"] == "Museum guide"
    done = wait_until_done(store, record["id"])
    yield store, done, cache
    store.close()


def test_an_uploaded_video_is_prepared_in_the_background_with_progress(prepared):
    store, record, cache = prepared
    assert record["status"] == "ready", record["error"]
    assert record["progress"] == 1.0 and record["error"] is None
    assert record["seen_progress"] == sorted(record["seen_progress"]), "progress never goes back"
    assert record["fps"] == 25 and record["num_frames"] == 50 and record["size"] == [832, 1248]
    assert 0 < record["faces_found"] <= 50
    video = uploaded_avatar_video(cache, record["id"])
    assert video.is_file() and video.parent.stat().st_mode & 0o777 == 0o700
    avatar = Avatar.load(cache / record["prepared"])
    assert avatar.num_frames == 50 and avatar.frame_size == (832, 1248)
    # A channel using it at the stream's fps and the video's size finds it prepared (the cache key matches).
    again = Avatar.prepare(video, AvatarSettings(fps=25, size=(832, 1248)), cache_dir=cache)
    assert again.path == avatar.path
    assert [r["id"] for r in store.list()] == [record["id"]]
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(store)
    text = generate_latest(registry).decode()
    assert 'latentsync_avatars{status="ready"} 1.0' in text and 'latentsync_avatars{status="failed"} 0.0' in text
    used = next(
        float(line.split()[1]) for line in text.splitlines() if line.startswith("latentsync_avatar_cache_bytes ")
    )
    assert used >= 50 * 832 * 1248 * 3  # the prepared frames at least


def test_uploads_survive_a_restart(prepared):
    store, record, cache = prepared
    again = AvatarStore(config_for(cache), lambda: {})
    again.start()
    try:
        assert again.get(record["id"])["status"] == "ready"
        assert again.get(record["id"])["prepared"] == record["prepared"]
    finally:
        again.close()


def test_a_video_without_a_face_fails_with_the_reason(tmp_path, faceless_video):
    store = AvatarStore(config_for(tmp_path / "cache"), lambda: {})
    store.start()
    try:
        record = wait_until_done(store, store.add(upload_of(faceless_video, tmp_path), "bars")[0]["id"])
    finally:
        store.close()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "no_face"
    assert "found on only 0 of 50 frames" in record["error"]["message"]
    assert not list((tmp_path / "cache").glob(f"{record['id']}-*")), "no half-prepared folder is left"


def test_bad_uploads_are_refused_and_leave_nothing(tmp_path):
    cache = tmp_path / "cache"
    store = AvatarStore(config_for(cache, upload_max_s=1.0), lambda: {})  # not started: nothing prepares
    playlist = tmp_path / "playlist.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nfile://{FACE_VIDEO}\n#EXT-X-ENDLIST\n")
    concat = tmp_path / "list.txt"
    concat.write_text(f"ffconcat version 1.0\nfile '{FACE_VIDEO}'\n")
    cases = [
        (SPEECH, 400, "not_video"),  # audio only
        (playlist, 400, "not_video"),  # HLS naming a local file
        (concat, 400, "not_video"),  # concat list naming a local file
        (FACE_VIDEO, 400, "too_long"),  # 2 s > avatar.upload_max_s = 1 s
    ]
    for source, status, code in cases:
        with pytest.raises(AvatarError) as err:
            store.add(upload_of(source, tmp_path), source.name)
        assert (HTTP_STATUS[err.value.code], err.value.code) == (status, code), source.name
    assert store.list() == []
    assert [p.name for p in (cache / "uploads").iterdir()] == []


def test_too_many_preparations_at_once_are_refused(tmp_path):
    store = AvatarStore(config_for(tmp_path / "cache", max_preparing=1), lambda: {})  # not started: one waits
    first, _ = store.add(upload_of(FACE_VIDEO, tmp_path), "one")
    with pytest.raises(AvatarError) as err:
        store.add(upload_of(other_bytes(FACE_VIDEO, tmp_path, "two"), tmp_path), "two")
    assert (HTTP_STATUS[err.value.code], err.value.code) == (429, "busy")
    assert [r["id"] for r in store.list()] == [first["id"]]
    # the same bytes again are that avatar, not one more preparation: never busy
    assert store.add(upload_of(FACE_VIDEO, tmp_path), "one again") == (store.get(first["id"]), False)


def test_the_same_bytes_are_one_avatar_and_other_bytes_with_the_same_name_another(tmp_path):
    cache = tmp_path / "cache"
    store = AvatarStore(config_for(cache), lambda: {})  # not started: nothing prepares, the records wait
    first, created = store.add(upload_of(FACE_VIDEO, tmp_path), "guide")
    assert created and first["sha256"] is not None
    again, created = store.add(upload_of(FACE_VIDEO, tmp_path), "guide (again)")
    assert not created and again["id"] == first["id"] and again["name"] == "guide"  # the record as it was
    other, created = store.add(upload_of(other_bytes(FACE_VIDEO, tmp_path, "copy"), tmp_path), "guide")
    assert created and other["id"] != first["id"] and other["name"] == "guide"
    assert sorted(r["id"] for r in store.list()) == sorted([first["id"], other["id"]])
    assert sorted(p.name for p in (cache / "uploads").iterdir()) == sorted([first["id"], other["id"]])
    # the digest is in the record on disk: after a restart the same bytes are still that avatar
    assert json.loads((cache / "uploads" / first["id"] / "avatar.json").read_text())["sha256"] == first["sha256"]


def fake_entry(cache: Path, name: str, mib: int, age_s: float, upload: bool) -> Path:
    """A cache entry of ``mib`` MiB last used ``age_s`` ago: an upload with its prepared folder, or a prepared one."""
    rng = np.random.default_rng(len(name))
    if upload:
        folder = cache / "uploads" / name
        folder.mkdir(parents=True)
        (folder / f"{name}.mkv").write_bytes(rng.bytes(MIB))
        record = dict(
            id=name, name=name, status="ready", progress=1.0, error=None, duration_s=1.0, size=[64, 64], fps=25
        )
        (folder / "avatar.json").write_text(json.dumps({**record, "num_frames": 25, "created_at": time.time()}))
        prepared = cache / f"{name}-0123456789abcdef01234567"
    else:
        folder = prepared = cache / f"{name}-0123456789abcdef01234567"
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "meta.json").write_text("{}")
    (prepared / "frames.npy").write_bytes(rng.bytes((mib - (1 if upload else 0)) * MIB))
    stamp = time.time() - age_s
    for path in {folder, prepared}:
        os.utime(path, (stamp, stamp))
    return folder


def test_the_quota_deletes_least_recently_used_avatars_no_channel_uses(tmp_path):
    cache = tmp_path / "cache"
    oldest = fake_entry(cache, "av-000000000001", 4, 400, upload=True)
    in_use = fake_entry(cache, "portrait", 4, 300, upload=False)  # older than the next, but a channel uses it
    middle = fake_entry(cache, "av-000000000002", 4, 200, upload=True)
    newest = fake_entry(cache, "av-000000000003", 4, 100, upload=True)
    users = {in_use.resolve(): ["hall"]}
    store = AvatarStore(config_for(cache, cache_quota_mb=13), lambda: users)
    store.start()
    try:
        assert {r["id"] for r in store.list()} == {"av-000000000001", "av-000000000002", "av-000000000003"}
        store.enforce_quota()  # 16 MiB in a 13 MiB quota: the oldest unused one goes, with its prepared folder
        assert not oldest.exists() and not list(cache.glob("av-000000000001-*"))
        assert in_use.exists() and middle.exists() and newest.exists()
        assert {r["id"] for r in store.list()} == {"av-000000000002", "av-000000000003"}
        with pytest.raises(AvatarError) as err:  # room for 10 MiB needs what a channel uses: refused, nothing deleted
            store.quota.make_room(10 * MIB, keep=set())
        assert (HTTP_STATUS[err.value.code], err.value.code) == (507, "quota_exceeded")
        assert middle.exists() and newest.exists()
        store.quota.make_room(4 * MIB + MIB // 2, keep=set())  # 12 + 4.5 MiB: the least recently used unused one goes
        assert not middle.exists() and newest.exists() and in_use.exists()
        store.delete("av-000000000003")
        assert not newest.exists() and store.list() == []
    finally:
        store.close()


@pytest.mark.slow  # several preparations at once: ~4 s
def test_simultaneous_uploads_never_overshoot_max_preparing_nor_the_quota(tmp_path):
    probe = AvatarStore(config_for(tmp_path / "probe"), lambda: {})  # not started: learn what one upload needs
    first, _ = probe.add(upload_of(FACE_VIDEO, tmp_path), "probe")
    need = probe.quota.reserved_bytes(first["id"]) + probe.usage_bytes()
    probe.close()

    videos = [other_bytes(FACE_VIDEO, tmp_path, f"u{i}") for i in range(8)]  # eight different uploads

    def eight_at_once(store: AvatarStore) -> list:
        results: list = [None] * 8
        barrier = threading.Barrier(8)

        def add(i: int) -> None:
            barrier.wait(10)
            try:
                results[i] = store.add(upload_of(videos[i], tmp_path, f"u{i}"), f"u{i}")[0]["id"]
            except AvatarError as exc:
                results[i] = exc.code

        threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results

    # slots: taken before the copy, so 8 simultaneous uploads at max_preparing=3 get exactly 3
    store = AvatarStore(config_for(tmp_path / "slots", max_preparing=3), lambda: {})  # not started: they wait
    results = eight_at_once(store)
    store.close()
    assert sorted(r if r == "busy" else "ok" for r in results) == ["busy"] * 5 + ["ok"] * 3, results
    # bytes: room for one and a half uploads beside an unused 4 MiB avatar: one is taken in, the others
    # get 507 (the queued one's bytes count), and the unused avatar is never deleted for them
    cache = tmp_path / "quota"
    old = fake_entry(cache, "av-000000000009", 4, 100, upload=True)
    quota_mb = (4 * MIB + 1.5 * need) / MIB
    store = AvatarStore(config_for(cache, max_preparing=8, cache_quota_mb=quota_mb), lambda: {})
    results = eight_at_once(store)
    store.close()
    assert sorted(r if r == "quota_exceeded" else "ok" for r in results) == ["ok"] + ["quota_exceeded"] * 7, results
    assert old.exists()


def test_an_avatar_a_channel_uses_cannot_be_deleted(tmp_path):
    cache = tmp_path / "cache"
    fake_entry(cache, "av-00000000000a", 1, 10, upload=True)
    users = {uploaded_avatar_video(cache, "av-00000000000a").resolve(): ["main"]}
    store = AvatarStore(config_for(cache), lambda: users)
    store.start()
    try:
        assert store.get("av-00000000000a")["used_by"] == ["main"]
        with pytest.raises(AvatarError) as err:
            store.delete("av-00000000000a")
        assert (HTTP_STATUS[err.value.code], err.value.code) == (409, "avatar_in_use")
        with pytest.raises(AvatarError) as err:
            store.get("av-ffffffffffff")
        assert (HTTP_STATUS[err.value.code], err.value.code) == (404, "no_avatar")
    finally:
        store.close()


def test_the_record_measures_the_face_and_a_channel_too_small_for_it_is_refused(prepared, tmp_path):
    store, record, _ = prepared
    assert record["source_size"] == [832, 1248] and record["warnings"] == []
    assert 150 < record["face_width_px"] < 220 and record["face_px"] == pytest.approx(record["face_width_px"], rel=0.01)
    store.check_face_size(record["id"], (512, 512), "cover")  # ~154 px across (face_fraction 0.3): enough
    store.check_face_size(record["id"], (256, 456), "cover")  # the window narrowed to 96 px (min_face_px)
    store.check_face_size(record["id"], None, "cover")  # size not known yet: nothing to check
    face = record["face_width_px"]
    for size, fit in (((512, 512), "contain"), ((128, 128), "stretch")):
        with pytest.raises(AvatarError) as info:
            store.check_face_size(record["id"], size, fit)
        assert info.value.code == "face_too_small" and HTTP_STATUS[info.value.code] == 409
        assert f"{size[0]}x{size[1]}" in info.value.message and '"force": true' in info.value.message
        assert f"without upscaling is {face:.0f} px" in info.value.message  # cover, a window the channel's size
    strict = AvatarStore(config_for(tmp_path / "strict", min_face_px=400), lambda: {})
    (warning,) = strict.face_policy.too_small_warnings(record["face_px"], record["size"])
    assert warning["code"] == "face_too_small" and warning["min_face_px"] == 400
    assert warning["face_px"] == pytest.approx(record["face_px"], abs=0.1)


def test_a_face_the_source_cannot_make_wide_enough_is_refused_naming_the_largest_it_allows():
    from latentsync.serving.avatars import FacePolicy
    from latentsync.serving.avatars.catalogue import AvatarRecord

    def record(source: list[int], face_width_px: float) -> AvatarRecord:
        return AvatarRecord(
            id="av-0123456789ab", name="x", status="ready", progress=1.0, error=None, duration_s=2.0,
            size=source, fps=25, num_frames=50, created_at=0.0, source_size=source, face_width_px=face_width_px,
        )  # fmt: skip

    policy = FacePolicy(96, 0.3)
    # the phone video (1080x1920, face 190 px) on 512x512: 154 px in a 632 px window (was 90)
    face_px, largest = policy.face_on_air(record([1080, 1920], 190.0), (512, 512), "cover")
    assert face_px == pytest.approx(0.3 * 512, rel=0.01) and largest == 190.0
    policy.check(record([1080, 1920], 190.0), (512, 512), "cover")
    # nanmote002's face (57.6 px in 256x456) on a channel its own size: 58 px at most without upscaling
    with pytest.raises(AvatarError) as info:
        policy.check(record([256, 456], 57.6), (256, 456), "cover")
    assert info.value.code == "face_too_small" and HTTP_STATUS[info.value.code] == 409
    assert "would be 58 px" in info.value.message and "without upscaling is 58 px" in info.value.message
    # a landscape source with a small face (87 px in 1280x720) on 512x512: the window at 512, the face 87
    with pytest.raises(AvatarError) as info:
        policy.check(record([1280, 720], 87.0), (512, 512), "cover")
    assert "would be 87 px" in info.value.message and "without upscaling is 87 px" in info.value.message
    # a source smaller than the channel is enlarged anyway (its largest window): 115 px, accepted
    assert policy.face_on_air(record([256, 456], 57.6), (512, 512), "cover")[0] == pytest.approx(115.2)


def test_frames_without_a_face_are_a_warning_with_their_count():
    assert lost_face_warnings(50, 50) == []
    (warning,) = lost_face_warnings(31, 50)
    assert warning["code"] == "face_lost" and (warning["frames_without_face"], warning["num_frames"]) == (19, 50)
    assert "19 of 50 frames" in warning["message"]


def test_a_preparation_child_over_prepare_max_rss_mb_is_terminated(tmp_path):
    from latentsync.serving.avatars.preparation import PreparationQueue

    queue = PreparationQueue(tmp_path / "cache", timeout_s=120, max_rss_mb=1, prepare_upload=lambda _id: None)
    t0 = time.monotonic()
    result = queue.run_child(
        str(FACE_VIDEO), AvatarSettings(fps=25), label="rss", on_progress=lambda _f: None, cancelled=lambda: False
    )
    assert result is not None and result[:2] == ("failed", "prepare_memory"), result
    assert "avatar.prepare_max_rss_mb = 1 MB" in result[2]
    assert queue.last_peak_rss_mb > 1
    assert time.monotonic() - t0 < 30, "terminated at a poll, not at the end of the preparation"
    assert not list((tmp_path / "cache").glob("2s_GirlMuseum_0730-*")), "nothing prepared"
    queue.close()
    import multiprocessing

    assert not multiprocessing.active_children(), "no preparation child survives"


def test_a_video_decoding_to_more_frames_than_its_budget_fails_too_long_in_the_child(tmp_path):
    from latentsync.media.video import FrameBudget
    from latentsync.serving.avatars.preparation import PreparationQueue

    queue = PreparationQueue(tmp_path / "cache", timeout_s=120, max_rss_mb=4096, prepare_upload=lambda _id: None)
    budget = FrameBudget.for_duration(1.0, 25, "avatar.upload_max_s")  # the video is 2 s: 50 frames
    result = queue.run_child(
        str(FACE_VIDEO),
        AvatarSettings(fps=25),
        label="budget",
        on_progress=lambda _f: None,
        cancelled=lambda: False,
        budget=budget,
    )
    queue.close()
    assert result == ("failed", "too_long", budget.message(25)), result
    assert "avatar.upload_max_s = 1 s" in result[2] and str(FACE_VIDEO.name) not in result[2]
    assert HTTP_STATUS.get("too_long") == 400
