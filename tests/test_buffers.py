"""FramePool: a buffer comes back only once nothing outside the pool references it (views and queues included)."""

from __future__ import annotations

import queue
import threading

import cv2
import numpy as np
import pytest

from latentsync.media.buffers import FramePool, written_into

SHAPE = (4, 6, 3)


def test_a_dropped_frame_is_handed_out_again():
    pool = FramePool(SHAPE)
    first = pool.take()
    address = first.ctypes.data
    del first
    again = pool.take()
    assert again.ctypes.data == address and pool.allocated == 1 and pool.kept == 1


def test_a_frame_still_referenced_anywhere_is_never_handed_out():
    pool = FramePool(SHAPE)
    held = pool.take()
    view_of = pool.take()
    view = view_of[1:3, 2:4]  # a view keeps its base alive: its buffer is not free
    del view_of
    queued = pool.take()
    q: queue.Queue = queue.Queue(maxsize=1)
    q.put(queued)
    del queued
    fresh = pool.take()
    viewed = view.base.ctypes.data
    assert len({a.ctypes.data for a in (held, view.base, q.queue[0], fresh)}) == 4 and pool.allocated == 4
    del view  # the view's buffer is free again, the others are not
    assert pool.take().ctypes.data == viewed and pool.allocated == 4


def test_a_frame_another_thread_let_go_comes_back():
    pool = FramePool(SHAPE)
    q: queue.Queue = queue.Queue(maxsize=4)
    for _ in range(3):
        q.put(pool.take())
    consumer = threading.Thread(target=lambda: [q.get(timeout=5) for _ in range(3)])  # a writer draining its queue
    consumer.start()
    consumer.join(5)
    assert not consumer.is_alive()
    for _ in range(10):
        frame = pool.take()
        del frame
    assert pool.allocated == 3


def test_past_max_buffers_frames_are_fresh_and_not_kept():
    pool = FramePool(SHAPE, max_buffers=2)
    frames = [pool.take() for _ in range(5)]
    assert pool.kept == 2 and pool.allocated == 5 and len({f.ctypes.data for f in frames}) == 5


def test_copy_fills_a_pooled_buffer_and_checks_the_shape():
    pool = FramePool(SHAPE)
    source = np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)
    out = pool.copy(source)
    assert np.array_equal(out, source) and not np.shares_memory(out, source)
    with pytest.raises(ValueError, match="shape"):
        pool.copy(np.zeros((6, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="max_buffers"):
        FramePool(SHAPE, max_buffers=0)


def test_written_into_keeps_what_opencv_wrote_in_place_and_copies_what_it_allocated():
    out = np.zeros(SHAPE, np.uint8)
    in_place = cv2.add(out, 3, dst=out)  # OpenCV writes through dst
    assert written_into(in_place, out) is out and (out == 3).all()
    allocated = np.full(SHAPE, 7, np.uint8)  # what OpenCV returns when it cannot use dst
    assert written_into(allocated, out) is out and (out == 7).all() and not np.shares_memory(out, allocated)
