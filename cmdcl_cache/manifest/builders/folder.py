"""Your own videos: a manifest from class folders, or from a CSV of `path,label[,split]`.

`cmdcl-cache manifest build --dataset folder --videos DIR --out NAME [--from-csv FILE]` reads one of two
layouts:

- Class folders (the ImageFolder convention): `DIR/<class>/.../<video>.<ext>`. Each first-level folder is a
  class, and every video file below it (any depth; the extensions of cmdcl_cache/manifest/paths.py) is one of its
  videos. Hidden files and folders (starting with ".") and files that are not videos are ignored.
- `--from-csv FILE`: a header row naming the columns `path`, `label` and optionally `split` (in any order,
  no others; case and surrounding spaces ignored), then one video a row. Quoted fields may hold commas.
  `path` is relative to DIR (an absolute path inside DIR is made relative) and must name a video file;
  `split` is train, val or test. Surrounding spaces of every field are dropped.

Ids: the path relative to DIR without its extension, with "/" written "__" (`cat/001.mp4` -> `cat__001`),
so that ids are readable and unique when the paths are. Labels: one single-label set "class" whose keys are
the folder names (CSV labels), sorted, named by their readable text (`cartoon_rabbit` -> "cartoon rabbit",
see cmdcl_cache/manifest/prompts.py); no finer set (the classes are their own fine vocabulary); one split scheme
"default"; the prompt template set given by --prompts (default "generic", which reads well for nouns and
verb phrases alike); source and licence as given (default empty).

Splits, unless the CSV gives them: seeded and stratified. Per class of n videos, test gets round(n * test)
videos (halves up; at least one when n >= 2 and the test fraction is above 0), val round(n * val), and train
the rest, but at least one (val shrinks first, then test). Which videos: the class's videos ordered by
sha256("<seed>:<video id>"), the first ones to test, the next to val. So the split depends only on the seed
and the ids, not on the order files are listed in, and a class folder with one video is a training video.

Every problem is reported in one run (cmdcl_cache.manifest.format.ManifestErrors, up to MAX_ERRORS), each naming
the file (the CSV, or the folder or video) with its line (0 for a folder or a video file) and field:
a class folder without videos, videos outside class folders, fewer than two classes, files that do not exist
or are no videos, a video name that is no regular file (a FIFO, a device), a folder that links outside DIR,
a file that links outside DIR to something that is not a video file (refused, not recorded; a link to a
video file on another disk is fine), a symlink loop, a CSV path that is a folder, two names of one file (or
folder) in different classes (a link `cat/x.mp4 -> ../dog/y.mp4`: one video, two labels; two names in one
class make one record, the first in sorted order), unknown or missing columns, a row
with a wrong number of fields, an unknown split, two rows with one path, two videos with one id.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cmdcl_cache.manifest.format import SPLITS, ErrorCollector, ManifestError, check_video_id, normalise_path
from cmdcl_cache.manifest.io import decode_lines, make_labels_json
from cmdcl_cache.manifest.paths import VIDEO_EXTENSIONS

LABEL_SET = "class"
SPLIT_SCHEME = "default"
DEFAULT_PROMPTS = "generic"
CSV_COLUMNS = ("path", "label", "split")   # split is optional


@dataclass(frozen=True)
class FoundVideo:
    path: str            # relative to the video root, normalised
    label: str           # class key
    split: str | None    # given by the CSV, else None (assigned by assign_splits)
    where: tuple         # (file, line) that named it, for error messages


def video_id_for(path: str) -> str:
    """`cat/sub/001.mp4` -> `cat__sub__001`."""
    stem, _, _ = path.rpartition(".")
    return (stem or path).replace("/", "__")


def _is_video(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_EXTENSIONS


def find_class_folders(root: Path, errors: ErrorCollector) -> list[FoundVideo]:
    """Videos of DIR/<class>/..., sorted by path; problems go to `errors`."""
    found: list[FoundVideo] = []
    classes, seen, owner = 0, {}, {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if _is_video(entry.name):
                errors.add(ManifestError(entry, 0, "(folder)", "video outside a class folder: put each video "
                                                              "in DIR/<class>/ (or list them with --from-csv)"))
            continue
        classes += 1
        try:
            st = entry.stat()
        except OSError as err:   # a symlink loop, a dangling link
            errors.add(ManifestError(entry, 0, "(folder)", link_problem(root, entry) or str(err)))
            continue
        if (st.st_dev, st.st_ino) in owner:
            errors.add(ManifestError(entry, 0, "(folder)", f"class folder {entry.name!r} is the same folder as class "
                                                           f"{owner[st.st_dev, st.st_ino]!r} (a link): one class per "
                                                           "folder"))
            continue
        owner[st.st_dev, st.st_ino] = entry.name
        below = _videos_below(root, entry, seen, errors)
        if below is None:   # the class folder is a second name of a folder of another class: said already
            continue
        videos = [FoundVideo(rel, entry.name, None, (root / rel, 0)) for rel in below]
        if not videos:
            errors.add(ManifestError(entry, 0, "(folder)", f"class folder {entry.name!r} holds no video file "
                                                           f"({' '.join(VIDEO_EXTENSIONS)}); remove it or add videos"))
        found += videos
    if not classes:
        errors.add(ManifestError(root, 0, "(folder)", "no class folders: expected DIR/<class>/<video> (one "
                                                      "folder per class), or pass --from-csv FILE"))
    return found


def _videos_below(root: Path, folder: Path, seen: dict, errors: ErrorCollector) -> list[str] | None:
    """Video files below `folder` (class `folder.name`); `seen` maps every real folder and file met so far
    to (its first name, its class). A second name in the same class (a link, a symlink loop of folders) is
    skipped: one record per real file, under its first name in sorted order. A second name in another class
    is an error (one video cannot carry two labels); None when `folder` itself is such a second name. A link
    that leaves `root` and a video name that is no regular file (a FIFO, a device) are errors."""
    out, cls = [], folder.name
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        if _outside(root, Path(dirpath), errors):
            dirnames[:] = []
            continue
        st = os.stat(dirpath)
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        first = seen.setdefault(("dir", st.st_dev, st.st_ino), (rel_dir, cls))
        if first != (rel_dir, cls):
            dirnames[:] = []
            if first[1] != cls:
                what = f"class folder {cls!r}" if rel_dir == cls else f"folder {rel_dir}"
                errors.add(ManifestError(Path(dirpath), 0, "(folder)", f"{what} is the same folder as {first[0]} "
                                                                       f"(a link), of class {first[1]!r}: one class per folder"))
                if rel_dir == cls:
                    return None
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not _is_video(name) or _outside(root, Path(dirpath) / name, errors):
                continue
            fst, rel = os.stat(Path(dirpath) / name), f"{rel_dir}/{name}"
            first = seen.setdefault(("file", fst.st_dev, fst.st_ino), (rel, cls))
            if first == (rel, cls):
                out.append(rel)
            elif first[1] != cls:
                errors.add(ManifestError(Path(dirpath) / name, 0, "path", f"{first[0]} is the same file as {rel} (a "
                                                                          f"link): one video cannot be of class "
                                                                          f"{first[1]!r} and {cls!r}"))
    return out


def _outside(root: Path, path: Path, errors: ErrorCollector) -> bool:
    """True (and an error) when `path` is no video file the manifest may name (see `link_problem`)."""
    problem = link_problem(root, path)
    if problem:
        errors.add(ManifestError(path, 0, "(folder)" if os.path.isdir(path) else "path", problem))
    return problem is not None


def link_problem(root: Path, path: Path) -> str | None:
    """Why `path` (under `root`, maybe a link) may not be a manifest's video, or None.

    A FIFO or a device (/dev/zero) would hang or feed the decoder, so only regular files are videos. A link
    may lead outside `root` (datasets assembled from links to another disk) only to a regular file whose own
    name is a video's (not /etc/passwd named clip.mp4); a folder that links outside `root` is refused, since
    walking it could walk anything."""
    try:
        os.stat(path)
        real = path.resolve()
    except (OSError, RuntimeError) as err:   # Path.resolve raises RuntimeError on a loop before 3.13
        if isinstance(err, RuntimeError) or err.errno == errno.ELOOP:
            return "a symlink loop (a link that leads back to itself); remove it"
        real = Path(os.path.realpath(path))
    if not real.exists():
        return f"a link to {real}, which does not exist"
    if not real.is_dir() and not stat.S_ISREG(os.stat(real).st_mode):
        return "not a regular file (a FIFO, socket or device); a video is a file"
    if real.is_relative_to(root.resolve()):
        return None
    if real.is_dir():
        return (f"a link to {real}, outside --videos {root}: class folders are read only under it (move the "
                "folder in, or link its video files one by one)")
    if not _is_video(real.name):
        return (f"a link to {real}, outside --videos {root}, and not to a video file "
                f"({' '.join(VIDEO_EXTENSIONS)})")
    return None


def read_csv(csv_path: Path, root: Path, errors: ErrorCollector) -> list[FoundVideo]:
    """Rows of a `path,label[,split]` CSV whose files exist under `root`; problems go to `errors`."""
    data = Path(csv_path).read_bytes().replace(b"\r\n", b"\n").replace(b"\r", b"\n")   # Windows, old Mac
    lines = decode_lines(csv_path, data, errors)
    reader = csv.reader([text + "\n" for _, text in lines], strict=True)   # strict: a stray quote is an error
    try:
        return _read_rows(csv_path, reader, root, errors)
    except csv.Error as err:   # an unterminated quote runs to the end of the file
        errors.add(ManifestError(csv_path, reader.line_num, "(csv)", f"{err} (an unterminated quote?)"))
        return []


def _read_rows(csv_path: Path, reader, root: Path, errors: ErrorCollector) -> list[FoundVideo]:
    header = next(reader, None)
    columns = _csv_columns(csv_path, header, errors)
    if columns is None:
        return []
    found, first_line = [], {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            errors.add(ManifestError(csv_path, line, "(row)", f"expected {len(columns)} fields "
                                     f"({', '.join(columns)}), got {len(row)}: {row!r} (quote fields that hold commas)"))
            continue
        cells = {name: cell.strip() for name, cell in zip(columns, row)}
        try:
            video = _csv_video(csv_path, line, cells, root)
        except ManifestError as err:
            errors.add(err)
            continue
        if video.path in first_line:
            errors.add(ManifestError(csv_path, line, "path", f"duplicate path {video.path!r} (first on line "
                                                             f"{first_line[video.path]})"))
            continue
        first_line[video.path] = line
        found.append(video)
    return found


def _csv_columns(csv_path: Path, header: list[str] | None, errors: ErrorCollector) -> list[str] | None:
    if not header or not any(h.strip() for h in header):
        errors.add(ManifestError(csv_path, 1, "(header)", "empty; expected a header row: path,label[,split]"))
        return None
    columns = [h.strip().lower() for h in header]
    problems = [f"unknown column {h!r}" for h in columns if h not in CSV_COLUMNS]
    problems += [f"missing column {c!r}" for c in CSV_COLUMNS[:2] if c not in columns]
    problems += [f"column {c!r} given twice" for c in CSV_COLUMNS if columns.count(c) > 1]
    if problems:
        errors.add(ManifestError(csv_path, 1, "(header)", "; ".join(problems) + f" (the header row names "
                                                          f"path, label and optionally split; got {header!r})"))
        return None
    return columns


def _csv_video(csv_path: Path, line: int, cells: dict[str, str], root: Path) -> FoundVideo:
    def fail(field_name, what):
        raise ManifestError(csv_path, line, field_name, what)

    path, label = cells["path"], cells["label"]
    if not label:
        fail("label", "empty")
    if any(not ch.isprintable() for ch in label):
        fail("label", f"{label!r} holds a line break or control character (a quoted cell left open?)")
    if Path(path).is_absolute():
        try:
            path = Path(path).relative_to(root.resolve()).as_posix()
        except ValueError:
            fail("path", f"{path!r} is outside --videos {root}")
    try:
        path = normalise_path(path)
    except ValueError as err:
        fail("path", str(err))
    if not _is_video(path):
        fail("path", f"{path!r} has no video extension ({' '.join(VIDEO_EXTENSIONS)})")
    if not (root / path).exists():
        fail("path", f"no file {path!r} under --videos {root}")
    problem = link_problem(root, root / path)
    if problem:
        fail("path", f"{path!r}: {problem}")
    if (root / path).is_dir():
        fail("path", f"{path!r}: not a regular file (a folder); a video is a file")
    split = cells.get("split")
    if split is not None:
        split = split.lower()
        if split not in SPLITS:
            fail("split", f"unknown split {cells['split']!r}; allowed: {', '.join(SPLITS)} (or drop the column "
                          "to let the builder split)")
    return FoundVideo(path, label, split, (csv_path, line))


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes of a class of n videos; the rules are in the module docstring."""
    n_test = math.floor(n * test_fraction + 0.5)
    if test_fraction > 0 and n >= 2:
        n_test = max(n_test, 1)
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(math.floor(n * val_fraction + 0.5), max(n - 1 - n_test, 0))
    return n - n_val - n_test, n_val, n_test


def assign_splits(ids_by_class: dict[str, list[str]], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
    """video id -> split, stratified by class and seeded (see the module docstring)."""
    out = {}
    for ids in ids_by_class.values():
        order = sorted(ids, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
        _, n_val, n_test = split_counts(len(order), val_fraction, test_fraction)
        for i, vid in enumerate(order):
            out[vid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _check_readable_names(classes: list[str], where: Path, readable_label, errors: ErrorCollector) -> None:
    """Two classes whose label texts read the same ('Rabbit', 'rabbit') get the same text embedding: a
    zero-shot head could never tell them apart, so it is an error, not a surprise after extraction."""
    by_text: dict[str, str] = {}
    for key in classes:
        text = readable_label(key).lower()
        if text in by_text:
            errors.add(ManifestError(where, 0, "label", f"classes {by_text[text]!r} and {key!r} both read "
                                                        f"{readable_label(key)!r} as a label text; rename one"))
        else:
            by_text[text] = key


def build(videos: Path, csv_path: Path | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
          seed: int = 0, prompts: str = DEFAULT_PROMPTS, name: str | None = None, source: str = "",
          licence: str = "") -> tuple[list[dict], dict]:
    """(videos.jsonl records, labels.json object) of a folder of videos; raises every problem at once.

    `name` (the dataset's name, which names its cache folder) defaults to the name of `videos`.
    """
    root = Path(videos)
    if not root.is_dir():
        raise ManifestError(root, 0, "(folder)", "--videos is not a folder")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"split fractions val {val_fraction} and test {test_fraction} must be in [0, 1) and "
                         "leave some videos for training")
    from cmdcl_cache.manifest.prompts import TEMPLATE_SETS, readable_label

    if prompts not in TEMPLATE_SETS:
        raise ValueError(f"unknown prompt template set {prompts!r}; choose one of {', '.join(TEMPLATE_SETS)}")
    errors = ErrorCollector()
    found = read_csv(Path(csv_path), root, errors) if csv_path else find_class_folders(root, errors)
    ids: dict[str, FoundVideo] = {}
    for video in found:
        vid = video_id_for(video.path)
        problem = check_video_id(vid)
        if problem or vid in ids:
            what = problem or f"id {vid!r} is also the id of {ids[vid].path!r}; rename one of the two files"
            errors.add(ManifestError(video.where[0], video.where[1], "video_id", what))
            continue
        ids[vid] = video
    classes = sorted({v.label for v in ids.values()})
    _check_readable_names(classes, csv_path or root, readable_label, errors)
    if found and len(classes) < 2 and not errors:   # judged only on an otherwise sound list
        errors.add(ManifestError(csv_path or root, 0, "label", f"{len(classes)} class(es) {classes}: a classifier "
                                                               "needs at least two"))
    errors.raise_if_any()
    given = {vid: v.split for vid, v in ids.items() if v.split is not None}
    if len(given) != len(ids):
        by_class: dict[str, list[str]] = {}
        for vid, v in ids.items():
            by_class.setdefault(v.label, []).append(vid)
        given = assign_splits(by_class, val_fraction, test_fraction, seed)
    records = [{"video_id": vid, "path": v.path, "split": given[vid], "labels": {LABEL_SET: v.label}}
               for vid, v in ids.items()]
    labels = make_labels_json(name or root.resolve().name, {LABEL_SET: (False, [(c, readable_label(c)) for c in classes])},
                              default_label_set=LABEL_SET, fine_label_set=None, split_schemes=[SPLIT_SCHEME],
                              source=source, licence=licence, prompts=prompts)
    return records, labels
