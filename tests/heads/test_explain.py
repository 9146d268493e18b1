"""`cmdcl-heads explain`: a video file or a cached id, mistyped ids, entries named by their nearest label, labelled
colour bars and a legend for the truth; heads with and without the frame dictionary Z."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _cmdcl_synth import make_dataset
from cmdcl_heads.cli import app
from cmdcl_heads.explain import explain_video, explanation_figure, nearest_names

runner = CliRunner()


def test_entries_are_named_by_their_nearest_label_text():
    texts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    entries = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.1], [0.0, -1.0, 0.0]])
    names = nearest_names(entries, texts, ["crack egg", "stir", "pour"], "z")
    assert names[0].startswith("z0 ~ stir (1.00") and names[1].startswith("z1 ~ crack egg (1.00")
    assert names[2].startswith("z2 ~ crack egg (0.00") or names[2].startswith("z2 ~ pour (0.00")   # all orthogonal


def _maps(with_z: bool):
    rng = np.random.default_rng(0)
    soft = lambda *s: (lambda x: x / x.sum(-1, keepdims=True))(rng.random(s))   # noqa: E731
    maps = {"logits": np.array([3.0, 1.0, 0.5]), "mediator": soft(4, 5), "tci_pred": soft(6)}
    maps["cross_sample" if with_z else "approximator"] = soft(4, 3 if not with_z else 7)
    return maps


def test_figure_labels_its_colour_bars_names_z_entries_and_has_a_truth_legend():
    z_names = [f"z{i} ~ action {i} (0.5)" for i in range(7)]
    fig, _ = explanation_figure(_maps(True), ["a", "b", "c"], [f"f{i}" for i in range(5)], truth="b",
                                z_names=z_names, vp_names=[f"b{i} ~ x" for i in range(6)])
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert sum("attention weight" in lab for lab in labels) == 2           # both heat maps' colour bars
    ticks = {t.get_text() for ax in fig.axes for t in ax.get_yticklabels()}
    assert {"z0 ~ action 0 (0.5)", "b0 ~ x"} & ticks == {"z0 ~ action 0 (0.5)", "b0 ~ x"}
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()]
    assert legends == [["truth", "not the truth"]]
    bars = [p for ax in fig.axes for p in ax.patches if ax.get_legend()]
    green = [b for b in bars if np.allclose(b.get_facecolor()[:3], (0.1725, 0.6275, 0.1725), atol=1e-3)]
    assert len(green) == 1                                                 # the one true class
    # a head without Z (the figure-4 approximator over T'): its panel reads the class texts
    fig, _ = explanation_figure(_maps(False), ["a", "b", "c"], [f"f{i}" for i in range(5)])
    titles = [ax.get_title() for ax in fig.axes]
    assert any("debiased texts T'" in t for t in titles)
    assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()] == \
        [["truth unknown"]]


@pytest.fixture(scope="module")
def video_runs(tmp_path_factory):
    from _video_runs import video_runs
    return video_runs(tmp_path_factory.mktemp("explain_videos"), models=("cmdcl",))


@pytest.mark.slow
def test_explain_a_video_file_as_predict_does_and_a_mistyped_id_gets_the_closest(video_runs, tmp_path):
    root, manifest, leaf, runs = video_runs
    run = runs["cmdcl"]
    clip = tmp_path / "my clip.mp4"
    clip.write_bytes((root / "good3.mp4").read_bytes())                   # a file in no manifest
    res = runner.invoke(app, ["explain", "--run", str(run), "--video", str(clip), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    png = run / "explain-my clip.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    # the file is explained from the features the cache holds for the same video
    from cmdcl_cache.cache.folder import Cache
    from cmdcl_cache.extract.run import encode_files
    from cmdcl_heads.evaluate import load_run
    ckpt, _, _, head = load_run(run, device="cpu")
    [(_, f)] = list(encode_files(ckpt.meta["cache_provenance"], [clip], "cpu"))
    cache = Cache(leaf)
    from_file, _ = explain_video(head, f.features, f.tokens, 4)
    from_cache, _ = explain_video(head, cache.features("good3"), cache.tokens("good3"), 4)
    np.testing.assert_allclose(from_file["logits"], from_cache["logits"], atol=2e-2)
    res = runner.invoke(app, ["explain", "--run", str(run), "--video", "good33", "--device", "cpu"])
    assert res.exit_code == 2 and "did you mean 'good3'" in res.output
    assert not (run / "explain-good33.png").exists()
    res = runner.invoke(app, ["explain", "--run", str(run), "--video", "good3", "--device", "cpu",
                              "--out", str(tmp_path / "cached.png")])
    assert res.exit_code == 0 and (tmp_path / "cached.png").exists(), res.output


def test_labels_are_cut_in_their_name_and_keep_their_similarity():
    from cmdcl_heads.explain import _short

    label = "z3 ~ " + "a very long atomic action name indeed, longer than any panel" + " (0.41)"
    cut = _short(label)
    assert len(cut) == 40 and cut.endswith("… (0.41)") and cut.startswith("z3 ~ a very long")
    assert _short("x" * 60) == "x" * 39 + "…"


@pytest.mark.slow
def test_explain_a_head_without_the_frame_dictionary(tmp_path, monkeypatch):
    cache, manifest = make_dataset(tmp_path / "data", n_train=12, n_test=4, d=32, frames=8, seed=2)
    res = runner.invoke(app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                              "--kp", "4", "--kz", "4", "--niter", "3"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "noz"
    res = runner.invoke(app, ["train", "--cache", str(cache), "--dataset", str(manifest), "--model", "cmdcl",
                              "--no-cross-sample", "--out", str(run), "--frames", "4", "--layers", "1", "--heads",
                              "4", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    from cmdcl_heads.evaluate import load_run
    from cmdcl_heads.explain import entry_names
    _, cfg, _, head = load_run(run, device="cpu")
    assert cfg.kz == 0 and not hasattr(head, "z")
    vp, z = entry_names(head, ["a"] * cfg.num_classes, [f"action {i}" for i in range(cfg.num_fine)])
    assert z is None and len(vp) == 4 and all(" ~ action " in n for n in vp)
    res = runner.invoke(app, ["explain", "--run", str(run), "--video", "test012", "--device", "cpu",
                              "--out", str(tmp_path / "e.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    first = (tmp_path / "e.png").read_bytes()
    explain = ["explain", "--run", str(run), "--device", "cpu", "--video"]
    res = runner.invoke(app, [*explain, "test013", "--out", str(tmp_path / "e.png")])
    assert res.exit_code == 2 and "exists" in res.output and (tmp_path / "e.png").read_bytes() == first
    res = runner.invoke(app, [*explain, "test013", "--out", str(tmp_path / "e.png"), "--force"])
    assert res.exit_code == 0 and (tmp_path / "e.png").read_bytes() != first, res.output
    # a file of the id's name in the current folder: the cached id wins (the file is no video)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test012").write_bytes(b"not a video")
    res = runner.invoke(app, [*explain, "test012", "--out", str(tmp_path / "cwd.png")])
    assert res.exit_code == 0, res.output
    for video, says in (("nothere/clip.mp4", "no such file"), ("clip.mp4", "no such file"),
                        (str(tmp_path), "a folder: explain takes one video"), ("t" * 300, "no video")):
        res = runner.invoke(app, [*explain, video])
        assert res.exit_code == 2 and says in " ".join(res.output.split()), (video, res.output)
