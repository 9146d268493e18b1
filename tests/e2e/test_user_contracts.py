"""The three contracts a user holds (issue 12): the cache folder (`--cache` means the same in every command),
the run folder (a head rebuilt from its checkpoint alone; config.toml repeats a run) and the configuration
(one source of defaults; unknown keys refused everywhere; --version)."""

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from _extract_util import PY, REPO, extract_args, good_videos, write_manifest
from _heads_synth import make_synthetic
from cmdcl_cache.cli import app as cache_app
from cmdcl_heads.cli import app as heads_app

runner = CliRunner()


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    t = tmp_path_factory.mktemp("contracts")
    root = t / "videos"
    manifest = write_manifest(t / "manifest", good_videos(root, 3, frames=12),
                              splits={"good0": "train", "good1": "train", "good2": "test"})
    res = runner.invoke(cache_app, extract_args(manifest, root, t / "cache"))
    assert res.exit_code == 0, res.output
    leaf = t / "cache" / "tiny" / "cmdcl-tiny-none"
    return t, root, manifest, leaf


def _spellings(t, leaf):
    return {"root": t / "cache", "dataset folder": leaf.parent, "leaf": leaf}


@pytest.mark.slow
def test_every_lookup_command_takes_the_root_the_leaf_or_the_folder_between(extracted, tmp_path):
    t, root, manifest, leaf = extracted
    for name, cache in _spellings(t, leaf).items():
        checks = {
            "verify": ["verify", "--cache", str(cache), "--dataset", str(manifest)],
            "inspect": ["inspect", "--cache", str(cache), "--json"],
            "export-npy": ["export-npy", "--cache", str(cache), "--out", str(tmp_path / name)],
            "texts": ["texts", "--cache", str(cache), "--dataset", str(manifest), "--device", "cpu"],
        }
        for command, args in checks.items():
            res = runner.invoke(cache_app, args)
            assert res.exit_code == 0, (name, command, res.output)
        assert "up to date" in runner.invoke(cache_app, checks["texts"]).output   # the model was inferred
        res = runner.invoke(heads_app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                                        "--kp", "2", "--kz", "2"])
        assert res.exit_code == 0 and str(leaf / "confounders.h5") in res.output, (name, res.output)
        run = tmp_path / f"run-{name.replace(' ', '-')}"
        res = runner.invoke(heads_app, ["train", "--cache", str(cache), "--dataset", str(manifest), "--model",
                                        "zeroshot", "--out", str(run), "--device", "cpu", "--quiet"])
        assert res.exit_code == 0, (name, res.output)
        res = runner.invoke(heads_app, ["eval", "--run", str(run), "--cache", str(cache), "--device", "cpu"])
        assert res.exit_code == 0, (name, res.output)
    assert sorted(p.name for p in (t / "cache").rglob("frames-*.h5")) == ["frames-00000-of-00001.h5"]


def test_extract_into_a_cache_folder_resumes_it_instead_of_nesting(extracted):
    t, root, manifest, leaf = extracted
    for cache in _spellings(t, leaf).values():
        res = runner.invoke(cache_app, extract_args(manifest, root, cache))
        assert res.exit_code == 0 and "nothing to do" in res.output and str(leaf) in res.output, res.output
    assert not any(p.is_dir() for p in leaf.iterdir())   # nothing nested inside the cache folder
    other = [a if a != "cmdcl-tiny" else "ViT-B-32" for a in extract_args(manifest, root, leaf)]
    res = runner.invoke(cache_app, other)
    assert res.exit_code == 2 and "is a cache of other settings" in res.output and "'cmdcl-tiny'" in res.output


def test_an_ambiguous_cache_root_lists_the_candidates(extracted, tmp_path):
    t, root, manifest, leaf = extracted
    copy = tmp_path / "cache"
    shutil.copytree(t / "cache", copy)
    shutil.copytree(copy / "tiny" / "cmdcl-tiny-none", copy / "tiny" / "cmdcl-tiny-other")
    res = runner.invoke(cache_app, ["verify", "--cache", str(copy)])
    assert res.exit_code == 2 and "holds 2 caches" in res.output
    assert "cmdcl-tiny-none (dataset tiny, model cmdcl-tiny, weights none)" in res.output
    assert "cmdcl-tiny-other" in res.output
    res = runner.invoke(cache_app, ["verify", "--cache", str(copy), "--model", "ViT-B-32"])
    assert res.exit_code == 2 and "no cache of model ViT-B-32" in res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract_run")
    cache, manifest = make_synthetic(root / "data", val_per_class=2)
    run = root / "run"
    res = runner.invoke(heads_app, ["train", "--cache", str(cache), "--dataset", str(manifest), "--model",
                                    "text4vis", "--out", str(run), "--frames", "8", "--layers", "1", "--heads",
                                    "4", "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    return root, cache, manifest, run


@pytest.mark.slow
def test_a_head_is_rebuilt_from_its_checkpoint_alone_in_a_fresh_process(trained, tmp_path):
    root, cache, manifest, run = trained
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    script = f"""
import json, torch
from cmdcl_heads.evaluate import load_run
torch.manual_seed(7)
frames = torch.randn(3, 8, 32)
_, _, _, head = load_run({str(moved)!r})
print(json.dumps(head(frames).tolist()))
"""
    # no cache reachable: the shards are renamed away for the subprocess
    hidden = cache.with_name("hidden-cache")
    cache.rename(hidden)
    try:
        out = subprocess.run([PY, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    finally:
        hidden.rename(cache)
    assert out.returncode == 0, out.stderr
    import torch

    from cmdcl_heads.evaluate import load_run
    torch.manual_seed(7)
    frames = torch.randn(3, 8, 32)
    expected = load_run(run)[3](frames)
    assert torch.equal(torch.tensor(json.loads(out.stdout)), expected)


@pytest.mark.slow
def test_config_toml_repeats_the_run(trained, tmp_path):
    root, cache, manifest, run = trained
    config = run / "config.toml"
    text = config.read_text()
    assert "[train]" in text and "[head]" in text and 'model = "text4vis"' in text and "select_split = \"val\"" in text
    again = tmp_path / "again"
    res = runner.invoke(heads_app, ["train", "--config", str(config), "--out", str(again)])
    assert res.exit_code == 0, res.output

    def records(folder):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert records(again) == records(run)
    first, second = (json.loads((f / "summary.json").read_text()) for f in (run, again))
    assert first["metrics"] == second["metrics"] and first["selection"]["value"] == second["selection"]["value"]
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,") and "select.top1" in csv_lines[0] and len(csv_lines) == 3


@pytest.mark.parametrize("program,command", [(cache_app, ["extract"]), (heads_app, ["train"]),
                                             (heads_app, ["confounders", "build"]), (cache_app, ["texts"])])
def test_unknown_configuration_keys_are_refused_with_the_valid_ones(tmp_path, program, command):
    config = tmp_path / "c.toml"
    config.write_text('learning_rate = 0.1\ndataset = "x"\n')
    res = runner.invoke(program, [*command, "--config", str(config)])
    assert res.exit_code == 2 and "unknown key(s) 'learning_rate'" in res.output and "valid keys:" in res.output
    config.write_text("not = [valid\n")
    res = runner.invoke(program, [*command, "--config", str(config)])
    assert res.exit_code == 2 and "not valid TOML" in res.output


def test_choices_are_checked_when_the_command_line_is_parsed(tmp_path):
    for program, args in ((cache_app, ["extract", "--tokens", "patches"]), (heads_app, ["train", "--model", "gpt"]),
                          (heads_app, ["confounders", "build", "--prototypes", "median"]),
                          (heads_app, ["train", "--mediator-mode", "swap"]), (heads_app, ["train", "--data-mode", "disk"])):
        res = runner.invoke(program, args)
        assert res.exit_code == 2 and "is not one of" in res.output, (args, res.output)


def test_both_programs_say_their_version():
    from importlib.metadata import version
    for program, name in ((cache_app, "cmdcl-cache"), (heads_app, "cmdcl-heads")):
        res = runner.invoke(program, ["--version"])
        assert res.exit_code == 0 and res.output.strip() == f"{name} {version('cmdcl')}"

