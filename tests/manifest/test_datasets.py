"""Builders against the real annotation copies in <repo>/../shared/datasets, the committed manifests,
COIN.json and Charades inputs written here in their official formats, and video path resolution."""

import collections
import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cmdcl_cache.cli import app
from cmdcl_cache.manifest.builders import build_manifest, build_records
from cmdcl_cache.manifest.builders import coin
from cmdcl_cache.manifest.format import ManifestError
from cmdcl_cache.manifest.io import load_manifest, write_manifest
from cmdcl_cache.manifest.paths import VideoPathError, build_video_index, check_videos, resolve_video_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def coin_manifest():
    return load_manifest("coin")


@pytest.fixture(scope="module")
def breakfast_manifest():
    return load_manifest("breakfast")


@pytest.mark.slow
def test_builtin_names_resolve_to_the_package_data():
    # package data read through importlib.resources, so that a regular (non-editable) install finds them
    assert load_manifest("coin").root == REPO / "cmdcl_cache" / "manifests" / "coin"


def test_coin_counts(coin_manifest):
    m = coin_manifest
    assert len(m.videos) == 11827
    assert {n: len(ls) for n, ls in m.label_sets.items()} == {"task": 180, "step": 778, "domain": 12}
    assert (len(m.select("train")), len(m.select("test"))) == (9030, 2797)
    assert m.default_label_set == "task" and m.fine_label_set == "step" and m.split_schemes == ["official"]
    # every task has test videos; task id == recipe_type
    assert len({v.labels["task"] for v in m.select("test")}) == 180
    assert all(m.label_sets["task"].index(v.labels["task"]) == v.meta["recipe_type"] for v in m.videos)
    # README example of the COIN authors: ChangeCarTire = 13 with steps 259-263
    assert m.label_sets["task"].keys[13] == "ChangeCarTire"
    step = m.label_sets["step"]
    assert step.keys[258] == "259" and step.names[step.index("261")] == "remove the tire"
    assert sum(len(v.labels["step"]) > 0 for v in m.videos) == 11827
    assert sum(1 for v in m.videos if v.segments) == 11015
    assert sum(1 for v in m.videos if v.duration is not None) == 11015
    assert sorted(v.video_id for v in m.videos if v.meta["excluded_by_vis4mer_malmm"]) == ["AfiVmAjfTNs", "cjwtcDKTQM8"]


def test_coin_segments_and_split_sources(coin_manifest, shared):
    by_id = coin_manifest.by_id()
    # PDPP's `subset` is its own 70/30 split: 500 of its test videos are official training videos
    pdpp_test = {k for item in json.loads((shared / "coin/pdpp/coin_test_30.json").read_text()) for k in item}
    assert collections.Counter(by_id[v].split for v in pdpp_test) == {"test": 2506, "train": 500}
    # distant-supervision step labels are 0-based
    first = (shared / "coin/distant_supervision/coin_step_train.csv").read_text().split("\n", 1)[0].split()
    rec = by_id[first[0].rsplit(".", 1)[0]]
    assert (rec.segments[0]["label"], rec.segments[0]["start"], rec.segments[0]["end"]) == \
        (str(int(first[1]) + 1), float(first[3]), float(first[4]))
    # the step labels of a video are its segments' distinct steps
    for v in coin_manifest.videos[:500]:
        if v.segments:
            assert set(v.labels["step"]) == {s["label"] for s in v.segments}


def test_breakfast_counts(breakfast_manifest):
    m = breakfast_manifest
    assert len(m.videos) == 1712
    assert {n: len(ls) for n, ls in m.label_sets.items()} == {"activity": 10, "action": 48}
    assert m.label_sets["action"].keys[:2] == ["SIL", "pour_cereals"] and m.label_sets["action"].keys[47] == "stir_tea"
    assert m.label_sets["activity"].keys[0] == "cereals"
    assert m.split_schemes == ["vis4mer", "s1", "s2", "s3", "s4"]
    assert (len(m.select("train")), len(m.select("test"))) == (1357, 355)
    assert [len(m.select("test", scheme=s)) for s in ("s1", "s2", "s3", "s4")] == [252, 451, 433, 576]
    tests = [{v.video_id for v in m.select("test", scheme=s)} for s in ("s1", "s2", "s3", "s4")]
    assert set().union(*tests) == {v.video_id for v in m.videos} and sum(map(len, tests)) == 1712
    assert {v.meta["participant"] for v in m.select("test")} == {f"P{i}" for i in range(47, 55)}
    rec = m.by_id()["P03_cam01_P03_cereals"]
    assert rec.path == "P03/cam01/P03_cereals" and rec.split_for("s1") == "test"
    # frames 0-29 SIL, 30-149 take_bowl at 15 fps
    assert rec.segments[:2] == ({"label": "SIL", "set": "action", "start": 0.0, "end": 2.0},
                                {"label": "take_bowl", "set": "action", "start": 2.0, "end": 10.0})
    assert rec.duration == pytest.approx(832 / 15)
    stereo = m.by_id()["P03_stereo01_P03_cereals"]
    assert stereo.path == "P03/stereo/P03_cereals_ch0"
    assert stereo.meta["path_alternatives"] == ["P03/stereo01/P03_cereals"]
    assert sum(len(v.segments) for v in m.videos) == 11656


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["coin", "breakfast"])
def test_rebuild_reproduces_committed_manifest(tmp_path, shared, dataset):
    build_manifest(dataset, shared / dataset, tmp_path / dataset)
    for f in ("videos.jsonl", "labels.json"):
        assert (tmp_path / dataset / f).read_bytes() == (REPO / "cmdcl_cache" / "manifests" / dataset / f).read_bytes(), f


@pytest.mark.slow
def test_coin_from_official_coin_json(tmp_path, shared, coin_manifest):
    """A small COIN.json in the official format (`database`), made from PDPP entries with the official subset."""
    entries = {}
    for item in json.loads((shared / "coin/pdpp/coin_test_30.json").read_text())[:6]:
        entries.update(item)
    by_id = coin_manifest.by_id()
    for vid, e in entries.items():
        e["subset"] = {"train": "training", "test": "testing"}[by_id[vid].split]
    first = next(iter(entries))
    entries[first]["class"] = {v: k for k, v in coin.OLD_TASK_NAMES.items()}.get(entries[first]["class"],
                                                                                    entries[first]["class"])
    for f in ("taxonomy_target_action_mapping.csv", "taxonomy_domain_target_mapping.csv"):
        (tmp_path / f).write_bytes((shared / "coin" / f).read_bytes())
    (tmp_path / "COIN.json").write_text(json.dumps({"version": "1.0", "database": entries}, indent=1))
    videos, labels = build_records("coin", tmp_path / "COIN.json")
    ref_videos, ref_labels = build_records("coin", shared / "coin")
    assert labels == ref_labels
    ref = {r["video_id"]: r for r in ref_videos}
    assert len(videos) == 6 and all(r == ref[r["video_id"]] for r in videos)
    # a step that belongs to another task is refused, naming the file, line and field
    bad = json.loads(json.dumps(entries))
    tax = coin.Taxonomy(tmp_path)
    bad[first]["annotation"][0]["id"] = next(str(s) for s, (_, t) in tax.steps.items() if t != bad[first]["recipe_type"])
    (tmp_path / "COIN.json").write_text(json.dumps({"database": bad}, indent=1))
    with pytest.raises(ManifestError, match=rf"COIN.json:\d+: field 'database.{first}.annotation.id'"):
        build_records("coin", tmp_path / "COIN.json")


CHARADES_HEADER = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                   "descriptions", "actions", "length"]


def write_charades(folder: Path, bad_action=False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Charades_v1_classes.txt").write_text(
        "c000 Holding some clothes\nc001 Putting clothes somewhere\nc002 Taking some clothes from somewhere\n")
    rows = {"train": [["46GP8", "HR43", "Kitchen", "6", "7", "Yes", "A person cooks.", "food;stove",
                       "A person is cooking;\nthen leaves.", "c001 11.90 21.20;c000 0.00 12.60;c001 3 5", "24.83"],
                      ["N11GT", "0KZ7", "Stairs", "6", "7", "Yes", "Walks.", "stairs", "Walks up.", "", "30.00"]],
            "test": [["YSKX3", "QRS3", "Bedroom", "7", "6", "Yes", "Dresses.", "clothes", "Gets dressed.",
                      "c002 1.5 8.2" if not bad_action else "c999 1 2", "17.10"]]}
    for split, rs in rows.items():
        with open(folder / f"Charades_v1_{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CHARADES_HEADER)
            w.writerows(rs)


def test_charades_from_official_format(tmp_path):
    write_charades(tmp_path / "ann")
    res = CliRunner().invoke(app, ["manifest", "build", "--dataset", "charades", "--annotations",
                                   str(tmp_path / "ann"), "--out", str(tmp_path / "charades")])
    assert res.exit_code == 0, res.output
    m = load_manifest(tmp_path / "charades")
    assert m.label_sets["action"].multi_label and m.label_sets["action"].keys == ["c000", "c001", "c002"]
    assert [(v.video_id, v.split) for v in m.videos] == [("46GP8", "train"), ("N11GT", "train"), ("YSKX3", "test")]
    first = m.videos[0]
    assert first.labels["action"] == ["c000", "c001"] and first.duration == 24.83 and first.path == "46GP8"
    assert first.segments[0] == {"label": "c001", "set": "action", "start": 11.9, "end": 21.2}
    assert m.videos[1].labels["action"] == [] and m.videos[1].segments == ()
    assert m.targets(m.videos, "action").tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    write_charades(tmp_path / "bad", bad_action=True)
    with pytest.raises(ManifestError, match=r"Charades_v1_test.csv:2: field 'actions': .*'c999 1 2'"):
        build_records("charades", tmp_path / "bad")


def _touch(root: Path, *rels):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def test_resolve_video_path(tmp_path, coin_manifest, breakfast_manifest):
    c, b = coin_manifest.by_id(), breakfast_manifest.by_id()
    _touch(tmp_path, "-8NaVGEccgc.mp4", "UseAnalyticalBalance/-Kw5jzhp_S0.mkv", "-Tiv4Ua1rFQ.webm",
           "Task/-Tiv4Ua1rFQ.mp4", "dup/a/x.mp4",
           "P03/cam01/P03_cereals.avi", "P03/cam01/P03_cereals.avi.labels",
           "P03/stereo/P03_cereals_ch0.avi", "P03/stereo/P03_cereals_ch1.avi",
           "P04/stereo01/P04_cereals.avi", "P03/cam01/P03_milk.avi", "P03/cam01/P03_milk.mp4")
    index = build_video_index(tmp_path)
    for kw in ({}, {"index": index}):  # glob-based and index-based resolution agree
        assert resolve_video_path(c["-8NaVGEccgc"], tmp_path, **kw) == tmp_path / "-8NaVGEccgc.mp4"
        assert resolve_video_path(c["-Kw5jzhp_S0"], tmp_path, **kw) == \
            tmp_path / "UseAnalyticalBalance/-Kw5jzhp_S0.mkv"
        # the flat file wins over a task folder: only the first matching rule counts
        assert resolve_video_path(c["-Tiv4Ua1rFQ"], tmp_path, **kw) == tmp_path / "-Tiv4Ua1rFQ.webm"
        assert resolve_video_path(b["P03_cam01_P03_cereals"], tmp_path, **kw) == \
            tmp_path / "P03/cam01/P03_cereals.avi"
        assert resolve_video_path(b["P03_stereo01_P03_cereals"], tmp_path, **kw) == \
            tmp_path / "P03/stereo/P03_cereals_ch0.avi"
        assert resolve_video_path(b["P04_stereo01_P04_cereals"], tmp_path, **kw) == \
            tmp_path / "P04/stereo01/P04_cereals.avi"
        with pytest.raises(VideoPathError, match="ambiguous") as info:
            resolve_video_path(b["P03_cam01_P03_milk"], tmp_path, **kw)
        assert info.value.kind == "ambiguous" and len(info.value.candidates) == 2
        with pytest.raises(VideoPathError, match="no file for path 'P03/cam01/P03_coffee'") as info:
            resolve_video_path(b["P03_cam01_P03_coffee"], tmp_path, **kw)
        assert info.value.kind == "missing"
    result = check_videos(breakfast_manifest.videos, tmp_path)
    assert len(result["found"]) == 3 and len(result["ambiguous"]) == 1 and len(result["missing"]) == 1708


def test_manifest_check_cli(tmp_path):
    ann = tmp_path / "ann"
    write_charades(ann)
    videos, labels = build_records("charades", ann)
    write_manifest(tmp_path / "m", videos, labels)
    _touch(tmp_path / "videos", "46GP8.mp4", "YSKX3.mp4", "YSKX3.webm")
    runner = CliRunner()
    res = runner.invoke(app, ["manifest", "check", "--dataset", str(tmp_path / "m"), "--video-root",
                              str(tmp_path / "videos"), "--missing-out", str(tmp_path / "missing.txt")])
    assert res.exit_code == 1, res.output
    assert "found" in res.output and "N11GT" in res.output and "YSKX3: YSKX3.mp4, YSKX3.webm" in res.output
    assert (tmp_path / "missing.txt").read_text() == "N11GT\n"
    (tmp_path / "videos" / "YSKX3.webm").unlink()
    res = runner.invoke(app, ["manifest", "check", "--dataset", str(tmp_path / "m"), "--video-root",
                              str(tmp_path / "videos"), "--allow-missing"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["manifest", "check", "--dataset", str(tmp_path / "nowhere"), "--video-root",
                              str(tmp_path / "videos")])
    assert res.exit_code == 2 and "does not exist" in res.output
