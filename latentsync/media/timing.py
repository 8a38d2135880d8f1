"""Exact audio/video timing arithmetic for the output clock.

Frame ``k`` of a stream at ``fps`` frames per second owns the audio samples
``[floor(k * sr / fps), floor((k + 1) * sr / fps))``. Summing per-frame counts therefore
never drifts, whatever the (sample rate, fps) pair: after ``k`` frames exactly
``floor(k * sr / fps)`` samples have been emitted. All arithmetic is on Python integers
(arbitrary precision), so it stays exact for streams that run for years.
"""

from __future__ import annotations


def samples_before_frame(frame_index: int, sample_rate_hz: int, fps: int) -> int:
    """Number of audio samples that precede frame ``frame_index``.

    Args:
        frame_index: Frame number ``k`` (>= 0).
        sample_rate_hz: Audio sample rate in Hz (> 0).
        fps: Video frame rate in frames per second (> 0).

    Returns:
        ``floor(k * sample_rate_hz / fps)`` samples (per channel).

    Raises:
        ValueError: If an argument is out of range.
    """
    if frame_index < 0 or sample_rate_hz <= 0 or fps <= 0:
        raise ValueError(
            f"need frame_index >= 0, sample_rate_hz > 0, fps > 0; got {frame_index}, {sample_rate_hz}, {fps}"
        )
    return (frame_index * sample_rate_hz) // fps


def samples_in_frame(frame_index: int, sample_rate_hz: int, fps: int) -> int:
    """Number of audio samples that ride with frame ``frame_index``.

    ``floor((k + 1) * sr / fps) - floor(k * sr / fps)``: either ``floor(sr / fps)`` or one more,
    with the fractional remainder carried to later frames and never dropped.

    Args:
        frame_index: Frame number ``k`` (>= 0).
        sample_rate_hz: Audio sample rate in Hz (> 0).
        fps: Video frame rate in frames per second (> 0).

    Returns:
        Samples (per channel) for frame ``k``.

    Raises:
        ValueError: If an argument is out of range.
    """
    return samples_before_frame(frame_index + 1, sample_rate_hz, fps) - samples_before_frame(
        frame_index, sample_rate_hz, fps
    )
