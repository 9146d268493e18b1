"""COIN (Tang et al., CVPR 2019) manifest builder.

Label sets (labels.json order):
- `task` (default, single-label, 180): key = taxonomy target name ("ChangeCarTire"), in Target Id order, so
  label id == COIN `recipe_type`.
- `step` (fine, multi-label, 778): key = official step id as a string ("259"), name = step label
  ("remove the tire"), in step id order (label id == step id - 1).
  A video's `step` labels are its distinct step ids in id order; `segments` keep the temporal order.
- `domain` (single-label, 12): taxonomy domain names, in the order of the official domain sheet.

Split: scheme "official", `training` -> train, `testing` -> test (`validation` -> val, which COIN.json
does not use in practice).

Two sources:
- `build_from_folder(dir)`: the annotation copies in shared/datasets/coin (see its PROVENANCE.md). Task,
  domain, split and ordered step ids from `coin_manifest_derived.csv` (split from the thu-jw fixture, which
  agrees with distant supervision on all 11,006 videos it covers); segments in absolute seconds from the PDPP
  json entries (verbatim COIN.json entries; their `subset` is PDPP's own 70/30 re-split and is *not* used),
  else from distant_supervision coin_step_*.csv (0-based step label, so step id = label + 1). Duration and
  ROI where known. The step ids of the segments must equal the derived CSV's ordered step ids.
- `build_from_coin_json(COIN.json, taxonomy_dir)`: the official file
  (`database -> id -> {recipe_type, class, subset, duration, start, end, video_url, annotation}`).

Both produce identical records for the same video. `path` is the YouTube id (a stem: any extension, flat or
under a task folder, see cmdcl_cache/manifest/paths.py). `meta`: recipe_type, excluded_by_vis4mer_malmm (the two
videos ViS4mer and MA-LMM skip), roi_start / roi_end (the procedure's start/end in COIN.json) where known.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cmdcl_cache.manifest.format import ManifestError
from cmdcl_cache.manifest.io import make_labels_json

EXCLUDED_BY_VIS4MER_MALMM = frozenset({"AfiVmAjfTNs", "cjwtcDKTQM8"})
SUBSETS = {"training": "train", "testing": "test", "validation": "val"}
# pre-Feb-2020 task names found in older COIN.json copies -> current taxonomy names
OLD_TASK_NAMES = {"MakeFrenchFried": "MakeFrenchFries", "InstallBicycleRackToCar": "InstallBicycleRack",
                  "InstallIpadScreenProtector": "PasteScreenProtectorOnPad"}

SOURCE = ("COIN annotations (Tang et al., CVPR 2019; github.com/coin-dataset/annotations): official taxonomy, "
          "per-video task/split/steps and segments (see manifests/README.md)")

LICENCE = "CC BY-NC 4.0 (COIN annotations); research use"
VIDEO_EXTS = (".mp4", ".mkv", ".webm")


class Taxonomy:
    """Tasks, steps and domains of the official taxonomy CSVs (converted from taxonomy.xlsx)."""

    def __init__(self, folder):
        folder = Path(folder)
        tam = folder / "taxonomy_target_action_mapping.csv"
        dtm = folder / "taxonomy_domain_target_mapping.csv"
        for f in (tam, dtm):
            if not f.is_file():
                raise ManifestError(f, 0, "(file)", "COIN taxonomy CSV not found")
        self.task_by_id: dict[int, str] = {}
        self.steps: dict[int, tuple[str, int]] = {}  # step id -> (label, task id)
        with open(tam, newline="", encoding="utf-8") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                tid, sid = int(row["Target Id"]), int(row["Action Id"])
                if self.task_by_id.setdefault(tid, row["Target Label"]) != row["Target Label"]:
                    raise ManifestError(tam, line, "Target Label", f"task {tid} has two names")
                if sid in self.steps:
                    raise ManifestError(tam, line, "Action Id", f"duplicate step id {sid}")
                self.steps[sid] = (row["Action Label"], tid)
        self.task_id = {name: tid for tid, name in self.task_by_id.items()}
        self.domain_of: dict[str, str] = {}
        self.domains: list[str] = []
        with open(dtm, newline="", encoding="utf-8") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                if row["Targets"] not in self.task_id:
                    raise ManifestError(dtm, line, "Targets", f"task {row['Targets']!r} not in the action mapping")
                self.domain_of[row["Targets"]] = row["Domains"]
                if row["Domains"] not in self.domains:
                    self.domains.append(row["Domains"])
        missing = set(self.task_id) - set(self.domain_of)
        if missing:
            raise ManifestError(dtm, 0, "Targets", f"tasks without a domain: {sorted(missing)[:5]}")

    def labels_json(self) -> dict:
        return make_labels_json(
            "coin",
            {"task": (False, [(self.task_by_id[t], self.task_by_id[t]) for t in sorted(self.task_by_id)]),
             "step": (True, [(str(s), self.steps[s][0]) for s in sorted(self.steps)]),
             "domain": (False, [(d, d) for d in self.domains])},
            default_label_set="task", fine_label_set="step", split_schemes=["official"],
            source=SOURCE, licence=LICENCE)


def _record(vid, task, domain, split, step_ids, duration, segments, roi, recipe_type) -> dict:
    rec = {"video_id": vid, "path": vid, "split": split,
           "labels": {"task": task, "step": [str(s) for s in sorted(set(step_ids))], "domain": domain}}
    if duration is not None:
        rec["duration"] = float(duration)
    if segments:
        rec["segments"] = [{"label": str(s), "set": "step", "start": float(a), "end": float(b)}
                           for s, a, b in segments]
    meta = {"recipe_type": recipe_type, "excluded_by_vis4mer_malmm": vid in EXCLUDED_BY_VIS4MER_MALMM}
    if roi is not None:
        meta["roi_start"], meta["roi_end"] = float(roi[0]), float(roi[1])
    rec["meta"] = meta
    return rec


def _video_stem(name: str) -> str:
    p = Path(name)
    return p.stem if p.suffix in VIDEO_EXTS else name  # three rows of the CSVs carry no extension


def _read_pdpp(folder: Path) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for f in sorted((folder / "pdpp").glob("*.json")):
        for item in json.loads(f.read_text(encoding="utf-8")):
            entries.update(item)
    return entries


def _read_step_csvs(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    segs: dict[str, list[tuple[int, float, float]]] = {}
    for f in sorted((folder / "distant_supervision").glob("coin_step_*.csv")):
        with open(f, encoding="utf-8") as fh:
            for line, raw in enumerate(fh, start=1):
                parts = raw.split()
                if not parts:
                    continue
                if len(parts) != 5:
                    raise ManifestError(f, line, "(row)", "expected `<file> <step_id-1> <duration> <start> <end>`")
                segs.setdefault(_video_stem(parts[0]), []).append(
                    (int(parts[1]) + 1, float(parts[3]), float(parts[4])))
    return segs


def build_from_folder(folder) -> tuple[list[dict], dict]:
    """Records and labels.json from the shared/datasets/coin copies (see module docstring)."""
    folder = Path(folder)
    tax = Taxonomy(folder)
    table = folder / "coin_manifest_derived.csv"
    if not table.is_file():
        raise ManifestError(table, 0, "(file)", "coin_manifest_derived.csv not found")
    pdpp, ds = _read_pdpp(folder), _read_step_csvs(folder)
    videos = []
    with open(table, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            vid, task = row["youtube_id"], row["task_name"]
            if tax.task_id.get(task) != int(row["recipe_type"]):
                raise ManifestError(table, line, "task_name", f"{task!r} does not match recipe_type "
                                                              f"{row['recipe_type']} in the taxonomy")
            if row["subset"] not in SUBSETS:
                raise ManifestError(table, line, "subset", f"unknown subset {row['subset']!r}")
            step_ids = [int(s) for s in row["step_ids"].split(";") if s]
            for s in step_ids:
                if s not in tax.steps or tax.steps[s][1] != int(row["recipe_type"]):
                    raise ManifestError(table, line, "step_ids", f"step {s} is not a step of task {task}")
            if vid in pdpp:
                segments = [(int(a["id"]), *a["segment"]) for a in pdpp[vid]["annotation"]]
            else:
                segments = ds.get(vid, [])
            if segments and [s for s, _, _ in segments] != step_ids:
                raise ManifestError(table, line, "step_ids", f"video {vid}: segment step ids "
                                                             f"{[s for s, _, _ in segments]} differ")
            roi = (row["roi_start_s"], row["roi_end_s"]) if row["roi_start_s"] != "" else None
            duration = float(row["duration_s"]) if row["duration_s"] != "" else None
            if (vid in EXCLUDED_BY_VIS4MER_MALMM) != (row["excluded_by_vis4mer_malmm"] == "1"):
                raise ManifestError(table, line, "excluded_by_vis4mer_malmm", "disagrees with the known list")
            videos.append(_record(vid, task, tax.domain_of[task], SUBSETS[row["subset"]], step_ids,
                                  duration, segments, roi, int(row["recipe_type"])))
    return videos, tax.labels_json()


def build_from_coin_json(coin_json, taxonomy_dir) -> tuple[list[dict], dict]:
    """Records and labels.json from an official COIN.json plus the taxonomy CSVs.

    Videos are ordered like the folder build: by recipe_type, then YouTube id.
    """
    coin_json = Path(coin_json)
    tax = Taxonomy(taxonomy_dir)
    text = coin_json.read_text(encoding="utf-8")
    try:
        database = json.loads(text)["database"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(coin_json, getattr(e, "lineno", 1), "database",
                            f"not a COIN.json (`{{\"database\": {{id: entry}}}}`): {e}") from None

    def where(vid):  # line of the entry, for error messages
        pos = text.find(json.dumps(vid))
        return 1 if pos < 0 else text.count("\n", 0, pos) + 1

    videos = []
    for vid, e in database.items():
        for f in ("recipe_type", "class", "subset", "annotation"):
            if f not in e:
                raise ManifestError(coin_json, where(vid), f"database.{vid}.{f}", "missing field")
        rt = e["recipe_type"]
        if rt not in tax.task_by_id:
            raise ManifestError(coin_json, where(vid), f"database.{vid}.recipe_type", f"unknown task id {rt!r}")
        task = tax.task_by_id[rt]
        if OLD_TASK_NAMES.get(e["class"], e["class"]) != task:
            raise ManifestError(coin_json, where(vid), f"database.{vid}.class",
                                f"{e['class']!r} but recipe_type {rt} is {task!r} in the taxonomy")
        if e["subset"] not in SUBSETS:
            raise ManifestError(coin_json, where(vid), f"database.{vid}.subset", f"unknown subset {e['subset']!r}")
        segments = []
        for a in e["annotation"]:
            sid = int(a["id"])
            if sid not in tax.steps or tax.steps[sid][1] != rt:
                raise ManifestError(coin_json, where(vid), f"database.{vid}.annotation.id",
                                    f"step {sid} is not a step of task {task}")
            segments.append((sid, *a["segment"]))
        roi = (e["start"], e["end"]) if e.get("start") is not None and e.get("end") is not None else None
        videos.append(_record(vid, task, tax.domain_of[task], SUBSETS[e["subset"]], [s for s, _, _ in segments],
                              e.get("duration"), segments, roi, rt))
    videos.sort(key=lambda r: (r["meta"]["recipe_type"], r["video_id"]))
    return videos, tax.labels_json()


def build(annotations) -> tuple[list[dict], dict]:
    """`annotations`: the shared/datasets/coin folder, or a COIN.json (taxonomy CSVs beside it)."""
    annotations = Path(annotations)
    if annotations.is_file():
        return build_from_coin_json(annotations, annotations.parent)
    if (annotations / "COIN.json").is_file() and not (annotations / "coin_manifest_derived.csv").is_file():
        return build_from_coin_json(annotations / "COIN.json", annotations)
    return build_from_folder(annotations)
