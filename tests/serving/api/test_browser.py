"""The control page in a real headless Chromium against the real server and the real nginx-rtmp.

One server and one browser for the module. The browser's fake microphone plays a real speech file
(Chromium's --use-file-for-fake-audio-capture). Screenshots go to out/browser/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.browsertools import launch_chromium
from tests.datafiles import media_file
from tests.streamtools import REPO, ServerProcess
from tests.whep_client import http

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow, pytest.mark.browser]

SPEECH = "audio/4s_Wavfile_1719704064_11.wav"
MIC_SPEECH = "audio/7s_shan_0801_01.wav"  # 48 kHz mono s16 WAV: what Chromium's fake capture device plays
SHOTS = REPO / "out" / "browser"


def chromium_path() -> str:
    """Debian's chromium (scripts/bootstrap.sh installs it); skip locally, fail under CI=true when absent."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    message = "chromium not installed (run scripts/bootstrap.sh: apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(rtmp_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    proc = ServerProcess(
        [f"avatar.idle_video={media_file('video/nanmote002.mp4')}", f"stream.rtmp_url={rtmp_server.url('browser')}"],
        tmp / "server.log",
    ).start()
    try:
        proc.wait_engine_ready()
        yield proc
    finally:
        code, _ = proc.stop()
        assert code == 0, proc.log()


#: Chromium flags for a microphone that plays MIC_SPEECH, granted without a prompt.
FAKE_MICROPHONE_ARGS = (
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={media_file(MIC_SPEECH)}",
)


@pytest.fixture(scope="module")
def page(server):
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw, executable, FAKE_MICROPHONE_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(f"http://127.0.0.1:{server.port}/")
            yield page
        finally:
            browser.close()


STATS_JS = """async () => {
  const s = await window.latentsync.inboundStats();
  return {now: performance.now(),
          video: s.video ? {decoded: s.video.framesDecoded, fps: s.video.framesPerSecond || 0,
                            mime: s.video.codecId || ''} : null,
          audio: s.audio ? {concealed: s.audio.concealedSamples, total: s.audio.totalSamplesReceived} : null};
}"""


def _stats(page) -> dict:
    return page.evaluate(STATS_JS)


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.1, detail=None):
    """Poll ``predicate`` until truthy (returned); else AssertionError naming ``what`` and ``detail()``, if given."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what} not within {timeout_s} s" + (f": {detail()}" if detail else ""))


def live_detail(page, task) -> str:
    """What the page and the server say of a live utterance (for a failure's message): ``task()`` is its record."""
    return f"page: {page.inner_text('#live-status')!r}, {page.inner_text('#message')!r}; task: {task()}"


def _speaks_and_returns_to_idle(page, timeout_s: float = 60.0, shot: Path | None = None) -> list[str]:
    """Wait for the badge (fed by /events) to show speaking, then idle again; returns the states seen."""
    _wait(lambda: page.inner_text("#state") == "speaking", timeout_s, "badge 'speaking'", poll_s=0.05)
    if shot is not None:
        time.sleep(1.0)  # mid-speech
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
    _wait(lambda: page.inner_text("#state") == "idle", timeout_s, "badge back to 'idle'", poll_s=0.05)
    return page.evaluate("window.latentsync.stateHistory")


def test_page_plays_the_stream_over_whep(page, server):
    _wait(lambda: page.inner_text("#whep-status") == "WebRTC connected", 20, "WHEP connected")
    _wait(lambda: (_stats(page)["video"] or {}).get("decoded", 0) >= 100, 30, "100 frames decoded")
    first = _stats(page)
    time.sleep(4.0)
    last = _stats(page)
    fps = (last["video"]["decoded"] - first["video"]["decoded"]) / ((last["now"] - first["now"]) / 1000.0)
    assert fps == pytest.approx(25.0, abs=1.0), (first, last)
    assert last["video"]["decoded"] >= 100
    # audio over the same window (the first packets' jitter-buffer start-up is not part of it)
    received = last["audio"]["total"] - first["audio"]["total"]
    concealed = last["audio"]["concealed"] - first["audio"]["concealed"]
    assert received >= 48000 * 3.5  # ~4 s of audio played out
    assert concealed / received < 0.01, (first["audio"], last["audio"])
    assert "H264" in last["video"]["mime"] or "42e01f" in last["video"]["mime"] or "42001f" in last["video"]["mime"]
    assert page.inner_text("#link") == "live" and page.inner_text("#state") == "idle"
    viewers = json.loads(http("GET", f"http://127.0.0.1:{server.port}/health")[2])["webrtc"]["viewers"]
    assert viewers == 1


def test_page_lists_the_channels_outputs_with_their_states(page, server):
    row = '#outputs li[data-output="rtmp"][data-state="live"]'
    _wait(lambda: page.query_selector(row), 20, "the rtmp output listed as live")
    text = page.inner_text(row)
    assert "live" in text and "/live/***" in text and "secret" not in text, text
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "outputs.png"), full_page=True)


def test_upload_through_the_form_speaks_and_the_badge_follows(page):
    page.set_input_files("#audio-file", str(media_file(SPEECH)))
    page.click("#upload")
    _wait(lambda: "queued" in page.inner_text("#message"), 10, "upload accepted")
    task_id = page.inner_text("#message").split()[1]
    history = _speaks_and_returns_to_idle(page, shot=SHOTS / "speaking.png")
    assert history.index("speaking") < len(history) - 1 - history[::-1].index("idle")
    _wait(lambda: page.get_attribute(f"#task-{task_id}", "data-status") == "done", 20, "task row 'done'")
    bar = page.eval_on_selector(f"#task-{task_id} progress", "b => [b.value, b.max]")
    assert bar[0] == bar[1] > 0  # the progress bar filled up to every frame on air
    assert (SHOTS / "speaking.png").stat().st_size > 10000


def test_text_box_speaks_through_speak(page):
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("espeak-ng is missing (scripts/tts.sh install)")
        pytest.skip("espeak-ng is missing (scripts/tts.sh install)")
    page.fill("#speak-text", "Hello from the page. This is the second sentence.")
    page.click("#speak")
    _wait(lambda: "queued" in page.inner_text("#message"), 10, "text accepted")
    task_id = page.inner_text("#message").split()[1]
    _speaks_and_returns_to_idle(page)
    task = json.loads(http("GET", page.url.rstrip("/") + f"/tasks/{task_id}")[2])
    assert task["status"] == "done" and task["audio_duration_s"] > 1.5, task


def test_microphone_live_over_the_websocket_speaks_while_talking(page):
    page.click("#live-start")
    _wait(lambda: "live (microphone)" in page.inner_text("#message"), 10, "utterance opened")
    task_id = page.inner_text("#message").split()[1]
    # the avatar starts speaking while the microphone is still sending (not after the recording)
    record = lambda: json.loads(http("GET", page.url.rstrip("/") + f"/tasks/{task_id}")[2])  # noqa: E731
    _wait(lambda: page.inner_text("#live-status").startswith("on air"), 10, "on air while talking",
          detail=lambda: live_detail(page, record))  # fmt: skip
    _wait(lambda: page.inner_text("#state") in ("speaking", "fade_in"), 5, "badge 'speaking' while talking")
    time.sleep(1.5)
    page.click("#live-stop")
    _wait(lambda: page.inner_text("#live-status") == "done (done)", 30, "utterance done")
    task = json.loads(http("GET", page.url.rstrip("/") + f"/tasks/{task_id}")[2])
    assert task["status"] == "done" and task["audio_duration_s"] > 1.5, task
    _wait(lambda: page.inner_text("#state") == "idle", 20, "badge back to 'idle'")


def test_microphone_recording_uploads_as_webm_and_plays(page):
    page.click("#rec-start")
    _wait(lambda: page.inner_text("#rec-status") == "recording…", 5, "recording")
    time.sleep(3.0)
    page.click("#rec-stop")
    _wait(lambda: "queued" in page.inner_text("#message"), 15, "microphone upload accepted")
    task_id = page.inner_text("#message").split()[1]
    _speaks_and_returns_to_idle(page)
    task = json.loads(http("GET", page.url.rstrip("/") + f"/tasks/{task_id}")[2])
    assert task["status"] == "done"
    assert 2.0 <= task["audio_duration_s"] <= 4.5  # what the fake microphone said while recording
