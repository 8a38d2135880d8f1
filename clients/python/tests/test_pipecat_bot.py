"""End to end: examples/pipecat_bot.py (SmallWebRTCTransport + espeak-ng + the video service) in a headless Chromium.

The bot runs as a subprocess of ``.venv-agents``; Chromium (Debian's) is driven by Playwright from the
server's venv (as tests/serving/api/test_browser.py does), on the bot's own page
(examples/pipecat_bot.html: nothing from the internet). The page measures what it receives:
frames decoded (``requestVideoFrameCallback``) and the audio's energy (an ``AnalyserNode``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, SERVER_PYTHON, TOKEN, free_port

pytestmark = pytest.mark.timeout(180)

BOT = REPO / "examples" / "pipecat_bot.py"

#: Run by the server venv's Python (Playwright): open the page, connect, wait, print the page's stats.
DRIVER = r"""
import json, sys, time
from playwright.sync_api import sync_playwright
url, chromium, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=chromium, args=[
        "--headless=new", "--no-sandbox", "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns", "--autoplay-policy=no-user-gesture-required"])
    try:
        page = browser.new_page()
        page.goto(url)
        t0 = page.evaluate("performance.now()")
        page.click("#connect")
        page.wait_for_function("window.stats.connected", timeout=20000)
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.5)
            samples.append(page.evaluate("window.stats.framesDecoded"))
        stats = page.evaluate("({...window.stats, rms: window.stats.rms.slice(-50)})")
        shot = page.locator("video").screenshot()
        stats["t0"] = t0
        stats["samples"] = samples
        stats["screenshot_bytes"] = len(shot)
        print(json.dumps(stats))
    finally:
        browser.close()
"""


def test_the_bot_speaks_in_a_browser_and_the_face_moves(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (bash scripts/chromium.sh install)")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (bash scripts/tts.sh install)")
    probe = subprocess.run([str(SERVER_PYTHON), "-c", "import playwright"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("playwright not in the server's venv")
    port = free_port()
    log = open(tmp_path / "bot.log", "wb")  # noqa: SIM115 - closed below
    bot = subprocess.Popen(
        [sys.executable, str(BOT), "--server", server.url, "--port", str(port)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, LATENTSYNC_TOKEN=TOKEN, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert bot.poll() is None, (tmp_path / "bot.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert b"RTCPeerConnection" in r.read()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "bot.log").read_text()
                time.sleep(0.3)
        run = subprocess.run(
            [str(SERVER_PYTHON), "-c", DRIVER, f"http://127.0.0.1:{port}/", chromium, "8"],
            capture_output=True,
            timeout=120,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-3000:] + (tmp_path / "bot.log").read_text()[-3000:]
        stats = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        bot.send_signal(signal.SIGINT)
        try:
            bot.wait(15)
        except subprocess.TimeoutExpired:
            bot.kill()
            bot.wait(5)
        log.close()
    print({k: v for k, v in stats.items() if k not in ("rms", "samples")})
    samples = stats["samples"]
    fps = (samples[-1] - samples[len(samples) // 2]) / (0.5 * (len(samples) - 1 - len(samples) // 2))
    print(f"frames decoded {samples[-1]}, {fps:.1f} fps in the second half; peak audio rms {stats['peakRms']:.3f}")
    assert stats["framesDecoded"] > 100, stats
    assert fps > 20, samples
    assert stats["peakRms"] > 0.02, "no speech heard"
    assert stats["speechAt"] is not None
