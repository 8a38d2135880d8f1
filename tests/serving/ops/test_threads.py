"""limit_native_threads: OpenCV's and BLAS's pools capped in this process, and put back after the test;
renice_this_thread: one thread's niceness, and the kernel's refusal."""

from __future__ import annotations

import os
import resource
import sys
import threading
import warnings

import cv2
import pytest
import threadpoolctl

from latentsync.serving.ops.threads import limit_native_threads, renice_this_thread
from tests.streamtools import thread_niceness

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


@linux_only
def test_a_negative_offset_without_privilege_is_refused_and_changes_nothing():
    """In a child that has given up root (if it had it) and RLIMIT_NICE (0: no niceness below 20)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process: the child only makes syscalls
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
            if os.geteuid() == 0:  # root's CAP_SYS_NICE ignores the limit: become nobody (drops every capability)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            before = thread_niceness()
            answer = renice_this_thread(-5)
            after = thread_niceness()
            os.write(write_end, f"{answer} {before} {after}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        _, status = os.waitpid(pid, 0)
        answer, before, after = os.read(read_end, 100).decode().split()
    finally:
        os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == "None" and before == after
