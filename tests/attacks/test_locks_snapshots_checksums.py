"""Every writer locks what it writes, every reader keeps one snapshot, every byte of a video record is checked,
an interrupted run always finishes (issue 24). Real processes where the attack used them."""

import json
import os
import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from _extract_util import PY, REPO, TINY, good_videos, write_manifest
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.cli import app as cache_app
from cmdcl_cache.extract.pipeline import ExtractConfig, extract
from cmdcl_cache.cache.writer import ShardWriter
from cmdcl_cache.files import WriterLock, lock_path_of
from cmdcl_cache.cache.format import read_shard
from cmdcl_cache.cache.verify import verify
from cmdcl_heads.cli import app as heads_app

runner = CliRunner()
TIMING = ("epoch_seconds", "eval_seconds")


def _env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def _train_args(cache, manifest, out, *extra, epochs=6):
    return ["train", "--cache", str(cache), "--dataset", str(manifest), "--out", str(out), "--model", "text4vis",
            "--frames", "8", "--epochs", str(epochs), "--batch-size", "16", "--lr", "3e-3", "--warmup", "0.5",
            "--device", "cpu", "--quiet", "--eval-each-epoch", *extra]


def _start_train(args):
    return subprocess.Popen([PY, "-m", "cmdcl_heads.cli", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _run_train(args):
    """`cmdcl-heads train` in this process (the second process where one runs beside it)."""
    res = runner.invoke(heads_app, args)
    return res.exit_code, res.output


def _wait_for(condition, proc=None, timeout=180, every=0.002):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended first (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(every)
    raise AssertionError("condition never held")


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _lines(path):
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_epoch(path):
    """The epoch recorded in a safetensors checkpoint's metadata (read from its header, not its tensors)."""
    try:
        data = path.read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        return json.loads(header["__metadata__"]["cmdcl"])["epoch"]
    except (OSError, ValueError, KeyError):
        return None


# ----------------------------------------------------------------------- 1. readers keep one snapshot

def _finalize_again_with_one_more_video(shard):
    """What an extract does to a shard it adds a video to: journal, then a new file renamed over the old one.
    The new video sorts first, so every row of the others moves."""
    prov, table, dim, _ = read_shard(shard)
    with ShardWriter(shard, prov, dim, durable=False) as w:
        w.append_video("aaa_new", np.full((30, dim), 3.0, np.float16), np.arange(30), np.arange(30.0), 1.0, 30, 30.0)
        w.finalize()
    assert read_shard(shard)[1][1]["row_start"] != table[0]["row_start"]


@pytest.mark.slow
def test_a_lazy_train_keeps_its_snapshot_while_an_extract_finalizes_its_shard(synth, tmp_path):
    cache, manifest = synth
    args = ("--data-mode", "lazy", "--workers", "1")
    epochs = 4
    rc, out = _run_train(_train_args(cache, manifest, tmp_path / "ref", *args, epochs=epochs))
    assert rc == 0, out
    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    run = tmp_path / "run"
    proc = _start_train(_train_args(moved, manifest, run, *args, epochs=epochs))
    try:
        _wait_for(lambda: _lines(run / "metrics.jsonl") >= 1, proc)
        for shard in sorted(moved.glob("frames-*.h5")):   # both shards replaced while the run reads them
            _finalize_again_with_one_more_video(shard)
        assert _lines(run / "metrics.jsonl") < epochs, "the run ended before its shards were replaced"
        _, err = proc.communicate(timeout=300)
    finally:
        _kill(proc)
    # keeping the snapshot, the run sees nothing of the new files: the very metrics of the undisturbed run
    assert proc.returncode == 0, err
    assert _records(run) == _records(tmp_path / "ref")
    summary = lambda p: json.loads((p / "summary.json").read_text())["metrics"]   # noqa: E731
    assert summary(run) == summary(tmp_path / "ref")


def test_a_forked_reader_reads_the_rows_it_indexed_after_the_shard_was_replaced(tmp_path):
    feats = {f"v{i}": np.full((3, 4), i, np.float16) for i in range(1, 4)}
    from cmdcl_cache.ingest.synthetic import write_synthetic_cache
    folder = write_synthetic_cache(tmp_path / "c", feats)
    cache = Cache(folder)
    _finalize_again_with_one_more_video(cache.shard_paths[0])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # a DataLoader worker: a fork that opens the shard for the first time
        os.close(read)
        ok = all((cache.features(v) == feats[v]).all() for v in feats)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert all((cache.features(v) == feats[v]).all() for v in feats)
    assert "aaa_new" not in cache and "aaa_new" in Cache(folder)   # a new reader sees the new file


# ------------------------------------------------------------------------------- 2. writers lock

@pytest.mark.slow
def test_a_second_train_on_the_same_run_folder_exits_2_naming_the_first(synth, tmp_path):
    cache, manifest = synth
    run = tmp_path / "run"
    first = _start_train(_train_args(cache, manifest, run, "--data-mode", "lazy", "--workers", "1", epochs=4))
    try:
        _wait_for(lambda: (run / "config.toml").exists(), first)
        rc, out = _run_train(_train_args(cache, manifest, run, "--data-mode", "memory", epochs=3))
        assert rc == 2, out
        assert f"another train (pid {first.pid}) holds" in out and "train.lock" in out
        rc, out = _run_train(_train_args(cache, manifest, run, "--resume", epochs=4))   # nor a resume
        assert rc == 2 and f"another train (pid {first.pid})" in out
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        _kill(first)
    assert [r["epoch"] for r in _records(run)] == list(range(1, 5))   # one run's epochs, once each


def test_a_second_confounders_build_exits_2_naming_the_holder(synth, tmp_path):
    cache, manifest = synth
    out = tmp_path / "conf.h5"
    args = ["confounders", "build", "--cache", str(cache), "--dataset", str(manifest), "--kp", "4", "--kz", "4",
            "--out", str(out)]
    with WriterLock(lock_path_of(out), out.name, "confounders build"):   # a build in progress (flock: per open file)
        res = runner.invoke(heads_app, args)
    assert res.exit_code == 2, res.output
    assert f"another confounders build (pid {os.getpid()}) holds {out}.lock" in res.output.replace("\n", "")
    assert not out.exists()
    assert runner.invoke(heads_app, args).exit_code == 0 and out.exists()   # released: the build runs


def test_texts_are_written_by_one_writer_at_a_time(extracted, tmp_path):
    _, _, manifest, original = extracted
    folder = tmp_path / "cache" / "tiny" / original.name
    shutil.copytree(original, folder)
    before = (folder / "texts.h5").read_bytes()
    args = ["texts", "--cache", str(folder), "--dataset", str(manifest), "--model", TINY["model"],
            "--pretrained", "none", "--precision", "fp32", "--device", "cpu", "--force"]
    with WriterLock(lock_path_of(folder / "texts.h5"), "texts.h5", "extract"):   # rank 0 writing its texts
        res = runner.invoke(cache_app, args)
    assert res.exit_code == 2, res.output
    assert f"another extract (pid {os.getpid()}) holds" in res.output.replace("\n", "")
    assert (folder / "texts.h5").read_bytes() == before
    assert runner.invoke(cache_app, args).exit_code == 0


def test_an_import_never_nests_a_cache_inside_one_an_extract_is_creating(tmp_path, monkeypatch):
    from cmdcl_cache.ingest import plan as importer
    src = tmp_path / "feats"
    src.mkdir()
    ids = ["a", "b"]
    for i, vid in enumerate(ids):
        np.save(src / f"{vid}.npy", np.full((4, 8), i + 1, np.float32))
    manifest = write_manifest(tmp_path / "manifest", {vid: f"{vid}.mp4" for vid in ids})
    extract_folder = tmp_path / "cache"   # does not exist yet: the import plans <it>/tiny/m-imported
    shard = extract_folder / "frames-00000-of-00001.h5"
    hash_sources, held = importer.hash_sources, []

    def extract_starts_meanwhile(*a, **kw):   # while the import hashes its sources, an extract takes its shard
        extract_folder.mkdir(exist_ok=True)
        held.append(ShardWriter(shard, {"dataset": "tiny", "model": "m", "shard_index": 0, "shard_count": 1}, 8))
        return hash_sources(*a, **kw)

    monkeypatch.setattr(importer, "hash_sources", extract_starts_meanwhile)
    try:
        res = runner.invoke(cache_app, ["import", "--dataset", str(manifest), "--from", str(src), "--format", "npy",
                                        "--fps", "1", "--cache", str(extract_folder), "--model", "m", "--quiet"])
    finally:
        for w in held:
            w.close()
    assert res.exit_code == 2, res.output
    text = res.output.replace("\n", "")
    assert "would nest one cache inside another" in text and f"`cmdcl-cache extract` (pid {os.getpid()})" in text
    assert sorted(p.name for p in extract_folder.iterdir()) == ["frames-00000-of-00001.h5.lock",
                                                              "frames-00000-of-00001.journal"]


def test_an_import_holding_a_shard_is_named_as_an_import():
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "frames-00000-of-00001.h5"
        prov = {"dataset": "t", "model": "m", "shard_index": 0, "shard_count": 1}
        with ShardWriter(path, prov, 4, command="import"):
            with pytest.raises(RuntimeError, match=rf"another import \(pid {os.getpid()}\) holds .*\.lock"):
                ShardWriter(path, prov, 4)


# ----------------------------------------------------------------------- 3. the whole record is checked

def _small_extract(tmp_path):
    root = tmp_path / "videos"
    manifest = write_manifest(tmp_path / "manifest", good_videos(root, 3, frames=12))
    cfg = ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(tmp_path / "cache"), fps=1,
                        min_frames=2, max_frames=6, batch_size=4, workers=1, quiet=True, **TINY)
    result = extract(cfg)
    assert result.exit_code == 0
    return tmp_path, root, manifest, result.cache_dir


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    return _small_extract(tmp_path_factory.mktemp("wr_extract"))


def _flip(shard, field, row=1):
    """Flip one byte of `field` of the videos table's row `row`, in place, as bit rot would. The table is
    stored contiguously, its members packed in order; a variable-length string takes 16 bytes on disk
    (length, global heap address, index)."""
    with h5py.File(shard, "r") as f:
        ds = f["videos"]
        start, item = ds.id.get_offset(), ds.id.get_storage_size() // len(ds)
        assert start is not None, "the videos table is stored contiguously"
        sizes = {name: 16 if h5py.check_string_dtype(ds.dtype[name]) else ds.dtype[name].itemsize
                 for name in ds.dtype.names}
        assert sum(sizes.values()) == item
        names = list(ds.dtype.names)
        at = start + row * item + sum(sizes[n] for n in names[:names.index(field)]) + 1
    with open(shard, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("field", ["fps", "duration", "num_source_frames", "source_size", "source_mtime_ns",
                                   "num_rows", "row_start", "crc32"])
def test_a_flipped_byte_of_a_video_record_is_named_shard_damage(extracted, tmp_path, field):
    t, root, manifest, folder = extracted
    copy = tmp_path / "cache" / "tiny" / folder.name
    shutil.copytree(folder, copy)
    shard = copy / "frames-00000-of-00001.h5"
    with h5py.File(shard, "r") as f:
        before = f["videos"][1][field]
    _flip(shard, field)
    with h5py.File(shard, "r") as f:
        assert f["videos"][1][field] != before   # the byte flipped is that field's
    res = runner.invoke(cache_app, ["verify", "--cache", str(copy), "--dataset", str(manifest),
                                    "--video-root", str(root)])
    text = res.output.replace("\n", "")
    assert res.exit_code == 1, res.output
    assert "does not match its checksum: the shard is damaged" in text and shard.name in text
    assert "changed on disk" not in text and "ok" not in res.output.split()
    res = runner.invoke(cache_app, ["export-npy", "--cache", str(copy), "--out", str(tmp_path / "npy")])
    assert res.exit_code == 2 and "damaged" in res.output
    assert not (tmp_path / "npy" / "index.jsonl").exists()


def test_a_changed_source_is_still_named_as_such(extracted, tmp_path):
    t, root, manifest, folder = extracted
    video = sorted(root.rglob("*.mp4"))[0]
    st = os.stat(video)
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        report = verify(folder, str(manifest), video_root=root)
    finally:
        os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(report.changed) == 1 and not any("damaged" in p for p in report.problems)


def test_a_shard_written_before_record_checksums_still_verifies_and_resumes(extracted, tmp_path):
    t, root, manifest, folder = extracted
    old = tmp_path / "cache" / "tiny" / folder.name
    shutil.copytree(folder, old)
    shard = old / "frames-00000-of-00001.h5"
    with h5py.File(shard, "r+") as f:   # the videos table as cmdcl wrote it before record_crc32
        table = f["videos"][:]
        legacy = [n for n in table.dtype.names if n != "record_crc32"]
        del f["videos"]
        f.create_dataset("videos", data=table[legacy])
    assert read_shard(shard)[1][0]["record_crc32"] is None
    assert verify(old, str(manifest), video_root=root).problems == []
    cfg = ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(old), fps=1, min_frames=2,
                        max_frames=6, batch_size=4, workers=1, quiet=True, **TINY)
    assert extract(cfg).exit_code == 0
    assert len(Cache(old)) == 3


# -------------------------------------------------------------------- 4. interrupted runs always finish

def _reference_and_killed(synth, tmp_path, epochs, moment):
    """An undisturbed run (in this process) and a `cmdcl-heads train` process SIGKILLed once moment(run) holds."""
    cache, manifest = synth
    rc, out = _run_train(_train_args(cache, manifest, tmp_path / "ref", "--data-mode", "memory", epochs=epochs))
    assert rc == 0, out
    run = tmp_path / "killed"
    proc = _start_train(_train_args(cache, manifest, run, "--data-mode", "memory", epochs=epochs))
    try:
        _wait_for(lambda: moment(run), proc, every=0.001)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        _kill(proc)
    return tmp_path / "ref", run


@pytest.mark.slow
def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(synth, tmp_path):
    cache, manifest = synth
    epochs = 3   # killed in the final evaluation: the last checkpoint is of the last epoch, no summary yet
    ref, run = _reference_and_killed(synth, tmp_path, epochs,
                                     lambda run: _checkpoint_epoch(run / "last.safetensors") == epochs)
    assert not (run / "summary.json").exists(), "the run finished before it was killed"
    args = _train_args(cache, manifest, run, "--data-mode", "memory", "--resume", epochs=epochs)
    rc, out = _run_train(args)
    assert rc == 0, out
    summary = json.loads((ref / "summary.json").read_text())
    assert json.loads((run / "summary.json").read_text())["metrics"] == summary["metrics"]
    assert (run / "curves.png").stat().st_size > 0 and (run / "confusion.png").stat().st_size > 0
    assert _records(run) == _records(ref)
    rc, out = _run_train(args)
    assert rc == 2 and "already finished" in out   # now it is finished


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_restarted(synth, tmp_path):
    cache, manifest = synth
    epochs = 2
    ref, killed = _reference_and_killed(synth, tmp_path, epochs, lambda run: (run / "config.toml").exists())
    assert killed.is_dir() and not (killed / "last.safetensors").exists(), "killed too late"
    metrics = json.loads((ref / "summary.json").read_text())["metrics"]
    for name, extra in (("resumed", ["--resume"]), ("restarted", [])):   # the same folder, nothing deleted
        run = tmp_path / name
        shutil.copytree(killed, run)
        rc, out = _run_train(_train_args(cache, manifest, run, "--data-mode", "memory", *extra, epochs=epochs))
        assert rc == 0, out
        assert json.loads((run / "summary.json").read_text())["metrics"] == metrics
        assert _records(run) == _records(ref)


def test_resume_of_a_folder_that_does_not_exist_is_refused(synth, tmp_path):
    cache, manifest = synth
    res = runner.invoke(heads_app, _train_args(cache, manifest, tmp_path / "typo", "--resume"))
    assert res.exit_code == 2 and "no run folder here to resume" in res.output
    assert not (tmp_path / "typo").exists()


# ------------------------------------------------------- 5. every byte of a journal line, attributes, rows

def _journal_of_two(tmp_path):
    """A killed extract's shard: two committed videos in its journal, no HDF5 file yet."""
    shard = tmp_path / "frames-00000-of-00001.h5"
    prov = {"dataset": "t", "model": "m", "shard_index": 0, "shard_count": 1}
    with ShardWriter(shard, prov, 4, durable=False) as w:
        for i, vid in enumerate(("a", "b")):
            w.append_video(vid, np.full((3, 4), i, np.float16), np.arange(3), np.arange(3.0), 8.0, 3, 3.0,
                           source_size=26143, decoder="pyav")
    return shard, prov, shard.with_suffix(".journal") / "commits.jsonl"


@pytest.mark.parametrize("old, new", [
    (b'"fps": 8.0', b'"fps": 9.0'), (b'"source_size": 26143', b'"source_size": 26142'),
    (b'"decoder": "pyav"', b'"decoder": "pyaw"'), (b'"duration": 3.0', b'"duration": 9.0')])
def test_a_changed_field_of_a_commit_line_drops_that_commit(tmp_path, old, new):
    shard, prov, log = _journal_of_two(tmp_path)
    lines = log.read_bytes().splitlines(keepends=True)
    assert old in lines[0]
    log.write_bytes(lines[0].replace(old, new, 1) + lines[1])
    with ShardWriter(shard, prov, 4, durable=False) as w:   # the resume: that video is extracted again
        assert w.committed_ids == {"b"}
        assert [vid for vid, _ in w.dropped] == ["a"] and "does not match its checksum" in w.dropped[0][1]
        w.append_video("a", np.full((3, 4), 0, np.float16), np.arange(3), np.arange(3.0), 8.0, 3, 3.0)
        w.finalize()
    assert {r["video_id"]: r["fps"] for r in read_shard(shard)[1]} == {"a": 8.0, "b": 8.0}


def test_a_journal_written_before_commit_lines_had_a_checksum_still_resumes(tmp_path):
    shard, prov, log = _journal_of_two(tmp_path)
    old = [{k: v for k, v in json.loads(line).items() if k != "line_crc32"} for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps(r) + "\n" for r in old))
    with ShardWriter(shard, prov, 4, durable=False) as w:
        assert w.committed_ids == {"a", "b"} and not w.dropped


def _copy_of(folder, to):
    """A copy of a cache folder and the path of its one shard."""
    shutil.copytree(folder, to)
    return to, to / "frames-00000-of-00001.h5"


@pytest.mark.parametrize("old, new", [(b"bicubic", b"bicubie"), (b'"fps": 1.0', b'"fps": 5.0')])
def test_a_changed_shard_attribute_is_named_shard_damage(extracted, tmp_path, old, new):
    t, root, manifest, folder = extracted
    copy, shard = _copy_of(folder, tmp_path / "cache" / "tiny" / folder.name)
    data = shard.read_bytes()
    assert data.count(old) == 1
    shard.write_bytes(data.replace(old, new))
    res = runner.invoke(cache_app, ["verify", "--cache", str(copy), "--dataset", str(manifest)])
    text = res.output.replace("\n", "")
    assert res.exit_code == 1 and "do not match their checksum: the shard is damaged" in text, res.output
    assert "cmdcl-cache texts" not in text
    res = runner.invoke(cache_app, ["export-npy", "--cache", str(copy), "--out", str(tmp_path / "npy")])
    assert res.exit_code == 2 and "the shard is damaged" in res.output.replace("\n", "")


def test_a_shard_written_before_attribute_checksums_is_read_unchecked(extracted, tmp_path):
    _, shard = _copy_of(extracted[3], tmp_path / "old")
    folder = extracted[3]
    with h5py.File(shard, "r+") as f:
        assert "provenance_crc32" in f.attrs
        del f.attrs["provenance_crc32"]
    prov = read_shard(shard)[0]
    assert "provenance_crc32" not in prov and prov == read_shard(folder / shard.name)[0]


def _synthetic(tmp_path, name="c"):
    from cmdcl_cache.ingest.synthetic import write_synthetic_cache
    feats = {f"v{i}": np.full((300, 4), i, np.float16) for i in range(1, 4)}
    return write_synthetic_cache(tmp_path / name, feats), feats


def test_a_reader_checks_each_videos_rows_against_their_crc32(tmp_path):
    folder, feats = _synthetic(tmp_path)
    shard = folder / "frames-00000-of-00001.h5"
    with h5py.File(shard, "r") as f:
        at = f["features"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:   # one flipped byte of v1's first row, as bit rot would
        fh.seek(at + 1)
        byte = fh.read(1)[0]
        fh.seek(at + 1)
        fh.write(bytes([byte ^ 0x01]))
    cache = Cache(folder)
    with pytest.raises(Exception, match=r"frames-00000-of-00001\.h5: the rows of video 'v1' do not match their "
                                        r"checksum: the shard is damaged"):
        cache.features("v1")
    assert (cache.features("v2") == feats["v2"]).all()
    res = runner.invoke(cache_app, ["export-npy", "--cache", str(folder), "--out", str(tmp_path / "npy")])
    assert res.exit_code == 2 and "'v1' do not match their checksum" in res.output.replace("\n", "")


@pytest.mark.parametrize("how", ["truncate", "copy over", "overwrite"])
def test_a_shard_rewritten_in_place_stops_the_reader_naming_it(tmp_path, how):
    folder, feats = _synthetic(tmp_path)
    other, _ = _synthetic(tmp_path, "other")
    shard = folder / "frames-00000-of-00001.h5"
    cache = Cache(folder)
    inode = os.stat(shard).st_ino
    time.sleep(0.01)   # a later mtime, even on a coarse clock
    if how == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif how == "copy over":   # cp writes into the same inode
        shutil.copyfile(other / shard.name, shard)
    else:
        with open(shard, "r+b") as fh:
            fh.seek(100)
            fh.write(fh.read(1))
    assert os.stat(shard).st_ino == inode
    with pytest.raises(Exception, match=r"frames-00000-of-00001\.h5: changed in place since this run opened it"):
        cache.features("v1")


@pytest.mark.slow
def test_a_lazy_train_stops_cleanly_when_its_shard_is_truncated_in_place(synth, tmp_path):
    cache, manifest = synth
    moved = tmp_path / "cache"
    shutil.copytree(cache, moved)
    run = tmp_path / "run"
    proc = _start_train(_train_args(moved, manifest, run, "--data-mode", "lazy", "--workers", "1", epochs=30))
    try:
        _wait_for(lambda: _lines(run / "metrics.jsonl") >= 1, proc)
        shard = sorted(moved.glob("frames-*.h5"))[0]
        os.truncate(shard, shard.stat().st_size // 2)
        _, err = proc.communicate(timeout=300)
    finally:
        _kill(proc)
    assert proc.returncode == 2, err
    assert f"{shard}: changed in place" in err.replace("\n", "")
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert not (run / "summary.json").exists()


def test_a_worker_error_comes_back_as_its_own_message(synth, monkeypatch):
    from cmdcl_cache.manifest.io import load_manifest
    from cmdcl_heads import data
    cache_dir, manifest_dir = synth
    cache = Cache(cache_dir)
    split = data.pair_split(cache, load_manifest(manifest_dir), "train", "task")
    lazy = data.make_features(cache, split, 8, "cpu", "lazy", workers=1)

    def nan_found(cache, video_id, x, what="features"):   # what a shard damaged after the first pass gives
        raise data.NonFiniteFeatures(f"video {video_id!r} has NaN/Inf")

    monkeypatch.setattr(data, "check_finite", nan_found)   # the forked worker inherits it
    import torch
    with pytest.raises(data.NonFiniteFeatures) as err:
        list(lazy.batches(8, torch.arange(len(split.video_ids)), None))
    assert str(err.value).startswith("video ") and str(err.value).endswith("has NaN/Inf")
    assert "Caught" not in str(err.value) and "Traceback" not in str(err.value)


# ------------------------------------------------------------------ 6. lock files are only regular files

def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = tmp_path / "train.lock"
    lock.symlink_to(victim)
    with pytest.raises(Exception, match=r"train\.lock: the lock file is a symlink"):
        WriterLock(lock, "the run folder", "train")
    assert victim.read_text() == "precious\n"
    lock.unlink()
    (tmp_path / "train.lock").mkdir()
    with pytest.raises(Exception, match=r"train\.lock: the lock file is a folder"):
        WriterLock(lock, "the run folder", "train")


@pytest.mark.slow
def test_a_train_whose_lock_file_is_a_symlink_exits_2_naming_it(synth, tmp_path):
    cache, manifest = synth
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run / "train.lock").symlink_to(victim)
    rc, out = _run_train(_train_args(cache, manifest, run, "--data-mode", "memory", epochs=1))
    assert rc == 2 and "train.lock: the lock file is a symlink" in out.replace("\n", "")
    assert victim.read_text() == "precious\n"


# ------------------------------------------------------------- 7. a sweep brands only its own folders

def _point(synth, tmp_path):
    from cmdcl_heads.config import HeadConfig, TrainConfig
    from cmdcl_heads.sweep import SweepSpec, plan
    cache, manifest = synth
    head = HeadConfig(model="text4vis", frames=4, layers=1, heads=4)
    base = TrainConfig(cache=str(cache), dataset=str(manifest), out=str(tmp_path / "sw"), epochs=1, batch_size=16,
                       device="cpu", data_mode="memory", quiet=True)
    return plan(SweepSpec(), head, base)[0]


@pytest.mark.slow
def test_a_sweep_never_brands_a_folder_another_train_is_writing(synth, tmp_path):
    from cmdcl_heads.sweep import POINT_FILE, prepare_point, run_point
    point = _point(synth, tmp_path)
    point.folder.mkdir(parents=True)
    with WriterLock(point.folder / "train.lock", "the run folder", "train"):   # a plain train loading its data
        with pytest.raises(Exception, match=rf"another train \(pid {os.getpid()}\) holds"):
            prepare_point(point)
        assert run_point(point) == 2
    assert not (point.folder / POINT_FILE).exists()


def test_a_sweep_refuses_a_folder_holding_another_configurations_run(synth, tmp_path):
    import dataclasses
    from cmdcl_cache.config import ConfigError
    from cmdcl_heads.run import RunFolder
    from cmdcl_heads.sweep import POINT_FILE, prepare_point
    point = _point(synth, tmp_path)
    point.folder.mkdir(parents=True)
    RunFolder(point.folder).write_config(dataclasses.replace(point.head, layers=2), point.train)
    with pytest.raises(ConfigError, match=r"holds the run of another configuration \(head\.layers 2, the point's 1\)"):
        prepare_point(point)
    assert not (point.folder / POINT_FILE).exists()


def test_collect_refuses_a_point_whose_run_has_other_options(synth, tmp_path):
    import dataclasses
    from cmdcl_cache.config import ConfigError
    from cmdcl_heads.run import RunFolder
    from cmdcl_heads.sweep import check_point_run, prepare_point
    point = _point(synth, tmp_path)
    prepare_point(point)
    entry = {"name": point.name, "hash": point.hash}
    run = RunFolder(point.folder)
    run.write_config(point.head, point.train)   # the point's own run
    check_point_run(entry, run)
    run.write_config(point.head, dataclasses.replace(point.train, lr=0.01))   # a train that raced the sweep
    with pytest.raises(ConfigError, match=r"trained with other options than the point's \(train\.lr 0\.01"):
        check_point_run(entry, run)


# --------------------------------------------------------------- 8. resumes and reruns that finish once

@pytest.mark.slow
def test_a_resumed_linear_probe_records_its_epoch_once(synth, tmp_path):
    cache, manifest = synth
    args = ["train", "--cache", str(cache), "--dataset", str(manifest), "--out", str(tmp_path / "run"), "--model",
            "linear", "--frames", "8", "--device", "cpu", "--quiet"]
    rc, out = _run_train(args)
    assert rc == 0, out
    run = tmp_path / "run"
    (run / "summary.json").unlink()   # as a kill in the final evaluation leaves it
    rc, out = _run_train([*args, "--resume"])
    assert rc == 0, out
    assert [r["epoch"] for r in _records(run)] == [0]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2


def test_extract_refuses_another_shard_count_before_writing(extracted, tmp_path):
    from cmdcl_cache.extract.pipeline import ExtractError
    t, root, manifest, folder = extracted
    copy = tmp_path / "cache" / "tiny" / folder.name
    shutil.copytree(folder, copy)
    before = sorted(p.name for p in copy.iterdir())
    cfg = ExtractConfig(dataset=str(manifest), video_root=str(root), cache=str(copy), fps=1, min_frames=2,
                        max_frames=6, batch_size=4, workers=1, quiet=True, shard_index=0, num_shards=2, **TINY)
    with pytest.raises(ExtractError, match=r"holds shards of another shard count \(frames-00000-of-00001\.h5\)"):
        extract(cfg)
    assert sorted(p.name for p in copy.iterdir()) == before
    assert len(Cache(copy)) == 3
