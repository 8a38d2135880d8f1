"""Faults in the streaming path: the encoder FFmpeg killed, the RTMP server gone and back. The stream must recover.

Several destinations at once, frozen servers, SRT, WHIP and HLS: tests/serving/egress/test_outputs.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.datafiles import media_file
from tests.streamtools import ServerProcess, analyse_recording, pull_stream, seconds_until

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

RECOVERY_LIMIT_S = 5.0


@pytest.fixture
def streaming_server(rtmp_server, tmp_path):
    key = f"faults-{tmp_path.name}"
    server = ServerProcess(
        [f"avatar.idle_video={media_file('video/nanmote002.mp4')}", f"stream.rtmp_url={rtmp_server.url(key)}"],
        tmp_path / "server.log",
    ).start()
    server.wait_healthy()
    assert seconds_until(lambda: rtmp_server.publishing(key), 10.0) is not None, server.log()
    yield server, key
    code, took_s = server.stop()
    assert code == 0 and took_s < 10.0, server.log()


def test_killed_ffmpeg_is_restarted_and_the_stream_is_back_within_5_s(rtmp_server, streaming_server, tmp_path):
    server, key = streaming_server
    _, before = server.health()
    old_pid = before["ffmpeg_pid"]
    os.kill(old_pid, signal.SIGKILL)
    t_kill = time.monotonic()

    def republished() -> bool:
        _, h = server.health()
        return h.get("ffmpeg_pid") not in (None, old_pid) and h.get("ffmpeg_up") and rtmp_server.publishing(key)

    assert seconds_until(republished, RECOVERY_LIMIT_S + 5) is not None, server.log()
    back_after_s = time.monotonic() - t_kill
    print(f"\nffmpeg SIGKILL: stream republished after {back_after_s:.2f} s")
    assert back_after_s <= RECOVERY_LIMIT_S, f"stream back only after {back_after_s:.2f} s"
    # A real client gets frames again, and the clock never stopped meanwhile.
    recording = analyse_recording(pull_stream(rtmp_server.url(key), 4.0, tmp_path / "after.flv"))
    assert len(recording.video_pts_ms) > 10
    _, after = server.health()
    assert after["ffmpeg_restarts"] == 1
    assert after["ticks"] > before["ticks"] + 25 * back_after_s - 5


OUTAGE_S = 10.0


def test_rtmp_server_restart_is_reconnected(rtmp_server, streaming_server, tmp_path):
    server, key = streaming_server
    rtmp_server.stop()
    try:
        time.sleep(OUTAGE_S)  # long enough for the restart backoff to have grown past 4 s
        status, during = server.health()
        (output,) = during["outputs"]
        assert status == 503 and not during["streaming"], during  # honest health while the server is away
        assert output["state"] in ("backoff", "connecting") and output["restarts"] >= 3, output  # kept trying
        assert "refused" in output["last_error"].lower() or output["last_error"], output
        assert during["ffmpeg_up"] and during["ffmpeg_restarts"] == 0  # the encoder is not the one that failed
        ticks_during = during["ticks"]
    finally:
        rtmp_server.start()
    t_back = time.monotonic()
    assert seconds_until(lambda: rtmp_server.publishing(key), RECOVERY_LIMIT_S + 10) is not None, server.log()
    reconnect_s = time.monotonic() - t_back
    print(f"\nRTMP server down {OUTAGE_S:.0f} s: republished {reconnect_s:.2f} s after it came back")
    assert reconnect_s <= RECOVERY_LIMIT_S, f"reconnected {reconnect_s:.2f} s after the server came back"
    recording = analyse_recording(pull_stream(rtmp_server.url(key), 4.0, tmp_path / "after.flv"))
    assert len(recording.video_pts_ms) > 10
    status, after = server.health()
    assert status == 200 and after["outputs"][0]["state"] == "live"
    assert after["ticks"] > ticks_during  # the controller kept ticking through the outage
    # the programme never stopped: the encoder took every tick; the output dropped what it could not send
    assert after["dropped_ticks"] == 0 and after["ffmpeg_restarts"] == 0
