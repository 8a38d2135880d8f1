"""How a task is cut into chunks: their lengths as audio arrives, and the audio window each one's features see.

Pure functions (no threads, no clock), tested with hand-computed cases (tests/serving/tasks/test_chunking.py).

Lengths: chunk 0 is ``engine.first_chunk_frames`` long (the first frame on air waits for it); when
their audio is in hand (an upload, synthesised text, a buffered stream) the next chunks double
(4, 8, 16, 16...), so each is generated while the one before it plays; while audio streams in at
real time, a chunk is as many frames as have arrived, but never fewer than the first chunk's.
Why the later chunks shrink too: chunk ``k`` (frames
``[s, s + n)``) can be generated only once the audio of frame ``s + n + L`` has arrived, i.e. at
``(s + n + L) / fps`` after the first byte at real time, and it plays at ``T0 + s / fps``; so a
start ``T0`` without gaps needs ``T0 >= (n + L) / fps`` + processing for *every* chunk: the
latency of a live stream is set by its longest chunk, not its first (docs/streaming-speech.md).
"""

from __future__ import annotations

import numpy as np

from latentsync.engines import CHUNK_FRAMES, ENGINE_SAMPLE_RATE_HZ
from latentsync.media.timing import samples_before_frame

#: Frames of audio before a chunk that its features see (5 s at 25 fps): enough for the
#: parametric engine's loudness normalisation and low-pass, a bounded cost per chunk (the
#: parametric features of a 7.5 s window take ~11 ms, of 15 s ~24 ms, on this project's 2-core CPU).
FEATURE_CONTEXT_FRAMES = 125
#: Frames of audio after a chunk (beyond its look-ahead) its features see when they have arrived
#: (an upload): the loudness normalisation then sees the speech around the chunk, not only before.
FEATURE_FUTURE_FRAMES = 63


def next_chunk_frames(
    start: int,
    previous: int,
    available: int,
    total: int | None,
    first_frames: int,
    min_frames: int,
    lookahead: int,
) -> int:
    """Frames of the chunk starting at content frame ``start``; 0 while it must wait for audio.

    Args:
        start: Its first frame (frames before it are planned).
        previous: Length of the chunk before it (0: this is chunk 0).
        available: Whole frames of audio received so far.
        total: Frames to generate once the utterance ended (speech + tail), else None.
        first_frames: Length of chunk 0 (``engine.first_chunk_frames``).
        min_frames: Shortest later chunk while audio streams in (at least ``first_frames``).
        lookahead: The engine's look-ahead in frames (a chunk's audio must reach this far past it).

    Returns:
        Frames of the chunk (1 .. 16), 0 to wait for more audio, -1 once every frame is planned.
    """
    want = first_frames if previous == 0 else min(CHUNK_FRAMES, max(min_frames, 2 * previous))
    if total is not None:
        left = total - start
        return -1 if left <= 0 else min(want, left)
    ready = available - lookahead - start
    if ready >= want:
        return want
    if previous > 0 and ready >= max(min_frames, 1):
        return min(ready, CHUNK_FRAMES)
    return 0


def feature_window(
    engine_16k: np.ndarray, start: int, frames: int, fps: int, lookahead: int, ended: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """The audio a chunk's features are computed from, and the rows of them that are the chunk's frames.

    Args:
        engine_16k: ``(M,) float32`` the task's audio at 16 kHz received so far.
        start: The chunk's first content frame.
        frames: Its length in frames.
        fps: Stream frame rate.
        lookahead: The engine's look-ahead in frames.
        ended: The utterance ended: frames past the audio (the closed-mouth tail) hear silence.

    Returns:
        ``(audio, (row0, row1))``: ``(n,) float32`` (a copy) from :data:`FEATURE_CONTEXT_FRAMES`
        before ``start`` to :data:`FEATURE_FUTURE_FRAMES` past its look-ahead (or what has
        arrived), and the feature rows ``[row0, row1)`` of that window that are frames
        ``[start, start + frames)``.
    """
    first = max(0, start - FEATURE_CONTEXT_FRAMES)
    offset = samples_before_frame(first, ENGINE_SAMPLE_RATE_HZ, fps)
    last = start + frames + lookahead + FEATURE_FUTURE_FRAMES
    window = np.array(engine_16k[offset : samples_before_frame(last, ENGINE_SAMPLE_RATE_HZ, fps)], np.float32)
    if ended:  # the tail and the last frames' look-ahead: silence
        need = samples_before_frame(start + frames + lookahead + 1, ENGINE_SAMPLE_RATE_HZ, fps) - offset
        if window.shape[0] < need:
            window = np.concatenate([window, np.zeros(need - window.shape[0], np.float32)])
    return window, (start - first, start - first + frames)


def padded_frame_indices(indices: np.ndarray, min_frames: int) -> np.ndarray:
    """Avatar base-frame indices of a chunk, padded to an engine's shortest chunk by repeating the last.

    Args:
        indices: ``(n,) int64``, n >= 1.
        min_frames: The engine's shortest chunk (LatentSync 1.0: 16).

    Returns:
        ``(max(n, min_frames),) int64``.
    """
    indices = np.asarray(indices, np.int64)
    if indices.shape[0] >= min_frames:
        return indices
    return np.concatenate([indices, np.full(min_frames - indices.shape[0], indices[-1], np.int64)])
