"""`cmdcl-heads sweep` and `collect`: a grid of runs over seeds, resumable after a kill, as a Slurm array."""

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
from typer.testing import CliRunner

from _extract_util import PY, REPO
from cmdcl_cache.config import ConfigError
from cmdcl_heads.cli import app
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.sweep import ABLATION, SweepSpec, plan, point_name, point_state, prepare_point, run_point
from cmdcl_heads.train import train
from cmdcl_heads.sweep_report import mean_ci, t975

GRID = ["--grid", "layers=0,1", "--seeds", "2"]
POINTS = ["layers=0,seed=0", "layers=0,seed=1", "layers=1,seed=0", "layers=1,seed=1"]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def synth_options():
    """A smaller `synth` (tests/conftest.py), with a val split."""
    return {"train_per_class": 6, "test_per_class": 3, "val_per_class": 2}


def base_args(synth, out):
    cache, manifest = synth
    return ["--cache", str(cache), "--dataset", str(manifest), "--model", "text4vis", "--frames", "4", "--heads",
            "4", "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--data-mode", "memory", "--quiet",
            "--out", str(out)]


def digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_of(folder):
    summary = json.loads((folder / "summary.json").read_text())
    return summary["metrics"], summary["selection"]["metrics"]


@pytest.fixture(scope="module")
def killed_sweep(synth, tmp_path_factory):
    """A --jobs 1 sweep SIGKILLed (with the training it runs) once its first point has finished, then rerun.
    Returns (sweep folder, {finished point: its file digests at the kill}, the rerun's output)."""
    out = tmp_path_factory.mktemp("killed") / "layers"
    cmd = [PY, "-m", "cmdcl_heads.cli", "sweep", *base_args(synth, out), *GRID, "--jobs", "1"]
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / POINTS[0] / "summary.json").exists():
        assert proc.poll() is None, "the sweep ended before its first point finished"
        assert time.monotonic() < deadline, "the first point did not finish in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)   # the whole job, as scancel or a lost node ends it
    proc.wait()
    finished = {name: digests(out / name) for name in POINTS if (out / name / "summary.json").exists()}
    assert not (out / "results.md").exists()   # it died mid-sweep
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    return out, finished, rerun.stdout


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_never_touches_finished_points(killed_sweep):
    out, finished, _ = killed_sweep
    assert POINTS[0] in finished
    for name, before in finished.items():
        assert digests(out / name) == before, name   # byte for byte: not retrained, not rewritten
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == POINTS
    for name in POINTS:
        record = json.loads((out / name / "point.json").read_text())
        manifest = json.loads((out / "sweep.json").read_text())
        assert record["hash"] == next(p["hash"] for p in manifest["points"] if p["name"] == name)
        assert (out / name / "summary.json").exists() and (out / name / "best.safetensors").exists()


@pytest.mark.slow
def test_sweep_writes_the_mean_and_interval_table_and_the_plot(killed_sweep):
    out, _, stdout = killed_sweep
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["layers"] for r in rows] == ["0", "1"] and all(r["seeds"] == "2" for r in rows)
    for r, layers in zip(rows, ("0", "1")):
        tops = [metrics_of(out / f"layers={layers},seed={s}")[0]["top1"] for s in (0, 1)]
        mean, half = mean_ci(tops)
        assert float(r["test_top1_mean"]) == pytest.approx(mean)
        assert float(r["test_top1_ci95"]) == pytest.approx(half)
        assert "val_top1_mean" in r
    md = (out / "results.md").read_text()
    assert "| layers | seeds | val top1 | test top1 |" in md and "±" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "results.md" in stdout


@pytest.mark.slow
def test_slurm_array_tasks_train_the_same_runs_as_jobs_1(synth, killed_sweep, tmp_path):
    reference = killed_sweep[0]
    out = tmp_path / "slurm"
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, out), *GRID, "--slurm"])
    assert res.exit_code == 0, res.output
    script = out / "slurm.sh"
    text = script.read_text()
    last = int(re.search(r"^#SBATCH --array=0-(\d+)$", text, re.M).group(1))
    assert last == len(POINTS) - 1 and "$SLURM_ARRAY_TASK_ID" in text
    assert not any(p.is_dir() for p in out.iterdir())   # written, nothing trained
    shim = tmp_path / "bin" / "cmdcl-heads"   # what installing the package puts on PATH
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{PY}" -m cmdcl_heads.cli "$@"\n')
    shim.chmod(0o755)
    env = {**ENV, "PATH": f"{shim.parent}{os.pathsep}{ENV['PATH']}"}
    for task in range(last + 1):   # what Slurm does: the same script, one task id each, from any folder
        done = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert CliRunner().invoke(app, ["collect", str(out), "--quiet"]).exit_code == 0
    for name in POINTS:
        assert metrics_of(out / name) == metrics_of(reference / name), name
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()


@pytest.mark.slow
def test_compare_a_sweep_lists_the_swept_options(killed_sweep):
    res = CliRunner().invoke(app, ["compare", str(killed_sweep[0]), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 4 and set(rows[0]) == {"run", "layers", "seed", "val top1", "test top1", "best epoch",
                                               "seconds"}


@pytest.mark.slow
def test_a_failing_point_is_named_and_the_others_still_run(synth, tmp_path):
    out = tmp_path / "fail"   # selecting on the eval split is refused by train itself, at run time
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, out), "--grid", "select_split=val,test", "--jobs", "2"])
    assert res.exit_code == 1, res.output
    assert "failed: select_split=test,seed=0 (exit 2" in res.output
    assert "--select-split" in (out / "select_split=test,seed=0" / "train.log").read_text()
    assert (out / "select_split=val,seed=0" / "summary.json").exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["select_split"], r["seeds"]) for r in rows] == [("val", "1"), ("test", "0")]


@pytest.mark.slow
def test_a_half_finished_point_resumes_through_train_resume(synth, tmp_path):
    cache, manifest = synth
    head = HeadConfig(model="text4vis", frames=4, layers=1, heads=4)
    base = TrainConfig(cache=str(cache), dataset=str(manifest), out=str(tmp_path / "sw"), epochs=2, batch_size=16,
                       device="cpu", data_mode="memory", quiet=True)
    point = plan(SweepSpec(), head, base)[0]
    prepare_point(point)

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(point.train, point.head, on_epoch_end=stop)   # killed after epoch 1's checkpoint
    first_epoch = (point.folder / "metrics.jsonl").read_text()
    assert point_state(point) == "partial"
    assert run_point(point) == 0
    records = (point.folder / "metrics.jsonl").read_text()
    assert records.startswith(first_epoch) and len(records.splitlines()) == 2   # epoch 1 kept, not retrained
    assert point_state(point) == "done" and run_point(point) == 0


@pytest.mark.parametrize("grid, named", [
    ("lyers=0,1", "'lyers'"), ("layers=0,x", "'x'"), ("layers=1.5", "'1.5'"), ("layers=-1", "--layers"),
    ("tci=maybe", "'maybe'"), ("mediator_mode=gate,fuse", "'fuse'"), ("device=cpu,cuda", "'device'"),
    ("layers", "OPTION=V1,V2"), ("layers=1,1", "twice"),
])
def test_bad_grid_input_exits_2_naming_it(synth, tmp_path, grid, named):
    out = tmp_path / "bad"
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, out), "--grid", grid])
    assert res.exit_code == 2, res.output
    assert named in res.output and "--grid" in res.output
    assert not out.exists()   # refused before anything was written


def test_ablation_needs_cmdcl_and_seeds_are_given_once(synth, tmp_path):
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, tmp_path / "a"), "--ablation"])
    assert res.exit_code == 2 and "--model cmdcl" in res.output
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, tmp_path / "b"), "--grid", "seed=3,4", "--seeds", "2"])
    assert res.exit_code == 2 and "--seeds" in res.output


def _base(tmp_path, **kw):
    return HeadConfig(model="cmdcl"), TrainConfig(cache="c", dataset="d", out=str(tmp_path / "sw"), **kw)


def test_ablation_points_switch_one_part_each(tmp_path):
    head, train = _base(tmp_path)
    points = plan(SweepSpec(grid=("layers=0,8",), seeds=2, ablation=True), head, train)
    assert len(points) == len(ABLATION) * 2 * 2
    assert points[0].name == "variant=full,layers=0,seed=0"
    assert points[-1].name == "variant=no-cross-sample,layers=8,seed=1"
    switches = ("tci", "vci", "mediator", "cross_sample")
    for p in points:
        off = {s for s in switches if not getattr(p.head, s)}
        assert off == {k for k in ABLATION[p.labels["variant"]]}
        assert p.head.layers == int(p.labels["layers"]) and p.train.seed == int(p.labels["seed"])


def test_a_point_is_identified_by_the_options_that_change_its_result(tmp_path):
    head, train = _base(tmp_path)
    spec = SweepSpec(grid=("frames=8,16",))
    a = plan(spec, head, train)
    moved = plan(spec, head, TrainConfig(cache="elsewhere", dataset="d", out=str(tmp_path / "sw"), device="cpu",
                                         workers=7))
    assert [p.hash for p in a] == [p.hash for p in moved]   # paths and devices do not make another point
    other = plan(spec, head, TrainConfig(cache="c", dataset="d", out=str(tmp_path / "sw"), lr=0.01))
    assert [p.name for p in other] == [p.name for p in a] and {p.hash for p in other}.isdisjoint(p.hash for p in a)
    prepare_point(a[0])
    assert point_state(a[0]) == "new"
    with pytest.raises(ConfigError, match="another configuration"):
        point_state(other[0])   # same folder, other options: refused, never overwritten


def test_long_or_unsafe_point_names_fall_back_to_the_hash():
    assert point_name({"layers": "4", "seed": "1"}, "ab" * 32) == "layers=4,seed=1"
    assert point_name({"label_set": "a/b", "seed": "0"}, "ab" * 32) == "p-" + "ab" * 8
    assert point_name({"fine_label_set": "x" * 200}, "cd" * 32) == "p-" + "cd" * 8


def test_t_interval_matches_scipy():
    from scipy import stats

    for df in (1, 2, 5, 29, 30, 31, 50, 200):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)
    mean, half = mean_ci([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and half == pytest.approx(stats.t.ppf(0.975, 2) * 0.2 / 3 ** 0.5, rel=1e-3)
    assert mean_ci([0.4]) == (0.4, None)


def test_eval_every_is_part_of_a_points_hash_and_may_be_swept(tmp_path):
    head, train = _base(tmp_path)
    points = plan(SweepSpec(grid=("eval_every=1,2",)), head, train)   # it decides the selected epoch
    assert len({p.hash for p in points}) == 2 and [p.train.eval_every for p in points] == [1, 2]


def test_a_point_is_found_by_its_hash_whatever_the_grid_spelling(synth, tmp_path):
    out = tmp_path / "sw"
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, out), "--grid", "layers=0,1", "--slurm"])
    assert res.exit_code == 0, res.output
    first = plan(SweepSpec(grid=("layers=0,1",)), HeadConfig(model="text4vis", frames=4, heads=4),
                 TrainConfig(cache="c", dataset="d", out=str(out), epochs=2, batch_size=16))
    for p in first:
        prepare_point(p)   # as a started task leaves them
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, out), "--grid", "heads=4", "--grid", "layers=01,00",
                                   "--slurm"])
    assert res.exit_code == 0, res.output
    names = [e["name"] for e in json.loads((out / "sweep.json").read_text())["points"]]
    assert sorted(names) == ["layers=0,seed=0", "layers=1,seed=0"]   # the same folders, not new ones


def test_sweep_out_must_keep_its_cache_and_dataset_and_not_be_a_run(synth, tmp_path):
    out = tmp_path / "sw"
    assert CliRunner().invoke(app, ["sweep", *base_args(synth, out), "--slurm"]).exit_code == 0
    args = base_args(synth, out)
    args[args.index("--cache") + 1] = str(tmp_path / "other-cache")
    res = CliRunner().invoke(app, ["sweep", *args, "--slurm"])
    assert res.exit_code == 2 and "--cache" in res.output and "other-cache" in res.output, res.output
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, run), "--slurm"])
    assert res.exit_code == 2 and "is a run folder" in res.output, res.output
    res = CliRunner().invoke(app, ["sweep", *base_args(synth, tmp_path / "a b"), "--slurm"])
    assert res.exit_code == 2 and "spaces or quotes" in res.output and not (tmp_path / "a b").exists()


def test_a_damaged_sweep_json_names_the_file_and_the_key(tmp_path):
    from cmdcl_heads.sweep import read_manifest

    (tmp_path / "sweep.json").write_text(json.dumps({"version": 1, "axes": [], "points": [{"name": "x"}]}))
    with pytest.raises(ConfigError, match=r"sweep\.json: points\[0\] has no 'values'"):
        read_manifest(tmp_path)
    (tmp_path / "sweep.json").write_text(json.dumps({"version": 1, "axes": [{"name": "layers"}],
                                                    "points": [{"name": "x", "values": {}, "hash": "ab"}]}))
    with pytest.raises(ConfigError, match=r"points\[0\] has no 'values.layers'"):
        read_manifest(tmp_path)


def test_a_point_another_training_holds_is_reported_with_the_reason(tmp_path):
    from cmdcl_heads.sweep import failure_reason

    head, train = _base(tmp_path)
    point = plan(SweepSpec(), head, train)[0]
    prepare_point(point)
    (point.folder / "train.log").write_text("epoch 1\nerror: the run folder x is held by train (pid 7)\n\n")
    assert failure_reason(point) == "error: the run folder x is held by train (pid 7)"


def _trainings_of(folder):
    found = []
    for proc in os.listdir("/proc"):
        try:
            if proc.isdigit() and str(folder) in open(f"/proc/{proc}/cmdline").read():
                found.append(int(proc))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_sweep_stops_its_trainings(synth, tmp_path, sig):
    out = tmp_path / "sig"
    args = base_args(synth, out)
    args[args.index("--epochs") + 1] = "200"
    proc = subprocess.Popen([PY, "-m", "cmdcl_heads.cli", "sweep", *args, "--grid", "layers=0,1"], env=ENV,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "layers=0,seed=0" / "last.safetensors").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)   # the sweep's pid alone, as `kill PID` does
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value and f"stopped by {sig.name}" in output, output
    deadline = time.monotonic() + 30
    while _trainings_of(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _trainings_of(out)
    assert not (out / "layers=1,seed=0").exists()   # no point starts after the signal


def test_a_cell_over_fewer_seeds_than_its_row_says_so():
    from cmdcl_heads.sweep_report import counted, markdown

    values = [0.5, None, float("nan")]
    assert counted(values) == 1 and mean_ci(values) == (0.5, None)
    table = {"axes": ["layers"], "metric": "top1", "splits": ["val", "test"],
             "rows": [{"labels": {"layers": "0"}, "n": 3, "of": 3,
                       "stats": {"val": (*mean_ci(values), counted(values)), "test": (0.25, 0.01, 3)}}]}
    assert markdown(table).splitlines()[-1] == "| 0 | 3/3 | 0.5000 (n=1) | 0.2500 ± 0.0100 |"


def test_a_sweep_starts_from_a_preset(synth, tmp_path):
    out = tmp_path / "paper"
    res = CliRunner().invoke(app, ["sweep", "--preset", "paper", *base_args(synth, out), "--grid", "layers=0,1",
                                   "--slurm"])
    assert res.exit_code == 0, res.output
    base = (out / "base.toml").read_text()
    assert 'approximator = "text"' in base   # from the preset; the flags (--frames 4) win over it
    assert re.search(r"^frames = 4$", base, re.M) and re.search(r'^model = "text4vis"$', base, re.M)
