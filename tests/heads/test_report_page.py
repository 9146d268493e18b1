"""`cmdcl-heads report`: one self-contained page of several runs, escaped, and loaded by a real browser."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _heads_synth import NUM_TASKS, make_synthetic
from cmdcl_heads.cli import app
from cmdcl_heads.config import HeadConfig, TrainConfig
from cmdcl_heads.confounders import ConfoundersConfig, build_and_save
from cmdcl_heads.page import ErrorRow, RunView, read_run, render, wrong_by_confidence
from cmdcl_heads.train import train

runner = CliRunner()
# names a page must escape: markup, an ampersand, quotes, non-ASCII
NAMES = ["pour <water> & stir", 'fry "the" egg', "café crème", "make tea", "cut</td>lettuce", "plain"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    t = tmp_path_factory.mktemp("report")
    cache, manifest = make_synthetic(t / "data", train_per_class=6, test_per_class=3, val_per_class=2, noise=2.0,
                                     task_names=NAMES)
    build_and_save(ConfoundersConfig(cache=str(cache), dataset=str(manifest), kp=4, kz=4, niter=5))
    base = dict(cache=str(cache), dataset=str(manifest), epochs=2, batch_size=16, device="cpu", quiet=True,
                data_mode="memory")
    for name, model, lr in (("t4v", "text4vis", 3e-3), ("cmdcl", "cmdcl", 1e-3)):
        train(TrainConfig(out=str(t / name), lr=lr, **base), HeadConfig(model=model, frames=4, layers=1, heads=4))
    return t


def test_worst_errors_are_the_confident_wrong_ones_in_order():
    predicted = np.array([0, 1, 2, 0])
    confidence = np.array([0.9, 0.8, 0.95, 0.5])
    assert wrong_by_confidence(predicted, confidence, np.array([0, 2, 0, 1]), False).tolist() == [2, 1, 3]
    multi = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]])   # rows 0-2 hit one positive
    assert wrong_by_confidence(predicted, confidence, multi, True).tolist() == [3]


@pytest.mark.slow   # every test of `runs` is: the fixture trains two heads (5-15 s)
def test_the_page_compares_runs_and_needs_nothing_else(runs, tmp_path):
    out = tmp_path / "report.html"
    res = runner.invoke(app, ["report", str(runs / "t4v"), str(runs / "cmdcl"), "--out", str(out), "--errors", "3"])
    assert res.exit_code == 0 and str(out) in res.output, res.output
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", page)   # no URL but data: URIs
    assert "<script" not in page and "<link" not in page and "@import" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    # two curves, two confusion matrices, an explanation for each of the cmdcl run's three errors
    assert len(images) == 2 + 2 + 3
    # one column per run; the options that differ (model, lr) are highlighted, the equal ones not
    header = re.search(r"<thead><tr><th></th>(.*?)</tr></thead>", page).group(1)
    assert header == "<th>t4v</th><th>cmdcl</th>"
    assert re.search(r'<tr class="differs"><th>model</th><td>text4vis</td><td>cmdcl</td>', page)
    assert re.search(r'<tr class="differs"><th>lr</th>', page)
    assert re.search(r"<tr><th>epochs</th><td>2</td><td>2</td></tr>", page)
    assert re.search(r"<tr><th>out</th>", page)                      # where a run was written: no difference
    differing = re.search(r"where the runs differ</th></tr>(.*?)</tbody>", page).group(1)
    assert "<th>lr</th>" in differing and "<th>epochs</th>" not in differing
    summary = json.loads((runs / "t4v" / "summary.json").read_text())
    assert f"<th>test top1</th><td>{summary['metrics']['top1']:.4g}</td>" in page
    assert "cache provenance" in page and "cmdcl-heads train --config" in page
    # names from data are escaped, never markup
    assert "pour &lt;water&gt; &amp; stir" in page and "cut&lt;/td&gt;lettuce" in page and "café crème" in page
    assert "<water>" not in page and "cut</td>lettuce" not in page


@pytest.mark.slow
def test_worst_errors_come_from_the_eval_split_with_best(runs, tmp_path):
    view = read_run(runs / "cmdcl", errors=NUM_TASKS * 3, explain=False)   # every test video could be one
    preds = tmp_path / "preds.jsonl"
    res = runner.invoke(app, ["predict", "--run", str(runs / "cmdcl"), "--out", str(preds), "--top-k", "1",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    wrong = {x["video_id"]: x["top_k"][0]["score"] for x in lines if x["top_k"][0]["key"] != x["target"]}
    assert {e.video_id for e in view.errors} == set(wrong) and wrong   # every wrong one, no right one
    scores = [e.top[0]["score"] for e in view.errors]
    assert scores == sorted(scores, reverse=True) and all(e.truth_rank > 1 for e in view.errors)


@pytest.mark.slow
def test_a_run_whose_cache_is_gone_still_gets_a_page(runs, tmp_path):
    copy = shutil.copytree(runs / "t4v", tmp_path / "moved")
    view = read_run(copy, errors=3)
    assert view.summary is not None and "curves.png" in view.plots
    meta_cache = view.meta["cache_dir"]
    assert meta_cache   # the copy still names the cache; hide it
    hidden = tmp_path / "hidden"
    shutil.move(meta_cache, hidden)
    try:
        view = read_run(copy, errors=3)
    finally:
        shutil.move(hidden, meta_cache)
    assert not view.errors and "could not be read" in view.errors_note
    assert "could not be read" in render([view])


@pytest.mark.slow
def test_an_unfinished_run_gets_a_page_and_a_folder_without_a_run_is_refused(runs, tmp_path):
    copy = shutil.copytree(runs / "t4v", tmp_path / "cut")
    (copy / "summary.json").unlink()   # as a run interrupted after its epochs
    view = read_run(copy, errors=3)
    assert not view.errors and "has not finished" in view.errors_note
    assert "not finished (no summary.json); 2 epoch(s) logged" in render([view])
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "no checkpoint here" in res.output and not (tmp_path / "r.html").exists()


def test_error_rows_escape_video_ids():
    view = RunView(name="r<1>", path=Path("/x/r<1>"), summary=None, history=[], plots={},
                   meta={"head_config": {"model": "text4vis"}, "train_config": {}, "dataset": "d&d",
                         "label_set": "task"},
                   errors=[ErrorRow("vid<img src=x>", ["a&b"], [{"name": "<b>", "score": 0.5}], 2)])
    page = render([view])
    assert "vid&lt;img src=x&gt;" in page and "<img src=x>" not in page and "<bdi>&lt;b&gt;</bdi> (0.500)" in page
    assert "r&lt;1&gt;" in page and "d&amp;d" in page


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "chromium is not installed: run `bash .ci/setup` (it installs Debian's chromium)"
    return found


def load_in_browser(page, tmp_path):
    """(console messages, screenshot PNG path) of one headless Chromium load of `page`."""
    shot = tmp_path / f"{page.stem}.png"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    # every console message (an error, a blocked request) is logged as ...:CONSOLE:<line>] "text"
    return [line for line in res.stderr.splitlines() if ":CONSOLE" in line], shot


@pytest.mark.slow   # a browser start, ~1 s alone, several seconds on a loaded machine
def test_the_page_loads_in_chromium_without_a_console_message_and_shows_something(runs, tmp_path):
    import matplotlib.image

    out = tmp_path / "report.html"
    res = runner.invoke(app, ["report", str(runs / "t4v"), str(runs / "cmdcl"), "--out", str(out), "--errors", "2"])
    assert res.exit_code == 0, res.output
    # the check can fail: a page with a request the policy blocks is reported on the console
    control = tmp_path / "control.html"
    control.write_text(out.read_text(encoding="utf-8").replace("</body>", '<img src="http://example.invalid/x.png">'
                                                                          "</body>"), encoding="utf-8")
    messages, _ = load_in_browser(control, tmp_path)
    assert any("example.invalid" in m for m in messages), messages
    messages, shot = load_in_browser(out, tmp_path)
    assert messages == []
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    colours = np.unique((pixels.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 50 and pixels.std() > 0.05   # text, tables and plots, not one colour


@pytest.mark.slow
def test_report_replaces_no_file_without_force(runs, tmp_path):
    run = shutil.copytree(runs / "t4v", tmp_path / "run")
    summary = (run / "summary.json").read_bytes()
    res = runner.invoke(app, ["report", str(run), "--out", str(run / "summary.json"), "--errors", "0"])
    assert res.exit_code == 2 and "exists" in res.output and "--force" in res.output
    assert (run / "summary.json").read_bytes() == summary
    out = tmp_path / "r.html"
    assert runner.invoke(app, ["report", str(run), "--out", str(out), "--errors", "0"]).exit_code == 0
    out.write_text("mine")
    assert runner.invoke(app, ["report", str(run), "--out", str(out), "--errors", "0"]).exit_code == 2
    assert out.read_text() == "mine"
    res = runner.invoke(app, ["report", str(run), "--out", str(out), "--errors", "0", "--force"])
    assert res.exit_code == 0 and out.read_text().startswith("<!DOCTYPE html>"), res.output


@pytest.mark.slow
@pytest.mark.parametrize("text,problem", [("[]", "holds a JSON list"), ("{not json", "not JSON"),
                                          ("{}", "no valid 'split', 'metrics'")])
def test_a_summary_that_train_did_not_write_is_refused_naming_it(runs, tmp_path, text, problem):
    run = shutil.copytree(runs / "t4v", tmp_path / "run")
    (run / "summary.json").write_text(text)
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html"), "--errors", "0"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and str(run / "summary.json") in out and problem in out, out
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_a_cut_last_metrics_line_is_skipped_with_a_note_and_bad_metadata_is_refused(runs, tmp_path):
    from cmdcl_heads.run import RunFolder

    run = shutil.copytree(runs / "t4v", tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "train_lo')   # a kill mid-append
    view = read_run(run, errors=0)
    assert len(view.history) == 2 and "line 3 is cut short" in render([view])
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n[1]\n')
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html"), "--errors", "0"])
    assert res.exit_code == 2 and "metrics.jsonl: line 2 is no epoch record" in " ".join(res.output.split())
    folder = RunFolder(run)
    ckpt = folder.load_checkpoint("best")
    weights = type("Weights", (), {"state_dict": lambda self: ckpt.model})()
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("dataset", "version")}
    meta["head_config"] = {}
    folder.save_checkpoint("best", meta, weights)
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html"), "--errors", "0"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and "best.safetensors" in out and "lacks 'dataset'" in out, out


def test_bidi_controls_in_label_names_cannot_reorder_the_scores():
    evil = "stir\u202egge yrf\u2066x"
    view = RunView(name="r", path=Path("/x/r"), summary=None, history=[], plots={},
                   meta={"head_config": {"model": "text4vis"}, "train_config": {}, "dataset": "d",
                         "label_set": "task"},
                   errors=[ErrorRow("v\u202e1", [evil], [{"name": evil, "score": 0.5}], 2)])
    page = render([view])
    assert not re.search("[\u202a-\u202e\u2066-\u2069]", page)
    assert "<bdi>stirgge yrfx</bdi> (0.500)" in page


@pytest.mark.slow
def test_only_real_pngs_inside_the_run_folder_are_inlined(runs, tmp_path):
    run = shutil.copytree(runs / "t4v", tmp_path / "run")
    (run / "curves.png").write_text("not a picture")
    outside = tmp_path / "outside.png"
    shutil.copy(run / "confusion.png", outside)
    (run / "confusion.png").unlink()
    (run / "confusion.png").symlink_to(outside)
    view = read_run(run, errors=0)
    assert view.plots == {}
    page = render([view])
    assert "curves.png: not a PNG; not shown" in page and "confusion.png: a link out of the run folder" in page
    assert "data:image/png" not in page
