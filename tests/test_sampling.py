"""Frame sampling: pure, so tested on numbers alone."""

import numpy as np
import pytest

from cmdcl_cache.sampling import SamplingError, SamplingPolicy, num_samples, sample_frames


def test_rate_mode_one_fps_centres_of_bins():
    idx, ts = sample_frames(250, 25.0, SamplingPolicy(fps=1, min_frames=2, max_frames=100))
    assert len(idx) == 10                                   # 10 s at 1 fps
    np.testing.assert_array_equal(idx, np.arange(10) * 25 + 12)
    np.testing.assert_allclose(ts, idx / 25.0)


def test_rate_mode_clamped_to_min_and_max():
    assert num_samples(75, 25.0, SamplingPolicy(fps=1, min_frames=8, max_frames=100)) == 8
    long_video = 2 * 3600 * 30   # two hours at 30 fps
    idx, _ = sample_frames(long_video, 30.0, SamplingPolicy(fps=1, min_frames=8, max_frames=4096))
    assert len(idx) == 4096 and idx[0] >= 0 and idx[-1] < long_video
    assert np.all(np.diff(idx) > 0)
    # uniform: gaps differ by at most one frame
    assert np.diff(idx).max() - np.diff(idx).min() <= 1


def test_rate_mode_never_repeats_frames():
    idx, _ = sample_frames(3, 30.0, SamplingPolicy(fps=1, min_frames=8, max_frames=16))
    np.testing.assert_array_equal(idx, [0, 1, 2])


def test_exact_mode_repeats_for_short_videos():
    p = SamplingPolicy(num_frames=4)
    np.testing.assert_array_equal(sample_frames(2, 10.0, p)[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(sample_frames(1, 10.0, p)[0], [0, 0, 0, 0])
    idx, _ = sample_frames(1000, 10.0, p)
    np.testing.assert_array_equal(idx, [125, 375, 625, 875])


def test_policy_round_trip_and_validation():
    for p in (SamplingPolicy(fps=0.5, min_frames=3, max_frames=9), SamplingPolicy(num_frames=16)):
        assert SamplingPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="--fps"):
        SamplingPolicy(fps=0)
    with pytest.raises(ValueError, match="--min-frames"):
        SamplingPolicy(min_frames=9, max_frames=3)
    with pytest.raises(ValueError, match="--num-frames"):
        SamplingPolicy(num_frames=0)


@pytest.mark.parametrize("n,fps", [(0, 25.0), (10, 0.0), (10, float("nan"))])
def test_unsampleable_videos_are_refused(n, fps):
    with pytest.raises(SamplingError):
        sample_frames(n, fps, SamplingPolicy())
