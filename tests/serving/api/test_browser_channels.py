"""The control page's channel choice in a real headless Chromium against a real two-channel server.

One server for the module: channel ``main`` and channel ``hall`` push to two stream keys of the
session's nginx-rtmp and share one worker pool (parametric engine). The page is switched to
``hall`` through its ``<select id="channel">``: its WHEP player, events (badge, health panel) and
uploads must then be ``hall``'s, and the choice must survive a reload (``#channel=hall``). The
avatar panel uploads real videos (``POST /avatars``, a private ``avatar.cache_dir``) and puts one
on ``hall`` (``PUT /channels/hall``). The server has an ``api.token``: the page must send it everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browsertools import launch_chromium
from tests.datafiles import MEDIA, make_faceless_video, media_file
from tests.serving.api.test_browser import FAKE_MICROPHONE_ARGS, SHOTS, STATS_JS, _wait, chromium_path, live_detail
from tests.streamtools import ServerProcess
from tests.whep_client import http

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow, pytest.mark.browser]

VIDEO = "video/nanmote002.mp4"  # 256x456: two channels fit on two shared cores
SPEECH = "audio/4s_Wavfile_1719704064_11.wav"
FACE_VIDEO = "video/2s_GirlMuseum_0730.mp4"  # a face on every frame: an avatar for POST /avatars
TOKEN = "page-channels-token"  # api.token: every request the page makes must carry it


@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser-channels")
    video = media_file(VIDEO)
    proc = ServerProcess(
        [
            f"avatar.idle_video={video}",
            f"stream.rtmp_url={rtmp_server.url('page-main')}",
            "engine.name=parametric",
            f"api.token={TOKEN}",
            f"avatar.cache_dir={tmp / 'avatars'}",  # private: the avatar list starts empty
            f'channels=[{{name: hall, rtmp_url: "{rtmp_server.url("page-hall")}", idle_video: "{video}"}}]',
            f"media.root={MEDIA}",  # PUT may name the test videos by path
            "avatar.min_face_px=200",  # over the guide's ~173 px, the most her video gives: the page asks first
        ],
        tmp / "server.log",
    ).start()
    try:
        proc.wait_engine_ready()
        _wait(lambda: get(proc, "/channels/hall/health").get("engine_ready"), 60, "hall ready")
        yield proc
    finally:
        code, _ = proc.stop()
        assert code == 0, proc.log()


def api(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """``(status, headers, body bytes)`` of one request with the API token."""
    headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    return http(method, f"http://127.0.0.1:{server.port}{path}", body, headers)


def get(server, path: str) -> dict:
    return json.loads(api(server, "GET", path)[2] or b"{}")


@pytest.fixture(scope="module")
def page(server):
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw, executable, FAKE_MICROPHONE_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.add_init_script(f"localStorage.setItem('latentsync.token', {json.dumps(TOKEN)})")  # as typed once
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{server.port}/")
            yield page
            assert not errors, errors  # no uncaught script error on any path the tests took
        finally:
            browser.close()


def _decoded(page) -> int:
    return (page.evaluate(STATS_JS)["video"] or {}).get("decoded", 0)


def _label(page, name: str) -> str:
    """What the channel list shows for channel ``name``."""
    return page.eval_on_selector(f'#channel option[value="{name}"]', "o => o.textContent")


def _viewers(server, name: str) -> int:
    return get(server, f"/channels/{name}/health")["webrtc"]["viewers"]


def test_switching_to_a_channel_plays_its_whep_and_shows_its_state(page, server):
    _wait(lambda: page.inner_text("#whep-status") == "WebRTC connected", 20, "main's WHEP connected")
    _wait(lambda: _viewers(server, "main") == 1, 10, "main's viewer")
    _wait(lambda: page.evaluate("window.latentsync.channelsListed") >= 1, 10, "GET /channels listed")
    assert page.eval_on_selector_all("#channel option", "os => os.map(o => o.value)") == ["main", "hall"]
    assert page.is_enabled("#speak") and page.is_enabled("#live-start")

    page.select_option("#channel", "hall")
    _wait(lambda: page.url.endswith("#channel=hall"), 5, "hash #channel=hall")
    _wait(lambda: page.inner_text("#whep-status") == "WebRTC connected", 20, "hall's WHEP connected")
    _wait(lambda: _decoded(page) >= 50, 20, "50 frames of hall decoded")
    # the page's WHEP session moved: main's was DELETEd before hall's was offered
    assert _viewers(server, "hall") == 1
    _wait(lambda: _viewers(server, "main") == 0, 10, "main's WHEP session closed")
    _wait(lambda: page.inner_text('#health dd[data-key="channel"]') == "hall", 10, "health panel of hall")
    assert page.inner_text('#health dd[data-key="format"]') == "256x456 @ 25 fps"
    assert page.inner_text("#state") == "idle" and page.inner_text("#link") == "live"
    # every way to speak works on every channel
    for control in ("#speak", "#speak-text", "#live-start", "#upload", "#rec-start"):
        assert page.is_enabled(control), control
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "channel-hall.png"))


def test_an_upload_from_the_page_lands_on_the_chosen_channel(page, server):
    assert page.evaluate("window.latentsync.channel") == "hall"
    main_done = get(server, "/channels/main/health")["tasks_final"]["done"]
    page.set_input_files("#audio-file", str(media_file(SPEECH)))
    page.click("#upload")
    _wait(lambda: "queued" in page.inner_text("#message"), 10, "upload accepted")
    message = page.inner_text("#message")
    task_id = message.split()[1]
    assert message.endswith("on hall"), message
    assert task_id in [t["task_id"] for t in get(server, "/channels/hall/tasks")["tasks"]]
    assert task_id not in [t["task_id"] for t in get(server, "/tasks")["tasks"]]  # not main's
    # the badge follows hall (main stays idle meanwhile), and so does hall's entry in the channel list
    _wait(lambda: page.inner_text("#state") == "speaking", 30, "badge 'speaking'", poll_s=0.05)
    _wait(lambda: _label(page, "hall") == "hall (speaking)", 2, "the list says what the badge says", poll_s=0.02)
    assert get(server, "/channels/main/health")["state"] == "idle"
    _wait(lambda: page.get_attribute(f"#task-{task_id}", "data-status") == "done", 30, "task row 'done'")
    _wait(lambda: page.inner_text("#state") == "idle", 10, "badge back to 'idle'")
    assert get(server, f"/channels/hall/tasks/{task_id}")["status"] == "done"
    assert get(server, "/channels/main/health")["tasks_final"]["done"] == main_done
    _wait(lambda: _label(page, "hall") == "hall (idle)", 5, "hall idle in the list again")


def test_text_to_speech_and_talk_live_speak_on_the_chosen_channel(page, server):
    assert page.evaluate("window.latentsync.channel") == "hall"
    page.fill("#speak-text", "Hello from the hall.")
    page.click("#speak")
    _wait(lambda: "text to speech" in page.inner_text("#message"), 10, "/channels/hall/speak accepted")
    message = page.inner_text("#message")
    task_id = message.split()[1]
    assert message.endswith("on hall"), message
    _wait(lambda: get(server, f"/channels/hall/tasks/{task_id}")["status"] == "done", 30, "spoken on hall")
    assert task_id not in [t["task_id"] for t in get(server, "/tasks")["tasks"]]
    page.click("#live-start")  # the fake microphone, over /channels/hall/ws/speech
    _wait(lambda: "live (microphone) on hall" in page.inner_text("#message"), 10, "live utterance opened on hall")
    live_id = page.inner_text("#message").split()[1]
    _wait(lambda: page.inner_text("#live-status").startswith("on air"), 15, "on air while talking",
          detail=lambda: live_detail(page, lambda: get(server, f"/channels/hall/tasks/{live_id}")))  # fmt: skip
    _wait(lambda: _label(page, "hall") in ("hall (speaking)", "hall (fade_in)"), 5, "hall speaking in the list")
    # Talk on until more than half a second has arrived: a fast host is on air after less than that.
    _wait(
        lambda: get(server, f"/channels/hall/tasks/{live_id}")["audio_duration_s"] > 0.6, 10, "0.6 s of talk received"
    )
    page.click("#live-stop")
    _wait(lambda: page.inner_text("#live-status") == "done (done)", 30, "live utterance done")
    task = get(server, f"/channels/hall/tasks/{live_id}")
    assert task["status"] == "done" and task["source"] == "stream" and task["audio_duration_s"] > 0.5, task
    assert get(server, "/channels/main/health")["state"] == "idle"


def test_the_choice_survives_a_reload_and_an_unknown_channel_falls_back_to_main(page, server):
    page.reload()
    _wait(lambda: page.evaluate("window.latentsync.channel") == "hall", 5, "hall after reload")
    assert page.input_value("#channel") == "hall"
    _wait(lambda: page.inner_text('#health dd[data-key="channel"]') == "hall", 10, "health panel of hall")
    _wait(lambda: page.inner_text("#whep-status") == "WebRTC connected", 20, "hall's WHEP after reload")

    page.evaluate("location.hash = 'channel=gone'")  # a shared link to a channel deleted since
    _wait(lambda: "showing channel main" in page.inner_text("#message"), 10, "fallback message")
    assert page.evaluate("window.latentsync.channel") == "main" and page.input_value("#channel") == "main"
    assert page.url.endswith("#channel=main")
    _wait(lambda: page.inner_text('#health dd[data-key="channel"]') == "main", 10, "health panel of main")
    _wait(lambda: page.inner_text("#whep-status") == "WebRTC connected", 20, "main's WHEP again")
    assert page.is_enabled("#speak")
    _wait(lambda: _viewers(server, "main") == 1 and _viewers(server, "hall") == 0, 10, "one viewer, on main")


def test_a_channel_added_at_run_time_is_listed_and_its_deletion_falls_back_to_main(page, server, rtmp_server):
    body = json.dumps({"rtmp_url": rtmp_server.url("page-popup"), "idle_video": str(media_file(VIDEO))}).encode()
    status, _, answer = api(server, "PUT", "/channels/popup", body, {"Content-Type": "application/json"})
    assert status == 202, answer
    _wait(lambda: get(server, "/channels/popup").get("status") == "ready", 60, "popup ready")
    page.focus("#channel")  # the list is refreshed when the select is focused or opened
    _wait(lambda: "popup" in page.eval_on_selector_all("#channel option", "os => os.map(o => o.value)"), 5, "listed")
    page.select_option("#channel", "popup")
    _wait(lambda: page.inner_text('#health dd[data-key="channel"]') == "popup", 10, "health panel of popup")
    _wait(lambda: _viewers(server, "popup") == 1, 20, "popup's viewer")
    assert api(server, "DELETE", "/channels/popup")[0] == 200
    _wait(lambda: "popup is gone: showing channel main" in page.inner_text("#message"), 15, "fallback to main")
    assert page.evaluate("window.latentsync.channel") == "main" and page.url.endswith("#channel=main")
    _wait(lambda: page.inner_text('#health dd[data-key="channel"]') == "main", 10, "health panel of main")
    _wait(lambda: _viewers(server, "main") == 1, 20, "main's viewer again")
    assert "popup" not in page.eval_on_selector_all("#channel option", "os => os.map(o => o.value)")


@pytest.fixture(scope="module")
def faceless_video(tmp_path_factory) -> Path:
    """2 s of FFmpeg's test pattern (colour bars, no face), H.264 in MP4."""
    return make_faceless_video(tmp_path_factory.mktemp("faceless") / "bars.mp4")


def test_avatars_uploaded_from_the_page_fail_with_the_reason_or_go_on_air_on_the_chosen_channel(
    page, server, faceless_video
):
    main_avatar = get(server, "/channels/main")["avatar"]
    page.evaluate("location.hash = 'channel=hall'")
    _wait(lambda: page.inner_text('#health dd[data-key="channel"]') == "hall", 10, "health panel of hall")
    assert page.is_visible("#avatars")  # the server has the avatar API
    # a file that is no video: the server's reason is shown, nothing is listed
    page.set_input_files("#avatar-file", str(media_file(SPEECH)))
    page.click("#avatar-upload")
    _wait(lambda: "avatar refused" in page.inner_text("#avatar-message"), 10, "refusal shown")
    assert "not_video" in page.inner_text("#avatar-message") and get(server, "/avatars")["avatars"] == []
    # a video without a face: the preparation fails, the page shows why; the record can be deleted
    page.set_input_files("#avatar-file", str(faceless_video))
    page.click("#avatar-upload")
    _wait(lambda: page.query_selector("#avatar-list li") is not None, 10, "the faceless upload listed")
    failed_id = page.get_attribute("#avatar-list li", "id").removeprefix("avatar-")
    _wait(lambda: page.get_attribute(f"#avatar-{failed_id}", "data-status") == "failed", 60, "preparation failed")
    reason = get(server, f"/avatars/{failed_id}")["error"]["message"]
    assert reason in page.inner_text(f"#avatar-{failed_id} .info") and reason in page.inner_text("#avatar-message")
    page.click(f"#avatar-{failed_id} .delete")
    _wait(lambda: page.query_selector(f"#avatar-{failed_id}") is None, 10, "the failed avatar's row gone")
    assert api(server, "GET", f"/avatars/{failed_id}")[0] == 404

    # the first still the page asks for is refused (429, as api.stills_per_min does): it is asked again
    refused: list[str] = []

    def refuse_the_first_still(route) -> None:
        if refused:
            route.continue_()
            return
        refused.append(route.request.url)
        error = {"error": {"code": "rate_limited", "message": "too many avatar stills (test)"}}
        route.fulfill(status=429, content_type="application/json", body=json.dumps(error))

    page.route("**/avatars/*/still*", refuse_the_first_still)
    page.set_input_files("#avatar-file", str(media_file(FACE_VIDEO)))
    page.fill("#avatar-name", "guide")
    page.click("#avatar-upload")
    _wait(lambda: page.query_selector("#avatar-list li") is not None, 10, "the new avatar listed")
    avatar_id = page.get_attribute("#avatar-list li", "id").removeprefix("avatar-")
    row = f"#avatar-{avatar_id}"
    assert page.inner_text(f"{row} .name") == "guide"
    _wait(lambda: page.get_attribute(row, "data-status") == "ready", 120, "avatar ready", poll_s=0.2)
    assert page.inner_text("#avatar-message") == "avatar guide is ready"
    assert page.is_enabled(f"{row} .use")
    assert get(server, f"/avatars/{avatar_id}")["status"] == "ready"
    # the still: the avatar framed as hall (256x456) would show it, before anything goes on air
    _wait(lambda: page.is_visible(f"{row} .still"), 30, "the still shown (asked again after a 429)")
    page.unroute("**/avatars/*/still*")
    assert len(refused) == 1, refused
    natural = page.eval_on_selector(f"{row} .still", "img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [256, 456], natural
    # the same file again: the server answers 200 with that avatar; nothing more is listed or prepared
    page.set_input_files("#avatar-file", str(media_file(FACE_VIDEO)))
    page.fill("#avatar-name", "guide again")
    page.click("#avatar-upload")
    _wait(lambda: "already uploaded as avatar guide" in page.inner_text("#avatar-message"), 10, "the same video")
    assert [a["id"] for a in get(server, "/avatars")["avatars"]] == [avatar_id]
    assert len(page.query_selector_all("#avatar-list li")) == 1

    # on hall the guide's face would be ~173 px across (cover's window narrowed to hall's 256 source
    # pixels: the most her video gives without upscaling), under avatar.min_face_px 200: the page asks first
    dialogs = []

    def accept(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    page.click(f"{row} .use")
    _wait(lambda: page.inner_text("#avatar-switch") == "hall → guide: done", 120, "switch done", poll_s=0.2)
    assert len(dialogs) == 1 and "avatar.min_face_px" in dialogs[0], dialogs
    assert get(server, "/channels/hall")["switch"]["state"] == "done"
    assert get(server, f"/avatars/{avatar_id}")["used_by"] == ["hall"]
    _wait(lambda: page.inner_text(f"{row} .use") == "On hall", 10, "row shows it is on hall")
    assert page.is_disabled(f"{row} .delete")  # in use: not deletable
    assert get(server, "/channels/main")["avatar"] == main_avatar != get(server, "/channels/hall")["avatar"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "channel-hall-avatar.png"))
