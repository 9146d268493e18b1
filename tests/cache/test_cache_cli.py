"""`cmdcl-cache verify`, `inspect`, `export-npy` and extract's exit status, through the CLI (in-process)."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from _extract_util import good_videos, write_manifest
from cmdcl_cache.cli import app
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.ingest.export import read_index

pytestmark = pytest.mark.slow   # every test reads the small_cache fixture, an extract of real videos
runner = CliRunner()


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    t = tmp_path_factory.mktemp("cli")
    root = t / "videos"
    vids = good_videos(root, 3, frames=12)
    (root / "bad.mp4").write_text("not a video")
    vids["bad"] = "bad.mp4"
    manifest = write_manifest(t / "manifest", vids)
    res = runner.invoke(app, ["extract", "--dataset", str(manifest), "--video-root", str(root),
                              "--cache", str(t / "cache"), "--model", "cmdcl-tiny", "--pretrained", "none",
                              "--precision", "fp32", "--device", "cpu", "--min-frames", "2", "--max-frames", "4",
                              "--batch-size", "4", "--workers", "2", "--quiet"])
    return t, manifest, res


def test_extract_exit_1_prints_the_cache_folder(small_cache):
    t, _, res = small_cache
    assert res.exit_code == 1, res.output
    folder = t / "cache" / "tiny" / "cmdcl-tiny-none"
    assert str(folder) in res.output


def test_verify_passes_then_names_each_problem(small_cache, tmp_path):
    t, manifest, _ = small_cache
    folder = t / "cache" / "tiny" / "cmdcl-tiny-none"
    res = runner.invoke(app, ["verify", "--cache", str(t / "cache"), "--dataset", str(manifest)])
    assert res.exit_code == 0, res.output
    assert "3 of 4 videos committed, 1 listed as failed" in res.output

    # Break a copy: a NaN in the features, and the failure record of "bad" lost.
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    with h5py.File(broken / "frames-00000-of-00001.h5", "r+") as f:
        f["features"][1, 0] = np.nan
    (broken / "failures.jsonl").write_text("")
    res = runner.invoke(app, ["verify", "--cache", str(broken), "--dataset", str(manifest)])
    assert res.exit_code == 1
    # the NaN is also a change of the rows after their commit: the checksum names the video too
    assert "NaN/Inf" in res.output and "'bad'" in res.output and "checksum" in res.output
    assert "3 problem(s)" in res.output


def test_verify_refuses_texts_from_another_model(small_cache, tmp_path):
    import shutil

    from cmdcl_cache.cache.format import read_texts, texts_provenance, write_texts
    t, manifest, _ = small_cache
    folder = tmp_path / "c"
    shutil.copytree(t / "cache" / "tiny" / "cmdcl-tiny-none", folder)
    prov = texts_provenance(folder / "texts.h5")
    write_texts(folder / "texts.h5", read_texts(folder / "texts.h5"), {**prov, "model": "ViT-B-16"})
    res = runner.invoke(app, ["verify", "--cache", str(folder), "--dataset", str(manifest)])
    assert res.exit_code == 1 and "texts.h5: made with other settings" in res.output


def test_inspect_and_export(small_cache, tmp_path):
    t, _, _ = small_cache
    res = runner.invoke(app, ["inspect", "--cache", str(t / "cache"), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["videos"] == 3 and s["failures_by_stage"] == {"open": 1} and set(s["texts"]) == {"task", "step"}
    res = runner.invoke(app, ["inspect", "--cache", str(t / "cache")])
    assert res.exit_code == 0 and "failures" in res.output and "frames-00000-of-00001.h5" in res.output
    out = tmp_path / "npy"
    res = runner.invoke(app, ["export-npy", "--cache", str(t / "cache"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    cache = Cache(t / "cache" / "tiny" / "cmdcl-tiny-none")
    assert sorted(read_index(out)) == cache.video_ids
    assert sorted(p.name for p in out.glob("good1*")) == ["good1.npy", "good1_fps.npy", "good1_timestamps_ms.npy"]
    x = np.load(out / "good1.npy")
    assert x.shape == (cache.num_frames("good1"), 64) and np.array_equal(x, cache.features("good1"))
    np.testing.assert_array_equal(np.load(out / "good1_timestamps_ms.npy"), cache.frame_info("good1")[1] * 1000)


def test_fatal_errors_exit_2_with_a_message(small_cache, tmp_path):
    t, manifest, _ = small_cache
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "labels.json").write_text("{}")
    (tmp_path / "m" / "videos.jsonl").write_text("")
    base = ["extract", "--video-root", str(t / "videos"), "--cache", str(tmp_path / "c"), "--model", "cmdcl-tiny",
            "--pretrained", "none", "--device", "cpu", "--precision", "fp32", "--quiet"]
    res = runner.invoke(app, base + ["--dataset", str(tmp_path / "m")])
    assert res.exit_code == 2 and "labels.json" in res.output
    res = runner.invoke(app, base + ["--dataset", str(manifest), "--shard-index", "3", "--num-shards", "2"])
    assert res.exit_code == 2 and "outside" in res.output
    # the same cache folder with another sampling policy is refused, naming the attribute
    res = runner.invoke(app, base[:4] + [str(t / "cache")] + base[5:] + ["--dataset", str(manifest)])
    assert res.exit_code == 2 and "sampling" in res.output


@pytest.mark.parametrize("bad, said", [
    (["--split", "bogus"], "unknown split 'bogus'"),
    (["--shard-index", "5"], "--shard-index 5: the cache has 1 shard, numbered 0 to 0"),
    (["--shard-index", "-1"], "--shard-index -1"),
    (["--num-shards", "0"], "--num-shards 0: a cache has at least 1 shard"),
])
def test_verify_with_an_option_the_cache_cannot_have_exits_2_in_one_line(small_cache, bad, said):
    t, manifest, _ = small_cache
    res = runner.invoke(app, ["verify", "--cache", str(t / "cache"), "--dataset", str(manifest), *bad])
    assert res.exit_code == 2, res.output
    assert said in " ".join(res.output.split()) and "Traceback" not in res.output
