"""limit_native_threads: OpenCV's and BLAS's pools capped in this process, and put back after the test."""

from __future__ import annotations

import cv2
import pytest
import threadpoolctl

from latentsync.serving.ops.threads import limit_native_threads


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
