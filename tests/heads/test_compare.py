"""`cmdcl-heads compare`: the options that differ between runs (only those), metric per split, epoch, time."""

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from _heads_synth import make_synthetic
from cmdcl_heads.cli import app
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.train import train


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Three one-epoch runs: a base, one with another lr, one with another lr and frames."""
    root = tmp_path_factory.mktemp("compare")
    cache, manifest = make_synthetic(root, train_per_class=4, test_per_class=2, val_per_class=2)
    runs = []
    for name, head_kw, train_kw in (("base", {}, {}), ("lr", {}, {"lr": 1e-2}),
                                    ("lr-frames", {"frames": 8}, {"lr": 1e-2})):
        out = root / name
        train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(out), epochs=1, batch_size=16,
                          device="cpu", quiet=True, data_mode="memory", **train_kw),
              HeadConfig(**{"model": "text4vis", "frames": 4, "layers": 1, "heads": 4, **head_kw}))
        runs.append(out)
    return runs


def _compare(runs, fmt):
    res = CliRunner().invoke(app, ["compare", *map(str, runs), "--format", fmt])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.slow
def test_compare_lists_exactly_the_options_that_differ(three_runs):
    rows = json.loads(_compare(three_runs, "json"))
    assert [set(r) for r in rows] == [{"run", "frames", "lr", "val top1", "test top1", "best epoch", "seconds"}] * 3
    assert [(r["frames"], r["lr"]) for r in rows] == [(4, 1e-3), (4, 1e-2), (8, 1e-2)]
    for run, row in zip(three_runs, rows):
        summary = json.loads((run / "summary.json").read_text())
        assert row["test top1"] == summary["metrics"]["top1"]
        assert row["val top1"] == summary["selection"]["metrics"]["top1"]
        assert row["best epoch"] == 1 and row["seconds"] > 0
    rows = json.loads(_compare(three_runs[1:], "json"))
    assert {"frames"} == set(rows[0]) - {"run", "val top1", "test top1", "best epoch", "seconds"}


@pytest.mark.slow
def test_compare_formats_hold_the_same_table(three_runs):
    rows = list(csv.DictReader(io.StringIO(_compare(three_runs, "csv"))))
    assert list(rows[0]) == ["run", "frames", "lr", "val top1", "test top1", "best epoch", "seconds"]
    assert [r["lr"] for r in rows] == ["0.001", "0.01", "0.01"]
    md = _compare(three_runs, "md").splitlines()
    assert md[0] == "| run | frames | lr | val top1 | test top1 | best epoch | seconds |" and len(md) == 5
    table = _compare(three_runs, "table")
    assert "frames" in table and "test top1" in table


def test_compare_names_a_folder_that_is_no_run(tmp_path):
    res = CliRunner().invoke(app, ["compare", str(tmp_path)])
    assert res.exit_code == 2 and "config.toml" in res.output and str(tmp_path) in res.output


def _copy(run, tmp_path, name):
    import shutil

    return shutil.copytree(run, tmp_path / name)


@pytest.mark.slow
def test_compare_json_writes_nan_and_inf_as_null(three_runs, tmp_path):
    runs = [_copy(r, tmp_path, r.name) for r in three_runs[:2]]
    summary = json.loads((runs[1] / "summary.json").read_text())
    summary["metrics"]["top1"] = float("nan")
    summary["selection"]["metrics"]["top1"] = float("inf")
    (runs[1] / "summary.json").write_text(json.dumps(summary))   # Python writes NaN/Infinity tokens
    rows = json.loads(_compare(runs, "json"), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert rows[1]["test top1"] is None and rows[1]["val top1"] is None and rows[0]["test top1"] is not None


@pytest.mark.slow
def test_compare_names_a_truncated_summary_and_marks_unfinished_runs(three_runs, tmp_path):
    runs = [_copy(r, tmp_path, r.name) for r in three_runs[:2]]
    (runs[1] / "summary.json").unlink()
    rows = json.loads(_compare(runs, "json"))
    assert rows[1]["best epoch"] == "unfinished" and rows[0]["best epoch"] == 1
    (runs[1] / "summary.json").write_text('{"split": "te')
    res = CliRunner().invoke(app, ["compare", *map(str, runs)])
    assert res.exit_code == 2 and str(runs[1] / "summary.json") in res.output, res.output


@pytest.mark.slow
def test_compare_names_a_sweep_with_no_finished_point(three_runs, tmp_path):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"version": 1, "axes": [], "points": [
        {"name": "seed=0", "values": {"seed": "0"}, "hash": "ab"}]}))
    res = CliRunner().invoke(app, ["compare", str(three_runs[0]), str(sweep)])
    assert res.exit_code == 2 and str(sweep) in res.output and "no finished point" in res.output, res.output
