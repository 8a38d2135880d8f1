"""Unit tests of the service plumbing: rate limiter, sd_notify + watchdog, JSON log lines."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentsync.config import load_config
from latentsync.serving.api.access import allowed_hosts, host_allowed
from latentsync.serving.api.app import PUBLIC_HEALTH_KEYS, RateLimiter, origin_allowed, public_health
from latentsync.serving.ops.logs import JsonFormatter
from latentsync.serving.ops.systemd import (
    PRIVATE_NOTIFY_ENV,
    Watchdog,
    sd_notify,
    take_notify_socket,
    watchdog_interval_s,
)


def test_rate_limiter_counts_per_client_and_is_bounded():
    limiter = RateLimiter(per_minute=2, max_clients=2)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")
    assert limiter.allow("c")  # "a" is forgotten: only two clients are tracked
    assert limiter.allow("a")
    assert all(RateLimiter(per_minute=0).allow("x") for _ in range(1000))  # 0 = unlimited


def _listener(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    return sock


def test_sd_notify_sends_datagrams_and_is_a_noop_outside_systemd(tmp_path, monkeypatch):
    sock = _listener(tmp_path, monkeypatch)
    assert sd_notify("READY=1")
    assert sock.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_watchdog_pings_only_while_the_clock_ticks(tmp_path, monkeypatch):
    sock = _listener(tmp_path, monkeypatch)
    ticking = {"alive": True}
    dog = Watchdog(lambda: ticking["alive"], interval_s=0.05)
    dog.start()
    assert sock.recv(64) == b"WATCHDOG=1"
    ticking["alive"] = False
    time.sleep(0.15)
    sock.settimeout(0.0)
    while True:  # drain pings sent before the clock "froze"
        try:
            sock.recv(64)
        except BlockingIOError:
            break
    sock.settimeout(0.3)
    try:
        sock.recv(64)
        raise AssertionError("a frozen clock still pinged the watchdog")
    except TimeoutError:
        pass
    dog.close()
    dog.close()


def test_watchdog_interval_from_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 2.5  # a quarter of WatchdogSec
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))  # gunicorn's master: its worker pings for it
    assert watchdog_interval_s() == 2.5
    monkeypatch.setenv("WATCHDOG_PID", "0")  # meant for another process
    assert watchdog_interval_s() is None


def test_take_notify_socket_hides_it_from_gunicorn_and_sd_notify_still_finds_it(tmp_path, monkeypatch):
    sock = _listener(tmp_path, monkeypatch)
    environ = dict(os.environ)
    take_notify_socket(environ)
    assert "NOTIFY_SOCKET" not in environ and environ[PRIVATE_NOTIFY_ENV] == str(tmp_path / "notify.sock")
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.setenv(PRIVATE_NOTIFY_ENV, environ[PRIVATE_NOTIFY_ENV])
    assert sd_notify("READY=1") and sock.recv(64) == b"READY=1"


def test_json_log_lines_carry_task_ids():
    record = logging.LogRecord("latentsync.tasks", logging.WARNING, __file__, 1, "task %s failed", ("t1",), None)
    record.task_id = "t1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "task t1 failed" and line["task_id"] == "t1" and line["level"] == "WARNING"
    assert line["ts"].endswith("Z")


def test_origin_check_allows_scripts_our_loopback_pages_and_listed_origins_only():
    listed = frozenset({"https://studio.example.com"})
    assert origin_allowed(None, "127.0.0.1:11001", "http", frozenset())  # curl: no Origin header
    assert origin_allowed("http://127.0.0.1:11001", "127.0.0.1:11001", "http", frozenset())  # our page
    assert origin_allowed("http://localhost:11001", "localhost:11001", "http", frozenset())
    assert origin_allowed("http://[::1]:11001", "[::1]:11001", "http", frozenset())
    assert origin_allowed("https://studio.example.com/", "10.0.0.5:11001", "http", listed)
    assert not origin_allowed("https://evil.example", "127.0.0.1:11001", "http", listed)  # cross-site POST
    assert not origin_allowed("null", "127.0.0.1:11001", "http", listed)  # sandboxed frame, file:// page
    # DNS rebinding: the page's own name resolves to 127.0.0.1, so it is "same-origin" by its own account
    assert not origin_allowed("http://evil.example:11001", "evil.example:11001", "http", frozenset())
    assert not origin_allowed("http://127.0.0.1:8080", "127.0.0.1:11001", "http", frozenset())  # another port


def test_host_allowlist_refuses_rebound_names_and_keeps_addresses_and_configured_names():
    config = load_config(
        overrides=["server.public_name=Avatars.Example.com", "api.allowed_origins=[https://studio.example.com]"]
    )
    hosts = allowed_hosts(config)
    for host in ("127.0.0.1:11001", "localhost", "[::1]:11001", "avatars.example.com:443", "studio.example.com"):
        assert host_allowed(host, hosts), host
    assert host_allowed("203.0.113.5:11001", hosts)  # an address: no name to rebind
    assert host_allowed("[2001:db8::1]:11001", hosts)
    for host in ("evil.example", "evil.example:11001", "localhost.evil.example", "", None):
        assert not host_allowed(host, hosts), host
    explicit = load_config(overrides=["server.allowed_hosts=[avatars.example.com]"])
    assert host_allowed("avatars.example.com", allowed_hosts(explicit), any_ip=False)
    assert not host_allowed("127.0.0.1:11001", allowed_hosts(explicit), any_ip=False)


def test_the_heap_gives_large_freed_blocks_back():
    script = (
        "import os; from latentsync.serving.ops.memory import bound_heap_growth, ENV_MMAP_THRESHOLD;"
        "assert bound_heap_growth(); print(os.environ[ENV_MMAP_THRESHOLD])"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(256 << 10), done.stderr


def test_public_health_tells_the_state_only():
    body = {
        "state": "speaking",
        "ticking": True,
        "ffmpeg_up": True,
        "engine_ready": True,
        "uptime_s": 3.0,
        "ffmpeg_pid": 42,
        "on_air_task": "t1",
        "ffmpeg_last_error": "x",
        "workers": {"pids": [43]},
    }
    assert public_health(body) == {k: body[k] for k in PUBLIC_HEALTH_KEYS}


UNIT = Path(__file__).resolve().parents[3] / "scripts" / "latentsync-realtime.service"
HARDENING = (
    "ProtectSystem=strict",
    "ProtectHome=true",
    "PrivateTmp=true",
    "UMask=0077",
    "CapabilityBoundingSet=",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter=@system-service",
    "ProtectProc=invisible",
    "NoNewPrivileges=true",
    "User=latentsync",
    "NotifyAccess=all",
)


def test_unit_file_is_hardened_and_verifies(tmp_path):
    lines = UNIT.read_text().splitlines()
    for option in HARDENING:
        assert option in lines, option
    assert any(line.startswith("MemoryMax=") for line in lines)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    local = tmp_path / UNIT.name  # the unit as installed at this checkout (its ExecStart must exist)
    local.write_text(UNIT.read_text().replace("/opt/latentsync-realtime", str(UNIT.parents[1])))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(local)], capture_output=True, text=True, timeout=60
    )
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert exposure and float(exposure.group(1)) <= 2.5, security.stdout[-2000:]
