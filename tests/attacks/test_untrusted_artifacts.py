"""Trustworthy artifacts (issue 11), attacked as a hostile or careless user would: checkpoints and weights from
a stranger, two extracts on one cache, ids the old format truncated, NaN in evaluated splits, truncated and
bit-flipped shards, changed sources, a full disk, a finished cache on a read-only disk."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _extract_util import PY, REPO, TINY, extract_args, good_videos, write_manifest, write_video
from _heads_synth import make_synthetic
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.cli import app as cache_app
from cmdcl_cache.extract.pipeline import ExtractConfig, extract
from cmdcl_cache.errors import CacheError
from cmdcl_cache.cache.writer import ShardWriter
from cmdcl_cache.cache.format import read_texts
from cmdcl_cache.ingest.synthetic import write_synthetic_cache
from cmdcl_cache.cache.verify import verify
from cmdcl_heads.cli import app as heads_app
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.train import train

runner = CliRunner()


class _Evil:
    """Unpickling this calls open(path, "w"): a file appears if anything unpickles it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _config(manifest, root, cache, **kw):
    return ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(cache), fps=1, min_frames=2,
                         max_frames=6, batch_size=4, workers=2, quiet=True, **TINY, **kw)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small trained linear run on the synthetic cache of the heads tests."""
    root = tmp_path_factory.mktemp("trust_run")
    cache, manifest = make_synthetic(root / "data")
    run = root / "run"
    train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(run), epochs=1, batch_size=16,
                      device="cpu", quiet=True, data_mode="memory"), HeadConfig(model="linear", frames=8))
    return run, cache, manifest


# ---------------------------------------------------------------------------------------- 1. no code from files

@pytest.mark.parametrize("command", ["eval", "predict", "explain", "resume"])
def test_a_pickled_checkpoint_is_refused_and_runs_nothing(run_dir, tmp_path, command):
    run, cache, manifest = run_dir
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    marker = tmp_path / "pwned"
    for name in ("best", "last"):   # what a stranger's cmdcl 0.1 run folder holds: pickles
        torch.save({"version": 1, "model": {}, "payload": _Evil(marker)}, stranger / f"{name}.pt")
    args = {"eval": ["eval", "--run", str(stranger), "--device", "cpu"],
            "predict": ["predict", "--run", str(stranger), "--out", str(tmp_path / "p.jsonl"), "--device", "cpu"],
            "explain": ["explain", "--run", str(stranger), "--video", "x", "--device", "cpu"],
            "resume": ["train", "--cache", str(cache), "--dataset", str(manifest), "--out", str(stranger),
                       "--model", "linear", "--resume", "--device", "cpu", "--quiet"]}[command]
    res = runner.invoke(heads_app, args)
    assert res.exit_code == 2, res.output
    assert "never unpickles" in res.output and str(stranger) in res.output
    assert not marker.exists()


def test_a_pickle_renamed_to_safetensors_is_refused(run_dir, tmp_path):
    run, _, _ = run_dir
    fake = tmp_path / "fake"
    shutil.copytree(run, fake)
    marker = tmp_path / "pwned"
    torch.save({"payload": _Evil(marker)}, fake / "best.safetensors")
    res = runner.invoke(heads_app, ["eval", "--run", str(fake), "--device", "cpu"])
    assert res.exit_code == 2 and "not a cmdcl checkpoint" in res.output and "best.safetensors" in res.output
    assert not marker.exists()


def test_no_pickle_on_any_load_path_in_the_code():
    """No unpickling call anywhere in the two packages: not torch.load, pickle, np.load with pickles."""
    import re
    bad = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|(?<![.\w])eval\(")
    hits = [f"{p}:{i}" for pkg in ("cmdcl_cache", "cmdcl_heads") for p in (REPO / pkg).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_pretrained_file_that_fails_to_load_is_exit_2_and_leaves_no_folder(tmp_path):
    root = tmp_path / "videos"
    manifest = write_manifest(tmp_path / "manifest", good_videos(root, 1, frames=8))
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": _Evil(marker)}, weights)
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    for path in (weights, tmp_path / "garbage.pt"):
        args = [str(path) if a == "none" else a for a in extract_args(manifest, root, tmp_path / "cache")]
        res = runner.invoke(cache_app, args)
        assert res.exit_code == 2, res.output
        assert "cannot be loaded" in res.output and path.name in res.output
        assert not (tmp_path / "cache").exists()
    assert not marker.exists()


# ------------------------------------------------------------------------------------- 2. one writer per shard

def _start(args, decoder=None, gate=None):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    if decoder:
        env["CMDCL_DECODER"] = f"_extract_util:{decoder}"
    if gate:
        env["CMDCL_GATE"] = str(gate)
    return subprocess.Popen([PY, "-m", "cmdcl_cache.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(condition, timeout=120):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition never held")


@pytest.mark.slow
def test_a_second_extract_on_the_same_shard_exits_2_and_the_first_is_unharmed(tmp_path):
    root = tmp_path / "videos"
    vids = good_videos(root, 4, frames=30)
    manifest = write_manifest(tmp_path / "manifest", vids)
    ref = extract(_config(manifest, root, tmp_path / "ref", decoder="decord"))   # as the gated seam decodes
    cache = tmp_path / "cache"
    folder = cache / "tiny" / "cmdcl-tiny-none"
    journal = folder / "frames-00000-of-00001.journal"
    gate = tmp_path / "gate"   # the first run holds its lock and waits at its first frame until the gate opens
    first = _start(extract_args(manifest, root, cache), decoder="gated_decord", gate=gate)
    try:
        _wait_for(lambda: (journal / "provenance.json").exists())
        second = _start(extract_args(manifest, root, cache))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert f"another extract (pid {first.pid}) holds" in err and "frames-00000-of-00001.h5.lock" in err
        gate.touch()
        _, err = first.communicate(timeout=180)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert _sha(folder / "frames-00000-of-00001.h5") == _sha(ref.shard)
    assert verify(folder, str(manifest)).problems == []


@pytest.mark.slow
def test_the_lock_of_a_killed_extract_does_not_block_its_resume(tmp_path):
    root = tmp_path / "videos"
    manifest = write_manifest(tmp_path / "manifest", good_videos(root, 3, frames=30))
    cache = tmp_path / "cache"
    folder = cache / "tiny" / "cmdcl-tiny-none"
    proc = _start(extract_args(manifest, root, cache), decoder="slow_decord")
    _wait_for(lambda: (folder / "frames-00000-of-00001.journal" / "commits.jsonl").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (folder / "frames-00000-of-00001.h5.lock").exists()   # left behind, but no process holds it
    assert extract(_config(manifest, root, cache)).exit_code == 0
    assert verify(folder, str(manifest)).problems == []


def test_two_writers_in_one_process_are_refused_too(tmp_path):
    path = tmp_path / "frames-00000-of-00001.h5"
    prov = {"dataset": "t", "model": "m", "shard_index": 0, "shard_count": 1}
    with ShardWriter(path, prov, 4):
        with pytest.raises(CacheError, match=rf"another extract \(pid {os.getpid()}\) holds .*\.lock"):
            ShardWriter(path, prov, 4)
    with ShardWriter(path, prov, 4) as w:   # released when the first one closed
        w.append_video("a", np.ones((2, 4)), [0, 1], [0.0, 1.0], 1.0, 2, 2.0)
        w.finalize()


# ------------------------------------------------------------------------------------------ 3. ids of any length

def test_long_and_non_ascii_ids_round_trip_without_truncation(tmp_path):
    prefix = "x" * 128
    ids = [prefix + "-a", prefix + "-b", "视频" * 25 + "-ü", "a b", "ε"]   # 128-byte shared prefix; 152-byte CJK id
    assert len(ids[2].encode()) > 128
    rng = np.random.default_rng(0)
    feats = {vid: rng.standard_normal((3 + i, 8)).astype(np.float16) for i, vid in enumerate(ids)}
    folder = write_synthetic_cache(tmp_path / "cache", feats, num_shards=2)
    cache = Cache(folder)
    assert cache.video_ids == sorted(ids)
    for vid, x in feats.items():
        np.testing.assert_array_equal(cache.features(vid), x)
    res = runner.invoke(cache_app, ["inspect", "--cache", str(folder), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["videos"] == len(ids)


# --------------------------------------------------------------------------------- 4. NaN in an evaluated split

def test_eval_and_predict_refuse_nan_in_the_evaluated_split(run_dir, tmp_path):
    run, cache, manifest = run_dir
    c = Cache(cache)
    feats = {v: np.asarray(c.features(v)) for v in c.video_ids}
    feats["test_2_001"][1, 3] = np.inf
    bad = write_synthetic_cache(tmp_path / "bad", feats, read_texts(cache / "texts.h5"), num_shards=2)
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--cache", str(bad), "--device", "cpu"])
    assert res.exit_code == 2 and "video 'test_2_001' has NaN/Inf" in res.output
    out = tmp_path / "preds.jsonl"
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--cache", str(bad), "--out", str(out),
                                    "--device", "cpu"])
    assert res.exit_code == 2 and "test_2_001" in res.output and not out.exists()
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0
    for line in out.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# ---------------------------------------------------------------------------- 5. truncated and damaged files

@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    t = tmp_path_factory.mktemp("trust_cache")
    root = t / "videos"
    manifest = write_manifest(t / "manifest", good_videos(root, 3, frames=12))
    result = extract(_config(manifest, root, t / "cache"))
    assert result.exit_code == 0
    return t, root, manifest, result.cache_dir


def test_a_truncated_shard_is_a_named_problem_with_its_recovery(small_cache, tmp_path):
    t, root, manifest, folder = small_cache
    broken = tmp_path / "cache" / "tiny" / "cmdcl-tiny-none"
    shutil.copytree(folder, broken)
    shard = broken / "frames-00000-of-00001.h5"
    shard.write_bytes(shard.read_bytes()[:3000])
    for args in (["verify", "--cache", str(broken), "--dataset", str(manifest)], ["inspect", "--cache", str(broken)]):
        res = runner.invoke(cache_app, args)
        command = args[0]
        assert res.exit_code == 1, res.output
        assert str(shard) in res.output and "move it aside" in res.output, command
        assert res.exception is None or isinstance(res.exception, SystemExit)
    res = runner.invoke(cache_app, extract_args(manifest, root, tmp_path / "cache"))
    assert res.exit_code == 2 and str(shard) in res.output and "move it aside" in res.output


def test_a_journal_shorter_than_its_commits_drops_those_commits(tmp_path):
    path = tmp_path / "frames-00000-of-00001.h5"
    prov = {"dataset": "t", "model": "m", "shard_index": 0, "shard_count": 1}
    rng = np.random.default_rng(0)
    x = {v: rng.standard_normal((4, 8)).astype(np.float16) for v in ("a", "b", "c")}
    with ShardWriter(path, prov, 8) as w:
        for vid in x:
            w.append_video(vid, x[vid], np.arange(4), np.arange(4.0), 1.0, 4, 4.0)
    data = path.with_suffix(".journal") / "features.f16"
    data.write_bytes(data.read_bytes()[:6 * 8 * 2])   # 6 rows of 12: "b" is cut, "c" is gone
    with ShardWriter(path, prov, 8) as w:
        assert w.committed_ids == {"a"}
        assert [vid for vid, _ in w.dropped] == ["b", "c"] and "past the end" in w.dropped[0][1]
        for vid in ("c", "b"):
            w.append_video(vid, x[vid], np.arange(4), np.arange(4.0), 1.0, 4, 4.0)
        w.finalize()
    cache = Cache(tmp_path)
    for vid in x:
        np.testing.assert_array_equal(cache.features(vid), x[vid])


def test_flipped_bits_in_a_shard_are_found_by_their_checksum(small_cache, tmp_path):
    _, _, manifest, folder = small_cache
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shard = copy / "frames-00000-of-00001.h5"
    with h5py.File(shard, "r") as f:
        offset = f["features"].id.get_offset()   # contiguous? chunked: take the first chunk's offset
        if offset is None:
            offset = f["features"].id.get_chunk_info(0).byte_offset
        vid = min(v.decode() for v in f["videos"]["video_id"])
    raw = bytearray(shard.read_bytes())
    raw[offset + 5] ^= 0x10                          # one bit of the first video's first row
    shard.write_bytes(bytes(raw))
    report = verify(copy, str(manifest))
    assert any("checksum" in p and repr(vid) in p for p in report.problems), report.problems
    assert verify(copy, str(manifest), quick=True).problems == []


def test_a_changed_source_is_reported_and_refreshed(small_cache, tmp_path):
    t, root, manifest, folder = small_cache
    videos, cache = tmp_path / "videos", tmp_path / "cache"
    shutil.copytree(root, videos)
    leaf = cache / "tiny" / "cmdcl-tiny-none"
    shutil.copytree(folder, leaf)
    assert verify(leaf, str(manifest), video_root=videos).problems == []
    before = Cache(leaf).features("good1").copy()
    write_video(videos / "good1.mp4", 20, seed=42)   # the user re-downloads one video
    report = verify(leaf, str(manifest), video_root=videos)
    assert report.changed == ["good1"] and any("--refresh-changed" in p for p in report.problems)
    r = extract(_config(manifest, videos, cache, refresh_changed=True))
    assert r.exit_code == 0 and r.todo == 1 and r.committed == 1
    assert verify(leaf, str(manifest), video_root=videos).problems == []
    after = Cache(leaf)
    assert after.video_ids == ["good0", "good1", "good2"]
    assert not np.array_equal(after.features("good1")[:1], before[:1])


# ------------------------------------------------------------------------------------------------ 9. messages

@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_the_commits(tmp_path, monkeypatch):
    root = tmp_path / "videos"
    manifest = write_manifest(tmp_path / "manifest", good_videos(root, 3, frames=12))
    from cmdcl_cache.cache import writer as store
    real = store.ShardWriter.append_video
    calls = {"n": 0}

    def full_after_one(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            self._files["features.f16"].write(b"\x00" * 10)   # a partial row, then the disk is full
            raise self._write_error(OSError(errno.ENOSPC, "No space left on device"), self.journal)
        return real(self, *a, **k)

    monkeypatch.setattr(store.ShardWriter, "append_video", full_after_one)
    res = runner.invoke(cache_app, extract_args(manifest, root, tmp_path / "cache"))
    assert res.exit_code == 2 and "disk full while writing" in res.output and ".journal" in res.output
    monkeypatch.undo()
    folder = tmp_path / "cache" / "tiny" / "cmdcl-tiny-none"
    commits = (folder / "frames-00000-of-00001.journal" / "commits.jsonl").read_text().splitlines()
    assert len(commits) == 1                          # the first video is kept
    r = extract(_config(manifest, root, tmp_path / "cache"))
    assert r.exit_code == 0 and r.todo == 2 and verify(folder, str(manifest)).problems == []


def test_a_finished_cache_with_nothing_to_do_writes_nothing(small_cache, monkeypatch):
    t, root, manifest, folder = small_cache
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}
    import builtins
    real_open, real_os_open = builtins.open, os.open

    def read_only(path, mode="r", *a, **k):   # a read-only file system, as far as the cache goes
        if str(folder) in str(path) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *a, **k)

    def read_only_os(path, flags, *a, **k):
        if str(folder) in str(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", read_only)
    monkeypatch.setattr(os, "open", read_only_os)
    res = runner.invoke(cache_app, extract_args(manifest, root, t / "cache"))
    monkeypatch.undo()
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")} == before


# ----------------------------------------------------------------------------------------- 10. GPU precision

def test_head_training_defaults_to_fp32_and_bf16_is_opt_in():
    import contextlib

    from cmdcl_heads.evaluate import autocast
    assert TrainConfig(cache="c", dataset="d", out="o").precision == "fp32"
    assert isinstance(autocast(torch.device("cuda"), "fp32"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), "bf16"), contextlib.nullcontext)   # the CPU runs fp32
    assert isinstance(autocast(torch.device("cuda"), "bf16"), torch.autocast)
    res = runner.invoke(heads_app, ["train", "--cache", "c", "--dataset", "d", "--out", "o", "--precision", "fp16"])
    assert res.exit_code == 2 and "fp16" in res.output


@pytest.mark.slow
def test_a_bad_model_name_or_unreachable_weights_exit_2_and_leave_no_folder(tmp_path):
    root = tmp_path / "videos"
    manifest = write_manifest(tmp_path / "manifest", good_videos(root, 1, frames=8))
    args = [a if a != "cmdcl-tiny" else "ViT-X-99" for a in extract_args(manifest, root, tmp_path / "cache")]
    res = runner.invoke(cache_app, args)
    assert res.exit_code == 2 and "'ViT-X-99': not an open_clip model config" in res.output
    offline = [a if a != "cmdcl-tiny" else "ViT-B-16" for a in extract_args(manifest, root, tmp_path / "cache")]
    offline[offline.index("none")] = "openai"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path)}
    t0 = time.monotonic()
    out = subprocess.run([PY, "-m", "cmdcl_cache.cli", *offline], env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not in the local cache and HF_HUB_OFFLINE is set" in out.stderr
    assert "--pretrained PATH" in out.stderr and out.stderr.count("\n") < 5   # one message, not forty warnings
    assert time.monotonic() - t0 < 60            # the hub client's retries alone take about a minute
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------ found by the attack session (issue 11)

def test_a_config_file_sets_options_only_never_seams_or_shapes(tmp_path):
    need_cache = 'dataset = "d"\nvideo_root = "v"\ncache = "c"\n'
    need_heads = 'dataset = "d"\nout = "o"\ncache = "c"\n'
    for program, text in ((cache_app, need_cache + 'decoder = "os:truncate"\n'),
                          (cache_app, need_cache + "decode_threads = 0\n"), (heads_app, need_heads + "dim = 1024\n")):
        config = tmp_path / "c.toml"
        config.write_text(text)
        res = runner.invoke(program, ["train" if program is heads_app else "extract", "--config", str(config)])
        assert res.exit_code == 2, res.output
        assert "is not one of" in res.output or "unknown key(s)" in res.output


def test_a_refused_second_extract_changes_nothing_texts_included(small_cache, tmp_path):
    t, root, manifest, folder = small_cache
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of {}.\n")
    before = _sha(folder / "texts.h5")
    from cmdcl_cache.cache.writer import ShardLock
    lock = ShardLock(folder / "frames-00000-of-00001.h5")   # another process is writing this shard
    try:
        args = extract_args(manifest, root, t / "cache", "--prompts", str(prompts))
        res = runner.invoke(cache_app, args)
    finally:
        lock.release()
    assert res.exit_code == 2 and "holds" in res.output
    assert _sha(folder / "texts.h5") == before


def test_other_settings_on_a_finished_cache_are_refused_not_nothing_to_do(small_cache):
    t, root, manifest, folder = small_cache
    args = [a if a != "--fps" else "--fps" for a in extract_args(manifest, root, t / "cache")]
    args[args.index("--fps") + 1] = "2"
    res = runner.invoke(cache_app, args)
    assert res.exit_code == 2 and "attribute 'sampling'" in res.output and "nothing to do" not in res.output


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_folder_alone(run_dir, tmp_path):
    run, cache, manifest = run_dir
    trained = tmp_path / "t4v"
    train(TrainConfig(cache=str(cache), dataset=str(manifest), out=str(trained), epochs=1, batch_size=16,
                      device="cpu", quiet=True), HeadConfig(model="text4vis", frames=8, layers=0))
    config = (trained / "config.toml").read_text()
    for flags, named in ((["--lr", "0.5"], "'lr'"), (["--dropout", "0.3"], "head option 'dropout'")):
        res = runner.invoke(heads_app, ["train", "--cache", str(cache), "--dataset", str(manifest), "--out",
                                        str(trained), "--model", "text4vis", "--frames", "8", "--layers", "0",
                                        "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--quiet",
                                        "--resume", *flags])
        assert res.exit_code == 2 and named in res.output, res.output
        assert (trained / "config.toml").read_text() == config


def _checkpoint_copy(run, tmp_path, name, edit):
    """A copy of the run whose best checkpoint's metadata or tensors were edited by `edit(meta, tensors)`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    copy = tmp_path / name
    shutil.copytree(run, copy)
    path = copy / "best.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["cmdcl"])
    tensors = load_file(str(path))
    edit(meta, tensors)
    save_file(tensors, str(path), metadata={"cmdcl": json.dumps(meta)})
    return copy


def test_checkpoints_from_a_stranger_are_checked_before_use(run_dir, tmp_path):
    run, _, _ = run_dir
    cases = {
        "nan": (lambda m, t: t["model.fc.weight"].fill_(float("nan")), "hold NaN/Inf"),
        "dtype": (lambda m, t: t.update({"model.fc.weight": t["model.fc.weight"].double()}), "torch.float64"),
        "rng": (lambda m, t: m.update(rng=5), "metadata is not what cmdcl writes"),
        "optimizer": (lambda m, t: m.update(optimizer={"state": [1, 2], "param_groups": []}),
                      "metadata is not what cmdcl writes"),
    }
    for name, (edit, message) in cases.items():
        copy = _checkpoint_copy(run, tmp_path, name, edit)
        res = runner.invoke(heads_app, ["eval", "--run", str(copy), "--device", "cpu"])
        assert res.exit_code == 2 and message in res.output and "best.safetensors" in res.output, (name, res.output)
    special = tmp_path / "devzero"
    shutil.copytree(run, special)
    (special / "best.safetensors").unlink()
    (special / "best.safetensors").symlink_to("/dev/zero")
    res = runner.invoke(heads_app, ["eval", "--run", str(special), "--device", "cpu"])
    assert res.exit_code == 2 and "not a regular file" in res.output


def test_damaged_confounders_and_texts_are_named_errors(tmp_path):
    import h5py

    from _cmdcl_synth import make_dataset
    from cmdcl_heads.confounders import FILE_NAME
    cache, manifest = make_dataset(tmp_path / "data", n_train=12, n_test=4, d=16, frames=8)
    assert runner.invoke(heads_app, ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest),
                                     "--kp", "4", "--kz", "4"]).exit_code == 0
    train_args = ["train", "--cache", str(cache), "--dataset", str(manifest), "--model", "cmdcl", "--frames", "4",
                  "--layers", "0", "--epochs", "1", "--device", "cpu", "--quiet"]
    good = (cache / FILE_NAME).read_bytes()
    for edit, message in ((lambda f: f["vp"].__setitem__((0, 0), np.nan), "vp holds NaN/Inf"),
                          (lambda f: f["z_prior"].__setitem__(0, -1.0), "z_prior is not a distribution"),
                          (lambda f: f.attrs.__setitem__("settings", "{not json"), "not a readable confounders")):
        (cache / FILE_NAME).write_bytes(good)
        with h5py.File(cache / FILE_NAME, "r+") as f:
            edit(f)
        res = runner.invoke(heads_app, [*train_args, "--out", str(tmp_path / "run")])
        assert res.exit_code == 2 and message in res.output and FILE_NAME in res.output, res.output
        assert not (tmp_path / "run").exists()
    with h5py.File(cache / "texts.h5", "r+") as f:
        del f["activity/names"]
        f["activity/names"] = np.arange(4)
    res = runner.invoke(cache_app, ["verify", "--cache", str(cache), "--dataset", str(manifest)])
    assert res.exit_code == 1 and "texts.h5" in res.output and "not a readable texts file" in res.output


def test_a_journal_edited_by_hand_is_recovered_or_named(tmp_path):
    path = tmp_path / "frames-00000-of-00001.h5"
    prov = {"dataset": "t", "model": "m", "shard_index": 0, "shard_count": 1}
    x = {v: np.full((3, 4), i, np.float16) for i, v in enumerate("abc")}
    with ShardWriter(path, prov, 4) as w:
        for vid, rows in x.items():
            w.append_video(vid, rows, np.arange(3), np.arange(3.0), 1.0, 3, 3.0)
    log = path.with_suffix(".journal") / "commits.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "{garbage", *lines[2:]]) + "\n")   # the second commit line destroyed
    with ShardWriter(path, prov, 4) as w:
        assert w.committed_ids == {"a"} and "not a commit line" in w.dropped[0][1]
        w.append_video("b", x["b"], np.arange(3), np.arange(3.0), 1.0, 3, 3.0)
        w.append_video("c", x["c"], np.arange(3), np.arange(3.0), 1.0, 3, 3.0)
        w.finalize()
    assert all(np.array_equal(Cache(tmp_path).features(v), x[v]) for v in x)
    with ShardWriter(tmp_path / "frames-00000-of-00002.h5", {**prov, "shard_count": 2}, 4) as w:
        pass
    (tmp_path / "frames-00000-of-00002.journal" / "provenance.json").write_text("{bad")
    with pytest.raises(CacheError, match=r"provenance.json: unreadable.*move the journal aside"):
        ShardWriter(tmp_path / "frames-00000-of-00002.h5", {**prov, "shard_count": 2}, 4)


@pytest.mark.slow
def test_a_disk_too_full_for_the_shard_stops_before_hdf5_writes(small_cache, tmp_path, monkeypatch):
    from collections import namedtuple
    t, root, manifest, _ = small_cache
    usage = namedtuple("usage", "total used free")
    from cmdcl_cache.cache import writer as store
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1024))
    res = runner.invoke(cache_app, extract_args(manifest, root, tmp_path / "cache"))
    assert res.exit_code == 2 and "disk full: the shard needs about" in res.output and "journal is kept" in res.output
    monkeypatch.undo()
    r = extract(_config(manifest, root, tmp_path / "cache"))
    assert r.exit_code == 0 and verify(r.cache_dir, str(manifest)).problems == []


def test_plain_mistakes_in_head_commands_are_messages(run_dir, tmp_path):
    run, cache, manifest = run_dir
    a_file = tmp_path / "a file"
    a_file.write_text("x")
    cases = [["train", "--cache", str(cache), "--dataset", str(manifest), "--model", "zeroshot", "--out", str(a_file),
              "--device", "cpu", "--quiet"],
             ["eval", "--run", str(run), "--device", "cpu", "--json", str(tmp_path / "no" / "such" / "m.json")],
             ["predict", "--run", str(run), "--top-k", "0", "--device", "cpu"]]
    for args in cases:
        res = runner.invoke(heads_app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, (args[0], res.output)


def test_inspect_and_the_video_index_survive_odd_folders(small_cache, tmp_path):
    t, root, manifest, folder = small_cache
    copy = tmp_path / "cache"
    shutil.copytree(folder, copy)
    with open(copy / "failures.jsonl", "a") as fh:
        fh.write(json.dumps({"video_id": "x"}) + "\n")   # a record without stage or error, edited by hand
    res = runner.invoke(cache_app, ["inspect", "--cache", str(copy)])
    assert res.exit_code == 0 and "x: ?" in res.output
    loops = tmp_path / "videos"
    shutil.copytree(root, loops)
    (loops / "a").symlink_to(".")
    (loops / "b").symlink_to(".")
    t0 = time.monotonic()
    res = runner.invoke(cache_app, ["manifest", "check", "--dataset", str(manifest), "--video-root", str(loops)])
    assert time.monotonic() - t0 < 30 and "found" in res.output
