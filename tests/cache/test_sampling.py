"""Frame sampling: pure, so tested on numbers alone."""

import numpy as np
import pytest

from cmdcl_cache.cache.sampling import SamplingError, SamplingPolicy, num_samples, sample_frames


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


@pytest.mark.parametrize("fps", [25.0, 30000 / 1001, 10.0, 7.0])
def test_time_uniform_rule_is_the_bin_centre_formula_on_constant_rate_timestamps(fps):
    """The frame on screen at each bin centre, found from timestamps i / fps, is floor((2k+1) n / 2T),
    bin edges included (n = 40, T = 4 puts every centre exactly on a frame's start)."""
    from cmdcl_cache.cache.sampling import bin_centres, frames_shown_at
    for n in [1, 2, 3, 40, 99, 250, 1000, 4321]:
        for t in sorted({1, 2, 3, 4, 7, 10, 64, n // 2 or 1, n}):
            if t > n:
                continue
            by_time = frames_shown_at(np.arange(n) / fps, bin_centres(0.0, n / fps, t))
            k = np.arange(t)
            np.testing.assert_array_equal(by_time, ((2 * k + 1) * n) // (2 * t), err_msg=f"n={n} T={t}")


def test_timestamps_given_for_a_constant_rate_video_are_stored_as_given():
    pts = 5.0 + np.arange(250) / 25.0                      # a stream that starts at 5 s
    idx, ts = sample_frames(250, 25.0, SamplingPolicy(fps=1, min_frames=2, max_frames=100), pts)
    np.testing.assert_array_equal(idx, np.arange(10) * 25 + 12)
    np.testing.assert_array_equal(ts, pts[idx])


def test_variable_rate_duration_and_fps_come_from_the_timestamps():
    from cmdcl_cache.cache.sampling import video_timing
    pts = np.r_[np.arange(10) * 0.1, 1.0 + np.arange(10) * 2.0]   # 1 s at 10 fps, then 20 s at 0.5 fps
    timing = video_timing(20, 10.0, pts)
    assert not timing.constant_rate
    assert timing.duration == pytest.approx(19.0 + 0.1) and timing.fps == pytest.approx(20 / 19.1)
    idx, ts = sample_frames(20, 10.0, SamplingPolicy(fps=1, min_frames=2, max_frames=100), pts)
    assert len(idx) == 19 and ts.max() <= 19.0 and (np.diff(idx) >= 0).all()
    assert (idx >= 10).mean() > 0.9                      # time-uniform: most samples in the slow part


@pytest.mark.parametrize("pts,match", [
    ([0.0, 0.2, 0.1], "presentation order"),
    ([0.0, float("nan"), 0.2], "presentation time"),
    ([0.0, 0.1], "2 timestamps for 3 frames"),
    ([1.0, 1.0, 1.0], "same timestamp"),
    ([-6.1e17, -6.1e17 + 1e3, -6.1e17 + 2e3], "timestamp of -6.1e"),   # FFmpeg's "no timestamp", scaled
])
def test_bad_timestamps_are_refused(pts, match):
    with pytest.raises(SamplingError, match="timestamps are unusable: .*" + match):
        sample_frames(3, 10.0, SamplingPolicy(), pts)


def test_one_frame_without_a_rate_is_refused():
    with pytest.raises(SamplingError, match="one-frame video"):
        sample_frames(1, float("nan"), SamplingPolicy(), [0.5])


def test_keyframes_only_takes_the_keyframe_nearest_each_bin_centre():
    from cmdcl_cache.cache.sampling import sample_timing, video_timing
    timing = video_timing(300, 25.0)                         # 12 s; keyframes at 0, 1.6, 5.2, 8, 11.6 s
    keys = np.array([0, 40, 130, 200, 290])
    rate = SamplingPolicy(fps=1, min_frames=2, max_frames=100, keyframes_only=True)
    idx, ts = sample_timing(timing, rate, keys)
    centres = (np.arange(5) + 0.5) * 12 / 5
    nearest = [keys[np.argmin(np.abs(keys / 25 - c))] for c in centres]
    assert nearest == [40, 130, 130, 200, 290]               # 130 is nearest to two centres ...
    np.testing.assert_array_equal(idx, [40, 130, 200, 290])  # ... and taken once: no keyframe twice
    np.testing.assert_allclose(ts, idx / 25)
    for c in centres:                                        # within half the largest keyframe interval
        assert np.abs(ts - c).min() <= (130 - 40) / 25 / 2
    idx, _ = sample_timing(timing, SamplingPolicy(num_frames=10, keyframes_only=True), keys)
    assert len(idx) == 10 and set(idx) <= set(keys) and (np.diff(idx) >= 0).all()
    # a centre exactly between two keyframes takes the earlier one
    # one sample of a 10 s video: its centre (5 s) is 4 s from both keyframes (1 s, 9 s): the earlier
    idx, _ = sample_timing(video_timing(100, 10.0), SamplingPolicy(num_frames=1, keyframes_only=True), [10, 90])
    assert list(idx) == [10]


def test_keyframes_only_policy_round_trips_and_needs_keyframes():
    from cmdcl_cache.cache.sampling import sample_timing, video_timing
    p = SamplingPolicy(fps=0.5, keyframes_only=True)
    assert p.to_dict()["placement"] == "nearest-keyframe" and SamplingPolicy.from_dict(p.to_dict()) == p
    assert SamplingPolicy().to_dict()["placement"] == "bin-centre"
    with pytest.raises(SamplingError, match="lists no keyframes"):
        sample_timing(video_timing(10, 10.0), p, None)
    with pytest.raises(SamplingError, match="outside"):
        sample_timing(video_timing(10, 10.0), p, [0, 12])
