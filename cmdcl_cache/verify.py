"""`verify` and `inspect`: is a cache complete and sound, and what is in it.

verify checks, and lists every problem it finds (it does not stop at the first):
- no unfinished extraction journal is left, every shard named by the shard count exists and opens;
- every manifest video of the selected split and ranks is committed exactly once, in the shard its rank
  writes, or is listed in failures.jsonl (a video listed there that was committed later counts as done);
  no video in the cache is unknown to the manifest;
- datasets have the expected shapes and dtypes, the videos table covers the rows exactly, frame indices
  lie inside the video, features (and tokens) hold no NaN or Inf;
- provenance agrees across shards (the reader refuses otherwise) and with texts.h5, which holds an
  L2-normalised [C, D] ensemble for every label set of the manifest, with the manifest's names.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .failures import read_failures, read_lines, RUN_LOG
from .ranks import split_ids
from .store import (VIDEO_DTYPE, Cache, CacheError, PER_SHARD_KEYS, SHARD_GLOB, _provenance_from,
                    is_cache_folder, locate_cache,
                    provenance_difference, read_texts, shard_name, texts_provenance)

# Keys that legitimately differ between shards and texts.h5 (texts do not depend on frames or shards).
TEXT_ONLY_KEYS = {"templates"}
FRAME_ONLY_KEYS = {"sampling", "decoder", "shard_index", "shard_count", "tokens", "grid"}
SCAN_ROWS = 8192
_SHARD_RE = re.compile(r"frames-(\d+)-of-(\d+)\.h5$")


@dataclass
class VerifyReport:
    cache_dir: Path
    problems: list[str] = field(default_factory=list)
    expected: int = 0
    committed: int = 0
    failed: dict = field(default_factory=dict)     # video_id -> failure record (not committed)
    frames: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def find_cache_dir(cache: Path, dataset: str | None = None, model: str | None = None,
                   pretrained: str | None = None, tokens: str = "cls", grid: int = 4) -> Path:
    """The cache folder: `cache` itself when it holds one, else <cache>/<dataset>/<model_tag>/ when the
    model is named, else the only cache folder below `cache`."""
    from .pipeline import cache_folder
    cache = Path(cache)
    if dataset and model and not is_cache_folder(cache):
        from .manifest import load_manifest
        return cache_folder(cache, load_manifest(dataset).dataset, model, pretrained, tokens, grid)
    return locate_cache(cache)


def _check_shard(path: Path, report: VerifyReport) -> dict | None:
    """Structure, dtypes, coverage and finiteness of one shard; returns {video_id: row} or None."""
    p = report.problems
    name = path.name
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        p.append(f"{name}: does not open ({err})")
        return None
    with f:
        prov = _provenance_from(f.attrs)
        m = _SHARD_RE.search(name)
        if m and (prov.get("shard_index"), prov.get("shard_count")) != (int(m.group(1)), int(m.group(2))):
            p.append(f"{name}: attributes say shard {prov.get('shard_index')} of {prov.get('shard_count')}")
        for key in ("features", "frame_index", "timestamps", "videos"):
            if key not in f:
                p.append(f"{name}: dataset '{key}' is missing")
                return None
        feats, fidx, stamps, table = f["features"], f["frame_index"], f["timestamps"], f["videos"][:]
        n = feats.shape[0]
        if feats.ndim != 2 or feats.dtype != np.float16:
            p.append(f"{name}: features are {feats.dtype} {feats.shape}, expected float16 [N, D]")
        if fidx.shape != (n,) or fidx.dtype != np.int64:
            p.append(f"{name}: frame_index is {fidx.dtype} {fidx.shape}, expected int64 [{n}]")
        if stamps.shape != (n,) or stamps.dtype != np.float64:
            p.append(f"{name}: timestamps are {stamps.dtype} {stamps.shape}, expected float64 [{n}]")
        if table.dtype != VIDEO_DTYPE:
            p.append(f"{name}: videos table has dtype {table.dtype}")
            return None
        toks = f.get("tokens")
        if toks is not None and (toks.ndim != 3 or toks.shape[0] != n or toks.shape[2] != feats.shape[1]
                                 or toks.dtype != np.float16):
            p.append(f"{name}: tokens are {toks.dtype} {toks.shape}, expected float16 [{n}, P, D]")
        rows = {}
        row = 0
        fi, ts = fidx[:], stamps[:]
        for r in sorted(table, key=lambda r: int(r["row_start"])):
            vid = r["video_id"].decode()
            start, k = int(r["row_start"]), int(r["num_rows"])
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
            rows[vid] = {"start": start, "num_rows": k}
            row = start + k
        if row != n:
            p.append(f"{name}: the videos table covers {row} rows, the features have {n}")
        report.frames += n
        for dset in [feats] + ([toks] if toks is not None else []):
            for lo in range(0, n, SCAN_ROWS):
                block = dset[lo:lo + SCAN_ROWS]
                if not np.isfinite(block).all():
                    bad = np.nonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0] + lo
                    owners = [v for v, r in rows.items() if r["start"] <= bad[0] < r["start"] + r["num_rows"]]
                    p.append(f"{name}: {dset.name.strip('/')} hold NaN/Inf in {len(bad)} rows "
                             f"(first row {bad[0]}, video {owners[0] if owners else '?'})")
                    break
        return rows


def verify(cache_dir: str | Path, dataset: str | None = None, split: str | None = None,
           shard_index: int | None = None, num_shards: int | None = None) -> VerifyReport:
    from .manifest import load_manifest

    cache_dir = Path(cache_dir)
    report = VerifyReport(cache_dir)
    p = report.problems
    if not cache_dir.is_dir():
        p.append(f"{cache_dir}: not a folder")
        return report
    for j in sorted(cache_dir.glob("frames-*-of-*.journal")):
        p.append(f"{j.name}: unfinished extraction journal; rerun `cmdcl-cache extract` with the same options")
    shards = sorted(cache_dir.glob(SHARD_GLOB))
    if not shards:
        p.append(f"{cache_dir}: no feature shards ({SHARD_GLOB})")
        return report
    cache = None
    try:
        cache = Cache(cache_dir, require_complete=False)  # missing ranks are reported below, per rank
    except CacheError as err:
        p.append(str(err))
    per_shard = {s.name: _check_shard(s, report) for s in shards}
    with h5py.File(shards[0], "r") as f:
        prov = _provenance_from(f.attrs)
    count = int(prov.get("shard_count", len(shards)))
    if num_shards is not None and num_shards != count:
        p.append(f"--num-shards {num_shards}, but the cache was written with {count} shards")
    ranks = [shard_index] if shard_index is not None else list(range(count))
    for r in ranks:
        if shard_name(r, count) not in per_shard:
            p.append(f"{shard_name(r, count)}: missing (rank {r} of {count} has not finished)")

    try:
        manifest = load_manifest(dataset or prov.get("dataset"))
    except (ValueError, OSError) as err:
        p.append(f"manifest {dataset or prov.get('dataset')!r}: {err} (pass --dataset)")
        return report
    all_ids = [v.video_id for v in manifest.videos]
    selected = {v.video_id for v in manifest.select(split)}
    failures = read_failures(cache_dir)
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

    _check_texts(cache_dir, manifest, prov, cache.feature_dim if cache else None, p)
    return report


def texts_difference(shard_prov: dict, texts_prov: dict) -> str | None:
    """The first setting (model, weights, precision...) in which texts.h5 and the shards disagree, or None."""
    ignore = PER_SHARD_KEYS | TEXT_ONLY_KEYS | FRAME_ONLY_KEYS
    common = {k: v for k, v in shard_prov.items() if k in texts_prov}
    return provenance_difference(common, {k: v for k, v in texts_prov.items() if k in shard_prov}, ignore=ignore)


def _check_texts(cache_dir: Path, manifest, shard_prov: dict, dim: int | None, p: list[str]) -> None:
    path = cache_dir / "texts.h5"
    if not path.exists():
        p.append("texts.h5: missing; run `cmdcl-cache texts` (or rerun extract on rank 0)")
        return
    diff = texts_difference(shard_prov, texts_provenance(path))
    if diff:
        p.append(f"texts.h5: made with other settings than the shards ({diff})")
    try:
        texts = read_texts(path)
    except (OSError, KeyError) as err:
        p.append(f"texts.h5: unreadable ({err})")
        return
    for name, ls in manifest.label_sets.items():
        t = texts.get(name)
        if t is None:
            p.append(f"texts.h5: label set {name!r} is missing")
            continue
        c = len(ls.names)
        if t.names != list(ls.names):
            p.append(f"texts.h5: label set {name!r} has other names than the manifest")
        if t.ensemble.ndim != 2 or t.ensemble.shape[0] != c or (dim and t.ensemble.shape[1] != dim):
            p.append(f"texts.h5: {name}/ensemble has shape {t.ensemble.shape}, expected [{c}, {dim or 'D'}]")
        elif not np.isfinite(t.ensemble).all():
            p.append(f"texts.h5: {name}/ensemble holds NaN/Inf")
        elif not np.allclose(np.linalg.norm(t.ensemble, axis=1), 1.0, atol=1e-3):
            p.append(f"texts.h5: {name}/ensemble rows are not L2-normalised")
        if t.per_prompt.ndim != 3 or t.per_prompt.shape[0] != c or t.per_prompt.shape[1] != len(t.templates):
            p.append(f"texts.h5: {name}/per_prompt has shape {t.per_prompt.shape}, expected "
                     f"[{c}, {len(t.templates)}, D]")


# -------------------------------------------------------------------------------------------- inspect

def summarize(cache_dir: str | Path) -> dict:
    """Everything `inspect` shows, as plain data."""
    cache_dir = Path(cache_dir)
    out: dict = {"cache_dir": str(cache_dir), "shards": [], "journals": [], "provenance": {}, "texts": {}}
    committed: set[str] = set()
    lengths = []
    for path in sorted(cache_dir.glob(SHARD_GLOB)):
        with h5py.File(path, "r") as f:
            table = f["videos"][:]
            out["provenance"] = out["provenance"] or {k: v for k, v in _provenance_from(f.attrs).items()
                                                      if k not in PER_SHARD_KEYS}
            out["shards"].append({"file": path.name, "videos": len(table), "frames": int(f["features"].shape[0]),
                                  "mb": round(path.stat().st_size / 2**20, 2)})
            committed |= {r.decode() for r in table["video_id"]}
            lengths += [int(k) for k in table["num_rows"]]
    for j in sorted(cache_dir.glob("frames-*-of-*.journal")):
        n = len(read_lines(j / "commits.jsonl"))
        out["journals"].append({"folder": j.name, "committed_videos": n})
    failures = {v: r for v, r in read_failures(cache_dir).items() if v not in committed}
    out["videos"] = len(committed)
    out["frames"] = int(sum(lengths))
    out["frames_per_video"] = ({"min": int(min(lengths)), "mean": round(float(np.mean(lengths)), 2),
                                "max": int(max(lengths))} if lengths else None)
    out["failures_by_stage"] = dict(sorted(Counter(r.get("stage", "?") for r in failures.values()).items()))
    out["failures"] = list(failures.values())
    if (cache_dir / "texts.h5").exists():
        for name, t in read_texts(cache_dir / "texts.h5").items():
            out["texts"][name] = {"classes": len(t.names), "prompts": len(t.templates),
                                  "dim": int(t.ensemble.shape[1])}
    runs = read_lines(cache_dir / RUN_LOG)
    out["runs"] = len(runs)
    out["last_run"] = runs[-1] if runs else None
    return out


def render_summary(s: dict, console) -> None:
    from rich.table import Table

    console.print(f"[bold]{s['cache_dir']}[/bold]: {s['videos']} videos, {s['frames']} frames"
                  + (f" ({s['frames_per_video']['min']}/{s['frames_per_video']['mean']}/"
                     f"{s['frames_per_video']['max']} per video, min/mean/max)" if s["frames_per_video"] else ""))
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
        t = Table(title="texts.h5")
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
            ex = next(r for r in s["failures"] if r.get("stage") == stage)
            t.add_row(stage, str(n), f"{ex['video_id']}: {ex['error'][:80]}")
        console.print(t)
    else:
        console.print("no failures")
    if s["last_run"]:
        r = s["last_run"]
        console.print(f"last run (of {s['runs']}): {r.get('end')}, rank {r.get('rank')}/{r.get('world')}, "
                      f"{r.get('committed')} committed, {r.get('failed')} failed, "
                      f"{r.get('frames_per_s')} frames/s, exit {r.get('exit_code')}")
