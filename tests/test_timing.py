"""Sample-count arithmetic: exact forever, for any (sample rate, fps) pair."""

from __future__ import annotations

import numpy as np
import pytest

from latentsync.media.timing import samples_before_frame, samples_in_frame

FRAMES = 10**6


@pytest.mark.parametrize(("rate", "fps"), [(44100, 30), (48000, 24), (16000, 25), (44100, 25), (48000, 29), (22050, 7)])
def test_one_million_frames_have_zero_drift(rate, fps):
    k = np.arange(FRAMES + 1, dtype=np.int64)
    boundaries = (k * rate) // fps  # floor(k * sr / fps), what samples_before_frame returns
    per_frame = np.diff(boundaries)
    # Each frame gets floor(sr/fps) or one more sample, never anything else.
    assert set(np.unique(per_frame)) <= {rate // fps, rate // fps + 1}
    # Summing the per-frame counts lands exactly on the ideal sample position after every frame.
    np.testing.assert_array_equal(np.cumsum(per_frame), boundaries[1:])
    assert int(per_frame.sum()) == FRAMES * rate // fps
    # The drift against real time (k * sr / fps) never reaches one sample.
    assert np.max(k * rate / fps - boundaries) < 1.0
    # The scalar functions the controller calls agree with the vectorised reference.
    for index in (0, 1, 2, 12345, FRAMES - 1):
        assert samples_in_frame(index, rate, fps) == per_frame[index]
        assert samples_before_frame(index, rate, fps) == boundaries[index]


def test_integer_arithmetic_stays_exact_for_years():
    frames_in_ten_years = 25 * 3600 * 24 * 3653
    assert samples_before_frame(frames_in_ten_years, 48000, 25) == frames_in_ten_years * 1920
    assert samples_in_frame(frames_in_ten_years, 44100, 30) in (1470,)


@pytest.mark.parametrize("args", [(-1, 48000, 25), (0, 0, 25), (0, 48000, 0)])
def test_rejects_out_of_range(args):
    with pytest.raises(ValueError, match="frame_index"):
        samples_before_frame(*args)
