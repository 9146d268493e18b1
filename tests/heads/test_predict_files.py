"""`cmdcl-heads predict --video FILE`: new files, in no manifest, encoded exactly as the run's cache was."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from _extract_util import extract_args, good_videos, write_manifest, write_video
from cmdcl_cache.cache.folder import Cache
from cmdcl_cache.cli import app as cache_app
from cmdcl_heads.cli import app as heads_app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    t = tmp_path_factory.mktemp("predict_files")
    root = t / "videos"
    vids = good_videos(root, 4, frames=16)
    manifest = write_manifest(t / "manifest", vids, splits={"good0": "train", "good1": "train", "good2": "train",
                                                            "good3": "test"})
    assert runner.invoke(cache_app, extract_args(manifest, root, t / "cache")).exit_code == 0
    leaf = t / "cache" / "tiny" / "cmdcl-tiny-none"
    run = t / "run"
    res = runner.invoke(heads_app, ["train", "--cache", str(leaf), "--dataset", str(manifest), "--model", "text4vis",
                                    "--frames", "4", "--layers", "1", "--heads", "4", "--epochs", "2",
                                    "--batch-size", "2", "--out", str(run), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    return t, root, leaf, run


@pytest.mark.slow
def test_new_files_get_the_features_the_cache_would_hold(trained):
    from cmdcl_cache.extract.run import encode_files
    t, root, leaf, run = trained
    cache = Cache(leaf)
    got = dict(encode_files(cache.provenance, [root / "good1.mp4", root / "good3.mp4"], "cpu"))
    for vid in ("good1", "good3"):
        f = got[root / f"{vid}.mp4"]
        np.testing.assert_allclose(f.features.astype(np.float32), cache.features(vid).astype(np.float32),
                                   atol=2e-3, rtol=2e-3)
        np.testing.assert_array_equal(f.timestamps, cache.frame_info(vid)[1])


@pytest.mark.slow
def test_predict_on_files_and_a_folder_writes_top_k_and_names_bad_files(trained, tmp_path):
    t, root, leaf, run = trained
    new = tmp_path / "new"
    new.mkdir()
    write_video(new / "fresh clip.mp4", 24, seed=77)      # in no manifest; a space in its name
    (new / "broken.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "preds.jsonl"
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--video", str(new), "--video",
                                    str(root / "good3.mp4"), "--out", str(out), "--top-k", "2", "--device", "cpu"])
    assert res.exit_code == 1, res.output                # one of three files failed
    assert "broken.mp4" in res.output and "2 predictions" in res.output
    lines = {json.loads(x)["file"]: json.loads(x) for x in out.read_text().splitlines()}
    assert set(lines) == {str(new / "broken.mp4"), str(new / "fresh clip.mp4"), str(root / "good3.mp4")}
    assert "error" in lines[str(new / "broken.mp4")]
    top = lines[str(new / "fresh clip.mp4")]["top_k"]
    assert len(top) == 2 and top[0]["score"] >= top[1]["score"] and top[0]["key"] in {"t0", "t1", "t2"}
    # the same video through the cache gives the same answer
    split = tmp_path / "split.jsonl"
    assert runner.invoke(heads_app, ["predict", "--run", str(run), "--out", str(split), "--device", "cpu"]).exit_code == 0
    cached = json.loads(split.read_text().splitlines()[0])
    assert cached["video_id"] == "good3"
    assert cached["top_k"][0]["key"] == lines[str(root / "good3.mp4")]["top_k"][0]["key"]
    assert abs(cached["top_k"][0]["score"] - lines[str(root / "good3.mp4")]["top_k"][0]["score"]) < 1e-2
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--video", str(tmp_path / "nope.mp4")])
    assert res.exit_code == 2 and "nope.mp4" in res.output


@pytest.mark.slow
def test_new_files_are_decoded_by_the_backends_the_cache_records(trained, monkeypatch):
    from cmdcl_cache.extract import decode
    from cmdcl_cache.extract.run import encode_files
    assert decode.decoders_of_provenance("decord 0.6.0; fallback pyav 18.1.0") == ("decord", "pyav")
    assert decode.decoders_of_provenance("pyav 18.1.0") == ("pyav", "none")
    assert decode.decoders_of_provenance("torchcodec-cuda 0.9; fallback pyav 18") == ("torchcodec", "pyav")
    assert decode.decoders_of_provenance("") == ("decord", "pyav")
    t, root, leaf, run = trained
    opened = []
    real = decode.resolve_decoder
    monkeypatch.setattr(decode, "resolve_decoder", lambda name: opened.append(name) or real(name))
    prov = dict(Cache(leaf).provenance, decoder="pyav 18.1.0")   # a cache extracted with --decoder pyav
    [(_, feats)] = list(encode_files(prov, [root / "good1.mp4"], "cpu"))
    assert opened == ["pyav"] and not isinstance(feats, Exception)


@pytest.mark.slow
def test_predict_out_naming_a_folder_is_refused_before_any_decoding(trained, tmp_path, monkeypatch):
    from cmdcl_cache.extract import run as pipeline
    t, root, leaf, run = trained
    monkeypatch.setattr(pipeline, "encode_files", lambda *a, **k: pytest.fail("decoded before --out was checked"))
    folder = tmp_path / "preds"
    folder.mkdir()
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--video", str(root / "good3.mp4"), "--out",
                                    str(folder), "--device", "cpu"])
    assert res.exit_code == 2 and "is a folder; give a file name" in res.output
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())   # no preds.tmp left behind


def test_write_atomic_refuses_a_folder_and_leaves_no_tmp_when_the_write_fails(tmp_path):
    from cmdcl_cache.files import write_atomic
    write_atomic(tmp_path / "a.txt", "first")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_atomic(tmp_path, "x")
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "a.txt", 42)     # fails inside the write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "first"


@pytest.mark.slow
def test_predict_on_files_leaves_the_split_predictions_and_replaces_nothing_unasked(trained, tmp_path):
    import shutil
    t, root, leaf, run = trained
    run = shutil.copytree(run, tmp_path / "run")
    split = run / "predictions.jsonl"
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--device", "cpu"])
    assert res.exit_code == 0 and str(split) in res.output, res.output
    before = split.read_bytes()
    assert json.loads(before.splitlines()[0])["video_id"] == "good3"
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--video", str(root / "good1.mp4"),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    files = run / "predictions-files.jsonl"
    assert str(files) in res.output and json.loads(files.read_text())["file"] == str(root / "good1.mp4")
    assert split.read_bytes() == before                              # the split's predictions untouched
    # a second time: refused before any decoding, the file as it was; --force replaces it
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--video", str(root / "good3.mp4"),
                                    "--device", "cpu"])
    assert res.exit_code == 2 and "exists; pass --force" in res.output
    assert json.loads(files.read_text())["file"] == str(root / "good1.mp4")
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--out", str(split), "--device", "cpu"])
    assert res.exit_code == 2 and split.read_bytes() == before
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--video", str(root / "good3.mp4"),
                                    "--device", "cpu", "--force"])
    assert res.exit_code == 0 and json.loads(files.read_text())["file"] == str(root / "good3.mp4")


@pytest.mark.slow
def test_quiet_predict_and_eval_print_one_result_line(trained, tmp_path):
    t, root, leaf, run = trained
    out = tmp_path / "files.jsonl"
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--video", str(root / "good3.mp4"), "--out",
                                    str(out), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0 and res.output.splitlines() == [f"wrote 1 predictions to {out}"], res.output
    res = runner.invoke(heads_app, ["predict", "--run", str(run), "--out", str(tmp_path / "split.jsonl"),
                                    "--device", "cpu", "--quiet"])
    assert res.exit_code == 0 and len(res.output.splitlines()) == 1, res.output
    summary = json.loads((run / "summary.json").read_text())
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    [line] = res.output.splitlines()
    assert line.startswith("test: top1 ") and f"top1 {summary['metrics']['top1']:.4f}" in line
    res = runner.invoke(heads_app, ["eval", "--run", str(run), "--device", "cpu", "--quiet", "--split",
                                    "train,test"])
    [line] = res.output.splitlines()
    assert line.startswith("train: top1 ") and "; test: top1 " in line
