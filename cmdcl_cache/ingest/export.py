"""`export-npy`: each cached video's features with their timestamps and rate, in video_features' layout, for
ActionFormer-style consumers.

Layouts (`--format`):

- `npy` (default): `<name>.npy` features [T, D] (float16 as cached, or `--dtype float32`: projected, not
  normalised), `<name>_timestamps_ms.npy` float64 [T] (each row's time in the video, milliseconds) and
  `<name>_fps.npy` float64 scalar (rows per second of video: T / duration; the source video's frame rate
  when the duration is unknown). These are the keys video_features writes beside its features.
- `npz`: one `<name>.npz` holding the arrays `features`, `timestamps_ms` and `fps`.

File names. `<name>` is the video id itself when that is a safe file name on every common file system:
ASCII letters, digits, `.`, `_` and `-` only; not starting or ending with `.`; at most 200 bytes (so that the longest
companion file stays under the 255-byte limit); not a Windows device name (CON, NUL, COM1, ...); not ending
in `_fps` or `_timestamps_ms` (whose companion files another id could name); and no other exported id equal
to it ignoring case (case-insensitive file systems). Any other id (spaces, non-ASCII, very long, ids that
differ only in case) is written as `<prefix>~<16 hex digits of sha256(id)>`, the prefix being the id's safe
characters (at most 64). `~` never occurs in a plain name, so the two kinds of name cannot collide.

`index.jsonl`, written last, maps every id to its files, one JSON object a line: `{"video_id", "name",
"files": {"features", "timestamps_ms", "fps"} or {"npz"}, "num_frames", "dim", "fps", "source_fps",
"duration"}`. The mapping is reversible through it (`read_index`): read the index, never parse file names.
Every file is written under a temporary name and renamed, so an interrupted export leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from cmdcl_cache.cache.folder import Cache

INDEX_FILE = "index.jsonl"
FORMATS = ("npy", "npz")
DTYPES = ("float16", "float32")   # as cached, or widened for tools that want float32
COMPANIONS = ("timestamps_ms", "fps")
MAX_PLAIN_BYTES = 200
PREFIX_CHARS = 64
_SAFE = re.compile(r"[A-Za-z0-9._-]+")
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def _plain_name_ok(video_id: str) -> bool:
    return (_SAFE.fullmatch(video_id) is not None and not video_id.startswith(".") and not video_id.endswith(".")
            and len(video_id) <= MAX_PLAIN_BYTES and not video_id.endswith(tuple(f"_{c}" for c in COMPANIONS))
            and video_id.split(".")[0].upper() not in _WINDOWS_DEVICES)


def hashed_name(video_id: str) -> str:
    """`<safe prefix>~<sha256 prefix>`: the name of an id that is not a safe file name as it is."""
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", video_id).strip("._-")[:PREFIX_CHARS].rstrip("._-") or "video"
    if prefix.split(".")[0].upper() in _WINDOWS_DEVICES:   # "nul.txt~..." is still the device NUL there
        prefix = "_" + prefix
    digest = hashlib.sha256(video_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{prefix}~{digest}"


def file_names(video_ids) -> dict[str, str]:
    """video id -> file name stem (without extension), unique even on case-insensitive file systems."""
    ids = list(video_ids)
    plain_folded = Counter(v.lower() for v in ids if _plain_name_ok(v))
    names = {v: v if _plain_name_ok(v) and plain_folded[v.lower()] == 1 else hashed_name(v) for v in ids}
    folded = Counter(n.lower() for n in names.values())
    clash = [v for v, n in names.items() if folded[n.lower()] > 1]
    if clash:   # two ids with one sha256 prefix: never seen, but refuse rather than overwrite
        raise ValueError(f"export names collide for video ids {clash[:4]}")
    return names


def _files_of(name: str, layout: str) -> dict[str, str]:
    if layout == "npz":
        return {"npz": f"{name}.npz"}
    return {"features": f"{name}.npy", **{c: f"{name}_{c}.npy" for c in COMPANIONS}}


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def export_cache(cache, out_dir: str | Path, dtype: str = "float16", video_ids: list[str] | None = None,
                 layout: str = "npy") -> list[dict]:
    """Write every video of `cache` (an open Cache, or anything with its reading methods) to `out_dir` in
    `layout`; returns the index entries, also written to out_dir/index.jsonl."""
    if layout not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {layout!r}")
    if dtype not in DTYPES:   # a bad --dtype fails before anything is written
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(cache.video_ids if video_ids is None else video_ids)
    entries = []
    for vid, name in file_names(ids).items():
        features = np.asarray(cache.features(vid), dtype=dtype)
        _, seconds = cache.frame_info(vid)
        info = cache.video_info(vid)
        duration = float(info.get("duration") or 0.0)
        fps = len(features) / duration if duration > 0 else float(info["fps"])
        arrays = {"features": features, "timestamps_ms": np.asarray(seconds, np.float64) * 1000.0,
                  "fps": np.asarray(fps, np.float64)}
        files = _files_of(name, layout)
        if layout == "npz":
            _save_atomic(out / files["npz"], lambda fh: np.savez(fh, **arrays))
        else:
            for key, file in files.items():
                _save_atomic(out / file, lambda fh, key=key: np.save(fh, arrays[key]))
        entries.append({"video_id": vid, "name": name, "files": files, "num_frames": int(len(features)),
                        "dim": int(features.shape[1]), "fps": fps, "source_fps": float(info["fps"]),
                        "duration": duration})
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    _save_atomic(out / INDEX_FILE, lambda fh: fh.write(text.encode("utf-8")))
    return entries


def export_npy(cache_dir: str | Path, out_dir: str | Path, dtype: str = "float16",
               video_ids: list[str] | None = None, layout: str = "npy") -> int:
    """Export the cache folder `cache_dir` (see the module docstring); returns how many videos were written."""
    cache = Cache(cache_dir)
    try:
        return len(export_cache(cache, out_dir, dtype, video_ids, layout))
    finally:
        cache.close()


def read_index(out_dir: str | Path) -> dict[str, dict]:
    """video id -> its index entry (file names relative to out_dir) of an export folder."""
    path = Path(out_dir) / INDEX_FILE
    return {e["video_id"]: e for e in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if e}
