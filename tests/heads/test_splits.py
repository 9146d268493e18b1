"""Splits beyond train/val/test (labels.json 'split_roles'): declared, trained and evaluated on; selection only
ever on a split of role val."""

import json

import pytest
from typer.testing import CliRunner

from _heads_synth import make_synthetic
from cmdcl_cache.manifest.format import ManifestError
from cmdcl_cache.manifest.io import load_manifest
from cmdcl_heads.cli import app
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.train import TrainingError, train

runner = CliRunner()


def _declare(manifest, roles: dict, moves: dict):
    """Add split roles to labels.json and move videos (by id prefix) to other splits."""
    labels = json.loads((manifest / "labels.json").read_text())
    labels["split_roles"] = roles
    (manifest / "labels.json").write_text(json.dumps(labels))
    lines = []
    for line in (manifest / "videos.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for prefix, split in moves.items():
            if rec["video_id"].startswith(prefix):
                rec["split"] = split
        lines.append(json.dumps(rec))
    (manifest / "videos.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """val videos become 'dev' (role val); a third of the test videos become 'test_ood' (role test)."""
    cache, manifest = make_synthetic(tmp_path_factory.mktemp("splits"), val_per_class=2)
    _declare(manifest, {"dev": "val", "test_ood": "test"},
             {"val_": "dev", **{f"test_{c}_00{i}": "test_ood" for c in range(6) for i in (0, 1)}})
    return cache, manifest


def _opts(data, out, **kw):
    cache, manifest = data
    return TrainConfig(**{"cache": str(cache), "dataset": str(manifest), "out": str(out), "epochs": 2,
                          "batch_size": 16, "device": "cpu", "quiet": True, "data_mode": "memory", **kw})


def _cfg():
    return HeadConfig(model="text4vis", frames=8, layers=0)


def test_declared_splits_load_and_unknown_ones_are_named(data, tmp_path):
    m = load_manifest(data[1])
    assert m.split_roles == {"train": "train", "val": "val", "test": "test", "dev": "val", "test_ood": "test"}
    assert len(m.select("test_ood")) == 12 and len(m.select("dev")) == 12 and m.select("val") == []
    assert m.role("test_ood") == "test" and m.splits_with_role("val") == ["val", "dev"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.json").write_text(json.dumps({"label_sets": {"t": {"labels": ["a"]}},
                                                 "split_roles": {"ood test": "test", "x": "holdout"}}))
    (bad / "videos.jsonl").write_text(json.dumps({"video_id": "v", "path": "v.mp4", "split": "ood",
                                                  "labels": {"t": "a"}}) + "\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    text = str(err.value)
    assert "split_roles.ood test" in text and "no spaces or commas" in text
    assert "role 'holdout'" in text
    with pytest.raises(ValueError, match="unknown split 'nope'.*declares train, val, test, dev, test_ood"):
        load_manifest(data[1]).select("nope")


@pytest.mark.slow
def test_auto_selects_on_a_val_role_split_and_says_which(data, tmp_path, capsys):
    summary = train(_opts(data, tmp_path / "auto", quiet=False), _cfg())
    assert summary["selection"]["split"] == "dev" and summary["selection"]["requested"] == "auto"
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert first.startswith("selection: best = the epoch with the best dev metric (auto: the split of role val")


@pytest.mark.slow
def test_a_test_role_split_is_evaluated_but_never_selected_on(data, tmp_path):
    summary = train(_opts(data, tmp_path / "ood", eval_split="test_ood"), _cfg())
    assert summary["split"] == "test_ood" and summary["num_eval_videos"] == 12
    with pytest.raises(TrainingError, match="declares it a test split.*--force-select"):
        train(_opts(data, tmp_path / "refused", select_split="test_ood"), _cfg())
    assert not (tmp_path / "refused").exists()
    forced = train(_opts(data, tmp_path / "forced", select_split="test_ood", force_select=True), _cfg())
    assert forced["selection"]["split"] == "test_ood"
    # auto with no val-role videos: nothing selects
    cache, manifest = data
    only_test = tmp_path / "manifest"
    only_test.mkdir()
    for name in ("labels.json", "videos.jsonl"):
        (only_test / name).write_text((manifest / name).read_text())
    _declare(only_test, {"dev": "test", "test_ood": "test"}, {})
    none = train(_opts((cache, only_test), tmp_path / "none"), _cfg())
    assert none["selection"]["split"] is None


@pytest.mark.slow
def test_eval_takes_several_splits_with_one_load(data, tmp_path):
    run = tmp_path / "run"
    summary = train(_opts(data, run), _cfg())
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "dev,test,test_ood", "--device", "cpu",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(out.read_text())
    assert list(metrics) == ["dev", "test", "test_ood"] and metrics["test"] == summary["metrics"]
    assert "test_ood (test, 12 videos)" in res.output and "dev (val, 12 videos)" in res.output
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "test,holdout", "--device", "cpu"])
    assert res.exit_code == 2 and "unknown split 'holdout'" in res.output


def test_a_bad_split_name_or_a_nan_rate_writes_no_run_folder(data, tmp_path):
    for field in ("train_split", "eval_split"):
        with pytest.raises(ValueError, match="unknown split 'nope'"):
            train(_opts(data, tmp_path / field, **{field: "nope"}), _cfg())
        assert not (tmp_path / field).exists()
    with pytest.raises(ValueError, match="--lr is NaN"):
        _opts(data, tmp_path / "nan", lr=float("nan"))


@pytest.mark.slow
def test_auto_says_when_the_only_val_split_is_the_eval_split(data, tmp_path, capsys):
    summary = train(_opts(data, tmp_path / "dev", eval_split="dev", quiet=False), _cfg())
    assert summary["selection"]["split"] is None
    first = capsys.readouterr().out.strip().splitlines()[0]
    assert "the only split of role val (dev) is the eval split" in first
