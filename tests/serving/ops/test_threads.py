"""limit_native_threads: OpenCV's and BLAS's pools capped in this process, and put back after the test;
renice_this_thread: one thread's niceness, and the kernel's refusal; make_this_thread_realtime: one
thread under SCHED_FIFO, the threads it starts ordinary again, and the kernel's refusal."""

from __future__ import annotations

import os
import resource
import sys
import threading
import warnings

import cv2
import pytest
import threadpoolctl

from latentsync.serving.ops.threads import limit_native_threads, make_this_thread_realtime, renice_this_thread
from tests.streamtools import may_use_fifo, sched_policy, thread_niceness

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")


@pytest.fixture
def restored():
    opencv = cv2.getNumThreads()
    with threadpoolctl.threadpool_limits(limits=None):  # its exit puts every pool back as it was
        yield
    cv2.setNumThreads(opencv)


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}


def test_one_thread_per_pool(restored):
    import numpy  # noqa: F401  (loads its OpenBLAS)

    limit_native_threads(1)
    assert cv2.getNumThreads() == 1
    assert blas_threads() == {1}


def test_zero_leaves_the_defaults_and_negative_is_refused(restored):
    before_cv, before_blas = cv2.getNumThreads(), blas_threads()
    limit_native_threads(0)
    assert (cv2.getNumThreads(), blas_threads()) == (before_cv, before_blas)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        limit_native_threads(-1)


@linux_only
def test_renice_moves_the_calling_thread_only():
    base = thread_niceness()
    seen = {}

    def in_a_thread():
        seen["returned"] = renice_this_thread(2)  # raising one's niceness needs no privilege
        seen["kernel"] = thread_niceness()
        seen["unchanged"] = renice_this_thread(0)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(10)
    assert seen == {"returned": min(19, base + 2), "kernel": min(19, base + 2), "unchanged": min(19, base + 2)}
    assert thread_niceness() == base


def in_an_unprivileged_child(limit: int, action) -> str:
    """``action()`` (returning a str) in a forked child that has given up root, if it had it, and ``limit``.

    The child sets the resource limit ``limit`` to 0 and, as root (whose CAP_SYS_NICE ignores the
    limit), becomes nobody, which drops every capability; it never returns into pytest.
    """
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process: the child only makes syscalls
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            resource.setrlimit(limit, (0, 0))
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            os.write(write_end, action().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        _, status = os.waitpid(pid, 0)
        answer = os.read(read_end, 100).decode()
    finally:
        os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer


@linux_only
def test_a_negative_offset_without_privilege_is_refused_and_changes_nothing():
    """RLIMIT_NICE 0: no niceness below 20."""

    def renice() -> str:
        before = thread_niceness()
        answer = renice_this_thread(-5)
        return f"{answer} {before} {thread_niceness()}"

    answer, before, after = in_an_unprivileged_child(resource.RLIMIT_NICE, renice).split()
    assert answer == "None" and before == after


@linux_only
def test_realtime_moves_the_calling_thread_only_and_not_the_threads_it_starts():
    seen = {}

    def started_from_it():
        seen["child"] = sched_policy()

    def in_a_thread():
        seen["returned"] = make_this_thread_realtime(7)
        seen["kernel"] = sched_policy(), os.sched_getparam(0).sched_priority
        child = threading.Thread(target=started_from_it)
        child.start()
        child.join(10)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(10)
    allowed = may_use_fifo(7)
    assert seen["returned"] is allowed
    assert seen["kernel"] == ((os.SCHED_FIFO, 7) if allowed else (os.SCHED_OTHER, 0))
    assert seen["child"] == os.SCHED_OTHER  # SCHED_RESET_ON_FORK: what it starts is ordinary
    assert sched_policy() == os.SCHED_OTHER  # the caller's thread kept its policy


def test_realtime_priority_outside_1_to_99_is_refused():
    for priority in (0, 100, -1):
        with pytest.raises(ValueError, match="priority must be 1..99"):
            make_this_thread_realtime(priority)


@linux_only
def test_realtime_without_privilege_is_refused_and_changes_nothing():
    """RLIMIT_RTPRIO 0: no real-time priority."""

    def ask() -> str:
        return f"{make_this_thread_realtime(10)} {os.sched_getscheduler(0)}"

    answer, policy = in_an_unprivileged_child(resource.RLIMIT_RTPRIO, ask).split()
    assert answer == "False" and int(policy) == os.SCHED_OTHER
