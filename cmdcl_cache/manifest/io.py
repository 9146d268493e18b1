"""Manifest files on disk. Reading: every line and field validated before any video is
touched, all errors at once (up to MAX_ERRORS), each naming the file, the line and the
field. Writing: validated first, then both files replaced atomically.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from pathlib import Path
from typing import Iterable

from cmdcl_cache.manifest.format import (DEFAULT_SPLIT_SCHEMES, DEFAULT_SPLITS, LABELS_FILE, ROLES, SPLITS, VIDEOS_FILE,
                                         ErrorCollector, LabelSet, Manifest, ManifestError, VideoRecord, check_video_id,
                                         normalise_path, resolve_dataset_dir)

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_RECORD_FIELDS = ("video_id", "path", "split", "labels", "splits", "duration", "segments", "meta")
_REQUIRED_FIELDS = ("video_id", "path", "split", "labels")
_LABELS_JSON_FIELDS = ("dataset", "default_label_set", "fine_label_set", "split_schemes", "split_roles",
                       "label_sets", "prompts", "source", "licence")


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
    return parse_manifest(root, labels_path.read_bytes(), videos_path.read_bytes())


def _line_of(text: str, needle: str) -> int:
    """1-based line of the first occurrence of `needle` in `text` (1 if absent)."""
    pos = text.find(needle)
    return 1 if pos < 0 else text.count("\n", 0, pos) + 1


def _nth_line(text: str, needle: str, n: int) -> int:
    pos = -1
    for _ in range(n):
        pos = text.find(needle, pos + 1)
        if pos < 0:
            return 1
    return text.count("\n", 0, pos) + 1


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


def decode_lines(file, data: bytes, errors: ErrorCollector) -> list[tuple[int, str]]:
    """(line number, text) of each line of a file's bytes; a line that is not UTF-8 is reported to `errors`
    (field '(encoding)') and kept as an empty line, so that later lines keep their numbers. A UTF-8
    byte-order mark at the start is dropped."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            errors.add(ManifestError(file, number, "(encoding)",
                                     f"byte {raw[err.start:err.start + 1]!r} at byte {err.start + 1} of the line "
                                     f"is not UTF-8 ({err.reason}); save the file as UTF-8"))
            lines.append((number, ""))
    return lines


def _lines_of(file, data: bytes | str, errors: ErrorCollector) -> list[tuple[int, str]]:
    if isinstance(data, str):
        return list(enumerate(data.split("\n"), start=1))
    return decode_lines(file, data, errors)


def parse_labels(file, text: str) -> tuple[dict, dict[str, LabelSet]]:
    """Validate labels.json text; returns (the object with its defaults filled in, label sets in file order).

    Every problem found is reported at once (ManifestErrors when there are several).
    """
    if not text.strip():
        raise ManifestError(file, 1, "(file)", "labels.json is empty")
    raw = _load_json(file, text)
    if not isinstance(raw, dict):
        raise ManifestError(file, 1, "(json)", f"expected a JSON object, got {type(raw).__name__}")
    errors = ErrorCollector()

    def problem(field_name, what, key=None, value=None, line=None):
        line = line or _json_line_of(text, key or field_name.split(".")[-1], value)
        errors.add(ManifestError(file, line, field_name, what))

    for f in raw:
        if f not in _LABELS_JSON_FIELDS:
            problem(f, f"unknown field (allowed: {', '.join(_LABELS_JSON_FIELDS)})")
    obj = {"dataset": Path(file).parent.name, "default_label_set": None, "fine_label_set": None,
           "split_schemes": list(DEFAULT_SPLIT_SCHEMES), "prompts": None, "source": "", "licence": "", **raw}
    for f in ("dataset", "source", "licence"):
        if not isinstance(obj[f], str):
            problem(f, f"expected a string, got {type(obj[f]).__name__}")
    for f in ("default_label_set", "fine_label_set", "prompts"):
        if obj[f] is not None and not isinstance(obj[f], str):
            problem(f, "expected a string or null")
    obj["split_roles"] = _parse_split_roles(raw.get("split_roles"), problem)
    schemes = obj["split_schemes"]
    if not isinstance(schemes, list) or not schemes or not all(isinstance(s, str) and s for s in schemes):
        problem("split_schemes", "expected a non-empty list of scheme names (first = default)")
    elif len(set(schemes)) != len(schemes):
        problem("split_schemes", "duplicate scheme name")
    if "label_sets" not in raw:
        problem("label_sets", 'missing field: {"<set name>": {"labels": ["<key>", ...]}, ...}', line=1)
        sets = {}
    else:
        sets = _parse_label_sets(text, raw["label_sets"], problem)
    if isinstance(raw.get("label_sets"), dict) and raw["label_sets"]:
        _check_set_references(obj, list(raw["label_sets"]), problem)
    errors.raise_if_any()
    return obj, sets


def _parse_split_roles(raw, problem) -> dict[str, str]:
    """labels.json 'split_roles': {name: role} declares splits beyond train/val/test (e.g. "test_ood": "test");
    the role says what a split may be used for: selecting checkpoints needs a val split, never a test one."""
    splits = dict(DEFAULT_SPLITS)
    if raw is None:
        return splits
    if not isinstance(raw, dict):
        problem("split_roles", 'expected an object {"<split name>": "train" | "val" | "test", ...}')
        return splits
    for name, role in raw.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            problem(f"split_roles.{name}", "a split name is letters, digits, '_', '.' or '-' (no spaces or commas)",
                    key=str(name))
        elif role not in ROLES:
            problem(f"split_roles.{name}", f"role {role!r}: expected one of {', '.join(ROLES)}", key=name)
        else:
            splits[name] = role
    return splits


def _parse_label_sets(text: str, raw_sets, problem) -> dict[str, LabelSet]:
    if not isinstance(raw_sets, dict) or not raw_sets:
        problem("label_sets", 'expected a non-empty object {"<set name>": {"labels": [...]}, ...}')
        return {}
    sets = {}
    for name, spec in raw_sets.items():
        where = f"label_sets.{name}"
        if not isinstance(spec, dict) or "labels" not in spec or set(spec) - {"multi_label", "labels"}:
            got = f", got the keys {sorted(spec)}" if isinstance(spec, dict) else ""
            problem(where, f'expected an object {{"labels": [...], "multi_label"?: bool}}{got}', key=name)
            continue
        multi = spec.get("multi_label", False)
        if not isinstance(multi, bool):
            problem(where + ".multi_label", "expected true or false", key="multi_label")
        parsed = _parse_label_list(text, where, name, spec["labels"], problem)
        if parsed is not None:
            sets[name] = LabelSet(name=name, multi_label=multi is True, keys=parsed[0], names=parsed[1])
    return sets


def _parse_label_list(text: str, where: str, set_name: str, labels, problem):
    """(keys, names) of one label set's `labels` list, or None when it is not a list."""
    if not isinstance(labels, list) or not labels:
        problem(where + ".labels", 'expected a non-empty list of {"key", "name"} objects or key strings',
                key=set_name)
        return None
    keys, names, seen = [], [], set()
    for i, item in enumerate(labels):
        entry = {"key": item} if isinstance(item, str) else item
        if (not isinstance(entry, dict) or "key" not in entry or set(entry) - {"key", "name"}
                or not isinstance(entry["key"], str) or not entry["key"]
                or not isinstance(entry.get("name", ""), str)):
            problem(f"{where}.labels[{i}]", 'expected {"key": non-empty string, "name"?: string} or a key string',
                    key=set_name)
            continue
        key = entry["key"]
        if key in seen:
            needle = ('"key": ' if isinstance(item, dict) else "") + json.dumps(key, ensure_ascii=False)
            problem(f"{where}.labels[{i}].key", f"duplicate key {key!r}", line=_nth_line(text, needle, 2))
            continue
        seen.add(key)
        keys.append(key)
        names.append(entry.get("name", key))
    return keys, names


def _check_set_references(obj: dict, declared: list[str], problem) -> None:
    """default_label_set (the only set when absent), fine_label_set and prompts name things that exist."""
    default = obj["default_label_set"]
    if default is None and len(declared) == 1:
        obj["default_label_set"] = declared[0]
    elif default is None:
        problem("default_label_set", f"missing; labels.json has {len(declared)} label sets "
                                     f"({', '.join(declared)}): name the one to train on", line=1)
    elif isinstance(default, str) and default not in declared:
        problem("default_label_set", f"{default!r} is not in label_sets ({', '.join(declared)})")
    fine = obj["fine_label_set"]
    if isinstance(fine, str) and fine not in declared:
        problem("fine_label_set", f"{fine!r} is not in label_sets ({', '.join(declared)})")
    if isinstance(obj["prompts"], str):
        from cmdcl_cache.manifest.prompts import TEMPLATE_SETS

        if obj["prompts"] not in TEMPLATE_SETS:
            problem("prompts", f"unknown prompt template set {obj['prompts']!r}; choose one of "
                               f"{', '.join(TEMPLATE_SETS)} (or null for the default)")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_record(file, line: int, obj, label_sets: dict[str, LabelSet], schemes: list[str],
                 default_label_set: str, split_names=SPLITS) -> VideoRecord:
    """Validate one videos.jsonl object; raises the first problem of the line."""
    def fail(field_name: str, what: str):
        raise ManifestError(file, line, field_name, what)

    if not isinstance(obj, dict):
        fail("(json)", f"expected a JSON object, got {type(obj).__name__}")
    for f in _REQUIRED_FIELDS:
        if f not in obj:
            fail(f, "missing field")
    for f in obj:
        if f not in _RECORD_FIELDS:
            fail(f, f"unknown field (allowed: {', '.join(_RECORD_FIELDS)})")
    problem = check_video_id(obj["video_id"])
    if problem:
        fail("video_id", problem)
    try:
        path = normalise_path(obj["path"])
    except ValueError as err:
        fail("path", str(err))
    splits = _checked_splits(obj, schemes, fail, list(split_names))
    _check_labels(obj["labels"], label_sets, default_label_set, fail)
    duration, segments = _checked_timing(obj, label_sets, fail)
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        fail("meta", "expected an object")
    return VideoRecord(video_id=obj["video_id"], path=path, split=obj["split"], labels=obj["labels"],
                       splits=splits, duration=duration, segments=segments, meta=meta)


def _checked_splits(obj: dict, schemes: list[str], fail, names: list[str]) -> dict:
    if obj["split"] not in names:
        fail("split", f"unknown split {obj['split']!r}; allowed: {', '.join(names)} (labels.json "
                      "'split_roles' declares more)")
    splits = obj.get("splits", {})
    if not isinstance(splits, dict):
        fail("splits", "expected an object {scheme: split}")
    for scheme, value in splits.items():
        if scheme == schemes[0] and value != obj["split"]:
            fail(f"splits.{scheme}", f"default scheme says {value!r} but 'split' says {obj['split']!r}")
        if scheme not in schemes:
            fail(f"splits.{scheme}", f"scheme not declared in labels.json split_schemes ({', '.join(schemes)})")
        if value not in names:
            fail(f"splits.{scheme}", f"unknown split {value!r}; allowed: {', '.join(names)}")
    missing = [s for s in schemes[1:] if s not in splits]
    if missing:
        fail(f"splits.{missing[0]}", "missing; labels.json declares this split scheme, so every video needs it")
    return splits


def _check_labels(labels, label_sets: dict[str, LabelSet], default_label_set: str, fail) -> None:
    if not isinstance(labels, dict):
        fail("labels", "expected an object {set_name: key | [key, ...]}")
    if default_label_set not in labels:
        fail(f"labels.{default_label_set}", "missing the default label set's label")
    for set_name, value in labels.items():
        ls = label_sets.get(set_name)
        where = f"labels.{set_name}"
        if ls is None:
            fail(where, f"label set not declared in labels.json ({', '.join(label_sets)})")
        if ls.multi_label:
            if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
                fail(where, f"multi-label set: expected a list of keys, got {type(value).__name__} {value!r}")
            if len(set(value)) != len(value):
                fail(where, "duplicate key in the list")
            keys = value
        else:
            if not isinstance(value, str):
                fail(where, f"single-label set: expected one key (string), got {type(value).__name__} {value!r}")
            keys = [value]
        for k in keys:
            if k not in ls._pos:
                fail(where, f"label key {k!r} is not in labels.json set '{set_name}'")


def _checked_timing(obj: dict, label_sets: dict[str, LabelSet], fail) -> tuple[float | None, tuple]:
    duration = obj.get("duration")
    if duration is not None and (not _is_number(duration) or duration < 0):
        fail("duration", f"expected a non-negative number of seconds, got {duration!r}")
    segments = obj.get("segments", [])
    if not isinstance(segments, list):
        fail("segments", "expected a list of {label, set, start, end}")
    for i, seg in enumerate(segments):
        where = f"segments[{i}]"
        if not isinstance(seg, dict) or set(seg) != {"label", "set", "start", "end"}:
            fail(where, "expected exactly {label, set, start, end}")
        ls = label_sets.get(seg["set"]) if isinstance(seg["set"], str) else None
        if ls is None:
            fail(where + ".set", f"label set {seg['set']!r} not declared in labels.json")
        if not isinstance(seg["label"], str) or seg["label"] not in ls._pos:
            fail(where + ".label", f"label key {seg['label']!r} is not in labels.json set '{seg['set']}'")
        for f in ("start", "end"):
            if not _is_number(seg[f]) or seg[f] < 0:
                fail(f"{where}.{f}", f"expected a non-negative number of seconds, got {seg[f]!r}")
        if seg["start"] > seg["end"]:
            fail(where + ".end", f"end {seg['end']} is before start {seg['start']}")
    return (None if duration is None else float(duration)), tuple(segments)


def parse_manifest(root, labels_text: str | bytes, videos_text: str | bytes) -> Manifest:
    """Validate labels.json and videos.jsonl of the folder `root`, given as text or as the files' bytes.

    Every bad line of videos.jsonl is reported in one ManifestErrors (one error per line, at most
    MAX_ERRORS listed); labels.json's problems are reported first, since the records are checked against it.
    """
    root = Path(root)
    labels_file, videos_file = root / LABELS_FILE, root / VIDEOS_FILE
    errors = ErrorCollector()
    labels_lines = _lines_of(labels_file, labels_text, errors)
    errors.raise_if_any()
    obj, sets = parse_labels(labels_file, "\n".join(text for _, text in labels_lines))
    lines = _lines_of(videos_file, videos_text, errors)
    if not errors and not any(text.strip() for _, text in lines):
        raise ManifestError(videos_file, 1, "(file)", "videos.jsonl is empty; expected one JSON object per line")
    videos: list[VideoRecord] = []
    first_id: dict[str, int] = {}
    first_path: dict[str, tuple[int, str]] = {}
    for lineno, raw in lines:
        if not raw.strip():
            continue
        try:
            rec = parse_record(videos_file, lineno, _load_json(videos_file, raw, lineno - 1), sets,
                               obj["split_schemes"], obj["default_label_set"], obj["split_roles"])
            _check_unique(videos_file, lineno, rec, first_id, first_path)
        except ManifestError as err:
            errors.add(err)
            continue
        videos.append(rec)
    errors.raise_if_any()
    return Manifest(root=root, dataset=obj["dataset"], videos=videos, label_sets=sets,
                    default_label_set=obj["default_label_set"], fine_label_set=obj["fine_label_set"],
                    split_schemes=list(obj["split_schemes"]), source=obj["source"], licence=obj["licence"],
                    prompts=obj["prompts"], split_roles=dict(obj["split_roles"]))


def _check_unique(file, line: int, rec: VideoRecord, first_id: dict, first_path: dict) -> None:
    if rec.video_id in first_id:
        raise ManifestError(file, line, "video_id", f"duplicate video id {rec.video_id!r} "
                                                    f"(first on line {first_id[rec.video_id]})")
    if rec.path in first_path:
        other_line, other_id = first_path[rec.path]
        raise ManifestError(file, line, "path", f"duplicate path {rec.path!r} (first on line {other_line}, "
                                                f"video {other_id!r}): two records would read the same file")
    first_id[rec.video_id] = line
    first_path[rec.path] = (line, rec.video_id)


def make_labels_json(dataset: str, label_sets: dict[str, tuple[bool, Iterable[tuple[str, str]]]],
                     default_label_set: str, fine_label_set: str | None, split_schemes: list[str],
                     source: str, licence: str, prompts: str | None = None,
                     split_roles: dict | None = None) -> dict:
    """Build the labels.json object; `label_sets` maps name -> (multi_label, [(key, name), ...]).

    Every field is written out (no defaults left implicit), except `prompts` when it is None and `splits`
    (extra split names and their roles) when it declares nothing beyond train/val/test.
    """
    obj = {"dataset": dataset, "default_label_set": default_label_set, "fine_label_set": fine_label_set,
           "split_schemes": list(split_schemes),
           "label_sets": {n: {"multi_label": bool(m), "labels": [{"key": str(k), "name": str(v)} for k, v in items]}
                          for n, (m, items) in label_sets.items()},
           "source": source, "licence": licence}
    if prompts is not None:
        obj["prompts"] = prompts
    extra = {k: v for k, v in (split_roles or {}).items() if DEFAULT_SPLITS.get(k) != v}
    if extra:
        obj["split_roles"] = extra
    return obj


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
    from cmdcl_cache.files import write_atomic

    for name, text in ((LABELS_FILE, labels_text), (VIDEOS_FILE, videos_text)):
        write_atomic(folder / name, text)
    return manifest
