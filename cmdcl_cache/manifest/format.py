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
  cmdcl_cache/manifest/prompts.py), `source` and `licence` "".

Rules for ids and paths (checked at load time):

- `video_id`: a non-empty string without leading or trailing whitespace, control characters (U+0000-U+001F,
  U+007F-U+009F), line or paragraph separators (U+2028, U+2029), lone surrogates, `/` or `\\`, and not "."
  or "..". Any other character and any length is allowed: ids are not file names (`export-npy` maps each id
  to a safe file name, see cmdcl_cache/ingest/export.py). Ids that differ only in case are different videos.
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

import os
import re
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")          # the split names every manifest has, and the three roles
ROLES = SPLITS
DEFAULT_SPLITS = {"train": "train", "val": "val", "test": "test"}

BUILTIN_DATASETS = ("coin", "breakfast", "charades", "demo")
VIDEOS_FILE = "videos.jsonl"
LABELS_FILE = "labels.json"
MAX_ERRORS = 20  # errors listed by one load; the rest are counted

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
