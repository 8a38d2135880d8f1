"""latentsync/serving/ops/procfs.py: /proc read in one place, checked against this process and its children."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from latentsync.serving.ops import procfs
from latentsync.serving.ops.systemd import name_this_thread
from tests.streamtools import seconds_until

# A /proc/<pid>/stat line (proc(5)) whose command name holds spaces and both parentheses: fields
# 3.. are "S 4242 ..." with utime 7, stime 3, nice 5, num_threads 2, starttime 123456, rss 789.
LINE = (
    "31337 (a) (b c) S 4242 31337 31337 0 -1 4194560 100 0 0 0 7 3 0 0 25 5 2 0 123456 "
    "10000000 789 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n"
)


def test_a_stat_line_is_split_at_its_last_parenthesis():
    found = procfs.parse_stat(LINE)
    assert found == procfs.ProcStat(
        pid=31337,
        comm="a) (b c",
        state="S",
        ppid=4242,
        utime_ticks=7,
        stime_ticks=3,
        nice=5,
        num_threads=2,
        starttime_ticks=123456,
        rss_pages=789,
    )
    assert found.cpu_s == pytest.approx(10 / procfs.CLOCK_TICKS_PER_S)
    assert found.rss_mb == pytest.approx(789 * procfs.PAGE_BYTES / 2**20)
    assert found.alive and not procfs.parse_stat(LINE.replace(" S ", " Z ", 1)).alive


@pytest.mark.parametrize("line", ["", "31337 (cat", "31337 cat) S 1", "x (cat) S 1 " + "0 " * 30, "1 (cat) S 1 2 3"])
def test_what_is_not_a_stat_line_is_refused(line):
    with pytest.raises(ValueError):
        procfs.parse_stat(line)


def test_this_process_and_its_threads():
    me = procfs.read_stat()
    assert me is not None and me.pid == os.getpid() and me.ppid == os.getppid() and me.state == "R"
    assert me.nice == os.getpriority(os.PRIO_PROCESS, 0) and me.starttime_ticks > 0 and me.rss_pages > 0
    assert procfs.read_stat(os.getpid()) is not None and procfs.process_state() == "R" and procfs.is_alive(os.getpid())
    assert me.num_threads == procfs.thread_count() == len(procfs.thread_stats())
    assert procfs.rss_kib() > 0 and procfs.rss_mb() == procfs.rss_kib() / 1024
    assert 0.5 < me.rss_mb / procfs.rss_mb() < 2  # the same counters, read at two moments
    caps = procfs.status_fields()["CapEff"]
    assert procfs.effective_capabilities() == int(caps, 16)
    ids = procfs.user_ids()
    assert ids is not None and (ids.real, ids.effective, ids.saved) == os.getresuid() and ids.filesystem == os.geteuid()
    # Under pytest-xdist a worker runs as ``python -c ...``: the interpreter's name is in every form.
    assert os.getpid() in procfs.process_stats() and Path(sys.executable).name in procfs.command_line()


def test_a_threads_own_line_its_name_niceness_and_cpu_time():
    ready, done, seen = threading.Event(), threading.Event(), {}

    def spin() -> None:
        name_this_thread("ls-test spin)")
        seen["tid"] = tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + 1)  # this thread only (Linux)
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:
            pass
        ready.set()
        done.wait(10)

    worker = threading.Thread(target=spin, daemon=True)
    worker.start()
    try:
        assert ready.wait(10)
        tid = seen["tid"]
        thread = procfs.read_stat("self", tid)
        assert thread is not None and thread.pid == tid and thread.comm == "ls-test spin)"
        assert thread.nice == procfs.read_stat().nice + 1
        assert 0.2 < thread.cpu_s == procfs.cpu_seconds(os.getpid(), tid) <= procfs.cpu_seconds()
        assert procfs.thread_stats()[tid].comm == "ls-test spin)"
        assert procfs.cpu_seconds("self", threading.get_native_id()) < procfs.cpu_seconds()
    finally:
        done.set()
        worker.join(10)
    # join() returns when the Python thread is done; the kernel drops its task a moment later.
    assert seconds_until(lambda: procfs.read_stat("self", tid) is None, 5.0) is not None
    assert procfs.cpu_seconds("self", tid) == 0.0


def test_children_descendants_zombies_and_the_gone(tmp_path):
    oddly_named = tmp_path / "sl) (e p"  # the command name is the executable's: spaces and parentheses
    shutil.copy(shutil.which("sleep"), oddly_named)
    shell = subprocess.Popen(["sh", "-c", f"'{oddly_named}' 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while not (below := procfs.descendants(shell.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(below) == 1, below
        sleeper = procfs.read_stat(below[0])
        assert sleeper is not None and sleeper.comm == "sl) (e p" and sleeper.ppid == shell.pid
        assert procfs.command_line(sleeper.pid) == f"{oddly_named} 30"
        assert shell.pid in procfs.children(os.getpid()) and sleeper.pid not in procfs.children(os.getpid())
        assert {shell.pid, sleeper.pid} <= set(procfs.descendants(os.getpid()))
        stats = procfs.process_stats()
        assert procfs.children(shell.pid, stats) == [sleeper.pid] == procfs.descendants(shell.pid, stats)
        assert procfs.tree_rss_mb(shell.pid) == pytest.approx(
            (procfs.rss_kib(shell.pid) + procfs.rss_kib(sleeper.pid)) / 1024, rel=0.2
        )
        os.kill(shell.pid, signal.SIGKILL)  # killed, not reaped yet (Popen.kill would reap it): a zombie
        os.kill(sleeper.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while procfs.process_state(shell.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert procfs.process_state(shell.pid) == "Z" and not procfs.is_alive(shell.pid)
    finally:
        shell.kill()
        shell.wait(10)
    gone = shell.pid
    assert procfs.read_stat(gone) is None and procfs.process_state(gone) is None and not procfs.is_alive(gone)
    assert procfs.cpu_seconds(gone) == 0.0 and procfs.rss_mb(gone) == 0 and procfs.tree_rss_mb(gone) == 0.0
    assert procfs.thread_stats(gone) == {} and procfs.command_line(gone) == "" and procfs.children(gone) == []
    assert procfs.effective_capabilities(gone) == 0 and procfs.thread_count(gone) == 0 and procfs.user_ids(gone) is None
