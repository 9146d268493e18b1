"""The demo set: it renders, decord reads it back exactly, the manifest follows the format of cmdcl_cache/manifest/format.py, it is
deterministic, the background confounder is measurably on in train/val and off in test, and the atomic
actions can be told apart from the pixels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest
from typer.testing import CliRunner

from cmdcl_cache.manifest import demo
from cmdcl_cache.cli import app

SIZE = (64, 48)  # W, H: not square, so that a swapped axis shows
FPS = 4
SMALL = dict(num_videos_per_activity_train=5, num_videos_per_activity_val=1, num_videos_per_activity_test=4)


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    calls = []
    manifest_dir = demo.make_demo(out, **SMALL, seed=0, size=SIZE, fps=FPS,
                                  progress=lambda done, total: calls.append((done, total)))
    lines = [json.loads(line) for line in (manifest_dir / "videos.jsonl").read_text().splitlines()]
    labels = json.loads((manifest_dir / "labels.json").read_text())
    return out, manifest_dir, lines, labels, calls


def _frames(out: Path, line: dict) -> np.ndarray:
    vr = decord.VideoReader(str(out / "videos" / line["path"]))
    return vr.get_batch(list(range(len(vr)))).asnumpy()


# ------------------------------------------------------------------------------ the manifest contract

def _check_contract(lines: list[dict], labels: dict) -> None:
    """A minimal check of the manifest format, independent of cmdcl_cache.manifest."""
    assert set(labels) == {"dataset", "default_label_set", "fine_label_set", "split_schemes", "label_sets",
                           "source", "licence"}
    sets = labels["label_sets"]
    assert labels["default_label_set"] in sets and labels["fine_label_set"] in sets
    assert isinstance(labels["split_schemes"], list) and labels["split_schemes"]
    keys = {}
    for name, s in sets.items():
        assert set(s) == {"multi_label", "labels"} and isinstance(s["multi_label"], bool)
        ks = [lab["key"] for lab in s["labels"]]
        assert len(ks) == len(set(ks)), f"duplicate keys in {name}"
        assert all(isinstance(lab["name"], str) and lab["name"] for lab in s["labels"])
        keys[name] = set(ks)
    allowed = {"video_id", "path", "split", "labels", "splits", "duration", "segments", "meta"}
    ids = [line["video_id"] for line in lines]
    assert len(ids) == len(set(ids))
    for line in lines:
        assert set(line) <= allowed and {"video_id", "path", "split", "labels"} <= set(line)
        assert line["split"] in {"train", "val", "test"}
        assert "\\" not in line["path"] and not line["path"].startswith("/")
        for set_name, value in line["labels"].items():
            if sets[set_name]["multi_label"]:
                assert isinstance(value, list) and set(value) <= keys[set_name]
            else:
                assert isinstance(value, str) and value in keys[set_name]
        assert isinstance(line["duration"], float) and line["duration"] > 0
        for seg in line["segments"]:
            assert set(seg) == {"label", "set", "start", "end"}
            assert seg["label"] in keys[seg["set"]]
            assert 0.0 <= seg["start"] < seg["end"] <= line["duration"]


def test_manifest_follows_contract(demo_set):
    _, manifest_dir, lines, labels, calls = demo_set
    _check_contract(lines, labels)
    assert labels["dataset"] == "demo"
    assert labels["default_label_set"] == "activity" and labels["fine_label_set"] == "action"
    assert labels["label_sets"]["activity"]["multi_label"] is False
    assert labels["label_sets"]["action"]["multi_label"] is True
    n = len(demo.ACTIVITIES)
    assert Counter(line["split"] for line in lines) == {"train": 5 * n, "val": 1 * n, "test": 4 * n}
    assert calls[-1] == (len(lines), len(lines)) and len(calls) == len(lines)
    assert [line["video_id"] for line in lines] == sorted(line["video_id"] for line in lines)


def test_manifest_loads_with_the_project_loader_when_present(demo_set):
    # cmdcl_cache.manifest is written on another branch; where it exists it must accept the demo set
    try:
        from cmdcl_cache.manifest.io import load_manifest
    except ImportError:
        _, _, lines, labels, _ = demo_set
        _check_contract(lines, labels)
        return
    _, manifest_dir, lines, _, _ = demo_set
    m = load_manifest(manifest_dir)
    assert len(m.videos) == len(lines)
    assert m.targets(m.select("train"), "action").shape == (len(m.select("train")), len(demo.ACTIONS))


def test_segments_tile_the_video_in_the_activity_order(demo_set):
    _, _, lines, _, _ = demo_set
    order = {key: actions for key, _, actions, _ in demo.ACTIVITIES}
    for line in lines:
        segs = line["segments"]
        assert tuple(s["label"] for s in segs) == order[line["labels"]["activity"]]
        assert segs[0]["start"] == 0.0 and segs[-1]["end"] == line["duration"]
        assert all(a["end"] == b["start"] for a, b in zip(segs, segs[1:]))
        assert sorted(line["labels"]["action"]) == sorted({s["label"] for s in segs})
        assert 6.0 <= line["duration"] <= 10.0
        # boundaries fall on frames
        assert all(abs(s["start"] * FPS - round(s["start"] * FPS)) < 1e-9 for s in segs)


def test_order_matters_between_assemble_and_disassemble():
    acts = {key: actions for key, _, actions, _ in demo.ACTIVITIES}
    assert set(acts["assemble"]) == set(acts["disassemble"])
    assert acts["assemble"] != acts["disassemble"]
    used = Counter(a for actions in acts.values() for a in actions)
    assert set(used) == {key for key, _, _ in demo.ACTIONS}
    assert sum(c > 1 for c in used.values()) >= 5  # most atomic actions are shared between activities


# ------------------------------------------------------------------------------------- the videos

def test_decord_reads_every_video_with_the_planned_frames(demo_set):
    out, _, lines, _, _ = demo_set
    plans = {p.video_id: p for p in demo.plan_demo(0, 5, 1, 4, fps=FPS)}
    errors = []
    for line in lines:
        vr = decord.VideoReader(str(out / "videos" / line["path"]))
        plan = plans[line["video_id"]]
        assert len(vr) == plan.num_frames == round(line["duration"] * FPS)
        assert vr[0].shape == (SIZE[1], SIZE[0], 3)
        assert vr.get_avg_fps() == pytest.approx(FPS)
        decoded = vr.get_batch(list(range(len(vr)))).asnumpy().astype(np.float32)
        rendered = demo.render_frames(plan, SIZE).astype(np.float32)
        errors.append(np.abs(decoded - rendered).mean())
        # frame f decodes to rendered frame f, not to a neighbour (no dropped or repeated frame)
        for shift in (1, -1):
            shifted = np.abs(decoded[max(shift, 0):len(decoded) + min(shift, 0)]
                             - rendered[max(-shift, 0):len(rendered) + min(-shift, 0)]).mean()
            assert errors[-1] < shifted, (line["video_id"], shift)
    # 4:2:0 chroma on 64x48 glyph edges costs a few grey levels on average; more means something broke
    assert max(errors) < 5.0, f"lossy coding drifted too far from the rendered frames: {max(errors):.2f}"


def test_same_seed_same_set_other_seed_other_set(tmp_path):
    tiny = dict(num_videos_per_activity_train=1, num_videos_per_activity_val=0, num_videos_per_activity_test=1,
                size=(32, 32), fps=4)
    a = demo.make_demo(tmp_path / "a", seed=3, **tiny)
    b = demo.make_demo(tmp_path / "b", seed=3, **tiny)
    c = demo.make_demo(tmp_path / "c", seed=4, **tiny)
    for name in ("videos.jsonl", "labels.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "videos.jsonl").read_bytes() != (c / "videos.jsonl").read_bytes()
    lines = [json.loads(line) for line in (a / "videos.jsonl").read_text().splitlines()]
    for line in lines:
        fa, fb = _frames(tmp_path / "a", line), _frames(tmp_path / "b", line)
        assert fa.shape == fb.shape and np.array_equal(fa, fb)


# ------------------------------------------------------------------------------- the confounder

def _cramers_v(xs: list[str], ys: list[str]) -> float:
    rows, cols = sorted(set(xs)), sorted(set(ys))
    table = np.zeros((len(rows), len(cols)))
    for x, y in zip(xs, ys):
        table[rows.index(x), cols.index(y)] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    k = min(len(rows), len(cols)) - 1
    return float(np.sqrt(chi2 / (table.sum() * k))) if k > 0 else 0.0


def _confounding(lines: list[dict]) -> dict[str, tuple[float, float]]:
    """(share on the activity's own background, Cramér's V of background vs activity) per split, where
    an activity's own background is measured as its most frequent one in train."""
    train = [line for line in lines if line["split"] == "train"]
    own = {}
    for activity in {line["labels"]["activity"] for line in train}:
        own[activity] = Counter(line["meta"]["background"] for line in train
                                if line["labels"]["activity"] == activity).most_common(1)[0][0]
    result = {}
    for split in ("train", "val", "test"):
        sel = [line for line in lines if line["split"] == split]
        if not sel:
            continue
        acts = [line["labels"]["activity"] for line in sel]
        bgs = [line["meta"]["background"] for line in sel]
        share = float(np.mean([own[a] == b for a, b in zip(acts, bgs)]))
        result[split] = (share, _cramers_v(acts, bgs))
    return result


def test_backgrounds_go_with_activities_in_train_and_not_in_test(demo_set):
    _, _, lines, _, _ = demo_set
    stats = _confounding(lines)
    (train_share, train_v), (test_share, test_v) = stats["train"], stats["test"]
    assert train_share >= 0.8 and train_v >= 0.7, stats
    assert test_share <= 0.4 and test_v <= 0.2, stats
    assert train_share < 1.0  # never a perfect shortcut


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_plan_confounding_is_exact(seed):
    plans = demo.plan_demo(seed)  # default sizes; planning only, nothing rendered
    lines = demo.manifest_lines(plans, fps=8)
    stats = _confounding(lines)
    assert stats["train"][0] == pytest.approx(0.9)
    assert stats["val"][0] >= 0.8
    assert stats["test"][0] == pytest.approx(1 / len(demo.BACKGROUNDS)) and stats["test"][1] == pytest.approx(0.0)
    # every activity has at least one train video off its own background
    for activity, _, _, own_bg in demo.ACTIVITIES:
        bgs = [p.background for p in plans if p.split == "train" and p.activity == activity]
        assert own_bg in bgs and any(b != own_bg for b in bgs)


# -------------------------------------------------------------------- the actions are visible

def _foreground_features(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: mean colour, centroid and area of the pixels that differ from the video's background,
    estimated as the per-pixel median over time (the glyphs move, the backgrounds do not)."""
    f = frames.astype(np.float32)
    background = np.median(f, axis=0)
    mask = np.abs(f - background).sum(-1) > 60
    t, h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w]
    area = mask.reshape(t, -1).mean(1)
    n = np.maximum(mask.reshape(t, -1).sum(1), 1)
    colour = (f * mask[..., None]).reshape(t, -1, 3).sum(1) / n[:, None] / 255.0
    cx = (mask * xs).reshape(t, -1).sum(1) / n / w
    cy = (mask * ys).reshape(t, -1).sum(1) / n / h
    return np.column_stack([colour, cx, cy, area]), area


def test_atomic_actions_are_visible_and_distinct(demo_set):
    out, _, lines, _, _ = demo_set
    feats, labels, splits, areas = [], [], [], []
    for line in lines:
        x, area = _foreground_features(_frames(out, line))
        for seg in line["segments"]:
            s, e = round(seg["start"] * FPS), round(seg["end"] * FPS)
            feats.append(x[s:e]), areas.append(area[s:e])
            labels += [seg["label"]] * (e - s)
            splits += [line["split"]] * (e - s)
    x, area = np.concatenate(feats), np.concatenate(areas)
    labels, splits = np.array(labels), np.array(splits)
    assert (area > 0.01).mean() > 0.95, "a glyph should be in (almost) every frame"
    # nearest class mean on train frames, scored on test frames (backgrounds independent of labels there)
    keys = sorted(set(labels))
    tr, te = splits == "train", splits == "test"
    means = np.stack([x[tr & (labels == k)].mean(0) for k in keys])
    pred = np.array(keys)[np.argmin(((x[te, None, :] - means[None]) ** 2).sum(-1), axis=1)]
    accuracy = (pred == labels[te]).mean()
    assert accuracy > 0.8, f"atomic actions hard to tell apart from pixels: {accuracy:.2f} (chance 0.125)"


def test_glyphs_move_as_their_names_say(demo_set):
    out, _, lines, _, _ = demo_set
    moves = {"circle_slides_right": (3, +1), "diamond_weaves_left": (3, -1), "cross_falls": (4, +1)}
    seen = Counter()
    for line in lines:
        x, _ = _foreground_features(_frames(out, line))
        for seg in line["segments"]:
            if seg["label"] in moves:
                column, sign = moves[seg["label"]]
                s, e = round(seg["start"] * FPS), round(seg["end"] * FPS)
                track = x[s:e, column]
                assert sign * (track[-1] - track[0]) > 0.3, (line["video_id"], seg)
                seen[seg["label"]] += 1
    assert set(seen) == set(moves)


# ----------------------------------------------------------------------------------------- CLI

def test_cli_demo_make(tmp_path):
    out = tmp_path / "set"
    result = CliRunner().invoke(app, ["demo", "make", str(out), "--train", "1", "--val", "0", "--test", "1",
                                      "--size", "32x32", "--fps", "4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "manifest:" in result.output and "cmdcl-cache extract --dataset demo" in result.output
    assert len(list((out / "videos").glob("*.mp4"))) == 2 * len(demo.ACTIVITIES)
    assert (out / "manifest" / "labels.json").is_file()


def test_cli_rejects_bad_size(tmp_path):
    result = CliRunner().invoke(app, ["demo", "make", str(tmp_path / "x"), "--size", "33x32"])
    assert result.exit_code != 0 and "size" in result.output
    assert not (tmp_path / "x").exists()


def test_mpeg4_fallback_also_reads_back_frame_exact(tmp_path):
    # the codec used where an FFmpeg build lacks libx264
    plan = demo.plan_demo(0, 1, 0, 0, fps=FPS)[0]
    rendered = demo.render_frames(plan, SIZE)
    demo.write_mp4(tmp_path / "v.mp4", rendered, FPS, codec="mpeg4")
    vr = decord.VideoReader(str(tmp_path / "v.mp4"))
    assert len(vr) == plan.num_frames
    decoded = vr.get_batch(list(range(len(vr)))).asnumpy()
    assert decoded.shape == rendered.shape
    assert np.abs(decoded.astype(np.float32) - rendered).mean() < 5.0
    assert not (tmp_path / "v.part.mp4").exists()
