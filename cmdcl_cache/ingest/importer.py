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

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from cmdcl_cache.cache.folder import check_not_nested
from cmdcl_cache.cache.runlog import (EXIT_OK, ExtractResult, append_line, append_run_log, exit_status,
                                      main_exit_message, record_failure, result_counts)
from cmdcl_cache.config import check_choices, option
from cmdcl_cache.errors import CacheError
from cmdcl_cache.ingest.export import INDEX_FILE
from cmdcl_cache.ingest.plan import ImportPlan, check_existing, check_features, plan_import, row_times
from cmdcl_cache.ingest.sources import PICKLED, VideoProblem, check_header, pickled_message

GROUP_VIDEOS = 256          # videos per group commit (one fsync per journal file per group)
GROUP_BYTES = 32 << 20      # ... or this many bytes of float16 rows, whichever comes first


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
class ImportResult(ExtractResult):
    unknown: list = field(default_factory=list)   # source entries whose id is not in the manifest
    hashed: int = 0                               # source files hashed by this run
    reused: int = 0                               # source hashes reused from import_sources.jsonl
    source_bytes: int = 0


def import_features(config: ImportConfig) -> ImportResult:
    """Import a source into its cache folder; see the module docstring. Raises SourceError, ManifestError,
    ProvenanceError, CacheLockedError, StorageError for fatal problems."""
    from cmdcl_cache.cache.writer import ShardWriter

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
        from cmdcl_cache.progress import ExtractProgress
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
