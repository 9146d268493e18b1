"""A command reads only the files it was given, and only a run's own checkpoint (issue 26).

HDF5 data kept or reached outside the `--from` file, checkpoints copied between runs, non-finite options and
collapsed trainings, full disks, resume options, degenerate label sets and odd files in folder manifests.
"""

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _extract_util import write_manifest
from _heads_synth import make_synthetic
from cmdcl_cache.cache import runlog as failures
from cmdcl_cache.cli import app as cache_app
from cmdcl_cache.cache.format import TextEmbeddings, read_texts, texts_provenance, write_texts
from cmdcl_heads import train as train_module
from cmdcl_heads.cli import app as heads_app
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.run import RunFolder
from cmdcl_heads.train import TrainingError, train

runner = CliRunner()
D = 64


def _strict(path: Path):
    """Parse a JSON or JSON Lines file refusing NaN/Infinity, as strict readers do."""
    def refuse(name):
        raise ValueError(f"{path}: non-JSON constant {name}")
    text = path.read_text()
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    return [json.loads(line, parse_constant=refuse) for line in lines if line.strip()]


# ----------------------------------------------------------------------------- 1. HDF5 outside the --from file

SECRET = np.full((4, D), 1234.5, dtype=np.float32)   # float16-exact, so an import would store it unchanged


def _outside_source(tmp_path, kind: str) -> Path:
    """An HDF5 file with a good video and a video `leak` whose data are in a file beside it."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET.tobytes())
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["feat"] = SECRET
    src = tmp_path / f"{kind}.h5"
    with h5py.File(src, "w") as f:
        f["good"] = np.ones((3, D), np.float32)
        if kind == "external":   # raw storage in secret.bin (HDF5's external file list)
            f.create_dataset("leak", shape=SECRET.shape, dtype="f4", external=[(str(secret), 0, SECRET.nbytes)])
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=SECRET.shape, dtype="f4")
            layout[:] = h5py.VirtualSource(str(other), "feat", shape=SECRET.shape)
            f.create_virtual_dataset("leak", layout)
        elif kind == "external-link":
            f["leak"] = h5py.ExternalLink(str(other), "/feat")
        else:   # a soft link through an external link
            f["hop"] = h5py.ExternalLink(str(other), "/feat")
            f["leak"] = h5py.SoftLink("/hop")
    with h5py.File(src, "r") as f:   # the attack is real: h5py hands over the outside bytes
        assert np.array_equal(f["leak"][()], SECRET)
    return src


@pytest.mark.parametrize("kind", ["external", "virtual", "external-link", "soft-link"])
def test_hdf5_data_outside_the_from_file_is_refused_and_never_reaches_the_cache(tmp_path, kind):
    src = _outside_source(tmp_path, kind)
    manifest = write_manifest(tmp_path / "manifest", {"good": "good.mp4", "leak": "leak.mp4"})
    cache = tmp_path / "cache"
    res = runner.invoke(cache_app, ["import", "--dataset", str(manifest), "--from", str(src), "--format", "hdf5",
                                    "--cache", str(cache), "--model", "m", "--fps", "1", "--quiet"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert str(src) in out and "'leak'" in out, out
    assert {"external": "external file", "virtual": "is virtual", "external-link": "external link to",
            "soft-link": "soft link to /hop"}[kind] in out
    if kind == "soft-link":
        assert "'hop' is an external link" in out   # every problem at once
    leaked = [SECRET.tobytes()[:64], SECRET.astype("<f2").tobytes()[:64]]
    for path in (p for p in cache.rglob("*") if p.is_file()) if cache.exists() else ():
        assert not any(s in path.read_bytes() for s in leaked), path


# ------------------------------------------------------------------------------- 2. a run's own checkpoint

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run `mine` (6 classes, D=32), and the runs whose checkpoints are copied into it: 10 classes of the
    multi-label set, and D=16."""
    root = tmp_path_factory.mktemp("runs")
    data = make_synthetic(root / "data")
    narrow = make_synthetic(root / "narrow", dim=16)

    def fit(name, cache, manifest, **kw):
        train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(root / name), epochs=1, batch_size=16,
                          device="cpu", quiet=True, data_mode="memory", **kw), HeadConfig(model="linear", frames=8))
        return root / name

    return {"mine": fit("mine", *data), "classes": fit("classes", *data, label_set="steps"),
            "dim": fit("dim", *narrow), "data": data}


@pytest.mark.parametrize("command", ["eval", "predict", "explain", "resume"])
@pytest.mark.parametrize("stranger,named", [("classes", "attribute 'label_set' is 'steps', in {other} 'task'"),
                                            ("dim", "attribute 'feature_dim' is 16, in {other} 32")])
def test_a_checkpoint_copied_from_another_run_is_refused(runs, tmp_path, command, stranger, named):
    run = tmp_path / "run"
    shutil.copytree(runs["mine"], run)
    name = "last" if command == "resume" else "best"
    shutil.copy(runs[stranger] / f"{name}.safetensors", run / f"{name}.safetensors")
    cache, manifest = runs["data"]
    args = {"eval": ["eval", "--run", str(run), "--device", "cpu"],
            "predict": ["predict", "--run", str(run), "--out", str(tmp_path / "p.jsonl"), "--device", "cpu"],
            "explain": ["explain", "--run", str(run), "--video", "test_0_000", "--out", str(tmp_path / "e.png"),
                        "--device", "cpu"],
            "resume": ["train", "--cache", str(cache), "--dataset", str(manifest), "--out", str(run), "--model",
                       "linear", "--frames", "8", "--batch-size", "16", "--epochs", "2", "--resume", "--device",
                       "cpu", "--quiet"]}[command]
    res = runner.invoke(heads_app, args)
    out = " ".join(res.output.split())
    assert res.exit_code == 2, out
    other = "best.safetensors" if name == "last" else "last.safetensors"
    assert "not this run's checkpoint" in out and named.format(other=other) in out and f"{name}.safetensors" in out, out
    assert not (tmp_path / "p.jsonl").exists() and not (tmp_path / "e.png").exists()


def test_a_checkpoint_whose_run_folder_config_says_otherwise_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["mine"], run)
    assert runner.invoke(heads_app, ["eval", "--run", str(run), "--device", "cpu"]).exit_code == 0
    (run / "last.safetensors").unlink()   # then only config.toml speaks for the run
    config = run / "config.toml"
    config.write_text(config.read_text().replace("seed = 0", "seed = 7"))
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--device", "cpu"])
    assert res.exit_code == 2 and "option 'seed' is 0, in config.toml 7" in " ".join(res.output.split())


# ---------------------------------------------------------------------- 3. non-finite options, collapsed runs

def test_non_finite_options_are_refused_by_name(runs, tmp_path):
    cache, manifest = runs["data"]
    base = ["train", "--cache", str(cache), "--dataset", str(manifest), "--model", "linear", "--device", "cpu",
            "--quiet"]
    res = runner.invoke(heads_app, [*base, "--out", str(tmp_path / "lr"), "--lr", "inf"])
    assert res.exit_code == 2 and "--lr is inf" in res.output, res.output
    config = tmp_path / "wd.toml"
    config.write_text("[train]\nweight_decay = inf\n")
    res = runner.invoke(heads_app, [*base, "--out", str(tmp_path / "wd"), "--config", str(config)])
    assert res.exit_code == 2 and "--weight-decay is inf" in res.output, res.output
    assert not (tmp_path / "lr").exists() and not (tmp_path / "wd").exists()
    with pytest.raises(ValueError, match="--dropout is -inf"):
        HeadConfig(dropout=float("-inf"))


def _t4v(runs, out, **kw):
    cache, manifest = runs["data"]
    return TrainConfig(cache=str(cache), dataset=str(manifest), out=str(out), batch_size=16, device="cpu",
                       quiet=True, data_mode="memory", **{"epochs": 2, **kw})


def test_a_huge_learning_rate_stops_naming_the_epoch_and_metrics_stay_strict_json(runs, tmp_path):
    cache, manifest = runs["data"]
    res = runner.invoke(heads_app, ["train", "--cache", str(cache), "--dataset", str(manifest), "--model",
                                    "text4vis", "--frames", "8", "--layers", "0", "--batch-size", "16", "--epochs",
                                    "2", "--lr", "1e30", "--out", str(tmp_path / "run"), "--device", "cpu",
                                    "--quiet"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "training collapsed in epoch 1" in out and "not JSON compliant" not in out, out
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "last.safetensors").exists()
    assert [r["epoch"] for r in _strict(tmp_path / "run" / "metrics.jsonl")] == [1]


@pytest.mark.slow
def test_every_step_skipped_is_a_collapse_and_some_skipped_is_said_loudly(runs, tmp_path, monkeypatch, capsys):
    real, calls = train_module.loss_fn, {"n": 0}

    def nan_loss(every):
        def loss(*a, **k):
            calls["n"] += 1
            value = real(*a, **k)
            return value * float("nan") if calls["n"] % every == 0 else value
        return loss

    monkeypatch.setattr(train_module, "loss_fn", nan_loss(1))
    with pytest.raises(TrainingError, match="training collapsed in epoch 1: all 4 steps had a non-finite loss"):
        train(_t4v(runs, tmp_path / "all"), HeadConfig(model="text4vis", frames=8, layers=0))
    calls["n"] = 0
    monkeypatch.setattr(train_module, "loss_fn", nan_loss(2))
    summary = train(_t4v(runs, tmp_path / "some"), HeadConfig(model="text4vis", frames=8, layers=0))
    assert summary["skipped_steps"] == 4   # 8 steps in two epochs (60 videos, 16 a step), every second one NaN
    assert "warning: 4 training step(s) were skipped" in " ".join(capsys.readouterr().err.split())
    assert _strict(tmp_path / "some" / "summary.json")[0]["skipped_steps"] == 4
    assert sum(r["skipped_steps"] for r in _strict(tmp_path / "some" / "metrics.jsonl")) == 4


# -------------------------------------------------------------------------------------------- 4. the rest

def test_a_full_disk_names_the_file_in_train_confounders_and_import(runs, tmp_path, monkeypatch):
    """/dev/full answers every write with ENOSPC: a real full disk, for one file."""
    def full_at_epoch_1(epoch, record):
        if epoch == 1:
            (tmp_path / "run" / "last.safetensors.tmp").symlink_to("/dev/full")

    with pytest.raises(OSError, match=r"disk full while writing; nothing was replaced: .*last\.safetensors'"):
        train(_t4v(runs, tmp_path / "run"), HeadConfig(model="text4vis", frames=8, layers=0), full_at_epoch_1)
    assert not (tmp_path / "run" / "last.safetensors.tmp").exists()
    folder = RunFolder(tmp_path / "metrics")
    folder.path.mkdir()
    (folder.path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError, match=r"metrics\.jsonl"):
        folder.append_metrics({"epoch": 1})

    cache, manifest = runs["data"]
    (tmp_path / "conf.h5.tmp").symlink_to("/dev/full")
    res = runner.invoke(heads_app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                                    "--kp", "4", "--kz", "4", "--out", str(tmp_path / "conf.h5")])
    assert res.exit_code == 2 and "conf.h5: disk full while writing" in " ".join(res.output.split()), res.output

    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f["a"] = np.ones((3, D), np.float32)
    class FullDisk:   # the os module of cmdcl_cache.cache.runlog, whose writes meet a full disk
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def write(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(failures, "os", FullDisk())   # not /dev/full: import reads import_sources.jsonl back
    res = runner.invoke(cache_app, ["import", "--dataset", str(write_manifest(tmp_path / "man", {"a": "a.mp4"})),
                                    "--from", str(src), "--format", "hdf5", "--cache", str(tmp_path / "cache"),
                                    "--model", "m", "--fps", "1", "--quiet"])
    assert res.exit_code == 2 and "import_sources.jsonl" in res.output and "No space left" in res.output, res.output


@pytest.mark.slow
def test_resume_names_every_changed_option_at_once(runs, tmp_path):
    cache, manifest = runs["data"]
    base = ["train", "--cache", str(cache), "--dataset", str(manifest), "--out", str(tmp_path / "run"), "--model",
            "text4vis", "--frames", "8", "--layers", "0", "--batch-size", "16", "--device", "cpu", "--quiet"]
    assert runner.invoke(heads_app, [*base, "--epochs", "1"]).exit_code == 0
    res = runner.invoke(heads_app, [*base, "--epochs", "2", "--resume", "--dropout", "0.3", "--heads", "4",
                                    "--lr", "0.5"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, out
    for named in ("head option 'dropout' is 0.1", "head option 'heads' is 8", "option 'lr' is 0.001",
                  "option 'epochs'"):
        assert named in out, (named, out)


def _with_one_class_set(root: Path) -> tuple[Path, Path]:
    """The synthetic data with a single-label set `one` of one class, and no training video of class t5."""
    cache, manifest = make_synthetic(root)
    labels = json.loads((manifest / "labels.json").read_text())
    labels["label_sets"]["one"] = {"multi_label": False, "labels": [{"key": "only", "name": "the only thing"}]}
    (manifest / "labels.json").write_text(json.dumps(labels))
    records = [json.loads(line) for line in (manifest / "videos.jsonl").read_text().splitlines()]
    for r in records:
        r["labels"]["one"] = "only"
        if r["split"] == "train" and r["labels"]["task"] == "t5":
            r["labels"]["task"] = "t4"
    (manifest / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = read_texts(cache / "texts.h5")
    per_prompt = texts["task"].per_prompt[:1]
    texts["one"] = TextEmbeddings(names=["the only thing"], texts=["the only thing"],
                                  templates=texts["task"].templates, per_prompt=per_prompt,
                                  ensemble=TextEmbeddings.ensemble_of(per_prompt))
    write_texts(cache / "texts.h5", texts, texts_provenance(cache / "texts.h5"))
    return cache, manifest


def test_one_class_sets_are_refused_and_classes_without_training_videos_named(tmp_path):
    cache, manifest = _with_one_class_set(tmp_path / "data")
    config = TrainConfig(cache=str(cache), dataset=str(manifest), out=str(tmp_path / "one"), epochs=1,
                         batch_size=16, device="cpu", quiet=True, label_set="one")
    with pytest.raises(TrainingError, match="label set 'one' of .*labels.json has 1 class \\(the only thing\\)"):
        train(config, HeadConfig(model="linear", frames=8))
    assert not (tmp_path / "one").exists()
    with pytest.warns(UserWarning, match="1 of 6 classes of label set 'task' .* no video in split 'train': task "
                                         "number 5"):
        train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(tmp_path / "task"), epochs=1,
                          batch_size=16, device="cpu", quiet=True), HeadConfig(model="linear", frames=8))
    with warnings.catch_warnings():   # a set whose classes all have training videos says nothing of them
        warnings.filterwarnings("error", message=".*no video in split")
        train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(tmp_path / "steps"), epochs=1,
                          batch_size=16, device="cpu", quiet=True, label_set="steps"),
              HeadConfig(model="linear", frames=8))


def test_folder_manifests_refuse_fifos_devices_and_links_outside_the_videos(tmp_path):
    videos = tmp_path / "videos"
    for rel in ("cat/a.mp4", "cat/b.mp4", "dog/a.mp4", "dog/b.mp4"):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"")
    os.mkfifo(videos / "cat" / "pipe.mp4")
    (videos / "dog" / "passwd.mp4").symlink_to("/etc/passwd")
    (videos / "dog" / "zero.mp4").symlink_to("/dev/zero")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.mp4").write_bytes(b"")
    (videos / "bird").symlink_to(elsewhere)
    (videos / "dog" / "other-disk.mp4").symlink_to(elsewhere / "x.mp4")   # a video on another disk: fine
    (videos / "cat" / "inside.mp4").symlink_to(videos / "cat" / "a.mp4")   # a second name in its class: skipped
    res = runner.invoke(cache_app, ["manifest", "build", "--dataset", "folder", "--videos", str(videos), "--out",
                                    str(tmp_path / "out")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, out
    assert "pipe.mp4" in out and "not a regular file" in out
    assert "passwd.mp4" in out and "a link to /etc/passwd, outside --videos" in out
    assert "zero.mp4:0: field 'path': not a regular file" in out and f"a link to {elsewhere}, outside --videos" in out
    assert not (tmp_path / "out" / "videos.jsonl").exists() and "other-disk.mp4" not in out
    assert "inside.mp4" not in out
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\ncat/a.mp4,cat\ndog/passwd.mp4,dog\ncat/pipe.mp4,cat\ndog/other-disk.mp4,dog\n")
    res = runner.invoke(cache_app, ["manifest", "build", "--dataset", "folder", "--videos", str(videos),
                                    "--from-csv", str(csv), "--out", str(tmp_path / "out2")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "a link to /etc/passwd, outside --videos" in out and "not a regular file" in out, out
    assert "not to a video file" in out and "other-disk" not in out


# ------------------------------------------------------------------ 5. the second attack (only given files)

def _import(tmp_path, src, fmt, ids=("a", "b")):
    manifest = write_manifest(tmp_path / "manifest", {v: f"{v}.mp4" for v in ids})
    res = runner.invoke(cache_app, ["import", "--dataset", str(manifest), "--from", str(src), "--format", fmt,
                                    "--cache", str(tmp_path / "cache"), "--model", "m", "--fps", "1", "--quiet"])
    return res, " ".join(res.output.split())


def _npy_folder(tmp_path, files: dict) -> Path:
    """An export-npy-like folder: a.npy, b.npy and an index.jsonl whose `files` entries are `files`."""
    src = tmp_path / "src"
    src.mkdir()
    for vid in ("a", "b"):
        np.save(src / f"{vid}.npy", np.ones((3, D), np.float32))
    lines = [{"video_id": "a", "files": {"features": "a.npy"}}, {"video_id": "b", "files": files}]
    (src / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return src


@pytest.mark.parametrize("rel", ["ABS", "../secret.npy", "sub/../../secret.npy"])
def test_an_index_entry_outside_from_is_refused_and_nothing_leaks(tmp_path, rel):
    np.save(tmp_path / "secret.npy", SECRET)
    rel = str(tmp_path / "secret.npy") if rel == "ABS" else rel
    res, out = _import(tmp_path, _npy_folder(tmp_path, {"features": rel}), "npy")
    assert res.exit_code == 2 and "index.jsonl:2: field 'files.features'" in out and "leaves --from" in out, out
    assert repr(rel) in out
    assert not (tmp_path / "cache").exists() or not any(
        SECRET.astype("<f2").tobytes()[:64] in p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_an_index_entry_linking_to_a_regular_npy_elsewhere_is_imported(tmp_path):
    np.save(tmp_path / "elsewhere.npy", np.ones((3, D), np.float32))
    src = _npy_folder(tmp_path, {"features": "link.npy"})
    (src / "b.npy").unlink()
    (src / "link.npy").symlink_to(tmp_path / "elsewhere.npy")
    res, out = _import(tmp_path, src, "npy")
    assert res.exit_code == 0, out


@pytest.mark.parametrize("files", ["abc", ["a"], {"features": 5}, {"features": "."}])
def test_a_malformed_index_files_field_is_named(tmp_path, files):
    res, out = _import(tmp_path, _npy_folder(tmp_path, files), "npy")
    assert res.exit_code == 2 and "index.jsonl:2: field 'files" in out and "Traceback" not in out, out


@pytest.mark.parametrize("how", ["fifo", "zero-index", "zero-walk", "zero-safetensors"])
def test_a_fifo_or_device_source_is_refused_before_it_is_opened(tmp_path, how):
    if how == "zero-safetensors":
        src, fmt = tmp_path / "src", "safetensors"
        src.mkdir()
        (src / "b.safetensors").symlink_to("/dev/zero")
    elif how == "zero-walk":
        src, fmt = tmp_path / "src", "npy"
        src.mkdir()
        (src / "b.npy").symlink_to("/dev/zero")
    else:
        src, fmt = _npy_folder(tmp_path, {"features": "b.npy"}), "npy"
        (src / "b.npy").unlink()
        os.mkfifo(src / "b.npy") if how == "fifo" else (src / "b.npy").symlink_to("/dev/zero")
    res, out = _import(tmp_path, src, fmt)
    assert res.exit_code == 2 and f"b.{fmt}: not a regular file" in out, out


def test_line_files_of_the_cache_folder_that_are_devices_are_refused_before_reading(tmp_path):
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f["a"] = np.ones((3, D), np.float32)
    manifest = write_manifest(tmp_path / "manifest", {"a": "a.mp4"})
    args = ["import", "--dataset", str(manifest), "--from", str(src), "--format", "hdf5", "--cache",
            str(tmp_path / "cache"), "--model", "m", "--fps", "1", "--quiet"]
    assert runner.invoke(cache_app, args).exit_code == 0
    [sources] = (tmp_path / "cache").rglob("import_sources.jsonl")
    sources.unlink()
    sources.symlink_to("/dev/zero")   # read whole, it would fill the memory
    res = runner.invoke(cache_app, args)
    assert res.exit_code == 2 and "import_sources.jsonl: not a regular file" in " ".join(res.output.split())
    with pytest.raises(ValueError, match="failures.jsonl: not a regular file"):
        (tmp_path / "f").mkdir()
        (tmp_path / "f" / "failures.jsonl").symlink_to("/dev/zero")
        failures.read_failures(tmp_path / "f")


@pytest.mark.parametrize("shape,kw,named", [((10**12, 8), {"chunks": (1, 8)}, "dimension 8"),
                                            ((2**20, D), {"chunks": (4096, D), "compression": "gzip"}, "limit of"),
                                            ((2**20, 512), {"chunks": (4096, 512), "compression": "gzip"},
                                             "dimension 512")])
def test_a_huge_or_bomb_hdf5_shape_is_refused_from_its_header(tmp_path, monkeypatch, shape, kw, named):
    from cmdcl_cache.ingest import sources as importer
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:   # nothing written: the file stays small, a read would not
        f["a"] = np.ones((3, D), np.float32)
        f["c"] = np.ones((3, D), np.float32)
        f.create_dataset("b", shape=shape, dtype="f4", **kw)
    real = importer.H5Source.read

    def guarded(self, sv):
        assert sv.video_id != "b", "the hostile dataset was read"
        return real(self, sv)
    monkeypatch.setattr(importer.H5Source, "read", guarded)
    res, out = _import(tmp_path, src, "hdf5", ids=("a", "b", "c"))
    assert "Traceback" not in out and res.exit_code != 0, out
    [record] = [r for r in failures.read_lines(next((tmp_path / "cache").rglob("failures.jsonl")))]
    assert record["video_id"] == "b" and f"shape {shape}" in record["error"] and named in record["error"], record


def _class_videos(tmp_path) -> Path:
    videos = tmp_path / "V"
    for rel in ("cls1/a.mp4", "cls1/other/c.mp4", "cls2/b.mp4", "cls2/d.mp4"):
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(rel.encode())
    return videos


def _build(videos, out, *extra):
    res = runner.invoke(cache_app, ["manifest", "build", "--dataset", "folder", "--videos", str(videos), "--out",
                                    str(out), *extra])
    return res, " ".join(res.output.split())


@pytest.mark.parametrize("chain", [False, True])
def test_one_file_under_two_classes_is_an_error_and_twice_in_one_class_one_record(tmp_path, chain):
    videos = _class_videos(tmp_path)
    if chain:   # cls1/dup.mp4 -> hop.lnk -> cls2/b.mp4
        (videos / "hop.lnk").symlink_to("cls2/b.mp4")
        (videos / "cls1" / "dup.mp4").symlink_to("../hop.lnk")
    else:
        (videos / "cls1" / "dup.mp4").symlink_to("../cls2/b.mp4")
    res, out = _build(videos, tmp_path / "out")
    assert res.exit_code == 2 and "cls1/dup.mp4 is the same file as cls2/b.mp4" in out, out
    assert not (tmp_path / "out" / "videos.jsonl").exists()
    (videos / "cls1" / "dup.mp4").unlink()
    (videos / "cls2" / "again.mp4").symlink_to("b.mp4")   # one class: one record, under its first name
    res, out = _build(videos, tmp_path / "out")
    assert res.exit_code == 0, out
    paths = [json.loads(line)["path"] for line in (tmp_path / "out" / "videos.jsonl").read_text().splitlines()]
    assert sorted(paths) == ["cls1/a.mp4", "cls1/other/c.mp4", "cls2/again.mp4", "cls2/d.mp4"]


def test_a_symlink_loop_and_a_class_folder_linking_into_another_class_are_named(tmp_path):
    videos = _class_videos(tmp_path)
    (videos / "cls1" / "loop1.mp4").symlink_to("loop2.mp4")
    (videos / "cls1" / "loop2.mp4").symlink_to("loop1.mp4")
    shutil.rmtree(videos / "cls2")
    (videos / "cls2").symlink_to("cls1/other")
    (videos / "cls3").mkdir()
    (videos / "cls3" / "e.mp4").write_bytes(b"e")
    res, out = _build(videos, tmp_path / "out")
    assert res.exit_code == 2 and "Traceback" not in out, out
    assert "loop1.mp4:0: field 'path': a symlink loop" in out and "loop2.mp4:0: field 'path': a symlink loop" in out
    assert "class folder 'cls2' is the same folder as cls1/other" in out and "holds no video" not in out, out


def test_a_csv_row_naming_a_folder_is_not_a_video(tmp_path):
    videos = _class_videos(tmp_path)
    (videos / "cls1" / "dir.mp4").mkdir()
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\ncls1/a.mp4,cls1\ncls1/dir.mp4,cls1\ncls2/b.mp4,cls2\n")
    res, out = _build(videos, tmp_path / "out", "--from-csv", str(csv))
    assert res.exit_code == 2 and "list.csv:3: field 'path': 'cls1/dir.mp4': not a regular file (a folder)" in out, out


def _eval_and_predict(run, tmp_path):
    for args in (["eval", "--run", str(run), "--device", "cpu"],
                 ["predict", "--run", str(run), "--out", str(tmp_path / "p.jsonl"), "--device", "cpu"]):
        res = runner.invoke(heads_app, args)
        yield res.exit_code, " ".join(res.output.split())


@pytest.mark.parametrize("other,named", [({"task_names": [f"another task {c}" for c in range(6)]},
                                          "(not this run's checkpoint: attribute 'label_names') and label set 'task'"),
                                         ({"provenance": {"model": "ViT-L-14"}}, "attribute 'model' is")])
def test_both_checkpoints_of_a_run_on_other_data_are_refused(runs, tmp_path, other, named):
    cache, manifest = make_synthetic(tmp_path / "other", **other)
    theirs = tmp_path / "theirs"
    train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(theirs), epochs=1, batch_size=16,
                      device="cpu", quiet=True, data_mode="memory"), HeadConfig(model="linear", frames=8))
    run = tmp_path / "run"
    shutil.copytree(runs["mine"], run)
    for name in ("best", "last"):
        shutil.copy(theirs / f"{name}.safetensors", run / f"{name}.safetensors")
    for code, out in _eval_and_predict(run, tmp_path):
        assert code == 2 and "not this run's checkpoint" in out and named in out and "config.toml" in out, out
    assert not (tmp_path / "p.jsonl").exists()


def test_a_moved_cache_still_evaluates_and_config_toml_must_be_a_regular_file(tmp_path):
    cache, manifest = make_synthetic(tmp_path / "data")
    run = tmp_path / "run"
    train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(run), epochs=1, batch_size=16,
                      device="cpu", quiet=True, data_mode="memory"), HeadConfig(model="linear", frames=8))
    cache.rename(tmp_path / "moved")
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--cache", str(tmp_path / "moved"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    config = run / "config.toml"
    config.rename(tmp_path / "config.toml")
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--device", "cpu"])
    assert res.exit_code == 2 and "config.toml: missing" in " ".join(res.output.split()), res.output
    config.symlink_to("/dev/zero")
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--device", "cpu"])
    assert res.exit_code == 2 and "config.toml: not a regular file" in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("key", ["label_set", "label_names", "cache_provenance"])
def test_a_checkpoint_lacking_a_metadata_key_names_the_file_and_the_key(runs, tmp_path, key):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    run = tmp_path / "run"
    shutil.copytree(runs["mine"], run)
    path = run / "best.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    meta = json.loads(header["cmdcl"])
    del meta[key]
    save_file(load_file(str(path)), str(path), metadata={"cmdcl": json.dumps(meta)})
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--device", "cpu"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "best.safetensors: its metadata lacks" in out and repr(key) in out, out
