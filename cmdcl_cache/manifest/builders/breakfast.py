"""Breakfast Actions (Kuehne, Arslan & Serre, CVPR 2014) manifest builder.

Reads the copies in shared/datasets/breakfast (see its PROVENANCE.md):
- `activities_derived.txt`: the 10 activities in ViS4mer's class_id order -> label set `activity`
  (default, single-label), keys "cereals", "coffee", ...
- `mapping.txt`: the 48 actions, ids 0-47 -> label set `action` (fine, multi-label), keys in mapping.txt order.
  **SIL** is kept: it is in the label set because mapping.txt has it (id 0) and the frame-level ground truth
  uses it, but it is a background class ("silence": no action), present in nearly every video. Consumers
  that want the 47 real actions (e.g. a multi-label mAP without background) drop key "SIL" themselves.
  Its human-text `name` is "background"; other action names are the keys made readable (`_` as spaces,
  `2` as "to", camelCase split; our choice, for text prompts). Activity names spell out three keys: friedegg, scrambledegg, salat (German for salad).
- `splits/{train,test}.split{1..4}.bundle`: participant splits s1-s4 (video in test.splitN -> "test",
  else "train"; each bundle pair is checked to partition the 1,712 videos).
- `vis4mer/{train,test}.csv`: the 1,357 / 355 split of ViS4mer and MA-LMM, the default scheme "vis4mer".
- `groundTruth_segments_derived.csv`: run-length MS-TCN frame-level ground truth (15 fps, 0-based inclusive
  frames) -> segments in seconds, start = start_frame / 15, end = (end_frame + 1) / 15. The frame ranges
  are kept in `meta.segment_frames` ([start, end] inclusive, at `meta.gt_fps`).
- `breakfast_manifest_derived.csv`: participant, camera, ViS4mer file name and duration per video.

`duration` = ground-truth frames / 15 (the annotated length; the MS-TCN files may end a few frames before
the video does, see PROVENANCE.md), ViS4mer's rounded duration is in `meta.vis4mer_duration_s`.

Paths follow the original dataset layout `<participant>/<camera>/<participant>_<activity>` (a stem; the
extension, normally .avi, is resolved at check time). That is ViS4mer's file name with `-` as `/`, e.g.
`P03-cam01-P03_cereals` -> `P03/cam01/P03_cereals`.
Stereo videos (documented choice): the original dataset stores camera "stereo01" as folder `stereo` with two
files per video, `<P>_<activity>_ch0.avi` and `_ch1.avi` (left/right channel). We use channel 0, as ViS4mer
does (`P03-stereo-P03_cereals_ch0`), so the path is `P03/stereo/P03_cereals_ch0`; one video per
annotation, no duplicate of the same recording in the training set. `meta.path_alternatives` adds
`P03/stereo01/P03_cereals` for trees that follow the MS-TCN camera name; the resolver tries it only when
the main path is missing.

`meta.excluded_by_vis4mer_malmm` marks the three training videos that ViS4mer and MA-LMM skip.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from cmdcl_cache.manifest.format import ManifestError
from cmdcl_cache.manifest.io import make_labels_json

GT_FPS = 15
ACTIVITY_NAMES = {"friedegg": "fried egg", "scrambledegg": "scrambled egg", "salat": "salad"}
NUM_VIDEOS = 1712
SCHEMES = ["vis4mer", "s1", "s2", "s3", "s4"]
EXCLUDED_BY_VIS4MER_MALMM = frozenset({"P28_cam01_P28_cereals", "P27_stereo01_P27_milk", "P28_cam02_P28_cereals"})
SOURCE = ("Breakfast Actions (Kuehne et al., CVPR 2014): MS-TCN mapping, participant splits and frame-level "
          "ground truth; ViS4mer 1,357/355 split (see manifests/README.md)")

LICENCE = "research use (Breakfast dataset page); cite Kuehne, Arslan & Serre, CVPR 2014"


def _need(path: Path) -> Path:
    if not path.is_file():
        raise ManifestError(path, 0, "(file)", "Breakfast annotation file not found")
    return path


def _id_list(path: Path, line_format: str) -> list[tuple[int, list[str]]]:
    out = []
    for line, raw in enumerate(_need(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        parts = raw.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(out):
            raise ManifestError(path, line, "(row)", f"expected `{line_format}` with ids 0, 1, 2, ...")
        out.append((line, parts))
    return out


def _bundle(path: Path) -> set[str]:
    names = set()
    for raw in _need(path).read_text(encoding="utf-8").splitlines():
        name = raw.strip()
        if name:
            names.add(name[:-4] if name.endswith(".txt") else name)
    return names


def _action_name(key: str) -> str:
    """Readable text for prompts: "put_egg2plate" -> "put egg to plate", "put_toppingOnTop" -> "put topping on top"."""
    if key == "SIL":
        return "background"
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", key).replace("2", " to ").replace("_", " ")
    text = text.replace("saltnpepper", "salt and pepper").replace("stirfry", "stir fry")
    return " ".join(text.lower().split())


def build(annotations) -> tuple[list[dict], dict]:
    folder = Path(annotations)
    activities = [p[1] for _, p in _id_list(folder / "activities_derived.txt", "<class_id> <activity>")]
    actions = [p[1] for _, p in _id_list(folder / "mapping.txt", "<id> <action>")]
    action_ids = {a: i for i, a in enumerate(actions)}

    table = _need(folder / "breakfast_manifest_derived.csv")
    with open(table, newline="", encoding="utf-8") as fh:
        rows = [(line, row) for line, row in enumerate(csv.DictReader(fh), start=2)]
    names = {row["video"] for _, row in rows}
    if len(rows) != NUM_VIDEOS or len(names) != NUM_VIDEOS:
        raise ManifestError(table, 1, "video", f"expected {NUM_VIDEOS} distinct videos, got {len(names)}")

    test_sets = {}
    for k in range(1, 5):
        test, train = _bundle(folder / "splits" / f"test.split{k}.bundle"), \
            _bundle(folder / "splits" / f"train.split{k}.bundle")
        if test & train or (test | train) != names:
            raise ManifestError(folder / "splits" / f"test.split{k}.bundle", 1, "(file)",
                                f"split {k}: train and test bundles do not partition the {NUM_VIDEOS} videos")
        test_sets[f"s{k}"] = test

    vis4mer = {}
    for split in ("train", "test"):
        path = _need(folder / "vis4mer" / f"{split}.csv")
        with open(path, newline="", encoding="utf-8") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                vis4mer[row["file_name"]] = (split, row["action"], path, line)

    segments: dict[str, list[tuple[str, int, int]]] = {}
    gt = _need(folder / "groundTruth_segments_derived.csv")
    with open(gt, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            if row["label"] not in action_ids or action_ids[row["label"]] != int(row["label_id"]):
                raise ManifestError(gt, line, "label", f"{row['label']!r} (id {row['label_id']}) is not in mapping.txt")
            segs = segments.setdefault(row["video"], [])
            start, end = int(row["start_frame"]), int(row["end_frame"])
            if int(row["segment_index"]) != len(segs) or start != (segs[-1][2] + 1 if segs else 0):
                raise ManifestError(gt, line, "start_frame", "segments are not contiguous from frame 0")
            segs.append((row["label"], start, end))

    videos = []
    for line, row in rows:
        vid, activity = row["video"], row["activity"]
        if activity not in activities:
            raise ManifestError(table, line, "activity", f"{activity!r} not in activities_derived.txt")
        v4 = row["vis4mer_file_name"]
        if v4 not in vis4mer or vis4mer[v4][0] != row["vis4mer_split"] or vis4mer[v4][1] != activity:
            raise ManifestError(table, line, "vis4mer_file_name", f"{v4!r} disagrees with vis4mer/*.csv")
        parts = v4.split("-")
        if len(parts) != 3 or parts[0] != row["participant"]:
            raise ManifestError(table, line, "vis4mer_file_name", f"unexpected ViS4mer name {v4!r}")
        path = "/".join(parts)
        segs = segments.get(vid)
        if not segs or segs[-1][2] + 1 != int(row["gt_num_frames"]):
            raise ManifestError(gt, 1, "video", f"{vid}: ground truth missing or not {row['gt_num_frames']} frames")
        meta = {"participant": row["participant"], "camera": row["camera"], "vis4mer_file_name": v4,
                "vis4mer_duration_s": float(row["vis4mer_duration_s"]), "gt_fps": GT_FPS,
                "gt_num_frames": int(row["gt_num_frames"]),
                "segment_frames": [[a, b] for _, a, b in segs],
                "excluded_by_vis4mer_malmm": vid in EXCLUDED_BY_VIS4MER_MALMM}
        if row["camera"] == "stereo01":
            meta["path_alternatives"] = [f"{row['participant']}/stereo01/{row['participant']}_{activity}"]
        videos.append({
            "video_id": vid, "path": path, "split": row["vis4mer_split"],
            "labels": {"activity": activity, "action": sorted({lab for lab, _, _ in segs}, key=action_ids.get)},
            "splits": {s: ("test" if vid in test_sets[s] else "train") for s in SCHEMES[1:]},
            "duration": int(row["gt_num_frames"]) / GT_FPS,
            "segments": [{"label": lab, "set": "action", "start": a / GT_FPS, "end": (b + 1) / GT_FPS}
                         for lab, a, b in segs],
            "meta": meta})
    labels = make_labels_json("breakfast", {"activity": (False, [(a, ACTIVITY_NAMES.get(a, a)) for a in activities]),
                                            "action": (True, [(a, _action_name(a)) for a in actions])},
                              default_label_set="activity", fine_label_set="action", split_schemes=SCHEMES,
                              source=SOURCE, licence=LICENCE)
    return videos, labels
