"""TSN sampling, pairing the cache with the manifest, and the memory / lazy feature modes."""

import numpy as np
import pytest
import torch

from cmdcl_cache.manifest.io import load_manifest
from cmdcl_cache.cache.folder import Cache
from cmdcl_heads import data
from cmdcl_heads.data import (LazyFeatures, MemoryFeatures, MissingVideosError, make_features, pair_split,
                              tsn_indices, tsn_rows)


def resolve_cache_dir(path):
    from cmdcl_cache.cache.folder import locate
    return locate(path).path


def test_tsn_eval_takes_segment_centres():
    np.testing.assert_array_equal(tsn_indices(100, 4, train=False), [12, 37, 62, 87])
    np.testing.assert_array_equal(tsn_indices(8, 8, train=False), np.arange(8))


def test_tsn_train_takes_one_row_inside_each_segment():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        rows = tsn_indices(100, 4, train=True, rng=rng)
        assert all(25 * i <= r < 25 * (i + 1) for i, r in enumerate(rows))
        seen.update(rows.tolist())
    assert len(seen) > 80  # offsets really are random


def test_tsn_short_videos_repeat_rows_in_order():
    rows = tsn_indices(3, 8, train=False)
    assert rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    rng = np.random.default_rng(1)
    for _ in range(50):
        r = tsn_indices(3, 8, train=True, rng=rng)
        assert (np.diff(r) >= 0).all() and r.min() >= 0 and r.max() <= 2
    assert tsn_indices(1, 5, train=True, rng=rng).tolist() == [0] * 5
    with pytest.raises(ValueError):
        tsn_indices(0, 4, train=False)


def test_torch_rows_equal_numpy_rows():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 3, 7, 8, 100, 513])
    u = torch.rand(len(lengths), 8, generator=gen)
    rows = tsn_rows(lengths, 8, u)
    for i, n in enumerate(lengths.tolist()):
        np.testing.assert_array_equal(rows[i].numpy(), tsn_indices(n, 8, True, offsets=u[i].double().numpy()))
        np.testing.assert_array_equal(tsn_rows(lengths, 8, None)[i].numpy(), tsn_indices(n, 8, False))


@pytest.fixture(scope="module")
def synth_options():
    """`synth` (tests/conftest.py) without three test videos in its cache, with 2x2 grid tokens."""
    return {"drop_from_cache": ("test_0_000", "test_1_001", "test_2_002"), "grid": 2}


def test_missing_videos_are_an_error_naming_them_unless_skipped(synth):
    cache_dir, manifest_dir = synth
    cache, manifest = Cache(cache_dir), load_manifest(manifest_dir)
    with pytest.raises(MissingVideosError, match=r"3 of 30 test videos .*test_0_000.*--skip-missing"):
        pair_split(cache, manifest, "test", "task")
    split = pair_split(cache, manifest, "test", "task", skip_missing=True)
    assert len(split.video_ids) == 27 and split.missing == ["test_0_000", "test_1_001", "test_2_002"]
    assert split.targets.dtype == np.int64 and split.targets[0] == 0
    assert split.lengths[0] == cache.num_frames(split.video_ids[0])
    steps = pair_split(cache, manifest, "train", "steps")
    assert steps.multi_label and steps.targets.shape == (60, 10) and (steps.targets.sum(1) >= 2).all()
    alt = pair_split(cache, manifest, "test", "task", scheme="alt", skip_missing=True)
    assert len(alt.video_ids) == 27 + 12  # the alt scheme moves two train videos per class to test


def test_cache_dir_found_below_a_root(synth, tmp_path):
    cache_dir, _ = synth
    assert resolve_cache_dir(cache_dir) == cache_dir
    nested = tmp_path / "root" / "synthetic" / "ViT-B-32"
    nested.mkdir(parents=True)
    for f in cache_dir.iterdir():
        (nested / f.name).symlink_to(f)
    assert resolve_cache_dir(tmp_path / "root") == nested
    with pytest.raises(Exception, match="no feature cache here"):
        resolve_cache_dir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [False, True])
def test_memory_and_lazy_modes_give_identical_batches(synth, tokens):
    cache_dir, manifest_dir = synth
    cache, manifest = Cache(cache_dir), load_manifest(manifest_dir)
    split = pair_split(cache, manifest, "train", "task")
    mem = make_features(cache, split, 8, "cpu", "memory", tokens)
    lazy = make_features(cache, split, 8, "cpu", "lazy", tokens, workers=2)
    assert isinstance(mem, MemoryFeatures) and isinstance(lazy, LazyFeatures)
    gen = torch.Generator().manual_seed(3)
    order, u = torch.randperm(60, generator=gen), torch.rand(60, 8, generator=gen)
    for offsets in (u, None):
        got = list(zip(mem.batches(16, order, offsets), lazy.batches(16, order, offsets)))
        assert len(got) == 4
        for (pa, fa, ta), (pb, fb, tb) in got:
            assert torch.equal(pa, pb) and fa.dtype == torch.float32 and fa.shape[1:] == (8, 32)
            assert torch.equal(fa, fb)
            assert (ta is None) == (not tokens)
            if tokens:
                assert ta.shape[1:] == (8, 4, 32) and torch.equal(ta, tb)
    # the rows really are the TSN rows of the right video
    pos, frames, _ = next(mem.batches(4, order, None))
    vid = split.video_ids[int(pos[1])]
    x = cache.features(vid)
    np.testing.assert_array_equal(frames[1].numpy(), x[tsn_indices(len(x), 8, False)].astype(np.float32))


def test_auto_mode_follows_the_memory_budget(synth, monkeypatch):
    cache_dir, manifest_dir = synth
    cache, manifest = Cache(cache_dir), load_manifest(manifest_dir)
    split = pair_split(cache, manifest, "train", "task")
    need = data.estimated_bytes(cache, split, tokens=False)
    assert need == int(split.lengths.sum()) * 32 * 2
    monkeypatch.setattr(data, "memory_budget", lambda device: need + 1)
    assert data.choose_mode("auto", cache, split, False, torch.device("cpu")) == "memory"
    monkeypatch.setattr(data, "memory_budget", lambda device: need)
    assert data.choose_mode("auto", cache, split, False, torch.device("cpu")) == "lazy"
    assert data.choose_mode("memory", cache, split, False, torch.device("cpu")) == "memory"
    assert data.memory_budget(torch.device("cpu")) > 0
