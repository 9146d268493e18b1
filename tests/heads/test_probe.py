"""The linear probe (cmdcl_heads/probe.py): L-BFGS logistic regression, l2 chosen on val, through the trainer."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from cmdcl_cache.cache.format import TextEmbeddings
from cmdcl_cache.ingest.synthetic import write_synthetic_cache
from cmdcl_heads.config import HeadConfig
from cmdcl_heads.data import NonFiniteFeatures, tsn_indices
from cmdcl_heads.probe import ProbeError, fit_linear_probe, fit_logistic
from cmdcl_heads.config import TrainConfig
from cmdcl_heads.evaluate import evaluate_run
from cmdcl_heads.train import train


def separable_cache(root, classes=3, dim=16, train=8, val=0, test=8, seed=0, nan_video=None):
    """Frames = a large shared offset + a small class direction + noise, unnormalised: the geometry of CLIP
    features under random weights, where the classes differ by a few percent of the feature norm. The mean
    features are linearly separable (checked by the test); single frames are not."""
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal(dim)
    offset *= 3.0 / np.linalg.norm(offset)
    directions = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:classes] * 0.15
    feats, records = {}, []
    for split, n in (("train", train), ("val", val), ("test", test)):
        for c in range(classes):
            for i in range(n):
                vid = f"{split}_{c}_{i}"
                t = int(rng.integers(6, 20))
                x = offset + directions[c] + 0.06 * rng.standard_normal((t, dim))
                feats[vid] = (x * rng.uniform(5, 15)).astype(np.float16)
                records.append({"video_id": vid, "path": f"{vid}.mp4", "split": split, "labels": {"class": f"c{c}"}})
    if nan_video:
        feats[nan_video][:] = np.nan
    names = [f"class {c}" for c in range(classes)]
    per_prompt = rng.standard_normal((classes, 2, dim)).astype(np.float32)   # texts say nothing here
    texts = {"class": TextEmbeddings(names, names, ["{}", "a {}"], per_prompt, TextEmbeddings.ensemble_of(per_prompt))}
    cache = write_synthetic_cache(root / "cache", feats, texts)
    manifest = root / "manifest"
    manifest.mkdir(parents=True)
    (manifest / "labels.json").write_text(json.dumps({"label_sets": {"class": {"labels": [
        {"key": f"c{c}", "name": names[c]} for c in range(classes)]}}}))
    (manifest / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cache, manifest, feats


def _opts(cache, manifest, out, **kw):
    return TrainConfig(cache=str(cache), dataset=str(manifest), out=str(out), device="cpu", quiet=True,
                        data_mode="memory", **kw)


def _mean_features(feats, prefix, frames=8):
    """What the head reads: the mean of the normalised frames at the centre rows of `frames` segments."""
    ids = sorted(v for v in feats if v.startswith(prefix))
    rows = [feats[v].astype(np.float64)[tsn_indices(len(feats[v]), frames, train=False)] for v in ids]
    x = np.stack([(f / np.linalg.norm(f, axis=1, keepdims=True)).mean(0) for f in rows])
    return x, np.array([int(v.split("_")[1]) for v in ids])


def test_probe_reaches_95_percent_on_a_small_linearly_separable_cache(tmp_path):
    cache, manifest, feats = separable_cache(tmp_path)
    # the data is separable: a hard-margin linear rule (large-C logistic regression) fits train and test alike
    x, y = np.concatenate([_mean_features(feats, "train")[0], _mean_features(feats, "test")[0]]), \
        np.concatenate([_mean_features(feats, "train")[1], _mean_features(feats, "test")[1]])
    assert LogisticRegression(C=1e6, max_iter=20000).fit(x, y).score(x, y) == 1.0
    summary = train(_opts(cache, manifest, tmp_path / "run"), HeadConfig(model="linear", frames=8))
    assert summary["metrics"]["top1"] >= 0.95, summary["metrics"]
    # it learns: the training loss ends far below the ln 3 of a probe stuck at chance
    assert summary["probe"]["train_loss"] < 0.3 * math.log(3)
    assert summary["probe"]["chosen_on"] == "default" and summary["epochs"] == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["probe"] == summary["probe"]
    assert summary["trainable_parameters"] == 3 * 16 + 3
    assert evaluate_run(tmp_path / "run", quiet=True) == summary["metrics"]   # best holds the fitted weights


@pytest.mark.slow
def test_with_a_val_split_l2_is_chosen_there_then_refitted_on_train_and_val(tmp_path):
    cache, manifest, feats = separable_cache(tmp_path, val=4, seed=1)
    summary = train(_opts(cache, manifest, tmp_path / "run"), HeadConfig(model="linear", frames=8))
    probe = summary["probe"]
    assert probe["chosen_on"] == "val" and probe["fitted_on"] == ["train", "val"] and len(probe["sweep"]) == 13
    best = max(probe["sweep"], key=lambda r: (r["val_metric"], -r["val_loss"], r["l2"]))
    assert probe["l2"] == best["l2"]
    assert summary["selection"]["split"] is None   # val picked l2, not a checkpoint


def _random_problem(seed, n=120, dim=6, classes=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n, dim)) + 0.8 * rng.standard_normal((classes, dim))[y] + 2.0
    return x, y


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_probe_is_sklearns_multinomial_logistic_regression(l2):
    x, y = _random_problem(0)
    fit = fit_linear_probe(x[:90], y[:90], 4, False, default_l2=l2)
    ref = LogisticRegression(C=1.0 / (l2 * 90), tol=1e-12, max_iter=100000).fit(x[:90], y[:90])
    ours = torch.softmax(torch.as_tensor(x[90:]).float() @ fit.weight.T + fit.bias, dim=1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x[90:]), atol=2e-4)
    np.testing.assert_allclose(fit.weight.numpy() - fit.weight.numpy().mean(0), ref.coef_ - ref.coef_.mean(0),
                               atol=2e-3)


def test_multi_label_is_one_vs_rest_with_a_shared_l2():
    x, y = _random_problem(1)
    targets = np.eye(4)[y] + (np.random.default_rng(2).random((120, 4)) < 0.2)
    targets = np.minimum(targets, 1.0)
    fit = fit_linear_probe(x, targets, 4, True, default_l2=1e-2)
    for c in range(4):   # each class alone gives the same weights: the classes do not interact
        alone = fit_linear_probe(x, targets[:, c:c + 1], 1, True, default_l2=1e-2)
        np.testing.assert_allclose(fit.weight[c].numpy(), alone.weight[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(fit.bias[c].numpy(), alone.bias[0].numpy(), atol=1e-4)


def test_the_fit_is_deterministic_whatever_the_thread_setting():
    x, y = _random_problem(3)
    before = torch.get_num_threads()
    a = fit_linear_probe(x[:80], y[:80], 4, False, x[80:], y[80:])
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        b = fit_linear_probe(x[:80], y[:80], 4, False, x[80:], y[80:])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.sweep == b.sweep
    assert torch.get_num_threads() == before


def test_warm_start_reaches_the_same_optimum():
    x, y = _random_problem(4)
    xc = torch.as_tensor(x - x.mean(0))
    cold = fit_logistic(xc, torch.as_tensor(y), 4, False, 1e-3)
    warm = fit_logistic(xc, torch.as_tensor(y), 4, False, 1e-3, init=fit_logistic(xc, torch.as_tensor(y), 4, False, 1e-1)[:2])
    assert abs(cold[2] - warm[2]) < 1e-8


def test_non_finite_features_are_refused_with_the_video_named(tmp_path):
    with pytest.raises(ProbeError, match=r"1 video\(s\) hold NaN/Inf \(rows \[2\]\)"):
        fit_linear_probe(np.array([[0.0, 1], [1, 0], [np.nan, 0]]), np.array([0, 1, 0]), 2, False)
    cache, manifest, _ = separable_cache(tmp_path, nan_video="train_1_3")
    # the data loader refuses it before the probe sees it, naming the video and the command to check the cache
    with pytest.raises(NonFiniteFeatures, match="video 'train_1_3' has NaN/Inf.*cmdcl-cache verify"):
        train(_opts(cache, manifest, tmp_path / "run"), HeadConfig(model="linear", frames=8))


def test_an_undefined_val_metric_leaves_plain_json():
    """mAP over a val split without any positive is undefined: the sweep says None (JSON null), never NaN or
    -Infinity, which jq and strict JSON readers refuse; l2 is then chosen by the val loss."""
    x, y = _random_problem(5)
    targets = np.eye(4)[y]
    fit = fit_linear_probe(x[:90], targets[:90], 4, True, x[90:], np.zeros((30, 4)))
    assert all(r["val_metric"] is None for r in fit.sweep)
    assert fit.l2 == min(fit.sweep, key=lambda r: r["val_loss"])["l2"]
    json.dumps(fit.summary(), allow_nan=False)
