"""Manifest format: loading, the API, and one test per kind of bad manifest (file, line and field named)."""

import json
import re

import numpy as np
import pytest

from cmdcl_cache.manifest.format import LabelSet, ManifestError, ManifestErrors, MAX_ERRORS, VideoRecord, resolve_dataset_dir
from cmdcl_cache.manifest.io import load_manifest, make_labels_json, write_manifest

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


# ------------------------------------------------------------------------------------ many errors at once

def test_three_errors_in_three_lines_are_reported_in_one_run(tmp_path):
    lines = [good(0), good(1, split="dev"), good(2), good(3, labels={"task": "zzz", "step": []}),
             good(4, duration=-1.0)]
    with pytest.raises(ManifestErrors) as info:
        load_manifest(write_raw(tmp_path, lines))
    err = info.value
    assert [(e.line, e.field) for e in err.errors] == [(2, "split"), (4, "labels.task"), (5, "duration")]
    assert err.total == 3 and (err.line, err.field) == (2, "split")   # the first one, for callers of one error
    msg = str(err).splitlines()
    assert len(msg) == 3 and all(m.startswith(f"{tmp_path / 'videos.jsonl'}:") for m in msg)
    assert isinstance(err, ManifestError)


def test_errors_beyond_the_limit_are_counted(tmp_path):
    lines = [good(i, split="dev") for i in range(MAX_ERRORS + 7)]
    with pytest.raises(ManifestErrors) as info:
        load_manifest(write_raw(tmp_path, lines))
    assert len(info.value.errors) == MAX_ERRORS and info.value.total == MAX_ERRORS + 7
    assert str(info.value).endswith("... and 7 more error(s)")


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    folder = write_raw(tmp_path, [good(0), good(1), good(2)])
    data = (folder / "videos.jsonl").read_bytes().split(b"\n")
    data[1] = data[1].replace(b'"dir/v1"', b'"dir/caf\xe9"')          # Latin-1, not UTF-8
    (folder / "videos.jsonl").write_bytes(b"\n".join(data))
    expect_error(folder, "videos.jsonl", 2, "(encoding)", r"byte b'\\xe9' at byte \d+ of the line is not UTF-8")
    data[1] = b'\xff\xfe' + data[1]
    data[2] = data[2].replace(b'"split": "train"', b'"split": "dev"')
    (folder / "videos.jsonl").write_bytes(b"\n".join(data))
    with pytest.raises(ManifestErrors) as info:   # a bad byte does not hide the other lines' errors
        load_manifest(folder)
    assert [(e.line, e.field) for e in info.value.errors] == [(2, "(encoding)"), (3, "split")]
    labels = json.dumps(LABELS, indent=2, ensure_ascii=False).replace('"task a"', '"t\u00e2che a"')
    (folder / "labels.json").write_bytes(labels.encode("latin-1"))
    line = 1 + labels.split("\n").index(next(l for l in labels.split("\n") if "che a" in l))
    expect_error(folder, "labels.json", line, "(encoding)", "not UTF-8")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    folder = write_raw(tmp_path, [good(0)])
    for name in ("videos.jsonl", "labels.json"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    assert [v.video_id for v in load_manifest(folder).videos] == ["v0"]


# ------------------------------------------------------------------------------------ ids and paths

@pytest.mark.parametrize("vid,what", [
    ("a\x00b", r"control character \(U\+0000\)"), ("tab\there", r"U\+0009"), ("del\x7f", r"U\+007F"),
    ("c1\x85", r"U\+0085"), ("line\u2028sep", "line separator"), ("para\u2029", "paragraph separator"),
    ("\ud800lone", "lone surrogate"), (" lead", "leading or trailing whitespace"),
    ("trail\u3000", "leading or trailing whitespace"), ("", "non-empty"), ("a/b", "path separators"),
    ("a\\b", "path separators"), ("..", "'..'"),
])
def test_video_ids_with_control_characters_or_separators_are_refused(tmp_path, vid, what):
    expect_error(write_raw(tmp_path, [good(0), good(1, video_id=vid)]), "videos.jsonl", 2, "video_id", what)


def test_odd_but_valid_video_ids_are_kept_as_written(tmp_path):
    ids = ["with spaces", "café au lait", "数据-1", "emoji 🐇", "x" * 300, "Case", "case", "-8NaVGEccgc",
           "zero\u200bwidth"]
    m = load_manifest(write_raw(tmp_path, [good(i, video_id=v, path=f"p{i}") for i, v in enumerate(ids)]))
    assert [v.video_id for v in m.videos] == ids


@pytest.mark.parametrize("written,stored", [("./x.mp4", "x.mp4"), ("a//b.mp4", "a/b.mp4"),
                                            ("./a/./b/", "a/b"), ("a b/c d.mp4", "a b/c d.mp4")])
def test_paths_are_normalised(tmp_path, written, stored):
    assert load_manifest(write_raw(tmp_path, [good(0, path=written)])).videos[0].path == stored


def test_two_spellings_of_one_path_are_one_path(tmp_path):
    lines = [good(0, path="clips/x.mp4"), good(1, path="./clips//x.mp4")]
    expect_error(write_raw(tmp_path, lines), "videos.jsonl", 2, "path",
                 r"duplicate path 'clips/x.mp4' \(first on line 1, video 'v0'\)")


@pytest.mark.parametrize("path,what", [(".", "names no file"), ("./", "names no file"),
                                       ("a\x00.mp4", "control character"), ("a/..", "escapes")])
def test_paths_that_name_no_file_are_refused(tmp_path, path, what):
    expect_error(write_raw(tmp_path, [good(0, path=path)]), "videos.jsonl", 1, "path", what)


# ------------------------------------------------------------------------------------ labels.json defaults

def test_a_minimal_labels_json_gets_sensible_defaults(tmp_path):
    folder = write_raw(tmp_path / "my_clips", [{"video_id": "a", "path": "cat/a.mp4", "split": "train",
                                                 "labels": {"class": "cat"}}],
                       labels={"label_sets": {"class": {"labels": ["cat", {"key": "dog"}, {"key": "cartoon_rabbit",
                                                                                             "name": "cartoon rabbit"}]}}})
    m = load_manifest(folder)
    assert (m.dataset, m.default_label_set, m.fine_label_set, m.split_schemes) == ("my_clips", "class", None,
                                                                                   ["default"])
    assert (m.source, m.licence, m.prompts) == ("", "", None)
    ls = m.label_sets["class"]
    assert not ls.multi_label and ls.keys == ["cat", "dog", "cartoon_rabbit"]
    assert ls.names == ["cat", "dog", "cartoon rabbit"]


def test_labels_json_reports_all_its_problems_at_once(tmp_path):
    labels = {"label_sets": {"a": {"labels": ["x"]}, "b": {"labels": ["y"], "multi_label": "yes"}},
              "split_schemes": [], "licence": 3, "colour": "red"}
    with pytest.raises(ManifestErrors) as info:
        load_manifest(write_raw(tmp_path, [good(0)], labels=labels))
    fields = {e.field for e in info.value.errors}
    assert fields == {"colour", "licence", "split_schemes", "label_sets.b.multi_label", "default_label_set"}
    assert "name the one to train on" in str(info.value)


def test_manifest_check_lists_every_problem_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from cmdcl_cache.cli import app

    folder = write_raw(tmp_path / "m", [good(0, split="dev"), good(1), good(2, video_id="a\x00b")])
    (tmp_path / "videos").mkdir()
    res = CliRunner().invoke(app, ["manifest", "check", "--dataset", str(folder), "--video-root",
                                   str(tmp_path / "videos")])
    assert res.exit_code == 2 and "2 problems" in res.output
    assert "videos.jsonl:1: field 'split'" in res.output and "videos.jsonl:3: field 'video_id'" in res.output
