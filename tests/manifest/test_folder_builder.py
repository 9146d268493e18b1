"""`manifest build --dataset folder`: your own videos from class folders or a CSV, as a careless user has them.

The builder never opens a video, so most tests use empty files with video extensions.
"""

import itertools
import json

import pytest
from typer.testing import CliRunner

from cmdcl_cache.cli import app
from cmdcl_cache.manifest.builders import build_manifest, build_records
from cmdcl_cache.manifest.builders.folder import assign_splits, split_counts, video_id_for
from cmdcl_cache.manifest.format import ManifestErrors
from cmdcl_cache.manifest.io import load_manifest

runner = CliRunner()


def touch(root, *rels):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


def test_class_folders_become_a_manifest_that_loads(tmp_path):
    videos = touch(tmp_path / "videos", "cartoon rabbit/clip 1.mp4", "cartoon rabbit/clip 2.MP4",
                   "cartoon rabbit/sub/deep.mkv", "café/a.webm", "café/b.webm", "dog/x.mp4", "dog/y.avi",
                   "dog/z.mov", "dog/notes.txt", "dog/.hidden.mp4", ".git/objects/v.mp4", "README.txt")
    m = build_manifest("folder", None, tmp_path / "out" / "mine", videos=videos)
    again = load_manifest(tmp_path / "out" / "mine")
    assert again.videos == m.videos and m.dataset == "mine" and m.prompts == "generic"
    ls = m.label_sets["class"]
    assert ls.keys == ["café", "cartoon rabbit", "dog"] and ls.names == ["café", "cartoon rabbit", "dog"]
    assert not ls.multi_label and m.fine_label_set is None and m.split_schemes == ["default"]
    by_id = m.by_id()
    assert set(by_id) == {"cartoon rabbit__clip 1", "cartoon rabbit__clip 2", "cartoon rabbit__sub__deep",
                          "café__a", "café__b", "dog__x", "dog__y", "dog__z"}
    assert by_id["cartoon rabbit__sub__deep"].path == "cartoon rabbit/sub/deep.mkv"
    assert all((videos / v.path).is_file() for v in m.videos)
    for key in ls.keys:   # stratified: each class split by the documented counts
        mine = [v for v in m.videos if v.labels["class"] == key]
        counts = tuple(sum(v.split == s for v in mine) for s in ("train", "val", "test"))
        assert counts == split_counts(len(mine), 0.1, 0.2), key
    build_manifest("folder", None, tmp_path / "again", videos=videos)   # same input, same bytes
    for f in ("videos.jsonl", "labels.json"):
        assert ((tmp_path / "again" / f).read_text()
                == (tmp_path / "out" / "mine" / f).read_text().replace('"mine"', '"again"'))


def test_split_counts_keep_a_training_video_and_a_test_video():
    for n, val, test in itertools.product(range(1, 40), (0.0, 0.1, 0.25), (0.0, 0.2, 0.5)):
        train, n_val, n_test = split_counts(n, val, test)
        assert train + n_val + n_test == n and train >= 1 and min(n_val, n_test) >= 0, (n, val, test)
        assert (n_test >= 1) == (n >= 2 and test > 0), (n, val, test)
        assert abs(n_test - n * test) <= 1 and n_val <= n * val + 0.5, (n, val, test)


def test_splits_depend_on_seed_and_ids_only():
    classes = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(7)]}
    base = assign_splits(classes, 0.1, 0.2, seed=0)
    shuffled = assign_splits({"b": classes["b"][::-1], "a": classes["a"][::-1]}, 0.1, 0.2, seed=0)
    alone = assign_splits({"a": classes["a"]}, 0.1, 0.2, seed=0)
    assert base == shuffled and alone == {k: v for k, v in base.items() if k.startswith("a")}
    seeds = {tuple(sorted(assign_splits(classes, 0.1, 0.2, seed=s).items())) for s in range(8)}
    assert len(seeds) > 1   # the seed matters


def test_ids_keep_the_folders():
    assert video_id_for("cat/sub/001.mp4") == "cat__sub__001" and video_id_for("x.mp4") == "x"


def test_every_folder_problem_is_reported_at_once_and_nothing_is_written(tmp_path):
    videos = touch(tmp_path / "videos", "cat/001.mp4", "cat/001.avi", "dog/a.mp4", "loose.mp4",
                   "only_text/notes.txt")
    (videos / "empty").mkdir()
    with pytest.raises(ManifestErrors) as info:
        build_manifest("folder", None, tmp_path / "out", videos=videos)
    problems = {(e.file.replace(str(videos), "DIR"), e.field) for e in info.value.errors}
    assert problems == {("DIR/loose.mp4", "(folder)"), ("DIR/empty", "(folder)"), ("DIR/only_text", "(folder)"),
                        ("DIR/cat/001.mp4", "video_id")}
    assert "'cat__001' is also the id of 'cat/001.avi'" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_one_class_is_refused_and_a_class_of_one_video_trains(tmp_path):
    with pytest.raises(ValueError, match="1 class.*at least two"):
        build_records("folder", videos=touch(tmp_path / "one", "cat/a.mp4", "cat/b.mp4"))
    videos = touch(tmp_path / "two", "cat/a.mp4", "dog/a.mp4", "dog/b.mp4", "dog/c.mp4")
    records, _ = build_records("folder", videos=videos)
    assert [r["split"] for r in records if r["labels"]["class"] == "cat"] == ["train"]


def write_csv(path, text):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_csv_with_quoted_commas_spaces_and_given_splits(tmp_path):
    videos = touch(tmp_path / "videos", "clips/rabbit one.mp4", "clips/b.mp4", "c.mkv", "d.mp4")
    csv = write_csv(tmp_path / "list.csv",
                    'Label , PATH,split\n"rabbit, cartoon",clips/rabbit one.mp4,Train\n'
                    f'dog,./clips//b.mp4,test\n dog ,{videos.resolve() / "c.mkv"},val\n\n'
                    '"rabbit, cartoon",d.mp4,train\n')
    m = build_manifest("folder", None, tmp_path / "m", videos=videos, csv_path=csv)
    assert m.label_sets["class"].keys == ["dog", "rabbit, cartoon"]
    got = {v.path: (v.video_id, v.split, v.labels["class"]) for v in m.videos}
    assert got == {"clips/rabbit one.mp4": ("clips__rabbit one", "train", "rabbit, cartoon"),
                   "clips/b.mp4": ("clips__b", "test", "dog"), "c.mkv": ("c", "val", "dog"),
                   "d.mp4": ("d", "train", "rabbit, cartoon")}


def test_csv_header_typo_is_named(tmp_path):
    videos = touch(tmp_path / "videos", "a.mp4")
    csv = write_csv(tmp_path / "list.csv", "path,lable\na.mp4,cat\n")
    with pytest.raises(ValueError, match=r"list.csv:1: field '\(header\)': unknown column 'lable'; missing "
                                         r"column 'label'"):
        build_records("folder", videos=videos, csv_path=csv)


def test_every_csv_problem_is_reported_at_once(tmp_path):
    videos = touch(tmp_path / "videos", "a.mp4", "b.mp4", "c.mp4", "notes.txt")
    rows = ["path,label,split",
            "a.mp4,cat,train",            # 2: fine
            "b.mp4,dog,validation",       # 3: unknown split
            "missing.mp4,dog,test",       # 4: no such file
            "./a.mp4,cat,train",          # 5: the same file as line 2
            "c.mp4,dog",                  # 6: two fields, not three
            "b.mp4,caf\xe9,train",        # 7: not UTF-8 (Latin-1 below)
            "c.mp4,,train",               # 8: empty label
            "/etc/passwd.mp4,dog,test",   # 9: outside --videos
            "notes.txt,dog,test"]         # 10: not a video
    csv = write_csv(tmp_path / "list.csv", "\n".join(rows).encode("latin-1"))
    with pytest.raises(ManifestErrors) as info:
        build_manifest("folder", None, tmp_path / "out", videos=videos, csv_path=csv)
    got = [(e.line, e.field) for e in info.value.errors]
    assert got == [(7, "(encoding)"), (3, "split"), (4, "path"), (5, "path"), (6, "(row)"), (8, "label"),
                   (9, "path"), (10, "path")]
    text = str(info.value)
    assert "duplicate path 'a.mp4' (first on line 2)" in text and "'validation'" in text
    assert all(line.startswith(str(csv)) for line in text.splitlines())
    assert not (tmp_path / "out").exists()


def test_cli_builds_then_reports_every_problem_with_exit_2(tmp_path):
    videos = touch(tmp_path / "videos", "cat/a.mp4", "cat/b.mp4", "dog/a.mp4", "dog/b.mp4", "dog/c.mp4")
    out = tmp_path / "manifests" / "pets"
    res = runner.invoke(app, ["manifest", "build", "--dataset", "folder", "--videos", str(videos), "--out", str(out),
                              "--prompts", "things", "--licence", "CC0", "--test-fraction", "0.4"])
    assert res.exit_code == 0, res.output
    assert "5 videos" in res.output and f"--dataset {out}" in res.output
    labels = json.loads((out / "labels.json").read_text())
    assert (labels["dataset"], labels["prompts"], labels["licence"]) == ("pets", "things", "CC0")
    before = (out / "videos.jsonl").read_bytes()
    (videos / "loose.mp4").write_bytes(b"")
    (videos / "empty").mkdir()
    res = runner.invoke(app, ["manifest", "build", "--dataset", "folder", "--videos", str(videos), "--out", str(out)])
    assert res.exit_code == 2 and "2 problems" in res.output
    assert "loose.mp4:0: field '(folder)'" in res.output and "empty:0: field '(folder)'" in res.output
    assert (out / "videos.jsonl").read_bytes() == before   # the manifest already there is kept
    for bad in (["--dataset", "folder", "--videos", str(videos)],                          # no --out
                ["--dataset", "coin", "--videos", str(videos), "--out", str(tmp_path / "c")],  # not coin's input
                ["--dataset", "folder", "--videos", str(videos), "--out", str(out), "--prompts", "nouns"],
                ["--dataset", "folder", "--videos", str(videos), "--out", str(out), "--val-fraction", "0.9"]):
        res = runner.invoke(app, ["manifest", "build", *bad])
        assert res.exit_code == 2, (bad, res.output)
    assert (out / "videos.jsonl").read_bytes() == before


def test_linked_class_folder_and_linked_files_are_one_record_each(tmp_path):
    videos = touch(tmp_path / "videos", "cat/a.mp4", "cat/b.mp4", "dog/x.mp4", "dog/y.mp4")
    (videos / "kitty").symlink_to(videos / "cat", target_is_directory=True)   # a second name for a class
    with pytest.raises(ValueError, match=r"class folder 'kitty' is the same folder as class 'cat'"):
        build_records("folder", videos=videos)
    (videos / "kitty").unlink()
    (videos / "dog" / "again.mp4").symlink_to(videos / "dog" / "x.mp4")     # a second name for a file
    (videos / "dog" / "loop").symlink_to(videos / "dog", target_is_directory=True)
    records, _ = build_records("folder", videos=videos)
    assert sorted(r["path"] for r in records) == ["cat/a.mp4", "cat/b.mp4", "dog/again.mp4", "dog/y.mp4"]


def test_csv_with_old_mac_line_ends_and_an_unterminated_quote(tmp_path):
    videos = touch(tmp_path / "videos", "a.mp4", "b.mp4", "c.mp4")
    csv = write_csv(tmp_path / "mac.csv", b"path,label\ra.mp4,cat\rb.mp4,dog\r\nc.mp4,dog\r")
    records, _ = build_records("folder", videos=videos, csv_path=csv)
    assert sorted((r["path"], r["labels"]["class"]) for r in records) == [("a.mp4", "cat"), ("b.mp4", "dog"),
                                                                           ("c.mp4", "dog")]
    csv = write_csv(tmp_path / "quote.csv", 'path,label\na.mp4,cat\nb.mp4,"dog\nc.mp4,dog\n')
    with pytest.raises(ValueError, match=r"quote.csv:\d+: field '\(csv\)'.*unterminated quote"):
        build_records("folder", videos=videos, csv_path=csv)


def test_classes_whose_label_texts_read_the_same_are_refused(tmp_path):
    videos = touch(tmp_path / "videos", "Rabbit/a.mp4", "rabbit/b.mp4", "cartoon_dog/c.mp4", "cartoon dog/d.mp4",
                   "cat/e.mp4")
    with pytest.raises(ManifestErrors) as info:
        build_records("folder", videos=videos)
    text = str(info.value)
    assert "classes 'Rabbit' and 'rabbit' both read" in text
    assert "classes 'cartoon dog' and 'cartoon_dog' both read 'cartoon dog'" in text


def test_out_naming_a_file_is_exit_2_and_the_file_is_untouched(tmp_path):
    videos = touch(tmp_path / "videos", "cat/a.mp4", "dog/b.mp4")
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    res = runner.invoke(app, ["manifest", "build", "--dataset", "folder", "--videos", str(videos), "--out",
                              str(target)])
    assert res.exit_code == 2 and "is a file; a manifest is a folder" in " ".join(res.output.split())
    assert target.read_text() == "mine"
