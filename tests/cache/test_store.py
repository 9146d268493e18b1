"""The shard journal, finalisation, resume after a cut, and the reader's provenance checks."""

import hashlib
import json

import numpy as np
import pytest

from cmdcl_cache.cache.folder import Cache, shard_name
from cmdcl_cache.ingest.synthetic import write_synthetic_cache
from cmdcl_cache.errors import CacheError, ProvenanceError
from cmdcl_cache.cache.writer import ShardWriter
from cmdcl_cache.cache.format import TextEmbeddings, read_texts

PROV = {"dataset": "t", "model": "m", "shard_index": 0, "shard_count": 1, "sampling": {"fps": 1.0}}


def _video(rng, t, d=8):
    return rng.standard_normal((t, d)).astype(np.float16)


def _append(w, vid, x):
    t = len(x)
    w.append_video(vid, x, np.arange(t) * 3, np.arange(t) * 0.5, 6.0, 3 * t, t * 0.5)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_roundtrip_sorted_by_id(tmp_path):
    rng = np.random.default_rng(0)
    vids = {"b": _video(rng, 5), "a": _video(rng, 3), "c": _video(rng, 7)}
    path = tmp_path / shard_name(0, 1)
    with ShardWriter(path, PROV, 8) as w:
        for vid, x in vids.items():
            _append(w, vid, x)
        w.finalize()
    assert not path.with_suffix(".journal").exists()
    cache = Cache(tmp_path)
    assert cache.video_ids == ["a", "b", "c"]
    for vid, x in vids.items():
        np.testing.assert_array_equal(cache.features(vid), x)
        idx, ts = cache.frame_info(vid)
        np.testing.assert_array_equal(idx, np.arange(len(x)) * 3)
    assert cache.video_info("c")["num_source_frames"] == 21
    assert cache.provenance["sampling"] == json.dumps({"fps": 1.0})


def test_resume_after_torn_commit_gives_same_bytes(tmp_path):
    rng = np.random.default_rng(1)
    vids = {f"v{i}": _video(rng, 4 + i) for i in range(4)}
    ref = tmp_path / "ref" / shard_name(0, 1)
    ref.parent.mkdir()
    with ShardWriter(ref, PROV, 8) as w:
        for vid, x in vids.items():
            _append(w, vid, x)
        w.finalize()

    path = tmp_path / "cut" / shard_name(0, 1)
    path.parent.mkdir()
    w = ShardWriter(path, PROV, 8)
    _append(w, "v2", vids["v2"])  # a different order than the reference run
    _append(w, "v0", vids["v0"])
    w.close()
    journal = path.with_suffix(".journal")
    # Simulate a crash: rows of an uncommitted video and half a commit line.
    with open(journal / "features.f16", "ab") as fh:
        fh.write(b"\x01" * 100)
    with open(journal / "commits.jsonl", "ab") as fh:
        fh.write(b'{"video_id": "v1", "row_st')
    w = ShardWriter(path, PROV, 8)
    assert w.committed_ids == {"v0", "v2"}
    for vid in ["v3", "v1"]:
        _append(w, vid, vids[vid])
    w.finalize()
    assert _sha(path) == _sha(ref)


def test_retry_appends_to_finalized_shard(tmp_path):
    rng = np.random.default_rng(2)
    x, y = _video(rng, 4), _video(rng, 6)
    path = tmp_path / shard_name(0, 1)
    with ShardWriter(path, PROV, 8) as w:
        _append(w, "x", x)
        w.finalize()
    with ShardWriter(path, PROV, 8) as w:
        assert w.committed_ids == {"x"}
        with pytest.raises(CacheError, match="already committed"):
            _append(w, "x", x)
        _append(w, "y", y)
        w.finalize()
    cache = Cache(tmp_path)
    np.testing.assert_array_equal(cache.features("x"), x)
    np.testing.assert_array_equal(cache.features("y"), y)


def test_provenance_mismatch_names_attribute(tmp_path):
    path = tmp_path / shard_name(0, 1)
    with ShardWriter(path, PROV, 8) as w:
        _append(w, "x", np.zeros((2, 8), np.float16))
    with pytest.raises(ProvenanceError, match="'model'"):
        ShardWriter(path, {**PROV, "model": "other"}, 8)


def test_shards_of_different_provenance_refuse_to_mix(tmp_path):
    rng = np.random.default_rng(3)
    for s, model in enumerate(["m", "other"]):
        with ShardWriter(tmp_path / shard_name(s, 2), {**PROV, "shard_index": s, "shard_count": 2,
                                                       "model": model}, 8) as w:
            _append(w, f"v{s}", _video(rng, 3))
            w.finalize()
    with pytest.raises(ProvenanceError, match="attribute 'model'"):
        Cache(tmp_path)


def test_unfinished_cache_says_how_to_finish(tmp_path):
    with ShardWriter(tmp_path / shard_name(0, 1), PROV, 8) as w:
        _append(w, "x", np.zeros((2, 8), np.float16))
    with pytest.raises(CacheError, match="journal"):
        Cache(tmp_path)


def test_synthetic_cache_with_tokens_and_texts(tmp_path):
    rng = np.random.default_rng(4)
    feats = {f"v{i}": rng.standard_normal((5, 8)).astype(np.float16) for i in range(5)}
    toks = {k: rng.standard_normal((5, 4, 8)).astype(np.float16) for k in feats}
    per_prompt = rng.standard_normal((3, 2, 8)).astype(np.float32)
    texts = {"task": TextEmbeddings(["a", "b", "c"], ["a", "b", "c"], ["{}", "a {}"], per_prompt,
                                    TextEmbeddings.ensemble_of(per_prompt))}
    write_synthetic_cache(tmp_path, feats, texts, num_shards=2, tokens=toks)
    cache = Cache(tmp_path)
    assert len(cache) == 5 and cache.has_tokens and cache.tokens_per_frame == 4
    np.testing.assert_array_equal(cache.tokens("v3"), toks["v3"])
    back = read_texts(tmp_path / "texts.h5")["task"]
    np.testing.assert_allclose(np.linalg.norm(back.ensemble, axis=1), 1.0, rtol=1e-5)
    assert back.templates == ["{}", "a {}"]


def test_a_missing_shard_is_refused_by_readers(tmp_path):
    rng = np.random.default_rng(5)
    feats = {f"v{i}": _video(rng, 3) for i in range(4)}
    write_synthetic_cache(tmp_path, feats, num_shards=2)
    assert len(Cache(tmp_path)) == 4
    (tmp_path / shard_name(1, 2)).unlink()
    with pytest.raises(CacheError, match=r"1 of 2 shards missing \(frames-00001-of-00002.h5\)"):
        Cache(tmp_path)
    assert len(Cache(tmp_path, require_complete=False)) == 2
