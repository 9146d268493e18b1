"""Manifest format: loading, the API, and one test per kind of bad manifest (file, line and field named)."""

import json
import re

import numpy as np
import pytest

from cmdcl_cache.manifest import (LabelSet, ManifestError, VideoRecord, load_manifest, make_labels_json,
                                  resolve_dataset_dir, write_manifest)

LABELS = make_labels_json("toy", {"task": (False, [("a", "task a"), ("b", "task b")]),
                                  "step": (True, [("1", "one"), ("2", "two"), ("3", "three")])},
                          default_label_set="task", fine_label_set="step", split_schemes=["official", "s1"],
                          source="test", licence="none")


def good(i=0, **kw):
    rec = {"video_id": f"v{i}", "path": f"dir/v{i}", "split": "train", "labels": {"task": "a", "step": ["1", "2"]},
           "splits": {"s1": "test"}, "duration": 10.0,
           "segments": [{"label": "1", "set": "step", "start": 0.0, "end": 2.5}], "meta": {"x": 1}}
    rec.update(kw)
    return rec


def write_raw(folder, lines, labels=LABELS):
    folder.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (folder / "labels.json").write_text(labels if isinstance(labels, str) else json.dumps(labels, indent=2))
    (folder / "videos.jsonl").write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return folder


def expect_error(folder, file, line, field, what=""):
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    msg = str(info.value)
    prefix = f"{folder / file}:{line}: field '{field}': "
    assert msg.startswith(prefix), msg
    assert re.search(what, msg), msg
    assert (info.value.line, info.value.field) == (line, field)


def test_roundtrip_and_api(tmp_path):
    videos = [good(0), good(1, split="test", labels={"task": "b", "step": ["3"]}, splits={"s1": "train"}),
              good(2, split="val", labels={"task": "b", "step": []}, splits={"s1": "train"})]
    m = write_manifest(tmp_path / "m", videos, LABELS)
    again = load_manifest(tmp_path / "m")
    assert again.videos == m.videos and len(again.videos) == 3
    assert isinstance(again.videos[0], VideoRecord) and again.videos[0].segments[0]["end"] == 2.5
    assert again.default_label_set == "task" and again.fine_label_set == "step"
    assert again.split_schemes == ["official", "s1"] and again.dataset == "toy"
    assert [v.video_id for v in again.select("train")] == ["v0"]
    assert [v.video_id for v in again.select("test", scheme="s1")] == ["v0"]
    assert [v.video_id for v in again.select("train", scheme="official")] == ["v0"]
    assert again.videos[1].split_for("s1") == "train" and again.videos[1].split_for(None) == "test"
    np.testing.assert_array_equal(again.targets(again.videos, "task"), np.array([0, 1, 1]))
    assert again.targets(again.videos, "task").dtype == np.int64
    multi = again.targets(again.videos, "step")
    assert multi.dtype == np.float32 and multi.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert again.label_sets["step"].index("3") == 2 and again.label_sets["task"].names == ["task a", "task b"]
    assert set(again.by_id()) == {"v0", "v1", "v2"}
    with pytest.raises(ValueError):
        again.select("train", scheme="s9")


def test_write_is_deterministic_and_validates_before_writing(tmp_path):
    write_manifest(tmp_path / "a", [good(0)], LABELS)
    write_manifest(tmp_path / "b", [VideoRecord(**{**good(0), "segments": tuple(good(0)["segments"])})], LABELS)
    for f in ("videos.jsonl", "labels.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    with pytest.raises(ManifestError, match=r"videos.jsonl:1: field 'split'"):
        write_manifest(tmp_path / "c", [good(0, split="dev")], LABELS)
    assert not (tmp_path / "c").exists()


def test_label_set_index_unknown_key():
    ls = LabelSet("task", False, ["a", "b"], ["A", "B"])
    assert ls.index("b") == 1
    with pytest.raises(KeyError, match="no key 'z'"):
        ls.index("z")


def test_missing_field(tmp_path):
    rec = good(1)
    del rec["split"]
    expect_error(write_raw(tmp_path, [good(0), rec]), "videos.jsonl", 2, "split", "missing field")


def test_wrong_type(tmp_path):
    expect_error(write_raw(tmp_path, [good(0, duration="long")]), "videos.jsonl", 1, "duration", "number")
    expect_error(write_raw(tmp_path, [good(0, video_id=7)]), "videos.jsonl", 1, "video_id", "string")


def test_duplicate_video_id(tmp_path):
    expect_error(write_raw(tmp_path, [good(0), good(1), good(0)]), "videos.jsonl", 3, "video_id",
                 "duplicate video id 'v0' \\(first on line 1\\)")


def test_label_key_not_in_labels_json(tmp_path):
    expect_error(write_raw(tmp_path, [good(0), good(1, labels={"task": "zzz", "step": []})]),
                 "videos.jsonl", 2, "labels.task", "'zzz' is not in labels.json")
    expect_error(write_raw(tmp_path, [good(0, segments=[{"label": "9", "set": "step", "start": 0, "end": 1}])]),
                 "videos.jsonl", 1, "segments[0].label", "'9' is not in labels.json")


def test_unknown_split(tmp_path):
    expect_error(write_raw(tmp_path, [good(0, split="dev")]), "videos.jsonl", 1, "split", "allowed: train, val, test")
    expect_error(write_raw(tmp_path, [good(0, splits={"s1": "holdout"})]), "videos.jsonl", 1, "splits.s1", "unknown split")
    expect_error(write_raw(tmp_path, [good(0, splits={"s1": "test", "s7": "test"})]), "videos.jsonl", 1, "splits.s7",
                 "not declared")


@pytest.mark.parametrize("path", ["/data/v0.mp4", "../v0", "a/../../v0", "C:/videos/v0", "a\\b"])
def test_path_escaping_the_video_root(tmp_path, path):
    expect_error(write_raw(tmp_path, [good(0, path=path)]), "videos.jsonl", 1, "path", "absolute|escapes|POSIX")


def test_malformed_json(tmp_path):
    expect_error(write_raw(tmp_path, [good(0), good(1), '{"video_id": "v2", "path": '], ), "videos.jsonl", 3,
                 "(json)", "malformed JSON")
    expect_error(write_raw(tmp_path, [good(0)], labels='{"dataset": "toy",\n  "label_sets": }'), "labels.json", 2,
                 "(json)", "malformed JSON")


def test_empty_file(tmp_path):
    expect_error(write_raw(tmp_path, []), "videos.jsonl", 1, "(file)", "empty")
    expect_error(write_raw(tmp_path, [good(0)], labels=""), "labels.json", 1, "(file)", "empty")


def test_missing_labels_json(tmp_path):
    expect_error(write_raw(tmp_path, [good(0)], labels=None), "labels.json", 0, "(file)", "not found")


def test_label_set_not_declared(tmp_path):
    expect_error(write_raw(tmp_path, [good(0, labels={"task": "a", "verb": "cut"})]), "videos.jsonl", 1,
                 "labels.verb", "not declared in labels.json")


def test_single_label_given_a_list(tmp_path):
    expect_error(write_raw(tmp_path, [good(0, labels={"task": ["a"]})]), "videos.jsonl", 1, "labels.task",
                 "single-label set: expected one key")


def test_multi_label_given_a_string(tmp_path):
    expect_error(write_raw(tmp_path, [good(0, labels={"task": "a", "step": "1"})]), "videos.jsonl", 1,
                 "labels.step", "multi-label set: expected a list")


def test_bad_labels_json_structure(tmp_path):
    dup = json.loads(json.dumps(LABELS))
    dup["label_sets"]["task"]["labels"].append({"key": "a", "name": "again"})
    text = json.dumps(dup, indent=2)
    lines = [i + 1 for i, l in enumerate(text.split("\n")) if l.strip() == '"key": "a",']
    assert len(lines) == 2
    line = lines[1]
    expect_error(write_raw(tmp_path, [good(0)], labels=text), "labels.json", line,
                 "label_sets.task.labels[2].key", "duplicate key 'a'")
    bad = {**LABELS, "default_label_set": "verb"}
    text = json.dumps(bad, indent=2)
    expect_error(write_raw(tmp_path, [good(0)], labels=text), "labels.json", 3, "default_label_set", "not in label_sets")


def test_resolve_dataset_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CMDCL_MANIFESTS", str(tmp_path / "mf"))
    monkeypatch.setenv("CMDCL_DEMO", str(tmp_path / "demo"))
    assert resolve_dataset_dir("coin") == tmp_path / "mf" / "coin"
    assert resolve_dataset_dir("demo") == tmp_path / "demo"
    assert resolve_dataset_dir(tmp_path) == tmp_path
    with pytest.raises(ManifestError, match="field 'dataset': not a built-in dataset"):
        resolve_dataset_dir("nosuchdataset")
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest("charades")
