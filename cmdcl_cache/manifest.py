"""Dataset manifests: `videos.jsonl` (one video per line) + `labels.json` (label sets in a fixed order).

A manifest folder holds:

- `videos.jsonl`, one JSON object per line: `{"video_id": str, "path": str (relative to --video-root, POSIX,
  may be a stem without extension), "split": a declared split, "labels": {set: key | [key, ...]},
  "splits"?: {scheme: split}, "duration"?: seconds, "segments"?: [{"label": key, "set": set, "start": s,
  "end": s}], "meta"?: {...}}`. `split` is the default scheme's split; `splits` carries the other schemes
  (Breakfast s1-s4).
- `labels.json`: `{"label_sets": {set: {"multi_label"?: bool, "labels": [{"key": unique key, "name"?: text}
  | "key", ...]}}, "dataset"?, "default_label_set"?, "fine_label_set"?, "split_schemes"?: [default first,
  ...], "split_roles"?: {name: "train" | "val" | "test"}, "prompts"?, "source"?, "licence"?}`. Label ids are
  positions in `labels`. Only `label_sets` is
  required; the defaults are: `dataset` the folder's name, `default_label_set` the only set (required when
  there are several), `fine_label_set` null (the target set is its own fine vocabulary), `split_schemes`
  ["default"], `split_roles` adds split names to train, val and test, each with the role that says what it
  may be used for (`{"test_ood": "test", "s2_test": "test", "dev": "val"}`: checkpoints are selected on a
  val-role split, never on a test-role one), `multi_label` false, a label's `name` its key, `prompts` null (the "actions" templates, see
  cmdcl_cache/texts.py), `source` and `licence` "".

Rules for ids and paths (checked at load time):

- `video_id`: a non-empty string without leading or trailing whitespace, control characters (U+0000-U+001F,
  U+007F-U+009F), line or paragraph separators (U+2028, U+2029), lone surrogates, `/` or `\\`, and not "."
  or "..". Any other character and any length is allowed: ids are not file names (`export-npy` maps each id
  to a safe file name, see cmdcl_cache/export.py). Ids that differ only in case are different videos.
- `path`: relative to the video root, POSIX separators; `.` and empty parts are dropped (`./a//b.mp4` is
  `a/b.mp4`), so two spellings of one file are one path. No absolute paths, drive letters, backslashes,
  `..` or control characters; two records may not name the same path (they would read the same file).

Everything is validated when the manifest is loaded, before any video is opened, and every error reads
`<file>:<line>: field '<field>': <what is wrong>`. One load reports every bad line (the first MAX_ERRORS of
them, and how many more; one error per line), as `ManifestErrors`. Bytes that are not UTF-8 are errors of
their line (field '(encoding)'); a UTF-8 byte-order mark at the start of a file is accepted. Errors about a
whole file (missing, empty) use line 0 for a missing file and line 1 for an empty one; errors in labels.json
point at the first line that mentions the offending key. Problems in labels.json are reported before
videos.jsonl is read, since its records are checked against the label sets.

`write_manifest` validates the text it is about to write with the same parser, so a builder can never
commit a manifest that `load_manifest` would refuse.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

SPLITS = ("train", "val", "test")          # the split names every manifest has, and the three roles
ROLES = SPLITS
DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
BUILTIN_DATASETS = ("coin", "breakfast", "charades", "demo")
VIDEOS_FILE = "videos.jsonl"
LABELS_FILE = "labels.json"
MAX_ERRORS = 20  # errors listed by one load; the rest are counted

_RECORD_FIELDS = ("video_id", "path", "split", "labels", "splits", "duration", "segments", "meta")
_REQUIRED_FIELDS = ("video_id", "path", "split", "labels")
_LABELS_JSON_FIELDS = ("dataset", "default_label_set", "fine_label_set", "split_schemes", "split_roles",
                       "label_sets", "prompts", "source", "licence")
DEFAULT_SPLIT_SCHEMES = ["default"]
# Characters that break file systems, terminals and line-based files when they sit in an id or a path.
_FORBIDDEN_CATEGORIES = {"Cc": "a control character", "Cs": "a lone surrogate", "Zl": "a line separator",
                         "Zp": "a paragraph separator"}


class ManifestError(ValueError):
    """A manifest that cannot be used. The message is `<file>:<line>: field '<f>': <what is wrong>`."""

    def __init__(self, file, line: int, field_name: str, what: str):
        self.file, self.line, self.field, self.what = str(file), int(line), field_name, what
        super().__init__(f"{self.file}:{self.line}: field '{field_name}': {what}")


class ManifestErrors(ManifestError):
    """Several problems found in one pass, one a line in the message. `errors` holds the first MAX_ERRORS
    (`file`, `line`, `field`, `what` are those of the first), `total` counts them all."""

    def __init__(self, errors: list[ManifestError], total: int):
        self.errors, self.total = list(errors), total
        first = self.errors[0]
        self.file, self.line, self.field, self.what = first.file, first.line, first.field, first.what
        more = f"\n... and {total - len(self.errors)} more error(s)" if total > len(self.errors) else ""
        ValueError.__init__(self, "\n".join(str(e) for e in self.errors) + more)


class ErrorCollector:
    """Gathers the errors of one pass over a file, so that a single run reports them all."""

    def __init__(self, limit: int = MAX_ERRORS):
        self.errors: list[ManifestError] = []
        self.total, self.limit = 0, limit

    def add(self, error: ManifestError) -> None:
        for one in getattr(error, "errors", [error]):
            if len(self.errors) < self.limit:
                self.errors.append(one)
        self.total += getattr(error, "total", 1)

    def __bool__(self) -> bool:
        return self.total > 0

    def raise_if_any(self) -> None:
        if self.total == 1:
            raise self.errors[0]
        if self.total:
            raise ManifestErrors(self.errors, self.total)


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
    prompts: str | None = None        # name of the prompt template set (None: the default, "actions")
    split_roles: dict = field(default_factory=lambda: dict(DEFAULT_SPLITS))   # split name -> role

    def by_id(self) -> dict[str, VideoRecord]:
        return {v.video_id: v for v in self.videos}

    def select(self, split: str | None = None, scheme: str | None = None) -> list[VideoRecord]:
        """Videos of `split` under `scheme` (None = the default scheme), in manifest order."""
        if scheme is not None and scheme not in self.split_schemes:
            raise ValueError(f"{self.root}: unknown split scheme {scheme!r}; this manifest has "
                             f"{', '.join(self.split_schemes)}")
        if split is not None and split not in self.split_roles:
            raise ValueError(f"{self.root}: unknown split {split!r}; this manifest declares "
                             f"{', '.join(self.split_roles)} (labels.json 'split_roles' adds more)")
        if scheme == self.split_schemes[0]:
            scheme = None
        return [v for v in self.videos if split is None or v.split_for(scheme) == split]

    def role(self, split: str) -> str:
        """train, val or test: what a split is for (labels.json 'split_roles'; the three defaults are themselves)."""
        if split not in self.split_roles:
            raise ValueError(f"{self.root}: unknown split {split!r}; this manifest declares "
                             f"{', '.join(self.split_roles)}")
        return self.split_roles[split]

    def splits_with_role(self, role: str) -> list[str]:
        return [name for name, r in self.split_roles.items() if r == role]

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


def builtin_manifests_root() -> Path:
    """Folder of the built-in manifests: $CMDCL_MANIFESTS when set, else the package data folder
    `cmdcl_cache/manifests`, found with importlib.resources so that a regular `pip install` has it too."""
    env = os.environ.get("CMDCL_MANIFESTS")
    if env:
        return Path(env)
    root = resources.files("cmdcl_cache") / "manifests"
    if not isinstance(root, Path):  # e.g. imported from a zip file: the manifests are no files on disk
        raise ManifestError(str(root), 0, "dataset", "the built-in manifests are not on the file system; "
                                                     "set CMDCL_MANIFESTS to a folder holding copies of them")
    return root


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
        return builtin_manifests_root() / name
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
    return parse_manifest(root, labels_path.read_bytes(), videos_path.read_bytes())


# ---------------------------------------------------------------------------------------------- ids and paths


def _forbidden_character(text: str) -> str | None:
    if text.isprintable():  # fast path: none of the forbidden categories is printable
        return None
    for i, ch in enumerate(text):
        kind = _FORBIDDEN_CATEGORIES.get(unicodedata.category(ch))
        if kind:
            return f"{text!r} holds {kind} (U+{ord(ch):04X}) at position {i}"
    return None


def check_video_id(video_id) -> str | None:
    """What is wrong with `video_id` as a video id, or None (the rules are in the module docstring)."""
    if not isinstance(video_id, str) or not video_id:
        return "expected a non-empty string"
    bad = _forbidden_character(video_id)
    if bad:
        return bad
    if video_id != video_id.strip():
        return f"{video_id!r} has leading or trailing whitespace"
    if "/" in video_id or "\\" in video_id or video_id in (".", ".."):
        return f"{video_id!r} must not contain path separators or be '.' or '..'"
    return None


def normalise_path(path) -> str:
    """The one spelling of a manifest path (`./a//b.mp4` -> `a/b.mp4`); ValueError says what is wrong."""
    if not isinstance(path, str) or not path:
        raise ValueError("expected a non-empty string")
    bad = _forbidden_character(path)
    if bad:
        raise ValueError(bad)
    if "\\" in path:
        raise ValueError(f"{path!r} is not a POSIX path (backslash)")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"{path!r} is absolute; paths are relative to --video-root")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r} escapes the video root ('..')")
    if not parts:
        raise ValueError(f"{path!r} names no file")
    return "/".join(parts)


# ---------------------------------------------------------------------------------------------- parsing


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
        from .texts import TEMPLATE_SETS  # the owner of the template sets

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


# ---------------------------------------------------------------------------------------------- writing


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
    from .store import write_atomic

    for name, text in ((LABELS_FILE, labels_text), (VIDEOS_FILE, videos_text)):
        write_atomic(folder / name, text)
    return manifest
