"""End to end from the CLI: confounders build -> train cmdcl and its ablations -> explain."""

import json

import pytest
import torch
from typer.testing import CliRunner

from _cmdcl_synth import ACTIVITIES, make_dataset
from cmdcl_heads.cli import app
from cmdcl_heads.run import RunFolder

pytestmark = pytest.mark.slow   # each test trains heads for several epochs from the CLI
CHANCE = 1 / len(ACTIVITIES)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmdcl_cli")
    return make_dataset(root, n_train=48, n_test=24, d=32, frames=16, seed=1)


def _train(synth, out, *flags):
    cache, manifest = synth
    args = ["train", "--cache", str(cache), "--dataset", str(manifest), "--model", "cmdcl", "--out", str(out),
            "--frames", "8", "--layers", "1", "--heads", "4", "--epochs", "6", "--batch-size", "16",
            "--lr", "3e-3", "--device", "cpu", "--quiet", "--data-mode", "memory", *flags]
    return CliRunner().invoke(app, args)


def test_cmdcl_and_ablations_train_from_the_cli_and_beat_chance(synth, tmp_path):
    cache, manifest = synth
    res = _train(synth, tmp_path / "nodict")
    assert res.exit_code != 0 and "cmdcl-heads confounders build --cache" in res.output
    res = CliRunner().invoke(app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                                   "--kp", "16", "--kz", "32", "--niter", "10"])
    assert res.exit_code == 0, res.output
    results = {}
    for name, flags in [("cmdcl", []), ("no-tci", ["--no-tci"]), ("no-vci", ["--no-vci"]),
                        ("no-mediator", ["--no-mediator", "--no-cross-sample"])]:
        run = tmp_path / name
        res = _train(synth, run, *flags)
        assert res.exit_code == 0, (name, res.output)
        summary = json.loads((run / "summary.json").read_text())
        results[name] = summary["metrics"]["top1"]
        cfg = RunFolder(run).load_checkpoint("best").meta["head_config"]
        assert cfg["tci"] == (name != "no-tci") and cfg["vci"] == (name != "no-vci")
    print(results)
    for name, top1 in results.items():
        assert top1 > CHANCE + 0.25, (name, results)

    # explain one test video of the full model
    png = tmp_path / "explain.png"
    res = CliRunner().invoke(app, ["explain", "--run", str(tmp_path / "cmdcl"), "--video", "test050",
                                   "--out", str(png), "--device", "cpu", "--top-k", "5"])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    res = CliRunner().invoke(app, ["explain", "--run", str(tmp_path / "cmdcl"), "--video", "nope",
                                   "--device", "cpu"])
    assert res.exit_code != 0 and "nope" in res.output

    # eval uses the run's own dictionaries: rebuilding confounders.h5 with other K changes nothing
    summary = json.loads((tmp_path / "cmdcl" / "summary.json").read_text())
    res = CliRunner().invoke(app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                                   "--kp", "8", "--kz", "12", "--niter", "5"])
    assert res.exit_code == 0, res.output
    from cmdcl_heads.evaluate import evaluate_run
    assert evaluate_run(tmp_path / "cmdcl", quiet=True) == summary["metrics"]


def test_cmdcl_trains_under_bf16_autocast(tmp_path, monkeypatch):
    """The mixed-precision path (bf16 autocast, as on GPU) run on the CPU: CI has no GPU, and without this the
    code under autocast (dtypes of buffers, attention, the fp32 classifier) would only ever run there."""
    from cmdcl_heads import train as train_module

    cache, manifest = make_dataset(tmp_path / "data", n_train=48, n_test=24, d=32, frames=16, seed=1)
    res = CliRunner().invoke(app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                                   "--kp", "16", "--kz", "32", "--niter", "10"])
    assert res.exit_code == 0, res.output
    autocasts = []

    def cpu_bf16(device, precision):
        autocasts.append(precision)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    monkeypatch.setattr(train_module, "autocast", cpu_bf16)
    run = tmp_path / "bf16"
    res = _train((cache, manifest), run, "--precision", "bf16")
    assert res.exit_code == 0, res.output
    assert autocasts and set(autocasts) == {"bf16"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_steps"] == 0 for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["top1"] > CHANCE + 0.25
    from cmdcl_heads.evaluate import evaluate_run
    assert evaluate_run(run, quiet=True) == summary["metrics"]
