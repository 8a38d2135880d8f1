"""engine.name=latentsync runs through the whole server on CPU with tiny random checkpoints.

Proves the wiring (worker process loads the official-format files, Whisper features, DDIM chunks,
latent cache, paste-back, RTMP), not quality: the tiny weights are random.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.datafiles import media_file
from tests.streamtools import REPO, Api, ServerProcess, analyse_recording, pull_stream

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-ckpt")
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_checkpoints.py"), str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


def engine_overrides(ckpt) -> list[str]:
    return [
        "engine.name=latentsync",
        f"engine.latentsync.unet_path={ckpt / 'latentsync_unet.pt'}",
        f"engine.latentsync.unet_config={ckpt / 'unet.yaml'}",
        f"engine.latentsync.whisper_path={ckpt / 'whisper' / 'tiny.pt'}",
        f"engine.latentsync.vae_path={ckpt / 'vae'}",
        "engine.latentsync.inference_steps=2",
        "engine.chunk_deadline_s=120",
        "engine.max_batch_chunks=4",  # queued chunks go through the U-Net together
    ]


def test_latentsync_task_completes_and_frames_reach_rtmp(rtmp_server, tiny_checkpoints, tmp_path, tmp_path_factory):
    key = f"ls-{tmp_path.name}"
    server = ServerProcess(
        [
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"stream.rtmp_url={rtmp_server.url(key)}",
            f"avatar.cache_dir={tmp_path_factory.getbasetemp() / 'avatars'}",
            *engine_overrides(tiny_checkpoints),
        ],
        tmp_path / "server.log",
    ).start()
    try:
        server.wait_healthy()
        server.wait_engine_ready(300)
        api = Api(server.port)
        status, accepted = api.post_audio(media_file("audio/4s_Wavfile_1719704064_11.wav").read_bytes())
        assert status == 202, accepted
        server_task = api.wait_task(accepted["task_id"], ("streaming", "done", "failed"), timeout_s=120)
        assert server_task["status"] != "failed", server_task
        live = analyse_recording(pull_stream(rtmp_server.url(key), 4.0, tmp_path / "pull.flv"))
        final = api.wait_task(accepted["task_id"], ("done", "failed"), timeout_s=180)
        _, health = server.health()
    finally:
        code, _ = server.stop()
    assert final["status"] == "done", final
    assert final["chunks_generated"] == final["chunks_total"] >= 7  # 4.16 s + tail at 25 fps
    assert final["frames_streamed"] == final["frames_total"]
    assert len(live.video_pts_ms) > 25 and (live.width, live.height) == (256, 456)
    assert health["engine"] == "latentsync" and health["dropped_ticks"] == 0
    assert code == 0, server.log()


def test_missing_weights_give_a_clear_startup_error(rtmp_server, tiny_checkpoints, tmp_path, tmp_path_factory):
    missing = tmp_path / "nowhere" / "latentsync_unet.pt"
    overrides = [o for o in engine_overrides(tiny_checkpoints) if not o.startswith("engine.latentsync.unet_path")]
    server = ServerProcess(
        [
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"stream.rtmp_url={rtmp_server.url('missing')}",
            f"avatar.cache_dir={tmp_path_factory.getbasetemp() / 'avatars'}",
            *overrides,
            f"engine.latentsync.unet_path={missing}",
        ],
        tmp_path / "server.log",
    ).start()
    server.proc.wait(240)
    log = server.log()
    server.stop()
    assert server.proc.returncode == 1, log
    assert "engine.latentsync.unet_path" in log and str(missing) in log, log
