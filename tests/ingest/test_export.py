"""`export-npy`: video_features' files per video, safe file names for any id, and the index that maps them."""

import hashlib
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from cmdcl_cache.cli import app
from cmdcl_cache.ingest.export import INDEX_FILE, export_cache, file_names, hashed_name, read_index
from cmdcl_cache.ingest.synthetic import write_synthetic_cache

HOSTILE = ["-8NaVGEccgc", "P03_cam01_P03_cereals", "a.b-c", "with spaces", "café au lait", "数据", "x" * 300,
           "é" * 150, "Clip", "clip", "a", "a_fps", "b_timestamps_ms", ".hidden", "CON", "nul.txt", "a~b",
           "old/cache/id", "emoji 🐇", "trailing.", "UPPER"]


def test_safe_ids_keep_their_name_and_every_other_id_gets_a_safe_unique_one():
    names = file_names(HOSTILE)
    for vid in ("-8NaVGEccgc", "P03_cam01_P03_cereals", "a.b-c", "a", "UPPER"):
        assert names[vid] == vid
    for vid in set(HOSTILE) - {"-8NaVGEccgc", "P03_cam01_P03_cereals", "a.b-c", "a", "UPPER"}:
        assert names[vid] == hashed_name(vid) and "~" in names[vid], vid
        assert names[vid].endswith(hashlib.sha256(vid.encode()).hexdigest()[:16])
    assert len({n.lower() for n in names.values()}) == len(HOSTILE)   # unique on a case-insensitive disk too
    for name in names.values():
        assert re.fullmatch(r"[A-Za-z0-9._~-]+", name) and not name.startswith(".")
        assert len(f"{name}_timestamps_ms.npy.tmp".encode()) <= 255
        assert name.split(".")[0].upper() not in ("CON", "NUL")
    assert file_names(HOSTILE) == names   # deterministic
    # "Clip" alone is a safe name; only its case twin makes both hashed
    assert file_names(["Clip", "other"])["Clip"] == "Clip"


class FakeCache:
    """The reading methods export uses, with a source fps and durations a synthetic cache does not have."""

    def __init__(self, ids, dim=4, seed=0):
        rng = np.random.default_rng(seed)
        self.video_ids = sorted(ids)
        self.rows = {v: rng.standard_normal((int(rng.integers(1, 9)), dim)).astype(np.float16) for v in ids}

    def features(self, vid):
        return self.rows[vid]

    def frame_info(self, vid):
        n = len(self.rows[vid])
        return np.arange(n) * 12, (np.arange(n) + 0.5) * 0.5

    def video_info(self, vid):
        return {"fps": 24.0, "duration": 0.5 * len(self.rows[vid]) if vid != "a" else 0.0}


@pytest.mark.parametrize("layout", ["npy", "npz"])
def test_every_id_round_trips_through_the_index(tmp_path, layout):
    cache = FakeCache(HOSTILE)
    entries = export_cache(cache, tmp_path, dtype="float32", layout=layout)
    index = read_index(tmp_path)
    assert sorted(index) == sorted(HOSTILE) and len(entries) == len(HOSTILE)
    for vid in HOSTILE:
        e = index[vid]
        if layout == "npz":
            with np.load(tmp_path / e["files"]["npz"]) as z:
                arrays = {k: z[k] for k in ("features", "timestamps_ms", "fps")}
        else:
            arrays = {k: np.load(tmp_path / e["files"][k]) for k in ("features", "timestamps_ms", "fps")}
        np.testing.assert_array_equal(arrays["features"], cache.rows[vid].astype(np.float32))
        assert arrays["features"].dtype == np.float32 and e["dim"] == 4 and e["num_frames"] == len(cache.rows[vid])
        np.testing.assert_allclose(arrays["timestamps_ms"], cache.frame_info(vid)[1] * 1000)
        expected_fps = 24.0 if vid == "a" else 2.0   # rows per second of video; source fps without a duration
        assert float(arrays["fps"]) == expected_fps == e["fps"] and arrays["fps"].shape == ()
    per_video = 1 if layout == "npz" else 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == per_video * len(HOSTILE) + 1 and INDEX_FILE in files
    assert not any(f.endswith(".tmp") for f in files)


def test_cli_exports_a_real_cache_with_odd_ids(tmp_path):
    ids = HOSTILE + ["plain-id", "café"]   # shards hold ids of any length and script
    rng = np.random.default_rng(1)
    feats = {v: rng.standard_normal((5, 8)).astype(np.float16) for v in ids}
    cache = write_synthetic_cache(tmp_path / "cache", feats)
    runner = CliRunner()
    res = runner.invoke(app, ["export-npy", "--cache", str(cache), "--out", str(tmp_path / "out"), "--format", "npz"])
    assert res.exit_code == 0, res.output
    index = read_index(tmp_path / "out")
    assert sorted(index) == sorted(ids) and index["plain-id"]["files"] == {"npz": "plain-id.npz"}
    with np.load(tmp_path / "out" / index["café"]["files"]["npz"]) as z:
        np.testing.assert_array_equal(z["features"], feats["café"])
        np.testing.assert_array_equal(z["timestamps_ms"], np.arange(5) * 1000.0)
    for bad in (["--format", "csv"], ["--dtype", "float99"]):
        res = runner.invoke(app, ["export-npy", "--cache", str(cache), "--out", str(tmp_path / "bad"), *bad])
        assert res.exit_code == 2 and not (tmp_path / "bad").exists(), res.output


@pytest.mark.parametrize("dtype", ["float64", "FLOAT16", "half", "int8", ""])
def test_export_takes_only_the_dtypes_it_names(tmp_path, dtype):
    cache = write_synthetic_cache(tmp_path / "cache", {"a": np.ones((3, 4), np.float16)})
    res = CliRunner().invoke(app, ["export-npy", "--cache", str(cache), "--out", str(tmp_path / "out"),
                                   "--dtype", dtype])
    assert res.exit_code == 2 and "--dtype must be one of float16, float32" in res.output, res.output
    assert not (tmp_path / "out").exists()
