"""`verify` and `inspect`: is a cache complete and sound, and what is in it.

verify checks, and lists every problem it finds (it does not stop at the first, and a shard that does not
open is one problem among others, named with the way to recover):
- no unfinished extraction journal is left, every shard named by the shard count exists and opens;
- every manifest video of the selected split and ranks is committed exactly once, in the shard its rank
  writes, or is listed in failures.jsonl (a video listed there that was committed later counts as done);
  no video in the cache is unknown to the manifest;
- datasets have the expected shapes and dtypes, the videos table covers the rows exactly, frame indices
  lie inside the video, features (and tokens) hold no NaN or Inf, and (unless `quick`) every video's rows
  match the crc32 recorded when they were committed: flipped bits are found; every video record (fps,
  duration, frame count, rows, source stamp) matches its record_crc32, always (a mismatch is shard damage,
  never a changed source);
- with the video root (given, or the last run's), videos whose file changed (size or modification time)
  since it was read: `extract --refresh-changed` extracts them again;
- provenance agrees across shards (the reader refuses otherwise) and with texts.h5, which holds an
  L2-normalised [C, D] ensemble for every label set of the manifest, with the manifest's names.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cmdcl_cache.cache.folder import SHARD_RE, TEXTS_FILE, Cache, CacheFolder, shard_name, split_ids
from cmdcl_cache.cache.format import frame_records, read_shard, read_texts, rows_checksum
from cmdcl_cache.cache.runlog import read_failures, read_lines
from cmdcl_cache.cache.writer import COMMITS_FILE
from cmdcl_cache.errors import CacheError

SCAN_ROWS = 8192


@dataclass
class VerifyReport:
    cache_dir: Path
    problems: list[str] = field(default_factory=list)
    expected: int = 0
    committed: int = 0
    failed: dict = field(default_factory=dict)     # video_id -> failure record (not committed)
    frames: int = 0
    changed: list = field(default_factory=list)    # videos whose source file changed since extraction
    checked_sums: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_table(name: str, table: list[dict], n: int, fi: np.ndarray, ts: np.ndarray, p: list[str]) -> dict:
    """Coverage of the rows by the videos table; returns {video_id: row}."""
    rows, row = {}, 0
    for r in sorted(table, key=lambda r: int(r["row_start"])):
        vid, start, k = r["video_id"], int(r["row_start"]), int(r["num_rows"])
        if vid in rows:
            p.append(f"{name}: video {vid!r} is committed twice")
        if start != row or k < 1:
            p.append(f"{name}: video {vid!r} has rows {start}..{start + k}, expected to start at {row}"
                     " with at least one row")
        idx = fi[start:start + k]
        if len(idx) and (idx.min() < 0 or idx.max() >= int(r["num_source_frames"])):
            p.append(f"{name}: video {vid!r} has frame indices outside 0..{int(r['num_source_frames']) - 1}")
        if not np.isfinite(ts[start:start + k]).all():
            p.append(f"{name}: video {vid!r} has non-finite timestamps")
        rows[vid] = r
        row = start + k
    if row != n:
        p.append(f"{name}: the videos table covers {row} rows, the features have {n}")
    return rows


def _check_values(name: str, f, rows: dict, checksums: bool, p: list[str]) -> None:
    """NaN/Inf in features and tokens, and each video's crc32 (streamed, one video at a time)."""
    feats, toks = f["features"], f.get("tokens")
    n = feats.shape[0]
    for dset in [feats] + ([toks] if toks is not None else []):
        for lo in range(0, n, SCAN_ROWS):
            block = dset[lo:lo + SCAN_ROWS]
            if not np.isfinite(block).all():
                bad = np.nonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0] + lo
                owners = [v for v, r in rows.items() if r["row_start"] <= bad[0] < r["row_start"] + r["num_rows"]]
                p.append(f"{name}: {dset.name.strip('/')} hold NaN/Inf in {len(bad)} rows "
                         f"(first row {bad[0]}, video {owners[0] if owners else '?'})")
                break
    if not checksums:
        return
    fi, ts = f["frame_index"], f["timestamps"]
    bad = []
    for vid, r in rows.items():
        lo, hi = int(r["row_start"]), int(r["row_start"]) + int(r["num_rows"])
        got = rows_checksum(feats[lo:hi], frame_records(fi[lo:hi], ts[lo:hi]),
                            toks[lo:hi] if toks is not None else None)
        if got != int(r["crc32"]):
            bad.append(vid)
    if bad:
        p.append(f"{name}: {len(bad)} video(s) whose rows do not match their checksum (bit rot or a damaged "
                 f"copy): {', '.join(map(repr, bad[:5]))}{', ...' if len(bad) > 5 else ''}; move the shard aside "
                 "and re-extract that rank, or restore it from a good copy")


def _check_shard(path: Path, report: VerifyReport, checksums: bool) -> dict | None:
    """Structure, dtypes, coverage, finiteness and checksums of one shard; returns {video_id: row} or None."""
    p, name = report.problems, path.name
    try:
        prov, table, _, _ = read_shard(path)
    except CacheError as err:
        p.append(str(err))
        return None
    m = SHARD_RE.search(name)
    if m and (prov.get("shard_index"), prov.get("shard_count")) != (int(m.group(1)), int(m.group(2))):
        p.append(f"{name}: attributes say shard {prov.get('shard_index')} of {prov.get('shard_count')}")
    try:
        with h5py.File(path, "r") as f:
            for key in ("features", "frame_index", "timestamps"):
                if key not in f:
                    p.append(f"{name}: dataset '{key}' is missing")
                    return None
            feats, fidx, stamps = f["features"], f["frame_index"], f["timestamps"]
            n = feats.shape[0]
            if feats.ndim != 2 or feats.dtype != np.float16:
                p.append(f"{name}: features are {feats.dtype} {feats.shape}, expected float16 [N, D]")
            if fidx.shape != (n,) or fidx.dtype != np.int64:
                p.append(f"{name}: frame_index is {fidx.dtype} {fidx.shape}, expected int64 [{n}]")
            if stamps.shape != (n,) or stamps.dtype != np.float64:
                p.append(f"{name}: timestamps are {stamps.dtype} {stamps.shape}, expected float64 [{n}]")
            toks = f.get("tokens")
            if toks is not None and (toks.ndim != 3 or toks.shape[0] != n or toks.shape[2] != feats.shape[1]
                                     or toks.dtype != np.float16):
                p.append(f"{name}: tokens are {toks.dtype} {toks.shape}, expected float16 [{n}, P, D]")
            rows = _check_table(name, table, n, fidx[:], stamps[:], p)
            report.frames += n
            _check_values(name, f, rows, checksums, p)
            return rows
    except OSError as err:   # the file opened but its data does not read (truncated, damaged)
        p.append(f"{path}: data cannot be read ({err}); move it aside and re-extract that rank")
        return None


def _changed_sources(folder: CacheFolder, manifest, rows_by_id: dict, video_root: Path | None) -> list[str]:
    """Committed videos whose file now has another size or modification time than when it was read."""
    from cmdcl_cache.manifest.paths import VideoPathError, build_video_index
    if video_root is None:
        runs = read_lines(folder.log_path)
        root = next((r.get("config", {}).get("video_root") for r in reversed(runs) if r.get("config")), None)
        video_root = Path(root) if root else None
    if video_root is None or not Path(video_root).is_dir():
        return []
    index = build_video_index(video_root)
    changed = []
    for rec in manifest.videos:
        row = rows_by_id.get(rec.video_id)
        if row is None or int(row["source_size"]) < 0:
            continue
        try:
            st = os.stat(index.resolve(rec))
        except (VideoPathError, OSError):
            continue
        if (st.st_size, st.st_mtime_ns) != (int(row["source_size"]), int(row["source_mtime_ns"])):
            changed.append(rec.video_id)
    return changed


def verify(cache_dir: str | Path | CacheFolder, dataset: str | None = None, split: str | None = None,
           shard_index: int | None = None, num_shards: int | None = None, quick: bool = False,
           video_root: str | Path | None = None) -> VerifyReport:
    from cmdcl_cache.manifest.io import load_manifest

    folder = cache_dir if isinstance(cache_dir, CacheFolder) else CacheFolder(cache_dir)
    report = VerifyReport(folder.path, checked_sums=not quick)
    p = report.problems
    if num_shards is not None and num_shards < 1:   # before any shard is read
        raise CacheError(f"--num-shards {num_shards}: a cache has at least 1 shard")
    if not folder.path.is_dir():
        p.append(f"{folder.path}: not a folder")
        return report
    for j in folder.journals:
        p.append(f"{j.name}: unfinished extraction journal; rerun `cmdcl-cache extract` with the same options")
    shards = folder.shard_paths
    if not shards:
        p.append(f"{folder.path}: no feature shards (frames-*-of-*.h5)")
        return report
    cache = None
    try:
        cache = Cache(folder, require_complete=False)  # missing ranks are reported below, per rank
    except CacheError as err:
        p.append(str(err))
    per_shard = {s.name: _check_shard(s, report, not quick) for s in shards}
    prov = folder.provenance()
    count = int(prov.get("shard_count", len(shards)))
    shards_text = f"{count} shard" + ("s" if count != 1 else "")
    if num_shards is not None and num_shards != count:
        p.append(f"--num-shards {num_shards}, but the cache was written with {shards_text}")
    if shard_index is not None and not 0 <= shard_index < count:
        raise CacheError(f"--shard-index {shard_index}: the cache has {shards_text}, numbered 0 to {count - 1}")
    ranks = [shard_index] if shard_index is not None else list(range(count))
    for r in ranks:
        if shard_name(r, count) not in per_shard:
            p.append(f"{shard_name(r, count)}: missing (rank {r} of {count} has not finished)")
    try:
        manifest = load_manifest(dataset or prov.get("dataset"))
    except (ValueError, OSError) as err:
        p.append(f"manifest {dataset or prov.get('dataset')!r}: {err} (pass --dataset)")
        return report
    _check_coverage(folder, manifest, per_shard, ranks, count, split, report)
    rows_by_id = {vid: row for rows in per_shard.values() if rows for vid, row in rows.items()}
    report.changed = _changed_sources(folder, manifest, rows_by_id, Path(video_root) if video_root else None)
    if report.changed:
        p.append(f"{len(report.changed)} video(s) changed on disk since they were extracted "
                 f"({', '.join(map(repr, report.changed[:5]))}{', ...' if len(report.changed) > 5 else ''}); "
                 "`cmdcl-cache extract ... --refresh-changed` extracts them again")
    p += folder.texts_problems(manifest, prov, cache.feature_dim if cache else None)
    report.problems = list(dict.fromkeys(p))   # a shard that does not open is named once, not twice
    return report


def _check_coverage(folder, manifest, per_shard: dict, ranks, count: int, split, report: VerifyReport) -> None:
    p = report.problems
    all_ids = [v.video_id for v in manifest.videos]
    selected = {v.video_id for v in manifest.select(split)}
    failures = read_failures(folder.path)
    where = {vid: name for name, rows in per_shard.items() if rows for vid in rows}
    known = set(all_ids)
    for vid, name in sorted(where.items()):
        if vid not in known:
            p.append(f"{name}: video {vid!r} is not in the manifest")
    for r in ranks:
        expect_shard = shard_name(r, count)
        for vid in split_ids(all_ids, r, count):
            if vid not in selected:
                continue
            report.expected += 1
            if vid in where:
                report.committed += 1
                if where[vid] != expect_shard:
                    p.append(f"video {vid!r} is in {where[vid]}, but rank {r} writes {expect_shard}")
            elif vid in failures:
                report.failed[vid] = failures[vid]
            else:
                p.append(f"video {vid!r}: neither in {expect_shard} nor in failures.jsonl")


def summarize(cache_dir: str | Path | CacheFolder) -> dict:
    """Everything `inspect` shows, as plain data; a shard that does not open is listed with its error."""
    folder = cache_dir if isinstance(cache_dir, CacheFolder) else CacheFolder(cache_dir)
    out: dict = {"cache_dir": str(folder.path), "shards": [], "journals": [], "provenance": {}, "texts": {},
                 "unreadable": []}
    committed: set[str] = set()
    lengths = []
    for path in folder.shard_paths:
        try:
            prov, table, _, _ = read_shard(path)
        except CacheError as err:
            out["unreadable"].append({"file": path.name, "error": str(err)})
            continue
        out["provenance"] = out["provenance"] or {k: v for k, v in prov.items() if k != "shard_index"}
        out["shards"].append({"file": path.name, "videos": len(table), "frames": sum(r["num_rows"] for r in table),
                              "mb": round(path.stat().st_size / 2**20, 2)})
        committed |= {r["video_id"] for r in table}
        lengths += [int(r["num_rows"]) for r in table]
    for j in folder.journals:
        n = len(read_lines(j / COMMITS_FILE))
        out["journals"].append({"folder": j.name, "committed_videos": n})
    failures = {v: r for v, r in read_failures(folder.path).items() if v not in committed}
    out["videos"] = len(committed)
    out["frames"] = int(sum(lengths))
    out["frames_per_video"] = ({"min": int(min(lengths)), "mean": round(float(np.mean(lengths)), 2),
                                "max": int(max(lengths))} if lengths else None)
    out["failures_by_stage"] = dict(sorted(Counter(r.get("stage", "?") for r in failures.values()).items()))
    out["failures"] = list(failures.values())
    if folder.texts_path.exists():
        try:
            for name, t in read_texts(folder.texts_path).items():
                out["texts"][name] = {"classes": len(t.names), "prompts": len(t.templates),
                                      "dim": int(t.ensemble.shape[1])}
        except CacheError as err:
            out["unreadable"].append({"file": folder.texts_path.name, "error": str(err)})
    runs = read_lines(folder.log_path)
    out["runs"] = len(runs)
    out["last_run"] = runs[-1] if runs else None
    return out


def render_summary(s: dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{s['cache_dir']}[/bold]: {s['videos']} videos, {s['frames']} frames"
                  + (f" ({s['frames_per_video']['min']}/{s['frames_per_video']['mean']}/"
                     f"{s['frames_per_video']['max']} per video, min/mean/max)" if s["frames_per_video"] else ""))
    for bad in s["unreadable"]:
        console.print(f"[red]unreadable:[/red] {bad['error']}")
    t = Table(title="provenance", show_header=False)
    for k, v in s["provenance"].items():
        t.add_row(k, str(v))
    console.print(t)
    t = Table(title="shards")
    for col in ("file", "videos", "frames", "MiB"):
        t.add_column(col)
    for sh in s["shards"]:
        t.add_row(sh["file"], str(sh["videos"]), str(sh["frames"]), str(sh["mb"]))
    for j in s["journals"]:
        t.add_row(j["folder"] + " (unfinished)", str(j["committed_videos"]), "", "")
    console.print(t)
    if s["texts"]:
        t = Table(title=TEXTS_FILE)
        for col in ("label set", "classes", "prompts", "dim"):
            t.add_column(col)
        for name, v in s["texts"].items():
            t.add_row(name, str(v["classes"]), str(v["prompts"]), str(v["dim"]))
        console.print(t)
    if s["failures"]:
        t = Table(title=f"failures ({len(s['failures'])}, not committed)")
        for col in ("stage", "videos", "example"):
            t.add_column(col)
        for stage, n in s["failures_by_stage"].items():
            ex = next(r for r in s["failures"] if r.get("stage", "?") == stage)   # hand-edited records too
            t.add_row(stage, str(n), f"{ex.get('video_id', '?')}: {str(ex.get('error', '?'))[:80]}")
        console.print(t)
    else:
        console.print("no failures")
    if s["last_run"]:
        r = s["last_run"]
        console.print(f"last run (of {s['runs']}): {r.get('end')}, rank {r.get('rank')}/{r.get('world')}, "
                      f"{r.get('committed')} committed, {r.get('failed')} failed, "
                      f"{r.get('frames_per_s')} frames/s, exit {r.get('exit_code')}")
