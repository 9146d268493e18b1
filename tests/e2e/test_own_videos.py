"""Your own videos, end to end through the CLI (issue 13): a folder of real clips in two classes -> manifest ->
extract -> confounders -> text4vis and cmdcl -> predictions on a file that is in no manifest."""

import json

import pytest
from typer.testing import CliRunner

from _extract_util import copy_clip, write_video
from cmdcl_cache.cli import app as cache_app
from cmdcl_heads.cli import app as heads_app

pytestmark = pytest.mark.slow   # the whole journey, real clips: extract, confounders, two trainings
runner = CliRunner()


def _ok(app, args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (args[:2], res.output)
    return res


def test_a_folder_of_clips_to_predictions_on_a_new_file(tmp_path):
    videos = tmp_path / "videos"
    for cls, clips in {"bikes": ["bikes.mp4", "bigbuckbunny.mp4"],
                       "phone calls": ["carphone_distorted.mp4", "carphone_pristine.mp4"]}.items():
        (videos / cls).mkdir(parents=True)
        for clip in clips:
            copy_clip(clip, videos / cls / clip)
    manifest = tmp_path / "manifests" / "mine"
    _ok(cache_app, ["manifest", "build", "--dataset", "folder", "--videos", videos, "--out", manifest])
    labels = json.loads((manifest / "labels.json").read_text())
    assert [x["name"] for x in labels["label_sets"]["class"]["labels"]] == ["bikes", "phone calls"]
    _ok(cache_app, ["extract", "--dataset", manifest, "--video-root", videos, "--cache", tmp_path / "cache",
                    "--model", "cmdcl-tiny", "--pretrained", "none", "--device", "cpu", "--fps", "2",
                    "--max-frames", "8", "--workers", "2", "--quiet"])
    cache = tmp_path / "cache"   # the root: every command finds the one cache below it
    _ok(heads_app, ["confounders", "build", "--cache", cache, "--dataset", manifest, "--kp", "4", "--kz", "4"])
    for model in ("text4vis", "cmdcl"):
        _ok(heads_app, ["train", "--cache", cache, "--dataset", manifest, "--model", model, "--frames", "4",
                        "--layers", "1", "--heads", "4", "--epochs", "2", "--batch-size", "2", "--device", "cpu",
                        "--out", tmp_path / "runs" / model, "--quiet"])
    (tmp_path / "new").mkdir()
    fifth = write_video(tmp_path / "new" / "my clip.mp4", 30)   # in no manifest, a space in its name
    out = tmp_path / "preds.jsonl"
    res = _ok(heads_app, ["predict", "--run", tmp_path / "runs" / "cmdcl", "--video", fifth, "--out", out,
                          "--device", "cpu"])
    line = json.loads(out.read_text())
    assert line["file"] == str(fifth) and {t["name"] for t in line["top_k"]} == {"bikes", "phone calls"}
    assert abs(sum(t["score"] for t in line["top_k"]) - 1) < 1e-4 and "my clip.mp4" in res.output
