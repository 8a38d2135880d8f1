"""gunicorn started exactly as systemd starts the shipped unit (scripts/latentsync-realtime.service).

The test is systemd's side of the notify protocol: a ``SOCK_DGRAM`` socket named by
``$NOTIFY_SOCKET`` (with ``SO_PASSCRED``, so each message carries its sender's pid, as systemd
sees it), ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` = the pid of the exec'd main process (gunicorn's
master). It checks: exactly one ``READY=1``, only once the stream is on air; ``WATCHDOG=1`` at
least every ``WatchdogSec/2`` while the output clock ticks and none once the clock thread is frozen
(ptrace stops that one thread, as a deadlock would; every other thread runs on); a start failure
exits non-zero; SIGTERM fades the speech out, flushes FFmpeg and closes the pool within the unit's
``TimeoutStopSec``. Real processes, real nginx-rtmp.
"""

from __future__ import annotations

import array
import ctypes
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from latentsync.serving.ops import procfs
from latentsync.serving.runtime.channel import HEALTH_TICK_STALE_S
from tests.datafiles import media_file
from tests.streamtools import REPO, Api, ServerProcess, free_port, may_use_fifo, sched_policy, thread_niceness

pytestmark = [pytest.mark.rtmp, pytest.mark.server, pytest.mark.slow]

UNIT = REPO / "scripts" / "latentsync-realtime.service"
WATCHDOG_S = 4.0  # the test's WatchdogSec: short, so a stall shows within seconds
PING_INTERVAL_S = WATCHDOG_S / 4  # latentsync.serving.systemd.watchdog_interval_s
FREEZE_S = 2 * WATCHDOG_S
SPEECH = "audio/7s_shan_0801_01.wav"

# ptrace(2) requests (<sys/ptrace.h>) and waitpid's __WALL (<linux/wait.h>)
PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT, WALL = 17, 0x4206, 0x4207, 0x40000000


def unit_setting(key: str) -> str:
    """The value of ``key=`` in the shipped unit."""
    values = [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]
    assert len(values) == 1, (key, values)
    return values[0]


class NotifyListener:
    """systemd's end of ``sd_notify``: records ``(seconds since start, sender pid, message)``."""

    def __init__(self, path: Path, on_ready=None):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.t0 = time.monotonic()
        self.messages: list[tuple[float, int, str]] = []
        self.ready_checks: list[dict] = []
        self._on_ready = on_ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds_size = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except TimeoutError:
                continue
            t = time.monotonic() - self.t0
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:creds_size])[0]
            for message in data.decode().split("\n"):
                self.messages.append((t, pid, message))
                if message == "READY=1" and self._on_ready is not None:
                    self.ready_checks.append(self._on_ready())

    def times(self, message: str) -> list[float]:
        return [t for t, _, m in self.messages if m == message]

    def senders(self, message: str) -> set[int]:
        return {pid for _, pid, m in self.messages if m == message}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def start_like_systemd(tmp_path: Path, overrides: list[str], notify: Path) -> subprocess.Popen:
    """gunicorn as the unit's ExecStart, with the environment systemd gives a Type=notify service."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(
        os.environ,
        TMPDIR=str(tmp_path / "tmp"),
        NOTIFY_SOCKET=str(notify),
        WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)),
        LATENTSYNC_OVERRIDES=" ".join(overrides),
    )
    gunicorn = Path(sys.executable).with_name("gunicorn")
    # WATCHDOG_PID is the main process's pid: the shell's, which exec keeps for gunicorn's master.
    cmd = [
        "sh",
        "-c",
        'export WATCHDOG_PID=$$; exec "$0" "$@"',
        str(gunicorn),
        "-c",
        "configs/gunicorn.conf.py",
        "latentsync.serving.api.app:create_app()",
    ]
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed by the caller through proc.stdout
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def thread_named(pid: int, name: str) -> int:
    """The tid of ``pid``'s thread called ``name`` (its ``comm``)."""
    for tid, thread in procfs.thread_stats(pid).items():
        if thread.comm == name:
            return tid
    raise AssertionError(f"no thread {name!r} in process {pid}")


def of_other_threads(pid: int, but: str, read) -> list:
    """``read(tid)`` for every thread of ``pid`` not called ``but`` (threads that end meanwhile left out)."""
    out = []
    for tid, thread in procfs.thread_stats(pid).items():
        try:
            if thread.comm != but:
                out.append(read(tid))
        except OSError:  # ProcessLookupError included: the thread ended
            pass
    return out


def may_lower_niceness_to(pid: int, target: int) -> bool:
    """Whether the kernel lets ``pid`` set niceness ``target``: CAP_SYS_NICE, or RLIMIT_NICE allowing it."""
    cap_sys_nice = 23  # linux/capability.h
    allowed = resource.prlimit(pid, resource.RLIMIT_NICE)[0]
    return bool(procfs.effective_capabilities(pid) >> cap_sys_nice & 1) or target >= 20 - allowed


class FrozenThread:
    """Stops one thread of another process with ptrace (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``)."""

    def __init__(self, tid: int):
        self.tid = tid
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.ptrace.restype = ctypes.c_long
        self._libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

    def _ptrace(self, request: int) -> None:
        if self._libc.ptrace(request, self.tid, None, None) != 0:
            err = ctypes.get_errno()
            if err == 1:  # EPERM: no CAP_SYS_PTRACE and not allowed by yama
                pytest.skip("ptrace is not permitted here")
            raise OSError(err, os.strerror(err))

    def __enter__(self) -> FrozenThread:
        self._ptrace(PTRACE_SEIZE)
        self._ptrace(PTRACE_INTERRUPT)
        os.waitpid(self.tid, WALL)  # the thread is in a ptrace-stop from here
        return self

    def __exit__(self, *exc) -> None:
        self._ptrace(PTRACE_DETACH)


@pytest.fixture
def overrides(rtmp_server, tmp_path_factory):
    def make(key: str, *extra: str) -> list[str]:
        return [
            f"server.port={free_port()}",
            f"avatar.idle_video={media_file('video/nanmote002.mp4')}",
            f"avatar.cache_dir={tmp_path_factory.getbasetemp() / 'avatars'}",
            f"stream.rtmp_url={rtmp_server.url(key)}",
            *extra,
        ]

    return make


def test_ready_watchdog_stall_and_stop_as_systemd_sees_them(rtmp_server, overrides, tmp_path):
    assert unit_setting("Type") == "notify" and unit_setting("NotifyAccess") == "all"
    stop_budget_s = float(unit_setting("TimeoutStopSec"))
    key = f"sd-{rtmp_server.port}"
    args = overrides(key)
    port = int(args[0].split("=")[1])
    server = ServerProcess([], tmp_path / "gunicorn.log")
    server.port = port

    def on_ready() -> dict:  # what systemd would find when READY=1 arrives
        return {"publishing": rtmp_server.publishing(key), "health": server.health()[0]}

    listener = NotifyListener(tmp_path / "notify.sock", on_ready)
    proc = start_like_systemd(tmp_path, args, listener.path)
    server.proc = proc
    log = tmp_path / "gunicorn.log"
    try:
        deadline = time.monotonic() + 240
        while not listener.times("READY=1"):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no READY=1"
            time.sleep(0.1)
        workers = procfs.children(proc.pid)
        assert len(workers) == 1, workers
        worker = workers[0]
        assert listener.ready_checks == [{"publishing": True, "health": 200}], listener.ready_checks

        # stream.clock_nice (-10): the clock thread ahead of the process's other threads, where allowed
        base = thread_niceness(worker, worker)
        clock_lowered = may_lower_niceness_to(worker, base - 10)
        assert thread_niceness(thread_named(worker, "ls-clock"), worker) == (base - 10 if clock_lowered else base)
        niceness = of_other_threads(worker, "ls-clock", lambda tid: thread_niceness(tid, worker))
        assert set(niceness) == {base}  # the rest keep theirs
        # stream.clock_rt_priority (10): the clock thread under SCHED_FIFO where allowed, the rest ordinary
        clock_policy = sched_policy(thread_named(worker, "ls-clock"))
        clock_fifo = may_use_fifo(10, worker)
        assert clock_policy == (os.SCHED_FIFO if clock_fifo else os.SCHED_OTHER)
        assert set(of_other_threads(worker, "ls-clock", os.sched_getscheduler)) == {os.SCHED_OTHER}

        time.sleep(3 * WATCHDOG_S)  # the clock ticks: pings keep coming
        t_freeze = listener.now()
        with FrozenThread(thread_named(worker, "ls-clock")):
            time.sleep(FREEZE_S)
            assert server.health()[0] == 503  # the HTTP threads run on and tell the truth
            t_thaw = listener.now()
        time.sleep(3 * PING_INTERVAL_S + HEALTH_TICK_STALE_S)

        api = Api(port)
        status, body = api.post_audio(media_file(SPEECH).read_bytes())
        assert status == 202, body
        api.wait_task(body["task_id"], ("streaming",), 60)
        pool = procfs.children(worker)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(stop_budget_s + 5)
        took_s = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        listener.close()
    text = log.read_text()
    for t, pid, message in listener.messages:
        print(f"{t:8.3f} s  pid {pid:>7}  {message}")
    print(
        f"master {proc.pid}, worker {worker}; clock frozen {t_freeze:.3f} .. {t_thaw:.3f} s; "
        f"SIGTERM took {took_s:.2f} s"
    )

    # exactly one READY=1, from the worker, once the stream was on air
    assert len(listener.times("READY=1")) == 1
    assert listener.senders("READY=1") == {worker} and worker != proc.pid
    # WATCHDOG=1 from the worker (NotifyAccess=all: WATCHDOG_PID names the master)
    pings = listener.times("WATCHDOG=1")
    assert listener.senders("WATCHDOG=1") == {worker}
    ready_t = listener.times("READY=1")[0]
    ticking = [t for t in pings if t <= t_freeze]
    # systemd arms the watchdog when start-up completes (READY=1): the first ping must follow within
    # WatchdogSec/2 of it (pings start with the clock, every WatchdogSec/4, so they may come just before or after)
    assert ticking and ticking[0] <= ready_t + WATCHDOG_S / 2, ("no ping within WatchdogSec/2 of READY=1", ready_t)
    gaps = [b - a for a, b in zip(ticking, ticking[1:], strict=False)] + [t_freeze - ticking[-1]]
    assert max(gaps) <= WATCHDOG_S / 2, gaps
    # frozen clock: pings stop once the last tick is HEALTH_TICK_STALE_S old, and stay away long
    # enough for systemd to act (WatchdogSec without a ping)
    during = [t for t in pings if t_freeze < t <= t_thaw]
    assert not [t for t in during if t > t_freeze + HEALTH_TICK_STALE_S + PING_INTERVAL_S + 0.5], during
    assert t_thaw - max([t_freeze, *during]) >= WATCHDOG_S
    assert "withholding the systemd watchdog ping" in text
    assert ("clock thread at niceness" if clock_lowered else "niceness -10 refused") in text
    assert ("clock thread under SCHED_FIFO at priority 10" if clock_fifo else "SCHED_FIFO priority 10 refused") in text
    assert [t for t in pings if t_thaw < t <= t_thaw + 2 * PING_INTERVAL_S + HEALTH_TICK_STALE_S], "no ping after thaw"
    # SIGTERM: fade, FFmpeg flush, pool closed, all inside TimeoutStopSec; systemd told STOPPING=1
    assert code == 0 and took_s < stop_budget_s, (code, took_s)
    assert "STOPPING=1" in [m for _, _, m in listener.messages]
    assert "faded out for shutdown (stream idle)" in text
    assert re.search(r"encoder \S+: run \d+ flushed and exited with code 0", text), text[-3000:]
    assert "runtime stopped" in text
    assert pool and not [p for p in pool if procfs.is_alive(p)], "engine workers or FFmpeg survived"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_start_failure_exits_non_zero_without_ready(overrides, tmp_path):
    not_a_video = tmp_path / "idle.mp4"
    not_a_video.write_text("not a video\n")
    args = [a for a in overrides("sd-fail") if not a.startswith("avatar.idle_video=")]
    listener = NotifyListener(tmp_path / "notify.sock")
    proc = start_like_systemd(tmp_path, [*args, f"avatar.idle_video={not_a_video}"], listener.path)
    try:
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    text = (tmp_path / "gunicorn.log").read_text()
    assert code not in (0, None), text[-3000:]  # Restart=on-failure retries it
    assert "cannot start" in text
    assert "READY=1" not in [m for _, _, m in listener.messages], listener.messages
