"""`cmdcl-heads figures`: the paper's diagnostics (figs. 1b, 1c/7c, 5, 7a/b), each checked on a hand-made case."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _cmdcl_synth import ACTIONS, ACTIVITIES, RECIPES, make_dataset
from cmdcl_cache.manifest.io import load_manifest, make_labels_json, write_manifest
from cmdcl_heads import figures
from cmdcl_heads.cli import app

runner = CliRunner()


def _three_videos(folder):
    """Two activities, three videos, counted by hand: tea = {v1: boil, pour (segments); v2: boil (labels, no
    segments)}, egg = {v3: crack, boil}."""
    labels = make_labels_json("hand", {"activity": (False, [("tea", "make tea"), ("egg", "fry egg")]),
                                       "actions": (True, [("boil", "boil water"), ("pour", "pour water"),
                                                          ("crack", "crack egg")])},
                              default_label_set="activity", fine_label_set="actions", split_schemes=["default"],
                              source="tests", licence="CC0")
    seg = lambda k, a, b: {"label": k, "set": "actions", "start": a, "end": b}   # noqa: E731
    videos = [
        {"video_id": "v1", "path": "v1.mp4", "split": "train", "labels": {"activity": "tea", "actions": ["boil"]},
         "segments": [seg("boil", 0, 2), seg("pour", 2, 4), seg("boil", 4, 5)]},
        {"video_id": "v2", "path": "v2.mp4", "split": "test", "labels": {"activity": "tea", "actions": ["boil"]}},
        {"video_id": "v3", "path": "v3.mp4", "split": "train", "labels": {"activity": "egg", "actions": ["crack"]},
         "segments": [seg("crack", 0, 1), seg("boil", 1, 3)]},
    ]
    write_manifest(folder, videos, labels)
    return folder


def test_cooccurrence_counts_what_a_hand_count_gives(tmp_path):
    stats = figures.cooccurrence(load_manifest(_three_videos(tmp_path / "m")))
    assert stats["videos"] == [2, 1]
    # tea: boil in v1 (twice, counted once) and v2 (from its labels: it has no segments); pour in v1 only
    assert stats["counts"] == [[2, 1, 0], [1, 0, 1]]
    assert stats["freq"] == [[1.0, 0.5, 0.0], [1.0, 0.0, 1.0]]
    train = figures.cooccurrence(load_manifest(tmp_path / "m"), split="train")
    assert train["counts"] == [[1, 1, 0], [1, 0, 1]]
    # owner: the activity where the action is most frequent, ties to the first; order: owner, then frequency
    assert figures.owners(np.array(stats["freq"]), [0, 1]) == ([0, 1, 2], [0, 0, 1])
    assert figures.owners(np.array(stats["freq"]), [1]) == ([0, 2], [0, 0])
    with pytest.raises(ValueError, match="no atomic action occurs"):   # a manifest that links none
        figures.owners(np.zeros((2, 3)), [0, 1])


def test_cooccurrence_command_writes_png_and_numbers_and_refuses_an_unknown_activity(tmp_path):
    m = _three_videos(tmp_path / "m")
    out = tmp_path / "fig" / "co.png"
    res = runner.invoke(app, ["figures", "cooccurrence", "--dataset", str(m), "--out", str(out),
                              "--activity", "fry egg", "--activity", "tea"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert numbers["shown_activities"] == [1, 0] and numbers["freq"][1] == [1.0, 0.0, 1.0]
    res = runner.invoke(app, ["figures", "cooccurrence", "--dataset", str(m), "--out", str(out),
                              "--activity", "make te", "--force"])
    assert res.exit_code == 2 and "did you mean 'make tea'" in res.output


def test_similarity_of_identical_texts_is_one_and_matching_rows_sum_to_one():
    x = torch.randn(3, 8)
    sim = figures.cosine_matrix(torch.cat([x, 2 * x[:1]]))
    np.testing.assert_allclose(np.diag(sim), 1, atol=1e-6)
    assert sim[0, 3] == pytest.approx(1, abs=1e-6)           # the same direction, another length
    logits = np.array([[0.0, 0.0], [np.log(3), 0.0], [0.0, 5.0]])
    membership = np.array([[1, 0], [1, 0], [0, 1]])
    p = figures.matching_probability(logits, membership)
    # activity 0: mean of (1/2, 1/2) and (3/4, 1/4); activity 1: softmax of (0, 5)
    np.testing.assert_allclose(p[0], [0.625, 0.375])
    np.testing.assert_allclose(p[1], [1 / (1 + np.exp(5)), 1 / (1 + np.exp(-5))])
    np.testing.assert_allclose(p.sum(axis=1), 1)


def test_figures_replace_no_file_without_force_and_name_label_sets_and_keys(tmp_path):
    m = _three_videos(tmp_path / "m")
    run = tmp_path / "q"
    run.mkdir()
    (run / "summary.json").write_text('{"split": "test"}')
    cmd = ["figures", "cooccurrence", "--dataset", str(m)]
    res = runner.invoke(app, [*cmd, "--out", str(run / "summary.png")])   # its numbers would go to summary.json
    assert res.exit_code == 2 and "summary.json exists" in res.output and "--force" in res.output
    assert (run / "summary.json").read_text() == '{"split": "test"}' and not (run / "summary.png").exists()
    res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "f" / "same.json")])
    assert res.exit_code == 2 and "ends in .json" in res.output and not (tmp_path / "f").exists()
    out = tmp_path / "f" / "co.png"
    assert runner.invoke(app, [*cmd, "--out", str(out)]).exit_code == 0
    first = out.read_bytes()
    res = runner.invoke(app, [*cmd, "--out", str(out), "--activity", "egg"])
    assert res.exit_code == 2 and "exists" in res.output and out.read_bytes() == first
    res = runner.invoke(app, [*cmd, "--out", str(out), "--activity", "egg", "--force"])
    assert res.exit_code == 0 and out.read_bytes() != first, res.output
    res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "n.png"), "--label-set", "nope"])
    assert res.exit_code == 2 and "label set" in res.output and "activity" in res.output and "actions" in res.output
    res = runner.invoke(app, [*cmd, "--out", str(tmp_path / "k.png"), "--activity", "eggg"])   # a key, mistyped
    assert res.exit_code == 2 and "did you mean 'egg'" in res.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    cache, manifest = make_dataset(root, n_train=16, n_test=8, d=32, frames=16, seed=3)
    res = runner.invoke(app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                              "--kp", "4", "--kz", "4", "--niter", "5"])
    assert res.exit_code == 0, res.output
    out = {}
    for model in ("text4vis", "cmdcl"):
        out[model] = root / model
        res = runner.invoke(app, ["train", "--cache", str(cache), "--dataset", str(manifest), "--model", model,
                                  "--out", str(out[model]), "--frames", "4", "--layers", "1", "--heads", "4",
                                  "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--quiet"])
        assert res.exit_code == 0, res.output
    return cache, manifest, out


@pytest.mark.slow
def test_similarity_command_groups_the_actions_by_activity(runs, tmp_path):
    cache, manifest, out = runs
    png = tmp_path / "sim.png"
    res = runner.invoke(app, ["figures", "similarity", "--run", str(out["cmdcl"]), "--out", str(png),
                              "--activity", "make_tea", "--activity", "fry egg"])
    assert res.exit_code == 0, res.output
    n = json.loads(png.with_suffix(".json").read_text())
    tea = {ACTIONS[a].replace("_", " ") for a in RECIPES[0]}
    egg = {ACTIONS[a].replace("_", " ") for a in RECIPES[2]}
    assert set(n["labels"]) == tea | egg                      # only the two activities' actions
    (g1, a1, b1), (g2, a2, b2) = n["groups"]
    assert (g1, g2) == ("make tea", "fry egg") and set(n["labels"][a1:b1]) == tea and set(n["labels"][a2:b2]) == egg - tea
    for key in ("E", "T", "T'"):
        m = np.array(n[key])
        np.testing.assert_allclose(np.diag(m), 1, atol=1e-5)
        np.testing.assert_allclose(m, m.T, atol=1e-5)
    assert not np.allclose(n["E"], n["T'"], atol=1e-3)          # TCI changed the texts
    res = runner.invoke(app, ["figures", "similarity", "--run", str(out["text4vis"]), "--out", str(png), "--force"])
    assert res.exit_code == 2 and "needs a cmdcl run" in res.output


@pytest.mark.slow
def test_matching_command_compares_two_runs_and_each_row_sums_to_one(runs, tmp_path):
    cache, manifest, out = runs
    png = tmp_path / "match.png"
    res = runner.invoke(app, ["figures", "matching", "--run", str(out["text4vis"]), "--run", str(out["cmdcl"]),
                              "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    n = json.loads(png.with_suffix(".json").read_text())
    assert [r["model"] for r in n["runs"]] == ["text4vis", "cmdcl"] and n["shown_activities"] == [0, 1]
    for r in n["runs"]:
        p = np.array(r["P"])
        assert p.shape == (len(ACTIVITIES), len(ACTIONS)) and r["videos"] == [2, 2, 2, 2]   # 8 test videos
        np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-6)
    # the numbers are those of the definition, recomputed here for the text4vis run by hand
    from cmdcl_heads.evaluate import open_run
    r = open_run(out["text4vis"], device="cpu")
    videos, feats = r.features("test")
    _, frames, _ = next(feats.batches(100, torch.arange(len(videos.video_ids)), None))
    v = torch.nn.functional.normalize(r.head.encoder(torch.nn.functional.normalize(frames, dim=-1)).mean(1), dim=-1)
    t = torch.nn.functional.normalize(r.data.labels.fine_text, dim=-1)
    soft = torch.softmax(r.head.log_scale.exp() * v @ t.T, dim=1).detach().numpy()
    act0 = [i for i, y in enumerate(videos.targets) if y == 0]
    np.testing.assert_allclose(np.array(n["runs"][0]["P"])[0], soft[act0].mean(0), atol=1e-5)


@pytest.mark.slow
def test_matching_refuses_an_activity_without_videos_in_the_split(runs, monkeypatch):
    cache, manifest, out = runs
    real = figures.run_matching(out["text4vis"], "best", None, None, None, "cpu")
    monkeypatch.setattr(figures, "run_matching", lambda *a: {**real, "videos": [2, 0, 2, 2]})
    res = runner.invoke(app, ["figures", "matching", "--run", str(out["text4vis"]),
                              "--activity", real["activity_keys"][1]])
    assert res.exit_code == 2, res.output
    assert f"no video of activity {real['activities'][1]!r} in the split 'test'" in res.output
    assert not (out["text4vis"] / "figures" / "matching.png").exists()


@pytest.mark.slow
def test_default_figure_outputs_are_replaced_freely(runs):
    cache, manifest, out = runs
    for _ in range(2):
        res = runner.invoke(app, ["figures", "similarity", "--run", str(out["cmdcl"]), "--device", "cpu"])
        assert res.exit_code == 0, res.output
    assert (out["cmdcl"] / "figures" / "similarity.json").exists()


@pytest.mark.slow
def test_attention_refuses_a_run_without_grid_tokens(runs):
    cache, manifest, out = runs
    res = runner.invoke(app, ["figures", "attention", "--run", str(out["cmdcl"]), "--video", "test016"])
    assert res.exit_code == 2 and "no spatial attention" in res.output and "--tokens grid" in res.output


@pytest.fixture(scope="module")
def video_runs(tmp_path_factory):
    from _video_runs import video_runs
    return video_runs(tmp_path_factory.mktemp("figures_videos"))


@pytest.mark.slow
def test_attention_on_decoded_frames_sums_to_one_and_leaves_the_prediction_unchanged(video_runs, tmp_path):
    root, manifest, leaf, runs = video_runs
    png = tmp_path / "att.png"
    res = runner.invoke(app, ["figures", "attention", "--run", str(runs["text4vis"]), "--run", str(runs["cmdcl"]),
                              "--video", "good3", "--video-root", str(root), "--out", str(png), "--frames", "3"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    n = json.loads(png.with_suffix(".json").read_text())
    for run in runs.values():
        patches, own = np.array(n[str(run)]["patches"]), np.array(n[str(run)]["self"])
        assert patches.shape == (3, 4) and (patches >= 0).all()            # 3 frames shown, a 2 x 2 grid
        np.testing.assert_allclose(patches.sum(axis=1) + own, 1, atol=1e-5)
    # the hooks ask for weights but change nothing the head computes
    from cmdcl_heads.evaluate import load_run
    _, _, _, head = load_run(runs["cmdcl"], device="cpu")
    frames, tokens = torch.randn(1, 4, head.dim), torch.randn(1, 4, 4, head.dim)
    before = head(frames, tokens)
    figures.spatial_attention(head, frames, tokens)
    assert torch.equal(head(frames, tokens), before)
    assert not head.encoder.blocks[-1].space.attn._forward_hooks                 # removed again
    # the frames are those the cache records, decoded as the encoder saw them (64 x 64, the tiny model's size)
    from cmdcl_cache.cache.folder import Cache
    from cmdcl_cache.cache.provenance import CacheSpec
    from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder
    cache = Cache(leaf)
    rows = np.array(n[str(runs["cmdcl"])]["rows"])
    got = figures.decoded_frames(cache, "good3", rows, root, load_manifest(manifest))
    assert got.shape == (3, 64, 64, 3) and got.dtype == np.uint8
    assert n["frame_index"] == cache.frame_info("good3")[0][rows].tolist()
    encoder = load_encoder(EncoderSpec.of(CacheSpec.from_provenance(cache.provenance), "cpu"))
    features, _ = encoder.encode_pixels(encoder.normalise_crops(got))   # they encode to the cached rows
    np.testing.assert_allclose(features.numpy(), cache.features("good3")[rows].astype(np.float32), atol=2e-3, rtol=2e-3)
    res = runner.invoke(app, ["figures", "attention", "--run", str(runs["cmdcl"]), "--video", "god3",
                              "--video-root", str(root)])
    assert res.exit_code == 2 and "did you mean 'good3'" in res.output
