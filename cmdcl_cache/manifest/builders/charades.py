"""Charades (Sigurdsson et al., ECCV 2016) manifest builder, from the user's own copy.

Charades' licence forbids redistribution, so nothing of it is committed; `cmdcl-cache manifest build
--dataset charades --annotations DIR` reads `DIR/Charades_v1_train.csv`, `DIR/Charades_v1_test.csv` and
`DIR/Charades_v1_classes.txt` (lines `cNNN name`).

- Label set `action` (default, multi-label, 157): key = class id "c000", name = class text, file order.
  A video's labels are the distinct classes of its `actions`, in class order (may be empty).
- Split: scheme "official", train CSV -> train, test CSV -> test.
- `segments` from `actions` (`;`-separated `cNNN start end`, seconds); `duration` = `length`.
- `path` = id (videos are `<id>.mp4` in the official release). `meta`: subject, scene, quality, relevance,
  verified (the free-text script/objects/descriptions are left out to keep the manifest small).
"""

from __future__ import annotations

import csv
from pathlib import Path

from cmdcl_cache.manifest.format import ManifestError
from cmdcl_cache.manifest.io import make_labels_json

COLUMNS = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects", "descriptions",
           "actions", "length"]

SOURCE = "Charades v1 (Sigurdsson et al., ECCV 2016), built from the user's own copy"
LICENCE = "Charades licence: non-commercial research use, no redistribution (do not commit this manifest)"


def read_classes(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ManifestError(path, 0, "(file)", "Charades_v1_classes.txt not found")
    out, seen = [], set()
    for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        key, _, name = raw.strip().partition(" ")
        if not (len(key) == 4 and key[0] == "c" and key[1:].isdigit()) or not name.strip():
            raise ManifestError(path, line, "class", f"expected `cNNN name`, got {raw!r}")
        if key in seen:
            raise ManifestError(path, line, "class", f"duplicate class {key}")
        seen.add(key)
        out.append((key, name.strip()))
    return out


def _number(path, line, field_name, text):
    try:
        return float(text)
    except ValueError:
        raise ManifestError(path, line, field_name, f"expected a number, got {text!r}") from None


def read_split(path: Path, split: str, class_pos: dict[str, int]) -> list[dict]:
    if not path.is_file():
        raise ManifestError(path, 0, "(file)", f"Charades CSV for the {split} split not found")
    videos = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(path, 1, missing[0], f"missing column (expected {', '.join(COLUMNS)})")
        for row in reader:
            line = reader.line_num  # last physical line of the row (descriptions may span lines)
            segments = []
            for item in filter(None, (a.strip() for a in row["actions"].split(";"))):
                parts = item.split()
                if len(parts) != 3 or parts[0] not in class_pos:
                    raise ManifestError(path, line, "actions", f"expected `cNNN start end` with a known class, "
                                                               f"got {item!r}")
                start, end = (_number(path, line, "actions", p) for p in parts[1:])
                segments.append({"label": parts[0], "set": "action", "start": max(start, 0.0),
                                 "end": max(end, start, 0.0)})
            rec = {"video_id": row["id"], "path": row["id"], "split": split,
                   "labels": {"action": sorted({s["label"] for s in segments}, key=class_pos.get)}}
            if row["length"].strip():
                rec["duration"] = _number(path, line, "length", row["length"])
            if segments:
                rec["segments"] = segments
            rec["meta"] = {k: row[k] for k in ("subject", "scene", "quality", "relevance", "verified")}
            videos.append(rec)
    return videos


def build(annotations) -> tuple[list[dict], dict]:
    folder = Path(annotations)
    classes = read_classes(folder / "Charades_v1_classes.txt")
    pos = {k: i for i, (k, _) in enumerate(classes)}
    videos = (read_split(folder / "Charades_v1_train.csv", "train", pos)
              + read_split(folder / "Charades_v1_test.csv", "test", pos))
    labels = make_labels_json("charades", {"action": (True, classes)}, default_label_set="action",
                              fine_label_set=None, split_schemes=["official"], source=SOURCE, licence=LICENCE)
    return videos, labels
