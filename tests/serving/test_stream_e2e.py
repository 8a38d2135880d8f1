"""End to end: infer_serv.py streams the idle avatar to a real nginx-rtmp server; a real client records it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.datafiles import media_file
from tests.streamtools import ServerProcess, StreamRecorder, analyse_recording, first_pts_s, pull_stream

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

CASES = [
    # (video, extra overrides, expected (width, height), audio rate)
    ("video/2s_GirlMuseum_0730.mp4", [], (832, 1248), 48000),
    ("video/10s_girl_0729_00_formal.mp4", ["stream.width=416", "stream.height=624"], (416, 624), 48000),
    ("video/20250106_124532_sig.mp4", ["stream.audio_sample_rate=44100"], (768, 768), 44100),
]
STREAM_S = 13.0  # the client keeps >= 10 s of video after waiting up to one GOP (2 s) for a keyframe


@pytest.mark.parametrize(("video", "extra", "size", "rate"), CASES, ids=[c[0].split("/")[-1] for c in CASES])
def test_idle_stream_reaches_rtmp_with_exact_timing(rtmp_server, tmp_path, video, extra, size, rate):
    key = f"e2e-{tmp_path.name}"
    fifo_tmp = tmp_path / "tmp"
    fifo_tmp.mkdir()
    server = ServerProcess(
        [f"avatar.idle_video={media_file(video)}", f"stream.rtmp_url={rtmp_server.url(key)}", *extra],
        tmp_path / "server.log",
        tmpdir=fifo_tmp,
    ).start()
    recorder = None
    try:
        server.wait_healthy()
        # A real client joins the live stream and stays until the publisher has gone for 3 s.
        recorder = StreamRecorder(rtmp_server.url(key), tmp_path / "pull.flv", rw_timeout_s=3.0)
        time.sleep(STREAM_S)
        status, health = server.health()
    finally:
        code, took_s = server.stop()
        path = recorder.wait_end() if recorder else None
    recording = analyse_recording(path)
    v0, a0 = first_pts_s(path, "v"), first_pts_s(path, "a")

    # What the viewer got: >= 10 s at 25 fps, the configured size, H.264 + AAC at the configured rate.
    assert recording.video_duration_s >= 10.0
    assert recording.fps == pytest.approx(25.0, abs=0.5)
    assert set(np.diff(recording.video_pts_ms)) <= {39, 40, 41}  # every frame, evenly spaced (1 ms FLV rounding)
    assert (recording.width, recording.height) == size
    assert (recording.video_codec, recording.audio_codec, recording.audio_rate_hz) == ("h264", "aac", rate)
    # From the client's first frame (a keyframe; its audio began v0 - a0 earlier) to the end of the
    # stream there is as much audio as video, within one frame (AAC priming and padding included).
    audio_from_first_frame_s = recording.audio_duration_s - (v0 - a0)
    assert abs(audio_from_first_frame_s - recording.video_duration_s) <= 1 / 25, (
        audio_from_first_frame_s,
        recording.video_duration_s,
        v0,
        a0,
    )
    assert status == 200 and health["state"] == "idle"
    assert health["dropped_ticks"] == 0 and health["ffmpeg_restarts"] == 0
    # Clean shutdown: exit 0 within 10 s, FIFO directory removed, stream key never logged.
    assert code == 0 and took_s < 10.0, server.log()
    assert list(fifo_tmp.iterdir()) == [], "FIFO directory left behind"
    assert key not in server.log(), "stream key leaked into the log"


def test_second_output_through_the_tee_muxer(rtmp_server, tmp_path):
    key = f"tee-{tmp_path.name}"
    record = tmp_path / "live-000-0000.mkv"  # the first file of the first FFmpeg run
    server = ServerProcess(
        [
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"stream.rtmp_url={rtmp_server.url(key)}",
            f"stream.record_dir={tmp_path}",
            "stream.record_path=live.mkv",
        ],
        tmp_path / "server.log",
    ).start()
    try:
        server.wait_healthy()
        live = analyse_recording(pull_stream(rtmp_server.url(key), 4.0, tmp_path / "pull.flv"))
        _, health = server.health()
    finally:
        code, _ = server.stop()
    assert code == 0, server.log()
    assert len(live.video_pts_ms) > 20  # the RTMP push works next to the recording
    local = analyse_recording(record)  # flushed and finalised on SIGTERM
    assert (local.width, local.height) == (256, 456)
    assert len(local.video_pts_ms) >= health["frames_emitted"]
    assert abs(local.audio_duration_s - local.video_duration_s) <= 1 / 25
