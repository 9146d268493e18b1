"""The files `cmdcl-cache import` reads: .npy/.npz/.safetensors per video (a folder,
optionally with index.jsonl) or one HDF5 file; nothing is ever unpickled and
shapes are judged from the headers before any data is read.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmdcl_cache.ingest.export import INDEX_FILE

if TYPE_CHECKING:   # annotations only: importer.py imports this module
    from cmdcl_cache.ingest.importer import ImportConfig

PICKLED = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
SIDECARS = {"timestamps_ms": "_timestamps_ms.npy", "fps": "_fps.npy"}

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
