"""`cmdcl-cache import` (issue 16), tried as a user who holds features from another pipeline would, and as a
careless or hostile one: video_features folders, plain .npy per video with --fps, one HDF5 file,
safetensors; every kind of bad file; unknown ids; changed sources; a killed import resumed; the export ->
import round trip; label texts from a file or an open_clip text tower."""

import hashlib
import json
import os
import signal
import subprocess
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _extract_util import PY, REPO, default_sigint, write_manifest
from cmdcl_cache.cache.folder import Cache, CacheFolder
from cmdcl_cache.cli import app
from cmdcl_cache.cache.runlog import read_failures, read_lines
from cmdcl_cache.ingest.plan import ms_to_seconds
from cmdcl_cache.manifest.io import load_manifest
from cmdcl_cache.cache.writer import ShardWriter
from cmdcl_cache.cache.format import texts_provenance
from cmdcl_cache.cache.verify import verify

runner = CliRunner()
D = 64   # cmdcl-tiny's embedding width, so that its text tower fits


def _manifest(tmp_path, ids):
    return write_manifest(tmp_path / "manifest", {vid: f"{vid}.mp4" for vid in ids})


def _import(manifest, source, fmt, cache, *extra):
    return runner.invoke(app, ["import", "--dataset", str(manifest), "--from", str(source), "--format", fmt,
                               "--cache", str(cache), "--model", "clip-ViT-B-32", "--quiet", *map(str, extra)])


def _leaf(cache):
    return cache / "tiny" / "clip-ViT-B-32-imported"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _video_features(folder, ids, rng, fps=29.97, key="clip"):
    """What video_features' save_numpy writes: float64 features, timestamps in ms, the fps as a 0-d array."""
    folder.mkdir(parents=True, exist_ok=True)
    feats = {}
    for i, vid in enumerate(ids):
        feats[vid] = rng.standard_normal((5 + i, D))
        np.save(folder / f"{vid}_{key}.npy", feats[vid])
        np.save(folder / f"{vid}_timestamps_ms.npy", np.arange(5 + i) * 1000.0 / fps)
        np.save(folder / f"{vid}_fps.npy", np.array(fps))
    return feats


def test_a_video_features_folder_is_imported_with_its_timestamps_fps_and_source_hashes(tmp_path):
    ids = ["v0", "v1", "v2"]
    manifest = _manifest(tmp_path, ids)
    src = tmp_path / "output" / "clip" / "ViT-B_32"
    feats = _video_features(src, ids, np.random.default_rng(0))
    res = _import(manifest, src, "video-features", tmp_path / "cache")
    assert res.exit_code == 0, res.output
    leaf = _leaf(tmp_path / "cache")
    assert str(leaf) in res.output and "cmdcl-cache texts" in res.output   # says how to get label texts
    cache = Cache(leaf)
    assert cache.video_ids == ids and cache.feature_dim == D
    for vid, x in feats.items():
        np.testing.assert_array_equal(cache.features(vid), x.astype(np.float16))   # float64 source accepted
        index, stamps = cache.frame_info(vid)
        np.testing.assert_array_equal(index, np.arange(len(x)))
        np.testing.assert_array_equal(stamps, np.load(src / f"{vid}_timestamps_ms.npy") / 1000)
        assert cache.video_info(vid)["fps"] == 29.97 and cache.video_info(vid)["source_size"] == -1
    prov = cache.provenance
    assert prov["model"] == "clip-ViT-B-32" and prov["pretrained"] == "imported"
    source = json.loads(prov["import"])
    assert source["format"] == "video-features" and source["source"] == str(src) and source["dim"] == D
    assert source["timestamps"] == {"from": "files"} and source["files"] == 9 and source["feature_key"] == "clip"
    lines = read_lines(leaf / "import_sources.jsonl")
    assert {(r["path"], r["sha256"]) for r in lines} == {(p.name, _sha(p)) for p in src.iterdir()}
    rows = sorted([r["video_id"], r["role"], r["path"], r["sha256"]] for r in lines)
    assert source["sources_sha256"] == hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    problems = verify(leaf, str(manifest)).problems
    assert len(problems) == 1 and "texts.h5: missing" in problems[0]
    again = _import(manifest, src, "video-features", tmp_path / "cache")
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_plain_npy_without_timestamps_needs_fps_and_derives_them(tmp_path):
    manifest = _manifest(tmp_path, ["a", "b"])
    src = tmp_path / "feats"
    (src / "TaskFolder").mkdir(parents=True)   # features kept in per-class folders: matched by file name
    x = {"a": np.ones((4, D), np.float32), "b": np.full((6, D), 0.5, np.float16)}
    np.save(src / "a.npy", x["a"])
    np.save(src / "TaskFolder" / "b.npy", x["b"])
    res = _import(manifest, src, "npy", tmp_path / "cache")
    assert res.exit_code == 2 and "no timestamps" in res.output and "--fps" in res.output
    assert not (tmp_path / "cache").exists()   # a fatal problem leaves nothing behind
    res = _import(manifest, src, "npy", tmp_path / "cache", "--fps", 2, "--time-offset", 0.25)
    assert res.exit_code == 0, res.output
    cache = Cache(_leaf(tmp_path / "cache"))
    np.testing.assert_array_equal(cache.frame_info("b")[1], 0.25 + np.arange(6) / 2)
    assert cache.video_info("b")["fps"] == 2.0 and cache.video_info("b")["duration"] == 6 / 2
    assert json.loads(cache.provenance["import"])["timestamps"] == {"from": "fps", "fps": 2.0, "offset": 0.25}
    np.save(src / "a_timestamps_ms.npy", np.arange(4) * 500.0)   # now the files carry timestamps too
    res = _import(manifest, src, "npy", tmp_path / "other", "--fps", 2)
    assert res.exit_code == 2 and "has its own timestamps" in res.output and "a_timestamps_ms.npy" in res.output
    np.save(src / "a_timestamps_ms.npy", np.zeros(4))            # a placeholder, not timestamps
    res = _import(manifest, src, "npy", tmp_path / "zeros")
    assert res.exit_code == 2 and "every row has the timestamp 0.0 ms" in " ".join(res.output.split())


def test_one_hdf5_file_in_both_layouts_and_its_broken_forms(tmp_path):
    ids = ["grp", "flat", "nofeat", "gone"]
    manifest = _manifest(tmp_path, ids)
    rng = np.random.default_rng(1)
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:
        f["grp/features"] = rng.standard_normal((5, D)).astype(np.float32)
        f["grp/timestamps_ms"] = np.arange(5) * 1000.0
        f["grp/fps"] = 1.0
        f["flat"] = rng.standard_normal((3, D)).astype(np.float32)   # a dataset per id has no timestamps
        f["nofeat/timestamps_ms"] = np.arange(2) * 1000.0
    res = _import(manifest, path, "hdf5", tmp_path / "cache")
    assert res.exit_code == 1, res.output
    failures = read_failures(_leaf(tmp_path / "cache"))
    assert set(failures) == {"flat", "nofeat", "gone"}
    assert "no timestamps file, and no --fps" in failures["flat"]["error"]
    assert failures["nofeat"]["stage"] == "open" and "group 'nofeat' has no dataset 'features'" in failures["nofeat"]["error"]
    assert "no source file for video 'gone'" in failures["gone"]["error"]
    cache = Cache(_leaf(tmp_path / "cache"))
    assert cache.video_ids == ["grp"] and json.loads(cache.provenance["import"])["format"] == "hdf5"
    with open(path, "rb") as fh:
        assert json.loads(cache.provenance["import"])["files"] == 1
        assert read_lines(_leaf(tmp_path / "cache") / "import_sources.jsonl")[0]["sha256"] == \
            hashlib.file_digest(fh, "sha256").hexdigest()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[:1500])
    res = _import(manifest, cut, "hdf5", tmp_path / "cache2")
    assert res.exit_code == 2 and str(cut) in res.output and "not a readable HDF5 file" in res.output
    shard = _leaf(tmp_path / "cache") / "frames-00000-of-00001.h5"
    res = _import(manifest, shard, "hdf5", tmp_path / "cache3")
    assert res.exit_code == 2 and "a cmdcl shard already" in res.output


def _bad_sources(src, rng):
    """One file (or none) per failure kind; returns {video id: (stage, words of the error)}."""
    good = rng.standard_normal((4, D)).astype(np.float32)
    np.save(src / "good.npy", good)
    np.save(src / "wide64.npy", rng.standard_normal((4, D)))               # float64: accepted
    np.save(src / "wrongdim.npy", good[:, :16])
    nan = good.copy()
    nan[2, 5] = np.nan
    np.save(src / "nan.npy", nan)
    np.save(src / "flat.npy", good[0])
    np.save(src / "empty.npy", np.zeros((0, D), np.float32))
    np.save(src / "ints.npy", np.ones((4, D), np.int64))
    np.save(src / "tokens.npy", np.ones((4, 49, D), np.float32))
    np.save(src / "huge.npy", np.full((4, D), 1e6, np.float32))
    np.save(src / "cut.npy", good)
    (src / "cut.npy").write_bytes((src / "cut.npy").read_bytes()[:300])
    (src / "text.npy").write_text("video,feature\nx,1\n")
    torch.save({"x": torch.zeros(2)}, src / "pickled.pt")
    np.save(src / "twice.npy", good)
    (src / "sub").mkdir()
    np.save(src / "sub" / "twice.npy", good)
    with open(src / "hostile.npy", "wb") as fh:   # a header declaring 10^12 rows over 256 bytes of data
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**12, D)})
        fh.write(bytes(256))
    return {"wrongdim": ("write", "dimension 16, but this import's is 64"), "nan": ("write", "NaN/Inf"),
            "flat": ("write", "is 1-D"), "empty": ("write", "no rows"), "ints": ("write", "dtype int64"),
            "tokens": ("write", "3-D"), "huge": ("write", "beyond float16's range"),
            "cut": ("open", "truncated or damaged"), "text": ("open", "not a .npy file"),
            "pickled": ("open", "never unpickles"), "twice": ("open", "2 source files for video 'twice'"),
            "absent": ("open", "no source file for video 'absent'"),
            "hostile": ("open", "header declares shape (1000000000000, 64)")}


def test_every_bad_file_is_a_recorded_failure_naming_it_and_the_rest_is_imported(tmp_path):
    src = tmp_path / "feats"
    src.mkdir()
    expected = _bad_sources(src, np.random.default_rng(2))
    manifest = _manifest(tmp_path, ["good", "wide64", *expected])
    res = _import(manifest, src, "npy", tmp_path / "cache", "--fps", 1)
    assert res.exit_code == 1, res.output
    leaf = _leaf(tmp_path / "cache")
    failures = read_failures(leaf)
    assert set(failures) == set(expected)
    for vid, (stage, words) in expected.items():
        assert failures[vid]["stage"] == stage and words in failures[vid]["error"], (vid, failures[vid])
        assert f"failed [{stage}] {vid}" in res.output
    assert str(src / "cut.npy") in failures["cut"]["error"]
    assert Cache(leaf).video_ids == ["good", "wide64"]
    assert [p for p in verify(leaf, str(manifest)).problems if "texts.h5" not in p] == []


def test_ids_the_manifest_lacks_are_fatal_unless_allowed_and_then_listed(tmp_path):
    manifest = _manifest(tmp_path, ["a"])
    src = tmp_path / "feats"
    src.mkdir()
    for vid in ("a", "v_a", "stranger"):
        np.save(src / f"{vid}.npy", np.ones((2, D), np.float32))
    res = _import(manifest, src, "npy", tmp_path / "cache", "--fps", 1)
    assert res.exit_code == 2 and "2 entries that match no video of the manifest" in res.output
    assert "stranger.npy" in res.output and "v_a.npy" in res.output and not (tmp_path / "cache").exists()
    res = _import(manifest, src, "npy", tmp_path / "cache", "--fps", 1, "--allow-unknown")
    assert res.exit_code == 0 and "not imported (--allow-unknown): stranger.npy, v_a.npy" in res.output
    log = read_lines(_leaf(tmp_path / "cache") / "extract_log.jsonl")[-1]
    assert log["command"] == "import" and log["unknown_first"] == ["stranger.npy", "v_a.npy"]
    res = _import(manifest, src, "video-features", tmp_path / "cache3")
    assert res.exit_code == 2 and "a.npy" in res.output and "reads <id>_clip.npy" in res.output
    res = _import(manifest, src, "npy", tmp_path / "cache3", "--feature-key", "clip")
    assert res.exit_code == 2 and "--format video-features" in res.output
    res = _import(manifest, tmp_path / "weights.pt", "npy", tmp_path / "cache4")
    assert res.exit_code == 2 and "never unpickles" in res.output


def test_an_import_never_mixes_with_other_sources_or_settings(tmp_path):
    manifest = _manifest(tmp_path, ["a", "b"])
    src = tmp_path / "feats"
    src.mkdir()
    for vid in ("a", "b"):
        np.save(src / f"{vid}.npy", np.ones((3, D), np.float32))
    cache = tmp_path / "cache"
    assert _import(manifest, src, "npy", cache, "--fps", 1).exit_code == 0
    shard = _leaf(cache) / "frames-00000-of-00001.h5"
    before = _sha(shard)
    res = _import(manifest, src, "npy", cache, "--fps", 2)
    assert res.exit_code == 2 and "import 'timestamps' was" in res.output
    np.save(src / "b.npy", np.zeros((3, D), np.float32))   # the user regenerates one file
    res = _import(manifest, src, "npy", cache, "--fps", 1)
    assert res.exit_code == 2 and "not those this cache was imported from" in res.output and "b.npy" in res.output
    assert _sha(shard) == before and not shard.with_suffix(".journal").exists()
    extracted = tmp_path / "extracted"   # a cache that `extract` made, of a model with the same name
    extracted.mkdir()
    with ShardWriter(extracted / "frames-00000-of-00001.h5", {"dataset": "tiny", "model": "clip-ViT-B-32",
                                                              "pretrained": "openai", "tokens": "cls",
                                                              "shard_index": 0, "shard_count": 1}, D) as w:
        w.append_video("a", np.ones((3, D)), np.arange(3), np.arange(3.0), 1.0, 3, 3.0)
        w.finalize()
    res = _import(manifest, src, "npy", extracted, "--fps", 1)
    assert res.exit_code == 2 and "made by `cmdcl-cache extract`, not imported ones" in res.output


def test_safetensors_per_video(tmp_path):
    from safetensors.numpy import save_file
    manifest = _manifest(tmp_path, ["a", "b"])
    src = tmp_path / "feats"
    src.mkdir()
    x = np.random.default_rng(3).standard_normal((4, D)).astype(np.float32)
    save_file({"features": x, "timestamps_ms": np.arange(4) * 250.0, "fps": np.array([4.0])}, src / "a.safetensors")
    save_file({"feats": x}, src / "b.safetensors")
    res = _import(manifest, src, "safetensors", tmp_path / "cache")
    assert res.exit_code == 1, res.output
    failures = read_failures(_leaf(tmp_path / "cache"))
    assert list(failures) == ["b"] and "no tensor 'features' (it holds feats)" in failures["b"]["error"]
    cache = Cache(_leaf(tmp_path / "cache"))
    np.testing.assert_array_equal(cache.features("a"), x.astype(np.float16))
    np.testing.assert_array_equal(cache.frame_info("a")[1], np.arange(4) * 0.25)


def _start_slow_import(args, output=subprocess.DEVNULL):
    """The import in its own process group, each video read 20 ms slower, committed 3 at a time."""
    script = textwrap.dedent(f"""
        import sys, time
        import cmdcl_cache.ingest.importer as m
        from cmdcl_cache.ingest.sources import FolderSource
        m.GROUP_VIDEOS = 3
        read = FolderSource.read
        def slow(self, sv):
            time.sleep(0.02)
            return read(self, sv)
        FolderSource.read = slow
        from cmdcl_cache.cli import app
        sys.argv = ["cmdcl-cache", *{args!r}]
        app()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([PY, "-c", script], env=env, stdout=output, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=default_sigint)


@pytest.mark.slow
def test_an_import_killed_midway_resumes_to_the_same_bytes(tmp_path):
    ids = [f"v{i:03d}" for i in range(60)]
    manifest = _manifest(tmp_path, ids)
    src = tmp_path / "feats"
    _video_features(src, ids, np.random.default_rng(4))
    ref = _import(manifest, src, "video-features", tmp_path / "ref")
    assert ref.exit_code == 0, ref.output
    cache = tmp_path / "cache"
    commits = _leaf(cache) / "frames-00000-of-00001.journal" / "commits.jsonl"
    args = ["import", "--dataset", str(manifest), "--from", str(src), "--format", "video-features",
            "--cache", str(cache), "--model", "clip-ViT-B-32", "--quiet"]
    proc = _start_slow_import(args)
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end and not (commits.exists() and len(commits.read_bytes().splitlines()) >= 9):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(commits.read_bytes().splitlines())
    assert 9 <= done < len(ids)   # killed in the middle, with commits behind it
    res = _import(manifest, src, "video-features", cache)
    assert res.exit_code == 0, res.output
    assert f"{len(ids) - done} videos imported" in res.output   # only the rest was read again
    shard = "frames-00000-of-00001.h5"
    assert _sha(_leaf(cache) / shard) == _sha(_leaf(tmp_path / "ref") / shard)


@pytest.mark.slow
def test_ctrl_c_in_an_import_is_a_message_and_the_rerun_finishes_it(tmp_path):
    ids = [f"v{i:03d}" for i in range(60)]
    manifest = _manifest(tmp_path, ids)
    src = tmp_path / "feats"
    _video_features(src, ids, np.random.default_rng(4))
    cache = tmp_path / "cache"
    commits = _leaf(cache) / "frames-00000-of-00001.journal" / "commits.jsonl"
    proc = _start_slow_import(["import", "--dataset", str(manifest), "--from", str(src), "--format",
                               "video-features", "--cache", str(cache), "--model", "clip-ViT-B-32", "--quiet"],
                              output=subprocess.PIPE)
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end and not (commits.exists() and len(commits.read_bytes().splitlines()) >= 6):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and b"interrupted; what is committed is kept" in out and b"Traceback" not in out
    res = _import(manifest, src, "video-features", cache)
    assert res.exit_code == 0 and "videos imported" in res.output, res.output
    assert Cache(_leaf(cache)).video_ids == ids


def _exported(folder):
    """{file name: array} of an export-npy folder (index.jsonl aside)."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".npy":
            out[path.name] = np.load(path)
        elif path.suffix == ".npz":
            with np.load(path) as z:
                out.update({f"{path.name}:{k}": z[k] for k in z.files})
    return out


@pytest.mark.parametrize("layout", ["npy", "npz"])
def test_export_then_import_gives_back_features_timestamps_and_fps(tmp_path, layout):
    rng = np.random.default_rng(5)
    ids = ["a", "b", "c", "clip 1"]   # "clip 1" is exported under a hashed name that index.jsonl maps back
    fps = {"a": 29.97, "b": 30000 / 1001, "c": 8.0, "clip 1": 25.0}
    first = tmp_path / "first"
    first.mkdir()
    with ShardWriter(first / "frames-00000-of-00001.h5", {"dataset": "tiny", "model": "m", "shard_index": 0,
                                                          "shard_count": 1}, D, durable=False) as w:
        for vid in ids:
            t = 200
            w.append_video(vid, rng.standard_normal((t, D)), np.arange(t) * 3, np.arange(t) * 3 / fps[vid],
                           fps[vid], 3 * t + 1, (3 * t + 1) / fps[vid])
        w.finalize()
    out, again = tmp_path / "exported", tmp_path / "exported-again"
    res = runner.invoke(app, ["export-npy", "--cache", str(first), "--out", str(out), "--format", layout])
    assert res.exit_code == 0, res.output
    assert any("~" in p.name for p in out.iterdir())
    res = _import(_manifest(tmp_path, ids), out, "npy", tmp_path / "second")
    assert res.exit_code == 0, res.output
    original, second = Cache(first), Cache(_leaf(tmp_path / "second"))
    assert second.video_ids == original.video_ids
    for vid in ids:
        np.testing.assert_array_equal(second.features(vid), original.features(vid))
        for key in ("fps", "duration"):   # from index.jsonl: the cache's own values, not rows per second
            assert second.video_info(vid)[key] == original.video_info(vid)[key]
        # Milliseconds in float64 cannot hold every float64 second: for a few % of NTSC timestamps no m has
        # m / 1000 == s. So timestamps come back within one ulp (< 4e-15 s here), bit for bit at 8 fps.
        np.testing.assert_array_max_ulp(second.frame_info(vid)[1], original.frame_info(vid)[1], maxulp=1)
    np.testing.assert_array_equal(second.frame_info("c")[1], original.frame_info("c")[1])
    stamps = original.frame_info("b")[1]
    assert (ms_to_seconds(stamps * 1000.0) != stamps).any()   # the one-ulp case does occur in this test
    np.save(out / "stray.npy", np.ones((2, D)))   # a file index.jsonl does not list is not silently skipped
    res = _import(_manifest(tmp_path, ids), out, "npy", tmp_path / "third")
    assert res.exit_code == 2 and "stray.npy" in res.output
    (out / "stray.npy").unlink()
    res = runner.invoke(app, ["export-npy", "--cache", str(_leaf(tmp_path / "second")), "--out", str(again),
                              "--format", layout])
    assert res.exit_code == 0, res.output
    a, b = _exported(out), _exported(again)
    assert a.keys() == b.keys()
    for name in a:   # exporting the imported cache gives the same files (timestamps within one ulp)
        if "timestamps_ms" in name:
            np.testing.assert_array_max_ulp(a[name], b[name], maxulp=1)
        else:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    t = tmp_path_factory.mktemp("imported")
    ids = ["v0", "v1"]
    manifest = _manifest(t, ids)
    _video_features(t / "src", ids, np.random.default_rng(6))
    assert _import(manifest, t / "src", "video-features", t / "cache").exit_code == 0
    return manifest, _leaf(t / "cache")


def _texts(manifest, cache, *extra):
    return runner.invoke(app, ["texts", "--dataset", str(manifest), "--cache", str(cache), *map(str, extra)])


def test_label_texts_from_a_file_are_checked_for_count_dimension_and_values(imported, tmp_path):
    manifest, leaf = imported
    m = load_manifest(manifest)
    task, step = (np.random.default_rng(7).standard_normal((len(m.label_sets[n]), D)) for n in ("task", "step"))
    bad = {"count.npy": task[:2], "dim.npy": task[:, :16], "nan.npy": np.where(task > 2, np.nan, task),
           "zero.npy": np.vstack([task[:2], np.zeros((1, D))])}
    for name, x in bad.items():
        np.save(tmp_path / name, x)
        res = _texts(manifest, leaf, "--text-embeddings", tmp_path / name)
        assert res.exit_code == 2 and name in res.output, (name, res.output)
    assert "expected [3, 64]" in _texts(manifest, leaf, "--text-embeddings", tmp_path / "count.npy").output
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "texts.pt")
    res = _texts(manifest, leaf, "--text-embeddings", tmp_path / "texts.pt")
    assert res.exit_code == 2 and "never unpickles" in res.output and not marker.exists()
    np.save(tmp_path / "task.npy", task)
    res = _texts(manifest, leaf, "--text-embeddings", tmp_path / "task.npy")
    assert res.exit_code == 0 and "no embeddings of label set(s) step" in res.output
    np.savez(tmp_path / "both.npz", task=task, step=step)
    res = _texts(manifest, leaf, "--text-embeddings", tmp_path / "both.npz")
    assert res.exit_code == 0 and "warning" not in res.output
    assert verify(leaf, str(manifest)).problems == []
    from safetensors.numpy import save_file
    save_file({"task": task.astype(np.float32), "step": step.astype(np.float32)}, tmp_path / "both.safetensors")
    assert _texts(manifest, leaf, "--text-embeddings", tmp_path / "both.safetensors").exit_code == 0
    res = _texts(manifest, leaf, "--text-embeddings", tmp_path / "both.npz", "--label-set", "task")
    assert res.exit_code == 2 and "only for an .npy file" in res.output
    assert _texts(manifest, leaf, "--text-embeddings", tmp_path / "both.npz").exit_code == 0
    prov = texts_provenance(leaf / "texts.h5")
    assert json.loads(prov["text_source"])["sha256"] == _sha(tmp_path / "both.npz")
    folder = CacheFolder(leaf)
    texts = folder.texts_for(m, Cache(leaf).provenance, D, ["task", "step"])   # what the heads ask for
    np.testing.assert_allclose(texts["task"].ensemble, task / np.linalg.norm(task, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.slow
def test_label_texts_from_an_open_clip_text_tower_of_the_same_space(imported, tmp_path):
    manifest, leaf = imported
    res = _texts(manifest, leaf.parent.parent, "--device", "cpu")
    assert res.exit_code == 2 and "holds imported features" in res.output and "--text-embeddings" in res.output
    res = _texts(manifest, leaf.parent.parent, "--model", "cmdcl-tiny", "--pretrained", "none", "--device", "cpu")
    assert res.exit_code == 0 and str(leaf / "texts.h5") in res.output, res.output
    assert verify(leaf, str(manifest)).problems == []
    source = json.loads(texts_provenance(leaf / "texts.h5")["text_source"])
    assert source["open_clip"]["model"] == "cmdcl-tiny"
    res = _texts(manifest, leaf, "--model", "cmdcl-tiny", "--pretrained", "none", "--device", "cpu")
    assert res.exit_code == 0 and "up to date" in res.output
    narrow = tmp_path / "narrow"
    np.save((narrow.mkdir() or narrow) / "v0.npy", np.ones((2, 16), np.float32))
    np.save(narrow / "v1.npy", np.ones((2, 16), np.float32))
    assert _import(manifest, narrow, "npy", tmp_path / "cache", "--fps", 1).exit_code == 0
    res = _texts(manifest, tmp_path / "cache", "--model", "cmdcl-tiny", "--pretrained", "none", "--device", "cpu")
    assert res.exit_code == 2 and "embeds texts in 64 dimensions" in res.output and "have 16" in res.output
