"""`cmdcl-cache import`: per-frame features made by another pipeline -> a cmdcl cache, written as `extract`
writes one (ShardWriter: flock, journal, per-video crc32, resume, atomic finalize), without decoding.

Formats (`--format`). `<id>` is a manifest video id; a file belongs to the video named by its file name,
in whichever subfolder of --from (features kept in per-class folders: `ChangeCarTire/abc.npy` -> `abc`).

  npy             `<id>.npy`: float16/32/64 [T, D], one row per sampled frame (ActionFormer, ViS4mer).
                  Beside it, when present (video_features' names): `<id>_timestamps_ms.npy` [T]
                  (milliseconds of each row) and `<id>_fps.npy` (one number); or one `<id>.npz` holding
                  `features`, `timestamps_ms`, `fps`. A folder that `export-npy` wrote has `index.jsonl`:
                  then it alone maps ids to files (hashed names included; names are never parsed), and its
                  `source_fps` and `duration` become the fps and duration of each video, so an export
                  imported back gives the same cache values.
  video-features  video_features' `on_extraction=save_numpy` folder: `<id>_<key>.npy` [T, D] (key: its
                  feature_type, --feature-key, default clip; float64, as video_features saves them),
                  `<id>_timestamps_ms.npy` [T] and `<id>_fps.npy`: all three required.
  safetensors     `<id>.safetensors` holding a tensor --feature-key (default features) [T, D], optionally
                  `timestamps_ms` [T] and `fps` (one number).
  hdf5            one file (--from FILE): per video a dataset `<id>` [T, D], or a group `<id>` holding a
                  dataset --feature-key (default features) [T, D] and optionally `timestamps_ms` and `fps`.

`.pt`/`.pth`/`.pkl` files are never read: unpickling a file runs whatever code it holds. The message says
how to convert one (np.save, in a Python process that trusts it).

Timestamps come from the files (seconds = milliseconds / 1000; seconds exported as seconds x 1000 come back
within one ulp, see ms_to_seconds) or, with `--fps F`, row i is at `--time-offset + i / F` seconds.
`--fps` with timestamp files is refused: which one won would be a silent choice. The fps column is the
fps file's value, else --fps, else 0 (unknown); the duration is T / fps (0: the last timestamp). Each row's
frame_index is its row number.

Outcomes. A failure recorded in failures.jsonl (the run goes on), stage `open`: no file, two files for
one id, a file that is truncated or not what its suffix says, a `.pt`, an HDF5 group without the dataset,
a missing sidecar (video-features), a file index.jsonl lists that is gone; stage `write`: not 2-D, no rows, not a float dtype, another dimension
than the import's, NaN/Inf, values beyond float16's range, timestamps of another length, non-finite or
decreasing, fps not > 0. Fatal (exit 2, nothing written): files whose id is not in the manifest (unless
--allow-unknown: listed, not imported), no matching file at all, an HDF5 file that does not open or that
keeps or reaches data in another file (external raw storage, a virtual dataset, an external link, a soft link
through one: the source sha256 covers the --from file only), --fps with
timestamp files, no timestamps and no --fps, a cache made with other settings or from other source bytes.

Provenance (cache.ImportSpec): model = --model, pretrained "imported", and `import` = {format, source
(absolute path), feature_key, dim, timestamps, files, sources_sha256}: sha256 over the sorted (video id,
role, file, sha256) of every matched source file. Each file's sha256 (with size, mtime, role) is appended
to `import_sources.jsonl` in the cache folder; a resumed import hashes again only the files whose size or
mtime changed. Changed sources change `sources_sha256`, and the cache refuses them: import into a new
--cache folder (it runs at disk speed).

One shard, `frames-00000-of-00001.h5`: import is bound by the disk, and ranks would only contend for it.
Videos are committed in groups (ShardWriter.commit: a group's rows, then its commit lines, each fsynced
once; --no-durable skips the fsyncs). Exit status as extract: 0 every manifest video is in the cache, 1
some failed (the cache holds the others), 2 none, or a fatal error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import stat
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from .cache import (CacheFolder, ImportSpec, check_not_nested, for_writing, provenance_difference,
                    text_provenance_for)
from .config import check_choices, option
from .export import INDEX_FILE
from .failures import append_line, append_run_log, read_lines, record_failure
from .pipeline import EXIT_OK, ExtractResult, exit_status, main_exit_message, result_counts
from .store import SCHEMA_VERSION, CacheError, ProvenanceError, TextEmbeddings, normalised, read_shard

PICKLED = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
SIDECARS = {"timestamps_ms": "_timestamps_ms.npy", "fps": "_fps.npy"}
GROUP_VIDEOS = 256          # videos per group commit (one fsync per journal file per group)
GROUP_BYTES = 32 << 20      # ... or this many bytes of float16 rows, whichever comes first
FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_ROWS = 1_000_000        # rows of one video (over 9 hours at 30 rows/s), judged from its header
MAX_SOURCE_BYTES = 1 << 30  # bytes of one video's array as read (decompressed), judged from its header


class SourceError(RuntimeError):
    """A fatal problem with the source or the options: nothing can be imported as asked."""


class VideoProblem(Exception):
    """One video cannot be imported; recorded in failures.jsonl with its stage."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage, self.message = stage, message


def pickled_message(path) -> str:
    return (f"{path}: a pickled PyTorch/Python file; cmdcl never unpickles files (loading one runs any code "
            "it holds). Convert it in a Python process that trusts it: load the tensor with torch, then "
            "`np.save('<id>.npy', tensor.float().numpy())`, or save it with safetensors")


@dataclass(frozen=True)
class ImportConfig:
    """Everything `cmdcl-cache import` is told; the fields are its flags (`--config FILE` takes them too)."""

    dataset: str = option(None, "Built-in manifest (coin, breakfast, charades, demo) or a manifest folder.",
                          required=True)
    source: str = option(None, "Folder of per-video files (npy, video-features, safetensors) or one HDF5 file.",
                         flag="--from", required=True)
    format: Literal["npy", "video-features", "safetensors", "hdf5"] = option(
        None, "How the features are stored (formats below; docs/guide/import.md).", required=True)
    cache: str = option(None, "Cache root (features go to <cache>/<dataset>/<model>-imported/), or a cache "
                              "folder to resume.", required=True)
    model: str = option(None, "Name of the model that made the features (free text, e.g. ViT-B-16-openai); "
                              "names the cache folder and goes into its provenance.", required=True)
    fps: float | None = option(None, "Rows per second, for sources without timestamps: row i is at "
                                     "--time-offset + i / fps seconds.")
    time_offset: float = option(0.0, "With --fps: seconds of row 0 (e.g. half a feature window).")
    feature_key: str | None = option(None, "video-features: the feature_type in <id>_<key>.npy (default clip); "
                                           "hdf5, safetensors: the dataset or tensor name (default features).")
    dim: int | None = option(None, "Feature dimension (default: the most common one among the source files).")
    allow_unknown: bool = option(False, "Import even when the source holds ids the manifest does not have "
                                        "(they are listed, not imported).")
    durable: bool = option(True, "fsync each group of videos, rows before commit lines (survives a power loss).")
    quiet: bool = option(False, "Log lines instead of a progress bar (for batch jobs).")

    def __post_init__(self):
        check_choices(self)
        if self.fps is not None and not (np.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"--fps must be a number > 0, got {self.fps}")
        if not np.isfinite(self.time_offset):
            raise ValueError(f"--time-offset must be finite, got {self.time_offset}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"--dim must be >= 1, got {self.dim}")
        if self.feature_key is not None and self.format == "npy":
            raise ValueError("--feature-key: --format npy reads <id>.npy (use --format video-features for "
                             "<id>_<key>.npy)")
        if Path(self.source).suffix.lower() in PICKLED:
            raise ValueError(pickled_message(self.source))

    @property
    def key(self) -> str:
        return self.feature_key or ("clip" if self.format == "video-features" else "features")


@dataclass
class SourceVideo:
    """The files of one manifest video in the source: {role: [paths relative to the source root]}."""

    video_id: str
    files: dict = field(default_factory=lambda: defaultdict(list))
    problem: str | None = None   # why it cannot be read (stage open), found while matching
    meta: dict = field(default_factory=dict)   # its export-npy index.jsonl entry, when there is one

    def one(self, role: str) -> str | None:
        paths = self.files.get(role) or []
        return paths[0] if paths else None


@dataclass
class ImportResult(ExtractResult):
    unknown: list = field(default_factory=list)   # source entries whose id is not in the manifest
    hashed: int = 0                               # source files hashed by this run
    reused: int = 0                               # source hashes reused from import_sources.jsonl
    source_bytes: int = 0


# --------------------------------------------------------------------------------------------- reading

def load_npy(path: Path) -> np.ndarray:
    """An .npy array, never a pickle; VideoProblem (open) naming the file when it is not a whole .npy."""
    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise VideoProblem("open", f"{path}: not a .npy file (no NumPy header)")
            fh.seek(0)
            shape, dtype = npy_header(fh)
            _check_declared_size(path, shape, dtype, os.fstat(fh.fileno()).st_size - fh.tell())
            fh.seek(0)
            return np.load(fh, allow_pickle=False)
    except VideoProblem:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as err:
        raise VideoProblem("open", f"{path}: cannot be read as .npy ({type(err).__name__}: {err}); "
                                   "truncated or damaged?") from None


def _check_declared_size(path: Path, shape, dtype, data_bytes: int) -> None:
    """A header that declares more bytes than the file holds (truncated, or a hostile shape like 10^12
    rows) is refused before NumPy tries to allocate them."""
    if dtype.hasobject:
        raise VideoProblem("open", f"{path}: an object array (a pickle), never loaded")
    declared = math.prod(shape) * dtype.itemsize
    if declared != data_bytes:
        raise VideoProblem("open", f"{path}: its header declares shape {shape} {dtype} ({declared} bytes) but "
                                   f"the file holds {data_bytes} bytes of data; truncated or damaged?")


def npy_shape(path: Path):
    """(shape, dtype) from the .npy header of a file, or of an .npz's `features` member (a few hundred
    bytes), or None when it does not parse (the real read then reports what is wrong)."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as zf, zf.open("features.npy") as fh:
                return npy_header(fh)
        with open(path, "rb") as fh:
            return npy_header(fh)
    except Exception:   # noqa: BLE001 - the real read reports what is wrong with the file
        return None


def npy_header(fh):
    major, _ = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return tuple(shape), dtype


def load_npz(path: Path) -> tuple:
    """(features, timestamps_ms or None, fps or None) of an .npz (export-npy --format npz), never a pickle."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                raise VideoProblem("open", f"{path}: not an .npz file (no zip header)")
        with zipfile.ZipFile(path) as zf:   # each member's declared size against its real one
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as fh:
                        shape, dtype = npy_header(fh)
                        _check_declared_size(f"{path}[{info.filename}]", shape, dtype, info.file_size - fh.tell())
        with np.load(path, allow_pickle=False) as z:
            if "features" not in z.files:
                raise VideoProblem("open", f"{path}: no array 'features' (it holds {', '.join(z.files) or 'none'})")
            return tuple(z[k] if k in z.files else None for k in ("features", "timestamps_ms", "fps"))
    except VideoProblem:
        raise
    except Exception as err:   # noqa: BLE001 - OSError, ValueError, zipfile.BadZipFile, EOFError
        raise VideoProblem("open", f"{path}: cannot be read as .npz ({type(err).__name__}: {err}); "
                                   "truncated or damaged?") from None


class FolderSource:
    """One file (or three, with sidecars) per video under a folder: npy, video-features, safetensors."""

    def __init__(self, root: Path, fmt: str, key: str):
        if not root.is_dir():
            raise SourceError(f"--from {root}: not a folder (--format {fmt} reads a folder of per-video files)")
        self.root, self.format, self.key = root, fmt, key
        self.location = root
        self.suffix = {"npy": ".npy", "video-features": f"_{key}.npy", "safetensors": ".safetensors"}[fmt]
        self.index = None
        if fmt == "npy" and (root / INDEX_FILE).is_file():   # export-npy's map of ids to file names
            self.index = read_source_index(root)

    def expected(self, video_id: str) -> str:
        return f"{self.root}/{video_id}{self.suffix}"

    @property
    def pattern(self) -> str:
        sidecars = "" if self.format == "safetensors" else " (+ <id>_timestamps_ms.npy, <id>_fps.npy)"
        return f"<id>{self.suffix}{sidecars}"

    def where(self, sv: SourceVideo) -> str:
        return str(self.root / sv.one("features"))

    def _classify(self, rel: str, resolve) -> tuple[str | None, str]:
        """(video id or None, role) of one file under the root; role "" for files of no interest."""
        if any(rel.lower().endswith(s) for s in PICKLED):
            return resolve(rel.rsplit(".", 1)[0]), "pickled"
        if self.format != "safetensors":
            for role, suffix in SIDECARS.items():
                if rel.endswith(suffix) and resolve(rel[:-len(suffix)]):
                    return resolve(rel[:-len(suffix)]), role
        if rel.endswith(self.suffix):
            return resolve(rel[:-len(self.suffix)]), "features"
        if rel.endswith(".npz") and self.format == "npy":   # export-npy --format npz
            return resolve(rel[:-4]), "features"
        if rel.endswith(".npy") and self.format == "video-features":
            return None, "features"   # an .npy that video_features would not have written
        return None, ""

    def match(self, ids: set[str]) -> tuple[dict[str, SourceVideo], list[str]]:
        """The source videos of the manifest's ids, and the files whose id it does not have."""
        if self.index is not None:
            return self._match_index(ids)

        def resolve(stem: str) -> str | None:   # a file's id is its name, in whichever subfolder
            name = stem.rsplit("/", 1)[-1]
            return name if name in ids else None

        found: dict[str, SourceVideo] = {}
        unknown = []
        for rel in _walk(self.root):
            vid, role = self._classify(rel, resolve)
            if not role:
                continue
            if vid is None:
                unknown.append(rel)
                continue
            found.setdefault(vid, SourceVideo(vid)).files[role].append(rel)
        for sv in found.values():
            sv.problem = self._problem(sv)
        return found, unknown

    def _match_index(self, ids: set[str]) -> tuple[dict[str, SourceVideo], list[str]]:
        """export-npy's folder: index.jsonl maps every id to its files (file names are never parsed)."""
        found, unknown, listed = {}, [], {INDEX_FILE}
        for vid, entry in self.index.items():
            files = entry.get("files") or {}
            listed |= set(files.values())
            if vid not in ids:
                unknown.append(f"{vid!r} ({INDEX_FILE})")
                continue
            sv = found[vid] = SourceVideo(vid, meta=entry)
            for role, rel in files.items():
                sv.files["features" if role in ("features", "npz") else role].append(rel)
            gone = [rel for rel in files.values() if not (self.root / rel).exists()]   # a FIFO: hash_sources
            if gone or not sv.files.get("features"):
                sv.problem = (f"{self.root / INDEX_FILE}: video {vid!r} lists "
                              f"{', '.join(gone) + ', not in the folder' if gone else 'no features file'}")
        unknown += [rel for rel in _walk(self.root) if rel.endswith((".npy", ".npz")) and rel not in listed]
        return found, unknown

    def _problem(self, sv: SourceVideo) -> str | None:
        for role, paths in sv.files.items():
            if len(paths) > 1 and role != "pickled":
                return (f"{len(paths)} source files for video {sv.video_id!r} under {self.root}: "
                        f"{', '.join(paths)}; keep one")
        if not sv.files.get("features"):
            if sv.files.get("pickled"):
                return pickled_message(self.root / sv.files["pickled"][0])
            return (f"no features file for video {sv.video_id!r} (expected {self.expected(sv.video_id)}; "
                    f"found only {', '.join(p for ps in sv.files.values() for p in ps)})")
        if self.format == "video-features":
            lacking = [sv.video_id + s for r, s in SIDECARS.items() if not sv.files.get(r)]
            if lacking:
                return (f"{self.root}: {', '.join(lacking)} missing (video_features writes the timestamps and "
                        "fps beside each features file)")
        return None

    def hash_units(self, videos: dict[str, SourceVideo]) -> list[tuple[str, str, str]]:
        index = [("", "index", INDEX_FILE)] if self.index is not None else []
        return index + [(sv.video_id, role, rel) for sv in videos.values() for role, paths in sorted(sv.files.items())
                        if role != "pickled" for rel in paths]

    def compressed(self, sv: SourceVideo) -> bool:
        """An .npz member's declared size is bounded by no file size (.npy and safetensors are checked so)."""
        return sv.one("features").endswith(".npz")

    def header(self, sv: SourceVideo):
        path = self.root / sv.one("features")
        if self.format != "safetensors":
            return npy_shape(path)
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="np") as f:
                return tuple(f.get_slice(self.key).get_shape()), None
        except Exception:   # noqa: BLE001 - the real read reports it
            return None

    def read(self, sv: SourceVideo) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(features, timestamps in ms or None, fps or None) of one video, as stored."""
        if self.format == "safetensors":
            return self._read_safetensors(self.root / sv.one("features"))
        features = self.root / sv.one("features")
        side = {role: load_npy(self.root / sv.one(role)) if sv.one(role) else None for role in SIDECARS}
        if features.suffix != ".npz":
            return load_npy(features), side["timestamps_ms"], side["fps"]
        if any(v is not None for v in side.values()):
            raise VideoProblem("open", f"{features}: an .npz with its own timestamps and fps, and sidecar files "
                                       "beside it; keep one")
        return load_npz(features)

    def _read_safetensors(self, path: Path):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="np") as f:
                names = list(f.keys())
                if self.key not in names:
                    raise VideoProblem("open", f"{path}: no tensor {self.key!r} (it holds {', '.join(names) or 'none'}"
                                               "); name the features tensor with --feature-key")
                extra = {n: f.get_tensor(n) if n in names else None for n in SIDECARS}
                return f.get_tensor(self.key), extra["timestamps_ms"], extra["fps"]
        except VideoProblem:
            raise
        except Exception as err:   # noqa: BLE001 - safetensors raises its own error types
            raise VideoProblem("open", f"{path}: cannot be read as safetensors ({type(err).__name__}: {err})") from None

    def close(self) -> None:
        pass


def read_source_index(root: Path) -> dict[str, dict]:
    """video id -> entry of export-npy's index.jsonl, every `files` value checked: a file name that stays
    inside --from lexically (not absolute, no `..` out of it). A link inside --from to a file elsewhere is
    allowed (as a folder manifest's links to videos on another disk); hash_sources refuses non-regular files."""
    path = root / INDEX_FILE
    out = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: not a readable export-npy index ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise SourceError(f"{path}:{n}: not JSON ({err})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("video_id"), str):
            raise SourceError(f"{path}:{n}: field 'video_id': expected an object with a string video_id")
        files = entry.get("files") or {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise SourceError(f"{path}:{n}: field 'files': expected an object of role -> file name, got "
                              f"{_brief(files)}")
        for role, rel in files.items():
            norm = posixpath.normpath(rel)
            if rel.startswith("/") or Path(rel).is_absolute() or norm == ".." or norm.startswith("../"):
                raise SourceError(f"{path}:{n}: field 'files.{role}': {rel!r} leaves --from {root}; import reads "
                                  "only files under it (a link inside it may point elsewhere)")
            if norm == ".":
                raise SourceError(f"{path}:{n}: field 'files.{role}': {rel!r} names --from itself, not a file")
        out[entry["video_id"]] = entry
    return out


def _brief(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _walk(root: Path) -> list[str]:
    """Every file under root, as sorted paths relative to it with '/' separators."""
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        out += [Path(dirpath, f).relative_to(root).as_posix() for f in files]
    return sorted(out)


class H5Source:
    """One HDF5 file: a dataset per video id, or a group per video id holding the features dataset."""

    format = "hdf5"

    def __init__(self, path: Path, key: str):
        import h5py
        if path.is_dir():
            raise SourceError(f"--from {path}: a folder; --format hdf5 reads one file")
        try:
            self.file = h5py.File(path, "r")
        except OSError as err:
            raise SourceError(f"--from {path}: not a readable HDF5 file ({err}); truncated or not HDF5?") from None
        if "videos" in self.file and "schema_version" in self.file.attrs:
            self.file.close()
            raise SourceError(f"--from {path}: a cmdcl shard already; use its folder as --cache directly")
        self.path, self.root, self.location, self.key = path, path.parent, path, key
        outside = self.outside_links()
        if outside:
            self.file.close()
            raise SourceError(f"--from {path}: {'; '.join(outside[:5])}{'; ...' if len(outside) > 5 else ''}. "
                              "import reads only the --from file (its sha256 covers nothing else): copy the "
                              "data into it (h5py: f2[name] = f1[name][()]) and import that copy")

    def outside_links(self) -> list[str]:
        """What in the file keeps or reaches bytes in another file: external raw storage (EFL), virtual
        datasets, external links, soft links through an external link. h5py's link visit follows no link."""
        import h5py
        found = []

        def look(name: str, link) -> None:
            if isinstance(link, h5py.ExternalLink):
                found.append(f"'{name}' is an external link to {link.filename}:{link.path}")
            elif isinstance(link, h5py.SoftLink) and self.soft_leaves(link.path, posixpath.dirname("/" + name)):
                found.append(f"'{name}' is a soft link to {link.path}, which leads out of the file or loops")
            elif isinstance(link, h5py.HardLink) and isinstance(obj := self.file.get(name), h5py.Dataset):
                if obj.is_virtual:
                    sources = sorted({v.file_name for v in obj.virtual_sources()})
                    found.append(f"dataset '{name}' is virtual (its data are in {', '.join(sources) or 'no file'})")
                elif obj.external:
                    found.append(f"dataset '{name}' keeps its raw data in an external file ({obj.external[0][0]})")
        self.file.visititems_links(look)
        return found

    def soft_leaves(self, target: str, base: str, depth: int = 0) -> bool:
        """True when the soft link target passes through an external link (or soft links nest past HDF5's
        own limit of 16, or loop); a dangling target reads nothing and is left to the match."""
        import h5py
        if depth > 16:
            return True
        here = "/" if target.startswith("/") else base
        for part in filter(None, target.split("/")):
            here = posixpath.join(here, part)
            try:
                link = self.file.get(here, getlink=True)
            except (KeyError, RuntimeError, OSError, ValueError):   # a link loop HDF5 itself gives up on
                return True
            if link is None:
                return False
            if isinstance(link, h5py.ExternalLink):
                return True
            if isinstance(link, h5py.SoftLink) and self.soft_leaves(link.path, posixpath.dirname(here), depth + 1):
                return True
        return False

    def expected(self, video_id: str) -> str:
        return f"dataset '{video_id}' or '{video_id}/{self.key}' in {self.path}"

    @property
    def pattern(self) -> str:
        return f"datasets <id> or <id>/{self.key}"

    def where(self, sv: SourceVideo) -> str:
        return f"{self.path}:{sv.one('features')}"

    def match(self, ids: set[str]) -> tuple[dict[str, SourceVideo], list[str]]:
        import h5py
        names: list[str] = []
        self.file.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset) else None)
        found: dict[str, SourceVideo] = {}
        unknown = []
        for name in sorted(names):
            parent, _, leaf = name.rpartition("/")
            if name in ids:
                vid, role = name, "features"
            elif parent in ids:
                vid, role = parent, {self.key: "features"}.get(leaf, leaf if leaf in SIDECARS else "other")
            else:
                unknown.append(name)
                continue
            found.setdefault(vid, SourceVideo(vid)).files[role].append(name)
        for sv in found.values():
            if not sv.files.get("features"):
                sv.problem = (f"{self.path}: group {sv.video_id!r} has no dataset {self.key!r} (it holds "
                              f"{', '.join(p.rpartition('/')[2] for ps in sv.files.values() for p in ps)}); "
                              "name it with --feature-key")
        return found, unknown

    def hash_units(self, videos) -> list[tuple[str, str, str]]:
        return [("", "hdf5", self.path.name)]

    def compressed(self, sv: SourceVideo) -> bool:
        return True   # any dataset may be gzip-compressed or chunked with nothing stored

    def header(self, sv: SourceVideo):
        ds = self.file[sv.one("features")]
        return tuple(ds.shape), ds.dtype

    def read(self, sv: SourceVideo):
        def get(role):
            name = sv.one(role)
            if name is None:
                return None
            try:
                ds = self.file[name]
                check_header((tuple(ds.shape), ds.dtype), None, f"{self.path}: dataset {name!r}")
                return np.asarray(ds[()])
            except (OSError, ValueError, KeyError) as err:
                raise VideoProblem("open", f"{self.path}: dataset {name!r} cannot be read ({err})") from None
        return get("features"), get("timestamps_ms"), get("fps")

    def close(self) -> None:
        self.file.close()


def open_source(config: ImportConfig):
    path = Path(config.source).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"--from {path}: does not exist")
    if config.format == "hdf5":
        return H5Source(path, config.key)
    return FolderSource(path, config.format, config.key)


# ---------------------------------------------------------------------------------------------- checks

def check_features(x: np.ndarray, dim: int, where: str) -> np.ndarray:
    """The rows as float16 [T, D], or VideoProblem (write) saying what is wrong with them."""
    if x.dtype.kind != "f":
        raise VideoProblem("write", f"{where}: dtype {x.dtype}; expected float16, float32 or float64 features")
    if x.ndim != 2:
        hint = {1: " (a one-frame video is [1, D])", 3: " (token grids are not imported: pool them or keep "
                                                        "the CLS token first)"}.get(x.ndim, "")
        raise VideoProblem("write", f"{where}: shape {tuple(x.shape)} is {x.ndim}-D; expected [T, D], one row "
                                    f"per frame{hint}")
    if x.shape[0] == 0:
        raise VideoProblem("write", f"{where}: no rows (shape {tuple(x.shape)})")
    check_header((tuple(x.shape), x.dtype), dim, where, capped=False)
    with np.errstate(over="ignore", invalid="ignore"):   # what they flag is reported below
        y = x.astype("<f2")
    if not np.isfinite(y).all():   # one pass over float16 finds NaN/Inf and float16 overflow alike
        bad = ~np.isfinite(x)
        if bad.any():
            raise VideoProblem("write", f"{where}: holds NaN/Inf ({int(bad.sum())} values, first in row "
                                        f"{int(np.argwhere(bad)[0][0])})")
        raise VideoProblem("write", f"{where}: values up to {float(np.abs(x).max()):.4g} are beyond float16's "
                                    f"range ({FLOAT16_MAX:.0f}); the cache stores float16")
    return y


def check_header(head, dim: int | None, where: str, capped: bool = True) -> None:
    """Shape and size as declared (a header, ds.shape), judged before anything is read: a dimension other
    than the import's, or (`capped`: a compressed source, whose declared size no file size bounds) more than
    MAX_ROWS rows or MAX_SOURCE_BYTES bytes (a hostile shape, a gzip bomb) is refused naming the shape.
    `head` None (no readable header): the read reports what is wrong."""
    if head is None:
        return
    shape, dtype = tuple(int(n) for n in head[0]), head[1]
    if dim is not None and len(shape) == 2 and shape[1] != dim:
        raise VideoProblem("write", f"{where}: shape {shape}: dimension {shape[1]}, but this import's is {dim} "
                                    "(--dim, or the most common dimension of the source files)")
    nbytes = math.prod(shape) * (getattr(dtype, "itemsize", None) or 4)
    if capped and ((shape[0] if shape else 0) > MAX_ROWS or nbytes > MAX_SOURCE_BYTES):
        raise VideoProblem("open", f"{where}: declared shape {shape} ({nbytes / 2**20:.0f} MiB) is beyond import's "
                                   f"limit of {MAX_ROWS} rows and {MAX_SOURCE_BYTES >> 20} MiB per video; refused "
                                   "before reading (a damaged header or a compression bomb?)")


def ms_to_seconds(ms: np.ndarray) -> np.ndarray:
    """Seconds of timestamps in milliseconds (float64 ms / 1000, correctly rounded). Seconds written as
    seconds x 1000 come back within one ulp: for ~2% of 29.97 fps timestamps no float64 m has m / 1000 equal
    to the original seconds, so no reader can do better from milliseconds."""
    return np.asarray(ms, dtype=np.float64) / 1000.0


def row_times(n: int, ms, fps_file, config: ImportConfig, where: str) -> tuple[np.ndarray, float]:
    """(timestamps in seconds [n], fps) of one video, from its files or from --fps."""
    fps = 0.0 if config.fps is None else float(config.fps)
    if fps_file is not None:
        f = np.asarray(fps_file)
        if f.size != 1 or f.dtype.kind not in "fiu" or not np.isfinite(f).all() or not float(f.ravel()[0]) > 0:
            raise VideoProblem("write", f"{where}: fps {f.ravel()[:3].tolist()} is not one number > 0")
        fps = float(f.ravel()[0])
    if ms is not None and config.fps is not None:
        raise VideoProblem("write", f"{where}: has its own timestamps, and --fps is given too; drop --fps")
    if ms is None:
        if config.fps is None:
            raise VideoProblem("open", f"{where}: no timestamps file, and no --fps to derive them")
        return config.time_offset + np.arange(n, dtype=np.float64) / config.fps, fps
    ms = np.asarray(ms)
    if ms.dtype.kind not in "fiu" or ms.shape != (n,):
        raise VideoProblem("write", f"{where}: timestamps are {ms.dtype} {tuple(ms.shape)}, expected [{n}] numbers "
                                    "(one per feature row, milliseconds)")
    if not np.isfinite(ms).all() or (np.diff(ms) < 0).any():
        raise VideoProblem("write", f"{where}: timestamps are not finite and non-decreasing")
    if n > 1 and ms[-1] == ms[0]:   # e.g. zeros written as a placeholder: segment labels would all land on t=0
        raise VideoProblem("write", f"{where}: every row has the timestamp {float(ms[0])} ms; give real "
                                    "timestamps, or drop the file and pass --fps")
    return ms_to_seconds(ms), fps


# ------------------------------------------------------------------------------------------------ plan

@dataclass
class ImportPlan:
    """What a run will do, decided before anything is written."""

    config: ImportConfig
    manifest: object
    source: object                   # FolderSource or H5Source
    folder: CacheFolder
    ids: list[str]                   # every manifest video, sorted
    videos: dict[str, SourceVideo]   # those with an entry in the source
    unknown: list[str]               # source entries whose id the manifest does not have
    records: list[dict]              # sha256 of every matched source file
    fresh: list[dict]                # of which hashed by this run (the others came from import_sources.jsonl)
    spec: ImportSpec

    @property
    def shard(self) -> Path:
        return self.folder.shard_path(0, 1)

    @property
    def dim(self) -> int:
        return int(self.spec.source["dim"])

    @property
    def provenance(self) -> dict:
        return self.spec.frame_provenance(self.manifest.dataset)


def plan_import(config: ImportConfig) -> ImportPlan:
    """Every check that writes nothing: manifest, source listing, ids, sha256 of the sources, dimension."""
    from .manifest import load_manifest

    manifest = load_manifest(config.dataset)
    ids = sorted(v.video_id for v in manifest.videos)
    source = open_source(config)
    try:
        videos, unknown = source.match(set(ids))
        check_match(config, source, manifest, videos, unknown)
        folder = for_writing(Path(config.cache).expanduser().resolve(), manifest.dataset, ImportSpec(config.model))
        records, fresh = hash_sources(source, videos, folder, config.quiet)
        dim = config.dim or common_dim(source, videos)
    except BaseException:
        source.close()
        raise
    timestamps = ({"from": "files"} if config.fps is None else
                  {"from": "fps", "fps": config.fps, "offset": config.time_offset})
    spec = ImportSpec(config.model, {
        "format": config.format, "source": str(source.location),
        "feature_key": None if config.format == "npy" else config.key, "dim": int(dim),
        "timestamps": timestamps, "files": len(records), "sources_sha256": sources_sha256(records)})
    return ImportPlan(config, manifest, source, folder, ids, videos, unknown, records, fresh, spec)


def check_match(config: ImportConfig, source, manifest, videos: dict, unknown: list[str]) -> None:
    """Fatal problems of the source as a whole (see the module docstring)."""
    if unknown and not config.allow_unknown:
        raise SourceError(f"{source.location}: {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} that match "
                          f"no video of the manifest {manifest.root}: {', '.join(unknown[:5])}"
                          f"{', ...' if len(unknown) > 5 else ''}; --format {config.format} reads {source.pattern}, "
                          "the id being the path under --from or the file name; rename them, check --format and "
                          "--feature-key, or pass --allow-unknown to import the others")
    if not any(sv.files.get("features") for sv in videos.values()):
        pickled = next((sv for sv in videos.values() if sv.files.get("pickled")), None)
        if pickled is not None:
            raise SourceError(pickled.problem)
        example = source.expected(manifest.videos[0].video_id) if manifest.videos else "?"
        raise SourceError(f"{source.location}: no features of any manifest video (looked for e.g. {example}); "
                          "check --format and --feature-key")
    with_times = [sv.one("timestamps_ms") for sv in videos.values() if sv.files.get("timestamps_ms")]
    if config.fps is not None and with_times:
        raise SourceError(f"--fps {config.fps}: the source has its own timestamps (e.g. {with_times[0]}); "
                          "drop --fps to use them")
    self_timed = config.format == "safetensors" or any(
        (sv.one("features") or "").endswith(".npz") for sv in videos.values())   # timestamps inside the file
    if config.fps is None and not with_times and not self_timed:
        raise SourceError(f"{source.location}: no timestamps (no <id>_timestamps_ms{'' if config.format == 'hdf5' else '.npy'}); "
                          "pass --fps (rows per second of video) to derive them")


def hash_sources(source, videos: dict, folder: CacheFolder, quiet: bool) -> tuple[list[dict], list[dict]]:
    """sha256 of every matched source file; a hash recorded in import_sources.jsonl for the same file, size
    and mtime is reused. Returns (all records, the ones computed now)."""
    from .progress import console
    where = str(source.location)
    known = {(r.get("source"), r.get("path"), r.get("size"), r.get("mtime_ns")): r.get("sha256")
             for r in read_lines(folder.sources_path)}
    units = source.hash_units(videos)
    if not quiet:
        console(stderr=True).print(f"sha256 of {len(units)} source files under {where}", markup=False)
    records, fresh = [], []
    for vid, role, rel in units:
        path = source.root / rel
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):   # a FIFO or /dev/zero would never finish hashing
                raise SourceError(f"{path}: not a regular file (a FIFO, socket or device, maybe through a link); "
                                  "import reads only regular files")
            sha = known.get((where, rel, st.st_size, st.st_mtime_ns))
            if sha is None:
                with open(path, "rb") as fh:
                    sha = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError as err:   # gone since the listing, unreadable
            if vid not in videos:
                raise SourceError(f"{path}: cannot be read ({err.strerror})") from None
            videos[vid].problem = f"{path}: cannot be read ({err.strerror})"
            continue
        rec = {"video_id": vid, "role": role, "path": rel, "source": where, "size": st.st_size,
               "mtime_ns": st.st_mtime_ns, "sha256": sha}
        records.append(rec)
        if known.get((where, rel, st.st_size, st.st_mtime_ns)) is None:
            fresh.append(rec)
    return records, fresh


def sources_sha256(records: list[dict]) -> str:
    rows = sorted([r["video_id"], r["role"], r["path"], r["sha256"]] for r in records)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def common_dim(source, videos: dict) -> int:
    """The most common D among the [T, D] arrays of the source (read from their headers)."""
    dims, other = Counter(), None
    for sv in videos.values():
        head = None if sv.problem else source.header(sv)
        if head and len(head[0]) == 2 and head[0][0] > 0:
            dims[int(head[0][1])] += 1
        elif head and other is None:
            other = f" ({sv.one('features')} has shape {head[0]})"
    if not dims:
        raise SourceError(f"{source.location}: no [T, D] feature array among {len(videos)} videos{other or ''}; "
                          "import reads one [T, D] array per video")
    (top, n), *rest = dims.most_common()
    if rest and rest[0][1] == n:
        raise SourceError(f"{source.location}: dimensions {top} and {rest[0][0]} are equally common ({n} files "
                          "each); pass --dim")
    return top


# ------------------------------------------------------------------------------------------------- run

def check_existing(plan: ImportPlan) -> bool:
    """True when the cache holds every manifest video from these very sources already (nothing to do);
    ProvenanceError when it was made from other sources or settings, before anything is written."""
    journal = plan.shard.with_suffix(".journal")
    table = None
    if plan.shard.exists():
        found, table, _, _ = read_shard(plan.shard)
    elif (journal / "provenance.json").exists():
        found = json.loads((journal / "provenance.json").read_text())
    else:
        return False
    diff = provenance_difference(normalised({**plan.provenance, "schema_version": SCHEMA_VERSION}), found)
    if diff:
        raise ProvenanceError(refusal(plan, found, diff))
    return table is not None and not journal.exists() and set(plan.ids) <= {r["video_id"] for r in table}


def refusal(plan: ImportPlan, found: dict, diff: str) -> str:
    where = plan.folder.path
    if "import" not in found:
        return (f"{where}: holds features made by `cmdcl-cache extract`, not imported ones ({diff}); pass "
                "another --cache")
    old, new = json.loads(found["import"]), plan.spec.source
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed and set(changed) <= {"sources_sha256", "files"}:
        names = [r["path"] for r in plan.fresh[:5]]
        return (f"{where}: the source files are not those this cache was imported from (sources_sha256 differs"
                + (f"; new or changed since: {', '.join(names)}" if names else "") + "); import into a new "
                "--cache folder, or remove this one (import_sources.jsonl lists the sha256 of each file)")
    if changed:
        return (f"{where}: imported with other settings (import {changed[0]!r} was {old.get(changed[0])!r}, "
                f"now {new.get(changed[0])!r}); use another --cache folder or the same options")
    return f"{where}: made with other settings ({diff}); use another --cache folder or the same options"


def import_features(config: ImportConfig) -> ImportResult:
    """Import a source into its cache folder; see the module docstring. Raises SourceError, ManifestError,
    ProvenanceError, CacheLockedError, StorageError for fatal problems."""
    from .store import ShardWriter

    started, t0 = datetime.now(timezone.utc), time.monotonic()
    plan = plan_import(config)
    try:
        result = ImportResult(plan.folder.path, EXIT_OK, selected=len(plan.ids), shard=plan.shard,
                              unknown=plan.unknown, hashed=len(plan.fresh), reused=len(plan.records) - len(plan.fresh),
                              source_bytes=sum(r["size"] for r in plan.records))
        if check_existing(plan):
            result.seconds = time.monotonic() - t0
            return result
        check_not_nested(plan.folder)   # an extract may have made a cache here during the hashing
        plan.folder.path.mkdir(parents=True, exist_ok=True)
        with ShardWriter(plan.shard, plan.provenance, plan.dim, durable=config.durable, command="import") as writer:
            for rec in plan.fresh:   # under the lock: a refused second import writes nothing
                append_line(plan.folder.sources_path, rec)
            result.dropped = list(writer.dropped)
            todo = [vid for vid in plan.ids if vid not in writer.committed_ids]
            result.todo = len(todo)
            run = ImportRun(plan, writer, result)
            try:
                run.go(todo)
                writer.finalize()
            finally:
                run.progress.close()
            committed = writer.committed_ids
    finally:
        plan.source.close()
    result.exit_code, result.missing = exit_status(plan.ids, committed)
    result.seconds = time.monotonic() - t0
    log_import(plan, result, started)
    return result


class ImportRun:
    """Videos read one by one, checked, and committed in groups (see GROUP_VIDEOS)."""

    def __init__(self, plan: ImportPlan, writer, result: ImportResult):
        from .progress import ExtractProgress
        self.plan, self.writer, self.result = plan, writer, result
        self.group, self.group_bytes = [], 0
        self.progress = ExtractProgress(result.todo, plan.config.quiet, "import")
        for vid, why in result.dropped:
            self.progress.log(f"journal: {vid} will be imported again ({why})")
        if plan.unknown:
            self.progress.log(f"warning: {len(plan.unknown)} source entries have ids the manifest does not have "
                              f"and are not imported (--allow-unknown): {', '.join(plan.unknown[:5])}"
                              f"{', ...' if len(plan.unknown) > 5 else ''}")

    def go(self, todo: list[str]) -> None:
        for vid in todo:
            t0 = time.monotonic()
            try:
                self.add(self.prepare(vid))
            except VideoProblem as problem:
                self.fail(vid, problem.stage, problem.message, t0)
            except CacheError as err:   # the writer refused the rows (StorageError is raised by commit)
                self.fail(vid, "write", str(err), t0)
        self.flush()

    def prepare(self, vid: str):
        plan = self.plan
        sv = plan.videos.get(vid)
        if sv is None:
            raise VideoProblem("open", f"no source file for video {vid!r} (expected {plan.source.expected(vid)})")
        if sv.problem:
            raise VideoProblem("open", sv.problem)
        where = plan.source.where(sv)
        check_header(plan.source.header(sv), plan.dim, where, plan.source.compressed(sv))   # before reading
        x, ms, fps_file = plan.source.read(sv)
        feats = check_features(np.asarray(x), plan.dim, where)
        stamps, fps = row_times(len(feats), ms, fps_file, plan.config, where)
        t = len(feats)
        duration = t / fps if fps > 0 else float(stamps[-1])   # fps = rows per second of video
        if sv.meta:   # export-npy's index keeps the cache's own fps and duration: the round trip is exact
            if int(sv.meta.get("num_frames", t)) != t:
                raise VideoProblem("write", f"{where}: {t} rows, but {INDEX_FILE} says {sv.meta['num_frames']}")
            fps, duration = float(sv.meta.get("source_fps", fps)), float(sv.meta.get("duration", duration))
        return self.writer.prepare(vid, feats, np.arange(t), stamps, fps, t, duration,
                                   decoder=f"import {plan.config.format}")

    def add(self, prepared) -> None:
        self.group.append(prepared)
        self.group_bytes += prepared.features.nbytes
        if len(self.group) >= GROUP_VIDEOS or self.group_bytes >= GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.group:
            return
        self.writer.commit(self.group)   # StorageError (disk full, I/O): fatal; earlier groups stay committed
        frames = sum(v.record["num_rows"] for v in self.group)
        self.result.committed += len(self.group)
        self.result.frames += frames
        self.progress.update(done=len(self.group), frames=frames)
        self.group, self.group_bytes = [], 0

    def fail(self, vid: str, stage: str, message: str, t0: float) -> None:
        sv = self.plan.videos.get(vid)
        path = self.plan.source.where(sv) if sv and sv.one("features") else str(self.plan.source.location)
        record_failure(self.plan.folder.path, vid, path, stage, message, time.monotonic() - t0, 0)
        self.result.failed.append(vid)
        self.progress.update(failed=1)
        self.progress.log(f"failed [{stage}] {vid}: {message}")


def log_import(plan: ImportPlan, result: ImportResult, started) -> None:
    record = {
        "command": "import", "start": started.isoformat(timespec="seconds"),
        "end": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rank": 0, "world": 1,
        "config": asdict(plan.config), **result_counts(result),
        "unknown": len(plan.unknown), "unknown_first": plan.unknown[:20],
        "sources_sha256": plan.spec.source["sources_sha256"], "hashed": result.hashed, "reused_hashes": result.reused,
    }
    append_run_log(plan.folder.log_path, record)


def main_message(result: ImportResult) -> str:
    return main_exit_message(result, "imported", "rows", "manifest")


# ------------------------------------------------------------------------------------------- label texts

def imported_cache(given, dataset: str) -> CacheFolder | None:
    """The one cache at or below `given` when it holds imported features, else None."""
    from .cache import locate
    try:
        folder = locate(given, dataset)
    except CacheError:
        return None
    return folder if "import" in folder.provenance() else None


def write_imported_texts(folder: CacheFolder, manifest, model: str, pretrained: str, precision: str = "fp16",
                         device: str = "auto", prompts=None, force: bool = False) -> tuple[Path, bool]:
    """texts.h5 of an imported cache from an open_clip text tower whose space the features share (CLIP
    features: the text tower of the same model); its provenance names that tower (`text_source`)."""
    from .cache import CacheSpec
    from .encoder import EncoderSpec, load_encoder
    from .texts import ensure_texts

    import open_clip

    spec = ImportSpec.from_provenance(folder.provenance())
    dim = int(spec.source.get("dim", 0))

    def check(width) -> None:
        if dim and width is not None and int(width) != dim:
            raise CacheError(f"{model} ({pretrained}) embeds texts in {width} dimensions, the imported features "
                             f"of {folder.path} have {dim}: use the text tower of the model that made them, or "
                             "pass --text-embeddings FILE")

    check((open_clip.get_model_config(model) or {}).get("embed_dim"))   # before loading any weights
    encoder = load_encoder(EncoderSpec.of(CacheSpec(model=model, pretrained=pretrained, precision=precision), device))
    check(encoder.feature_dim)
    return ensure_texts(folder, manifest, encoder, spec, prompts, force=force)


def read_text_embeddings(path: str | Path, manifest, dim: int, label_set: str | None = None
                         ) -> dict[str, TextEmbeddings]:
    """Label text embeddings from a file: .npy [C, D] or [C, P, D] (rows in labels.json order) for one label
    set, or .npz/.safetensors with one such array per label set name. Checked for count, dimension, values."""
    path = Path(path)
    arrays = text_arrays(path, manifest, label_set)
    out = {}
    for name, x in arrays.items():
        names = list(manifest.label_sets[name].names)
        where = f"{path} (label set {name!r})"
        if x.dtype.kind not in "f" or x.ndim not in (2, 3):
            raise SourceError(f"{where}: {x.dtype} {tuple(x.shape)}; expected float [C, D] or [C, P, D]")
        if x.shape[0] != len(names) or x.shape[-1] != dim:
            raise SourceError(f"{where}: shape {tuple(x.shape)}, expected [{len(names)}, {dim}]: one row per label "
                              f"of {manifest.root}/labels.json, in its order, of the features' dimension {dim}")
        per_prompt = np.asarray(x if x.ndim == 3 else x[:, None, :], dtype=np.float32)
        if not np.isfinite(per_prompt).all():
            raise SourceError(f"{where}: holds NaN/Inf")
        zero = np.flatnonzero((np.linalg.norm(per_prompt, axis=-1) == 0).any(axis=1))
        if len(zero):
            raise SourceError(f"{where}: label {names[zero[0]]!r} (row {zero[0]}) has an all-zero embedding")
        templates = [f"(from {path.name}{f', prompt {p}' if per_prompt.shape[1] > 1 else ''})"
                     for p in range(per_prompt.shape[1])]
        out[name] = TextEmbeddings(names=names, texts=names, templates=templates, per_prompt=per_prompt,
                                   ensemble=TextEmbeddings.ensemble_of(per_prompt))
    return out


def text_arrays(path: Path, manifest, label_set: str | None) -> dict[str, np.ndarray]:
    """{label set: array} of a text embeddings file (nothing is unpickled)."""
    suffix = path.suffix.lower()
    if suffix in PICKLED:
        raise SourceError(pickled_message(path))
    if suffix not in (".npy", ".npz", ".safetensors"):
        raise SourceError(f"{path}: expected a .npy, .npz or .safetensors file")
    if label_set is not None and suffix != ".npy":
        raise SourceError(f"--label-set: only for an .npy file; {path.name} names its label sets itself")
    try:
        if suffix == ".npy":
            arrays = {label_set or manifest.default_label_set: load_npy(path)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file
            arrays = load_file(str(path))
    except VideoProblem as err:
        raise SourceError(err.message) from None
    except Exception as err:   # noqa: BLE001 - OSError, ValueError, zipfile's and safetensors' own errors
        raise SourceError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    strange = [k for k in arrays if k not in manifest.label_sets]
    if strange:
        raise SourceError(f"{path}: {strange[0]!r} is not a label set of {manifest.root}/labels.json "
                          f"({', '.join(manifest.label_sets)})")
    return arrays


def write_texts_from_file(folder: CacheFolder, manifest, path: str | Path,
                          label_set: str | None = None) -> tuple[Path, list[str]]:
    """texts.h5 from a file of embeddings, for any cache (imported or extracted); returns (texts.h5, the
    manifest's label sets the file does not cover)."""
    from .cache import Cache
    from .store import write_texts
    from .texts import texts_lock

    path = Path(path).expanduser().resolve()
    cache = Cache(folder, require_complete=False)
    dim, prov = cache.feature_dim, dict(cache.provenance)
    cache.close()
    sets = read_text_embeddings(path, manifest, dim, label_set)
    with open(path, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256").hexdigest()
    source = {"file": str(path), "sha256": sha, "label_sets": sorted(sets)}
    templates = next(iter(sets.values())).templates
    with texts_lock(folder, "texts"):
        write_texts(folder.texts_path, sets, text_provenance_for(prov, source, templates))
    return folder.texts_path, [name for name in manifest.label_sets if name not in sets]
