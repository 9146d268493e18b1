"""Confounder dictionaries: training split only, deterministic, class means, file round trip."""

import dataclasses

import numpy as np
import pytest
import torch

from _cmdcl_synth import ACTIONS, make_dataset
from cmdcl_cache.manifest.io import load_manifest
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.errors import CacheError, ProvenanceError
from cmdcl_heads.confounders import Confounders, build_confounders, cache_fingerprint

KW = dict(kp=6, kz=10, niter=10, seed=3, progress=False)


def _build(root, **kw):
    cache_dir, man_dir = make_dataset(root, **{k: kw.pop(k) for k in list(kw) if k in ("planted", "n_train")})
    return build_confounders(Cache(cache_dir), load_manifest(man_dir), **{**KW, **kw}), cache_dir


def _same(a: Confounders, b: Confounders):
    for name in ("vp", "vp_prior", "z", "z_prior"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.vp_labels == b.vp_labels


def test_shapes_priors_and_same_seed_identical(tmp_path):
    a, cache_dir = _build(tmp_path / "a")
    b = build_confounders(Cache(cache_dir), load_manifest(tmp_path / "a" / "manifest"), **KW)
    assert a.vp.shape == (6, 32) and a.z.shape == (10, 32) and a.vp.dtype == torch.float32
    assert a.vp_prior.sum().item() == pytest.approx(1.0) and a.z_prior.sum().item() == pytest.approx(1.0)
    assert torch.allclose(a.vp.norm(dim=1), torch.ones(6), atol=1e-5)  # spherical: unit centroids
    _same(a, b)
    assert a.settings == b.settings
    c = build_confounders(Cache(cache_dir), load_manifest(tmp_path / "a" / "manifest"), **{**KW, "seed": 4})
    assert not torch.equal(a.z, c.z)


def test_priors_over_all_training_frames_with_subsampling(tmp_path):
    a, cache_dir = _build(tmp_path, max_points=50)
    assert a.settings["points"] == 50 and a.settings["train_frames"] == 24 * 16
    # every prior is a count over the 384 training frames
    counts = a.z_prior.double() * 384
    assert torch.allclose(counts, counts.round(), atol=1e-3)


def test_test_split_video_does_not_influence_dictionaries(tmp_path):
    far = np.full((16, 32), 500.0)                       # far from everything, in the TEST split
    with_planted, cache_a = _build(tmp_path / "with", planted=far)
    without, cache_b = _build(tmp_path / "without")
    _same(with_planted, without)
    assert with_planted.settings == without.settings
    assert with_planted.cache_fingerprint != without.cache_fingerprint  # the caches do differ
    # sanity: had the planted video been training data, a centroid would sit on it
    man = load_manifest(tmp_path / "with" / "manifest")
    for i, v in enumerate(man.videos):
        if v.video_id == "planted":
            man.videos[i] = dataclasses.replace(v, split="train")
    leaked = build_confounders(Cache(cache_a), man, **KW)
    assert leaked.settings["train_videos"] == 25 and not torch.equal(leaked.z_prior, without.z_prior)


def test_class_mean_prototypes_are_per_class_means(tmp_path):
    cache_dir, man_dir = make_dataset(tmp_path)
    cache, man = Cache(cache_dir), load_manifest(man_dir)
    for spherical in (False, True):
        c = build_confounders(cache, man, prototypes="class-mean", spherical=spherical, **KW)
        assert c.vp_labels == ACTIONS and c.settings["label_set"] == "actions"
        sums = {a: [] for a in ACTIONS}
        for v in man.select("train"):
            x = cache.features(v.video_id).astype(np.float32)
            if spherical:
                x = x / np.linalg.norm(x, axis=1, keepdims=True)
            for s in v.segments:
                sums[s["label"]].append(x[int(s["start"]):int(s["end"])])
        for k, a in enumerate(ACTIONS):
            m = np.concatenate(sums[a]).mean(0)
            if spherical:
                m = m / np.linalg.norm(m)
            np.testing.assert_allclose(c.vp[k].numpy(), m, rtol=1e-4, atol=1e-5)
        n = np.array([sum(len(x) for x in sums[a]) for a in ACTIONS], dtype=np.float64)
        np.testing.assert_allclose(c.vp_prior.numpy(), n / n.sum(), rtol=1e-6)


def test_class_mean_falls_back_to_video_labels(tmp_path):
    cache_dir, man_dir = make_dataset(tmp_path, with_segments=False)
    cache, man = Cache(cache_dir), load_manifest(man_dir)
    c = build_confounders(cache, man, prototypes="class-mean", spherical=False, **KW)
    vids = [v for v in man.select("train") if "stir" in v.labels["actions"]]
    m = np.concatenate([cache.features(v.video_id).astype(np.float32) for v in vids]).mean(0)
    np.testing.assert_allclose(c.vp[c.vp_labels.index("stir")].numpy(), m, rtol=1e-4, atol=1e-4)


def test_class_mean_on_an_unknown_label_set_names_the_sets_there_are(tmp_path):
    cache_dir, man_dir = make_dataset(tmp_path)
    man = load_manifest(man_dir)
    with pytest.raises(ValueError, match=r"--label-set 'bogus': .*labels.json has the label sets"):
        build_confounders(Cache(cache_dir), man, prototypes="class-mean", label_set="bogus", **KW)


def test_k_clamped_with_warning(tmp_path):
    cache_dir, man_dir = make_dataset(tmp_path, n_train=2, frames=4)
    with pytest.warns(UserWarning, match="K=10 clusters requested but only 8"):
        c = build_confounders(Cache(cache_dir), load_manifest(man_dir), kp=3, kz=10, niter=5, progress=False)
    assert c.z.shape[0] == 8 and c.settings["kz_effective"] == 8


def test_save_load_roundtrip_and_fingerprint_check(tmp_path):
    a, cache_dir = _build(tmp_path / "a")
    path = a.save(cache_dir / "confounders.h5")
    b = Confounders.load(path, cache=Cache(cache_dir))
    _same(a, b)
    assert b.settings == a.settings and b.cache_fingerprint == cache_fingerprint(Cache(cache_dir))
    other_dir, _ = make_dataset(tmp_path / "b", n_train=20)
    with pytest.raises(ProvenanceError, match="confounders build"):
        Confounders.load(path, cache=Cache(other_dir))
    with pytest.raises(CacheError, match="cmdcl-heads confounders build --cache"):
        Confounders.load(other_dir / "confounders.h5")


def test_cli_build_writes_loadable_file(tmp_path):
    from typer.testing import CliRunner

    from cmdcl_heads.cli import app

    cache_dir, man_dir = make_dataset(tmp_path)
    args = ["confounders", "build", "--cache", str(cache_dir), "--dataset", str(man_dir), "--kp", "4",
            "--kz", "8", "--niter", "5", "--prototypes", "class-mean", "--no-spherical"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    c = Confounders.load(cache_dir, cache=Cache(cache_dir))
    assert c.vp_labels == ACTIONS and c.z.shape == (8, 32) and c.settings["spherical"] is False
    bad = CliRunner().invoke(app, args[:-2] + ["median"])
    assert bad.exit_code != 0 and "class-mean" in bad.output


def test_load_for_training_names_the_build_command(tmp_path):
    from cmdcl_heads.config import HeadConfig
    from cmdcl_heads.confounders import load_for_training

    cache_dir, _ = make_dataset(tmp_path)
    cache = Cache(cache_dir)
    assert load_for_training(cache, HeadConfig(model="text4vis")) is None
    assert load_for_training(cache, HeadConfig(tci=False, cross_sample=False)) is None
    with pytest.raises(CacheError, match=r"cmdcl-heads confounders build --cache .* --dataset coin"):
        load_for_training(cache, HeadConfig(), dataset="coin")


def test_training_refuses_dictionaries_built_from_other_training_videos(tmp_path):
    """Built under one split scheme, used under another whose training set differs: refused, never silently
    mixing the run's test frames into V_P and Z."""
    from cmdcl_cache.manifest.io import load_manifest
    from cmdcl_heads.config import HeadConfig
    from cmdcl_heads.confounders import load_for_training

    cache_dir, manifest_dir = _two_scheme_cache(tmp_path)
    cache, manifest = Cache(cache_dir), load_manifest(manifest_dir)
    build_confounders(cache, manifest, kp=2, kz=2, niter=2, split_scheme="a").save(cache_dir / "confounders.h5")
    cfg = HeadConfig(model="cmdcl")
    assert load_for_training(cache, cfg, "d", manifest, "a") is not None
    with pytest.raises(CacheError, match="split scheme a.*split scheme b"):
        load_for_training(cache, cfg, "d", manifest, "b")


def _two_scheme_cache(tmp_path):
    """8 videos; scheme a trains on v0-v5, scheme b on v2-v7."""
    from cmdcl_cache.manifest.io import make_labels_json, write_manifest
    from cmdcl_cache.ingest.synthetic import write_synthetic_cache

    rng = np.random.default_rng(0)
    feats = {f"v{i}": rng.standard_normal((4, 8)).astype(np.float16) for i in range(8)}
    records = [{"video_id": f"v{i}", "path": f"v{i}", "split": "train" if i < 6 else "test",
                "splits": {"b": "train" if i >= 2 else "test"}, "labels": {"task": f"t{i % 2}"}}
               for i in range(8)]
    labels = make_labels_json("d", {"task": (False, [("t0", "zero"), ("t1", "one")])}, "task", None,
                              ["a", "b"], "test", "test")
    write_manifest(tmp_path / "manifest", records, labels)
    return write_synthetic_cache(tmp_path / "cache", feats), tmp_path / "manifest"
