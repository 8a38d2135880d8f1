"""The development RTMP server (scripts/rtmp_server.sh): only a publisher holding its secret may
publish, and its nginx workers do not run as root."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from latentsync.serving.ops import procfs
from tests.streamtools import FFMPEG, RtmpServer

pytestmark = [pytest.mark.rtmp, pytest.mark.ffmpeg]


def publish(url: str, seconds: float = 3.0) -> subprocess.Popen:
    cmd = [
        FFMPEG,
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        f"sine=d={seconds}",
        "-c:a",
        "aac",
        "-f",
        "flv",
        url,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_publishing(rtmp_server, key: str, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if rtmp_server.publishing(key):
            return True
        time.sleep(0.1)
    return False


def test_only_the_secret_holder_publishes(rtmp_server):
    assert (os.stat(rtmp_server.run_dir / "publish.secret").st_mode & 0o077) == 0
    base = f"rtmp://127.0.0.1:{rtmp_server.port}/live"
    for url in (f"{base}/intruder", f"{base}/intruder?secret=wrong"):
        proc = publish(url)
        proc.communicate(timeout=30)
        assert proc.returncode != 0, url  # refused by on_publish at connect
        assert not rtmp_server.publishing("intruder")
    proc = publish(rtmp_server.url("owner"))
    try:
        assert wait_publishing(rtmp_server, "owner")
    finally:
        proc.kill()
        proc.wait(5)


def test_nginx_workers_do_not_run_as_root(rtmp_server):
    master, workers = rtmp_server.nginx_pids()
    assert workers, "no nginx worker"
    ids = {pid: procfs.user_ids(pid) for pid in workers}
    assert None not in ids.values(), f"an nginx worker is gone: {ids}"
    uids = {found.real for found in ids.values() if found is not None}
    if os.getuid() == 0:
        assert 0 not in uids, ids
    else:
        assert uids == {os.getuid()}, ids


def test_a_relay_keeps_the_destination_key_off_every_command_line(rtmp_server, tmp_path):
    key = "platform-key-" + os.urandom(8).hex()
    push_file = tmp_path / "push.url"
    push_file.write_text(rtmp_server.url(key) + "\n")  # the "platform" is the session's server
    push_file.chmod(0o600)
    relay = RtmpServer(tmp_path / "relay", push_url_file=push_file)
    relay.start()
    proc = publish(relay.url("avatar"), seconds=6.0)
    try:
        assert wait_publishing(rtmp_server, key, timeout_s=5.0), "the relay did not push to the destination"
        leaked = [pid for pid in procfs.process_stats() if key in procfs.command_line(pid)]
        assert leaked == [], f"stream key on the command line of {leaked}"
        assert (os.stat(relay.run_dir / "nginx.conf").st_mode & 0o077) == 0
    finally:
        proc.kill()
        proc.wait(5)
        relay.stop()
