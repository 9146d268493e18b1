"""Shipped presets: `train --preset paper` trains, flags override it, `--help` lists the presets; the warning
when --frames exceeds a video's cached rows."""

import json
import tomllib

import pytest
from typer.testing import CliRunner

from _cmdcl_synth import make_dataset
from cmdcl_cache.manifest.format import resolve_dataset_dir
from cmdcl_heads.cli import app, preset_names, preset_path
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.run import RunFolder


def test_help_lists_every_shipped_preset_and_each_is_a_valid_configuration():
    assert {"paper", "coin", "breakfast", "charades"} <= set(preset_names())
    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for name in preset_names():
        assert f"{name} (" in res.output, name
        table = tomllib.loads(preset_path(name).read_text())
        head = HeadConfig(**table["head"])   # every key is an option and every value is accepted
        assert (head.model, head.layers, head.frames, head.approximator) == ("cmdcl", 8, 64, "text")
        TrainConfig(cache="c", dataset="d", out="o", **{k: v for k, v in table.get("train", {}).items()
                                                        if k != "dataset"})


@pytest.mark.parametrize("name", ["coin", "breakfast"])
def test_dataset_presets_name_the_label_sets_their_manifest_declares(name):
    table = tomllib.loads(preset_path(name).read_text())
    labels = json.loads((resolve_dataset_dir(table["train"]["dataset"]) / "labels.json").read_text())
    assert table["train"]["label_set"] == labels["default_label_set"] and table["train"]["label_set"] in labels["label_sets"]
    assert table["head"]["fine_label_set"] == labels["fine_label_set"]


@pytest.mark.slow
def test_train_preset_paper_on_a_small_cache_with_a_flag_overriding_it(tmp_path):
    cache, manifest = make_dataset(tmp_path, n_train=24, n_test=12, d=32, frames=16, seed=3)
    res = CliRunner().invoke(app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                                   "--kp", "4", "--niter", "3"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"--frames 64: 24 of 24 videos of split 'train' have fewer cached rows "
                                         r"\(shortest 16\).*frames repeat"):
        res = CliRunner().invoke(app, ["train", "--preset", "paper", "--cache", str(cache), "--dataset",
                                       str(manifest), "--out", str(run), "--epochs", "1", "--device", "cpu",
                                       "--quiet", "--data-mode", "memory", "--layers", "2"])
    assert res.exit_code == 0, res.output
    head = json.loads((run / "summary.json").read_text())
    cfg = tomllib.loads((run / "config.toml").read_text())["head"]
    assert (cfg["model"], cfg["frames"], cfg["approximator"]) == ("cmdcl", 64, "text")   # from the preset
    assert cfg["layers"] == 2                                                           # the flag won
    assert RunFolder(run).load_checkpoint("best").meta["head_config"]["kz"] == 0        # no frame dictionary
    assert 0.0 <= head["metrics"]["top1"] <= 1.0
    res = CliRunner().invoke(app, ["train", "--preset", "nope", "--cache", str(cache), "--dataset", str(manifest),
                                   "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no such preset" in res.output and "paper" in res.output
