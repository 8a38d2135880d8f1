"""Chunk lengths and feature windows (latentsync/serving/tasks/chunking.py): hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from latentsync.serving.tasks.chunking import (
    FEATURE_CONTEXT_FRAMES,
    FEATURE_FUTURE_FRAMES,
    feature_window,
    next_chunk_frames,
    padded_frame_indices,
)

FPS = 25
PER_FRAME_16K = 16000 // FPS  # 640 samples


@pytest.mark.parametrize(
    ("start", "previous", "available", "total", "expected"),
    [
        # chunk 0 (first_frames 4, look-ahead 1): needs 4 + 1 frames of audio
        (0, 0, 4, None, 0),
        (0, 0, 5, None, 4),
        (0, 0, 500, None, 4),
        # audio in hand: the chunks double up to 16
        (4, 4, 500, None, 8),
        (12, 8, 500, None, 16),
        (28, 16, 500, None, 16),
        # at real time: what has arrived, at least the first chunk's length, at most what doubling allows
        (4, 4, 4 + 4 + 1 - 1, None, 0),
        (4, 4, 4 + 4 + 1, None, 4),
        (4, 4, 4 + 6 + 1, None, 6),
        (12, 8, 12 + 9 + 1, None, 9),
        # ended: what is left (speech + tail), in the same growing lengths; -1 once all is planned
        (0, 0, 0, 3, 3),
        (4, 4, 0, 10, 6),
        (12, 8, 0, 100, 16),
        (100, 16, 0, 100, -1),
    ],
)
def test_next_chunk_frames(start, previous, available, total, expected):
    assert next_chunk_frames(start, previous, available, total, 4, 4, 1) == expected


def test_latentsync_chunks_are_16_frames_whatever_the_arrivals():
    # first_frames = min_frames = 16, look-ahead 3
    assert next_chunk_frames(0, 0, 18, None, 16, 16, 3) == 0
    assert next_chunk_frames(0, 0, 19, None, 16, 16, 3) == 16
    assert next_chunk_frames(16, 16, 16 + 15 + 3, None, 16, 16, 3) == 0  # never a short chunk at real time
    assert next_chunk_frames(16, 16, 16 + 16 + 3, None, 16, 16, 3) == 16
    assert next_chunk_frames(16, 16, 0, 25, 16, 16, 3) == 9  # the last one (padded later)


def test_feature_window_holds_the_context_the_chunk_and_its_look_ahead():
    audio = np.arange(400 * PER_FRAME_16K, dtype=np.float32)  # 400 frames received
    window, rows = feature_window(audio, 300, 16, FPS, 1, ended=False)
    first = 300 - FEATURE_CONTEXT_FRAMES
    assert rows == (FEATURE_CONTEXT_FRAMES, FEATURE_CONTEXT_FRAMES + 16)
    last = min(400, 300 + 16 + 1 + FEATURE_FUTURE_FRAMES)  # what arrived, at most its future context
    assert window[0] == first * PER_FRAME_16K and window.shape[0] == (last - first) * PER_FRAME_16K
    early, rows = feature_window(audio, 4, 8, FPS, 1, ended=False)
    assert rows == (4, 12) and early.shape[0] == (4 + 8 + 1 + FEATURE_FUTURE_FRAMES) * PER_FRAME_16K
    window[0] = -1.0  # a copy: the task's audio is never written
    assert audio[first * PER_FRAME_16K] == first * PER_FRAME_16K


def test_the_window_of_an_ended_utterance_hears_silence_past_its_end():
    audio = np.ones(10 * PER_FRAME_16K, np.float32)  # 10 frames, then the tail
    window, rows = feature_window(audio, 8, 7, FPS, 3, ended=True)  # 2 speech frames + 5 tail frames
    assert rows == (8, 15) and window.shape[0] == (8 + 7 + 3 + 1) * PER_FRAME_16K
    assert window[: 10 * PER_FRAME_16K].min() == 1.0 and not window[10 * PER_FRAME_16K :].any()


def test_padded_frame_indices_repeat_the_last_frame_up_to_the_engines_shortest_chunk():
    assert padded_frame_indices(np.array([5, 6, 7]), 1).tolist() == [5, 6, 7]
    assert padded_frame_indices(np.array([5, 6, 7]), 5).tolist() == [5, 6, 7, 7, 7]
    assert padded_frame_indices(np.arange(16), 16).tolist() == list(range(16))
