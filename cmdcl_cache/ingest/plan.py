"""Planning an import: which source holds each manifest video, checks of its
arrays and timestamps, the sources' sha256, and refusals of a cache made otherwise.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmdcl_cache.cache.folder import CacheFolder, for_writing
from cmdcl_cache.cache.format import SCHEMA_VERSION, read_shard
from cmdcl_cache.cache.provenance import ImportSpec, normalised, provenance_difference
from cmdcl_cache.cache.runlog import read_lines
from cmdcl_cache.errors import ProvenanceError
from cmdcl_cache.files import file_sha256
from cmdcl_cache.ingest.sources import FLOAT16_MAX, SourceError, SourceVideo, VideoProblem, check_header, open_source

if TYPE_CHECKING:   # annotations only: importer.py imports this module
    from cmdcl_cache.ingest.importer import ImportConfig



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
    from cmdcl_cache.manifest.io import load_manifest

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
    from cmdcl_cache.progress import console
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
                sha = file_sha256(path)
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
