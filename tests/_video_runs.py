"""Runs trained on a cache of real (PyAV-written) video files with grid tokens: for the figures and explain
tests that decode frames or explain a file."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from _extract_util import extract_args, good_videos, write_manifest
from cmdcl_cache.cli import app as cache_app
from cmdcl_heads.cli import app as heads_app

runner = CliRunner()
SPLITS = {"good0": "train", "good1": "train", "good2": "train", "good3": "test"}


def video_runs(t: Path, models=("text4vis", "cmdcl")) -> tuple[Path, Path, Path, dict[str, Path]]:
    """(video root, manifest, cache leaf, {model: run}) under `t`: 4 videos, a 2x2 grid, 1 layer, 2 epochs."""
    root = t / "videos"
    manifest = write_manifest(t / "manifest", good_videos(root, 4, frames=16), splits=SPLITS)
    res = runner.invoke(cache_app, extract_args(manifest, root, t / "cache", "--tokens", "grid", "--grid", "2"))
    assert res.exit_code == 0, res.output
    leaf = t / "cache" / "tiny" / "cmdcl-tiny-none-grid2"
    res = runner.invoke(heads_app, ["confounders", "build", "--cache", str(leaf), "--dataset", str(manifest),
                                    "--kp", "2", "--kz", "2", "--niter", "3"])
    assert res.exit_code == 0, res.output
    runs = {}
    for model in models:
        runs[model] = t / model
        res = runner.invoke(heads_app, ["train", "--cache", str(leaf), "--dataset", str(manifest), "--model", model,
                                        "--tokens", "--frames", "4", "--layers", "1", "--heads", "4", "--epochs",
                                        "2", "--batch-size", "2", "--out", str(runs[model]), "--device", "cpu",
                                        "--quiet"])
        assert res.exit_code == 0, res.output
    return root, manifest, leaf, runs
