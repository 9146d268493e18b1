"""Dataset manifests: `videos.jsonl` (one video per line) + `labels.json` (label sets in a fixed order).

A manifest folder holds:

- `videos.jsonl`, one JSON object per line: `{"video_id": str, "path": str (relative to --video-root, POSIX,
  may be a stem without extension), "split": "train"|"val"|"test", "labels": {set: key | [key, ...]},
  "splits"?: {scheme: split}, "duration"?: seconds, "segments"?: [{"label": key, "set": set, "start": s,
  "end": s}], "meta"?: {...}}`. `split` is the default scheme's split; `splits` carries the other schemes
  (Breakfast s1-s4).
- `labels.json`: `{"dataset", "default_label_set", "fine_label_set", "split_schemes": [default first, ...],
  "label_sets": {set: {"multi_label": bool, "labels": [{"key": unique key, "name": text}, ...]}},
  "source", "licence"}`. Label ids are positions in `labels`.

Everything is validated when the manifest is loaded, before any
video is opened, and every error reads `<file>:<line>: field '<field>': <what is wrong>`. Errors about a
whole file (missing, empty) use line 0 for a missing file and line 1 for an empty one; errors in
labels.json point at the first line that mentions the offending key.

`write_manifest` validates the text it is about to write with the same parser, so a builder can never
commit a manifest that `load_manifest` would refuse.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SPLITS = ("train", "val", "test")
BUILTIN_DATASETS = ("coin", "breakfast", "charades", "demo")
VIDEOS_FILE = "videos.jsonl"
LABELS_FILE = "labels.json"

_RECORD_FIELDS = ("video_id", "path", "split", "labels", "splits", "duration", "segments", "meta")
_REQUIRED_FIELDS = ("video_id", "path", "split", "labels")
_LABELS_JSON_FIELDS = ("dataset", "default_label_set", "fine_label_set", "split_schemes", "label_sets",
                       "source", "licence")


class ManifestError(ValueError):
    """A manifest that cannot be used. The message is `<file>:<line>: field '<f>': <what is wrong>`."""

    def __init__(self, file, line: int, field_name: str, what: str):
        self.file, self.line, self.field, self.what = str(file), int(line), field_name, what
        super().__init__(f"{self.file}:{self.line}: field '{field_name}': {what}")


@dataclass(frozen=True)
class VideoRecord:
    video_id: str
    path: str
    split: str
    labels: dict
    splits: dict = field(default_factory=dict)
    duration: float | None = None
    segments: tuple = ()
    meta: dict = field(default_factory=dict)

    def split_for(self, scheme: str | None) -> str:
        """Split of this video under `scheme`; None or the default scheme -> `split`.

        Validation guarantees that every record carries every non-default scheme of its manifest, so a
        scheme absent from `splits` is the default one (Manifest.select rejects unknown schemes).
        """
        if scheme is None or scheme not in self.splits:
            return self.split
        return self.splits[scheme]

    def to_json(self) -> dict:
        """The videos.jsonl object; optional fields are left out when empty."""
        out: dict[str, Any] = {"video_id": self.video_id, "path": self.path, "split": self.split,
                               "labels": self.labels}
        if self.splits:
            out["splits"] = self.splits
        if self.duration is not None:
            out["duration"] = self.duration
        if self.segments:
            out["segments"] = list(self.segments)
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass
class LabelSet:
    name: str
    multi_label: bool
    keys: list[str]
    names: list[str]
    _pos: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._pos = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, key) -> int:
        try:
            return self._pos[str(key)]
        except KeyError:
            raise KeyError(f"label set '{self.name}' has no key {key!r}") from None


@dataclass
class Manifest:
    root: Path
    dataset: str
    videos: list[VideoRecord]
    label_sets: dict[str, LabelSet]
    default_label_set: str
    fine_label_set: str | None
    split_schemes: list[str]
    source: str = ""
    licence: str = ""

    def by_id(self) -> dict[str, VideoRecord]:
        return {v.video_id: v for v in self.videos}

    def select(self, split: str | None = None, scheme: str | None = None) -> list[VideoRecord]:
        """Videos of `split` under `scheme` (None = the default scheme), in manifest order."""
        if scheme is not None and scheme not in self.split_schemes:
            raise ValueError(f"{self.root}: unknown split scheme {scheme!r}; this manifest has "
                             f"{', '.join(self.split_schemes)}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if scheme == self.split_schemes[0]:
            scheme = None
        return [v for v in self.videos if split is None or v.split_for(scheme) == split]

    def targets(self, videos, label_set: str) -> np.ndarray:
        """int64 [N] class ids (single-label set) or float32 [N, C] multi-hot (multi-label set)."""
        ls = self.label_sets.get(label_set)
        if ls is None:
            raise KeyError(f"{self.root}: no label set {label_set!r}; have {', '.join(self.label_sets)}")
        videos = list(videos)
        if ls.multi_label:
            out = np.zeros((len(videos), len(ls)), dtype=np.float32)
        else:
            out = np.zeros(len(videos), dtype=np.int64)
        for i, v in enumerate(videos):
            if label_set not in v.labels:
                raise KeyError(f"{self.root}: video {v.video_id!r} has no '{label_set}' label")
            value = v.labels[label_set]
            if ls.multi_label:
                for key in value:
                    out[i, ls.index(key)] = 1.0
            else:
                out[i] = ls.index(value)
        return out


# ---------------------------------------------------------------------------------------------- locating


def _manifests_root() -> Path:
    env = os.environ.get("CMDCL_MANIFESTS")
    if env:
        return Path(env)
    import cmdcl_cache

    return Path(cmdcl_cache.__file__).resolve().parents[1] / "manifests"


def resolve_dataset_dir(dataset_or_path) -> Path:
    """Folder of a manifest: a built-in name (coin, breakfast, charades, demo) or a folder path.

    A string that is exactly a built-in name wins over a folder of that name in the current directory;
    pass `./coin` to mean the folder.
    """
    if isinstance(dataset_or_path, Path):
        return dataset_or_path
    name = str(dataset_or_path)
    if name == "demo":
        return Path(os.environ.get("CMDCL_DEMO") or Path("demo") / "manifest")
    if name in BUILTIN_DATASETS:
        return _manifests_root() / name
    path = Path(name)
    if path.is_dir() or "/" in name or os.sep in name:
        return path
    raise ManifestError(name, 0, "dataset", f"not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                                            "and not a manifest folder")


def load_manifest(dataset_or_path: str | Path) -> Manifest:
    """Load and fully validate a manifest folder (or a built-in dataset name)."""
    root = resolve_dataset_dir(dataset_or_path)
    labels_path, videos_path = root / LABELS_FILE, root / VIDEOS_FILE
    if not root.is_dir():
        hint = "run `cmdcl-cache demo make`" if str(dataset_or_path) == "demo" else \
            "build it with `cmdcl-cache manifest build`"
        raise ManifestError(videos_path, 0, "(file)", f"manifest folder {root} does not exist; {hint}")
    if not labels_path.is_file():
        raise ManifestError(labels_path, 0, "(file)", "labels.json not found; every manifest folder needs "
                                                      "one next to videos.jsonl")
    if not videos_path.is_file():
        raise ManifestError(videos_path, 0, "(file)", "videos.jsonl not found")
    return parse_manifest(root, labels_path.read_text(encoding="utf-8"),
                          videos_path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- parsing


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of `needle` in `text` (1 if absent)."""
    pos = text.find(needle)
    return 1 if pos < 0 else text.count("\n", 0, pos) + 1


def _json_line_of(text: str, key: str, value=None) -> int:
    needle = json.dumps(key) + (": " + json.dumps(value, ensure_ascii=False) if value is not None else "")
    line = _line_of(text, needle)
    return line if needle in text else _line_of(text, json.dumps(key))


def _load_json(file, text: str, line_offset: int = 0):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(file, e.lineno + line_offset, "(json)",
                            f"malformed JSON: {e.msg} (column {e.colno})") from None


def parse_labels(file, text: str) -> tuple[dict, dict[str, LabelSet]]:
    """Validate labels.json text; returns (the raw object, label sets in file order)."""
    if not text.strip():
        raise ManifestError(file, 1, "(file)", "labels.json is empty")
    obj = _load_json(file, text)
    if not isinstance(obj, dict):
        raise ManifestError(file, 1, "(json)", f"expected a JSON object, got {type(obj).__name__}")

    def fail(field_name, what, key=None, value=None):
        raise ManifestError(file, _json_line_of(text, key or field_name.split(".")[-1], value),
                            field_name, what)

    for f in _LABELS_JSON_FIELDS:
        if f not in obj:
            raise ManifestError(file, 1, f, "missing field")
    for f in obj:
        if f not in _LABELS_JSON_FIELDS:
            fail(f, f"unknown field (allowed: {', '.join(_LABELS_JSON_FIELDS)})")
    for f in ("dataset", "default_label_set", "source", "licence"):
        if not isinstance(obj[f], str):
            fail(f, f"expected a string, got {type(obj[f]).__name__}")
    if obj["fine_label_set"] is not None and not isinstance(obj["fine_label_set"], str):
        fail("fine_label_set", "expected a string or null")
    schemes = obj["split_schemes"]
    if (not isinstance(schemes, list) or not schemes
            or not all(isinstance(s, str) and s for s in schemes)):
        fail("split_schemes", "expected a non-empty list of scheme names (first = default)")
    if len(set(schemes)) != len(schemes):
        fail("split_schemes", "duplicate scheme name")
    raw_sets = obj["label_sets"]
    if not isinstance(raw_sets, dict) or not raw_sets:
        fail("label_sets", "expected a non-empty object {set_name: {multi_label, labels}}")
    sets: dict[str, LabelSet] = {}
    for name, spec in raw_sets.items():
        where = f"label_sets.{name}"
        if not isinstance(spec, dict):
            fail(where, "expected an object {multi_label, labels}", key=name)
        if set(spec) != {"multi_label", "labels"}:
            fail(where, f"expected exactly the keys multi_label and labels, got {sorted(spec)}", key=name)
        if not isinstance(spec["multi_label"], bool):
            fail(where + ".multi_label", "expected true or false", key="multi_label")
        labels = spec["labels"]
        if not isinstance(labels, list) or not labels:
            fail(where + ".labels", "expected a non-empty list of {key, name}", key=name)
        keys, names, seen = [], [], set()
        for i, item in enumerate(labels):
            if (not isinstance(item, dict) or set(item) != {"key", "name"}
                    or not isinstance(item["key"], str) or not isinstance(item["name"], str)
                    or not item["key"]):
                fail(f"{where}.labels[{i}]", "expected {\"key\": non-empty string, \"name\": string}", key=name)
            if item["key"] in seen:
                raise ManifestError(file, _nth_line(text, f'"key": {json.dumps(item["key"])}', 2),
                                    f"{where}.labels[{i}].key", f"duplicate key {item['key']!r}")
            seen.add(item["key"])
            keys.append(item["key"])
            names.append(item["name"])
        sets[name] = LabelSet(name=name, multi_label=spec["multi_label"], keys=keys, names=names)
    if obj["default_label_set"] not in sets:
        fail("default_label_set", f"{obj['default_label_set']!r} is not in label_sets ({', '.join(sets)})")
    if obj["fine_label_set"] is not None and obj["fine_label_set"] not in sets:
        fail("fine_label_set", f"{obj['fine_label_set']!r} is not in label_sets ({', '.join(sets)})")
    return obj, sets


def _nth_line(text: str, needle: str, n: int) -> int:
    pos = -1
    for _ in range(n):
        pos = text.find(needle, pos + 1)
        if pos < 0:
            return 1
    return text.count("\n", 0, pos) + 1


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_path(file, line, path) -> None:
    if not isinstance(path, str) or not path:
        raise ManifestError(file, line, "path", "expected a non-empty string")
    if "\\" in path:
        raise ManifestError(file, line, "path", f"{path!r} is not a POSIX path (backslash)")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ManifestError(file, line, "path", f"{path!r} is absolute; paths are relative to --video-root")
    if ".." in path.split("/"):
        raise ManifestError(file, line, "path", f"{path!r} escapes the video root ('..')")


def parse_record(file, line: int, obj, label_sets: dict[str, LabelSet], schemes: list[str],
                 default_label_set: str) -> VideoRecord:
    """Validate one videos.jsonl object."""
    if not isinstance(obj, dict):
        raise ManifestError(file, line, "(json)", f"expected a JSON object, got {type(obj).__name__}")
    for f in _REQUIRED_FIELDS:
        if f not in obj:
            raise ManifestError(file, line, f, "missing field")
    for f in obj:
        if f not in _RECORD_FIELDS:
            raise ManifestError(file, line, f, f"unknown field (allowed: {', '.join(_RECORD_FIELDS)})")
    vid = obj["video_id"]
    if not isinstance(vid, str) or not vid.strip():
        raise ManifestError(file, line, "video_id", "expected a non-empty string")
    if "/" in vid or "\\" in vid or vid in (".", ".."):
        raise ManifestError(file, line, "video_id", f"{vid!r} must not contain path separators "
                                                    "(ids name output files)")
    _check_path(file, line, obj["path"])
    if obj["split"] not in SPLITS:
        raise ManifestError(file, line, "split", f"unknown split {obj['split']!r}; allowed: {', '.join(SPLITS)}")
    splits = obj.get("splits", {})
    if not isinstance(splits, dict):
        raise ManifestError(file, line, "splits", "expected an object {scheme: split}")
    for scheme, value in splits.items():
        if scheme == schemes[0] and value != obj["split"]:
            raise ManifestError(file, line, f"splits.{scheme}", f"default scheme says {value!r} but 'split' "
                                                                f"says {obj['split']!r}")
        if scheme not in schemes:
            raise ManifestError(file, line, f"splits.{scheme}",
                                f"scheme not declared in labels.json split_schemes ({', '.join(schemes)})")
        if value not in SPLITS:
            raise ManifestError(file, line, f"splits.{scheme}",
                                f"unknown split {value!r}; allowed: {', '.join(SPLITS)}")
    missing = [s for s in schemes[1:] if s not in splits]
    if missing:
        raise ManifestError(file, line, f"splits.{missing[0]}", "missing; labels.json declares this split "
                                                                "scheme, so every video needs it")
    labels = obj["labels"]
    if not isinstance(labels, dict):
        raise ManifestError(file, line, "labels", "expected an object {set_name: key | [key, ...]}")
    if default_label_set not in labels:
        raise ManifestError(file, line, f"labels.{default_label_set}",
                            "missing the default label set's label")
    for set_name, value in labels.items():
        ls = label_sets.get(set_name)
        where = f"labels.{set_name}"
        if ls is None:
            raise ManifestError(file, line, where, f"label set not declared in labels.json "
                                                   f"({', '.join(label_sets)})")
        if ls.multi_label:
            if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
                raise ManifestError(file, line, where, f"multi-label set: expected a list of keys, "
                                                       f"got {type(value).__name__} {value!r}")
            if len(set(value)) != len(value):
                raise ManifestError(file, line, where, "duplicate key in the list")
            keys = value
        else:
            if not isinstance(value, str):
                raise ManifestError(file, line, where, f"single-label set: expected one key (string), "
                                                       f"got {type(value).__name__} {value!r}")
            keys = [value]
        for k in keys:
            if k not in ls._pos:
                raise ManifestError(file, line, where, f"label key {k!r} is not in labels.json set '{set_name}'")
    duration = obj.get("duration")
    if duration is not None and (not _is_number(duration) or duration < 0):
        raise ManifestError(file, line, "duration", f"expected a non-negative number of seconds, got {duration!r}")
    segments = obj.get("segments", [])
    if not isinstance(segments, list):
        raise ManifestError(file, line, "segments", "expected a list of {label, set, start, end}")
    for i, seg in enumerate(segments):
        where = f"segments[{i}]"
        if not isinstance(seg, dict) or set(seg) != {"label", "set", "start", "end"}:
            raise ManifestError(file, line, where, "expected exactly {label, set, start, end}")
        ls = label_sets.get(seg["set"]) if isinstance(seg["set"], str) else None
        if ls is None:
            raise ManifestError(file, line, where + ".set", f"label set {seg['set']!r} not declared in labels.json")
        if not isinstance(seg["label"], str) or seg["label"] not in ls._pos:
            raise ManifestError(file, line, where + ".label",
                                f"label key {seg['label']!r} is not in labels.json set '{seg['set']}'")
        for f in ("start", "end"):
            if not _is_number(seg[f]) or seg[f] < 0:
                raise ManifestError(file, line, f"{where}.{f}", f"expected a non-negative number of seconds, "
                                                                f"got {seg[f]!r}")
        if seg["start"] > seg["end"]:
            raise ManifestError(file, line, where + ".end", f"end {seg['end']} is before start {seg['start']}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ManifestError(file, line, "meta", "expected an object")
    return VideoRecord(video_id=vid, path=obj["path"], split=obj["split"], labels=labels, splits=splits,
                       duration=None if duration is None else float(duration), segments=tuple(segments),
                       meta=meta)


def parse_manifest(root, labels_text: str, videos_text: str) -> Manifest:
    """Validate the text of labels.json and videos.jsonl of the folder `root`."""
    root = Path(root)
    labels_file, videos_file = root / LABELS_FILE, root / VIDEOS_FILE
    obj, sets = parse_labels(labels_file, labels_text)
    schemes = obj["split_schemes"]
    if not videos_text.strip():
        raise ManifestError(videos_file, 1, "(file)", "videos.jsonl is empty; expected one JSON object per line")
    videos: list[VideoRecord] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(videos_text.split("\n"), start=1):
        if not raw.strip():
            continue
        rec = parse_record(videos_file, lineno, _load_json(videos_file, raw, lineno - 1), sets, schemes,
                           obj["default_label_set"])
        if rec.video_id in first_line:
            raise ManifestError(videos_file, lineno, "video_id", f"duplicate video id {rec.video_id!r} "
                                                                 f"(first on line {first_line[rec.video_id]})")
        first_line[rec.video_id] = lineno
        videos.append(rec)
    return Manifest(root=root, dataset=obj["dataset"], videos=videos, label_sets=sets,
                    default_label_set=obj["default_label_set"], fine_label_set=obj["fine_label_set"],
                    split_schemes=list(schemes), source=obj["source"], licence=obj["licence"])


# ---------------------------------------------------------------------------------------------- writing


def make_labels_json(dataset: str, label_sets: dict[str, tuple[bool, Iterable[tuple[str, str]]]],
                default_label_set: str, fine_label_set: str | None, split_schemes: list[str],
                source: str, licence: str) -> dict:
    """Build the labels.json object; `label_sets` maps name -> (multi_label, [(key, name), ...])."""
    return {"dataset": dataset, "default_label_set": default_label_set, "fine_label_set": fine_label_set,
            "split_schemes": list(split_schemes),
            "label_sets": {n: {"multi_label": bool(m), "labels": [{"key": str(k), "name": str(v)} for k, v in items]}
                           for n, (m, items) in label_sets.items()},
            "source": source, "licence": licence}


def dump_labels(labels_obj: dict) -> str:
    return json.dumps(labels_obj, indent=2, ensure_ascii=False) + "\n"


def dump_videos(videos: Iterable) -> str:
    lines = []
    for v in videos:
        obj = v.to_json() if isinstance(v, VideoRecord) else v
        lines.append(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
    return "\n".join(lines) + "\n"


def write_manifest(folder, videos: Iterable, labels_json: dict) -> Manifest:
    """Validate, then write `folder/videos.jsonl` and `folder/labels.json`; returns the loaded Manifest.

    `videos` are VideoRecords or plain dicts in the videos.jsonl format. Output is deterministic (same input,
    same bytes), so committed manifests can be checked by rebuilding them.
    """
    folder = Path(folder)
    labels_text, videos_text = dump_labels(labels_json), dump_videos(videos)
    manifest = parse_manifest(folder, labels_text, videos_text)  # raises before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in ((LABELS_FILE, labels_text), (VIDEOS_FILE, videos_text)):
        tmp = folder / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return manifest
