"""The feature cache: crash-safe shard writing and HDF5 reading.

A cache folder (`<cache>/<dataset>/<model_tag>/`) holds one HDF5 shard per rank, `texts.h5` with the
label text embeddings, `failures.jsonl`, and later `confounders.h5`.

Shard layout (`frames-00000-of-00004.h5`, one writer per file):

    features      float16 [N, D]      every frame of every video of the shard, video after video,
                                      as the image tower returns them (projected, not normalised)
    tokens        float16 [N, P, D]   optional pooled patch grid (P = grid * grid)
    frame_index   int64   [N]         source frame index of each row
    timestamps    float64 [N]         seconds of each row
    videos        compound [V]        video_id, row_start, num_rows, fps, num_source_frames, duration
    attrs                             provenance (schema version, model, weights, sampling, versions, shard)

Videos are sorted by id inside a shard, so a shard's bytes depend only on what it holds, not on the order
in which worker processes happened to finish.

Why a journal: an HDF5 file that is being written is not crash-safe (a SIGKILL while the library evicts
metadata can leave a file that no longer opens). So while a shard is being extracted, its rows go to an
append-only journal folder (`frames-00000-of-00004.journal/`: raw float16 rows, raw frame info, and
`commits.jsonl`, one line per video, written only after that video's rows are on disk). On resume the
journal is cut back to its last complete commit line. `finalize()` then writes the HDF5 shard to a
temporary file and renames it into place, so a shard that exists is always whole.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1
SHARD_GLOB = "frames-*-of-*.h5"
VIDEO_DTYPE = np.dtype([
    ("video_id", "S128"), ("row_start", "<i8"), ("num_rows", "<i8"),
    ("fps", "<f8"), ("num_source_frames", "<i8"), ("duration", "<f8"),
])
# Attributes that legitimately differ between the shards of one cache.
PER_SHARD_KEYS = {"shard_index"}
CHUNK_ROWS = 256


class CacheError(RuntimeError):
    """A cache file is missing, malformed, or does not match what it is used with."""


class ProvenanceError(CacheError):
    """Two files of one cache (or a cache and a checkpoint) were made with different settings."""


def shard_name(index: int, count: int) -> str:
    return f"frames-{index:05d}-of-{count:05d}.h5"


def provenance_difference(expected: dict, found: dict, ignore=PER_SHARD_KEYS) -> str | None:
    """Return a sentence naming the first attribute that differs, or None when they agree."""
    for key in sorted((set(expected) | set(found)) - set(ignore)):
        if expected.get(key) != found.get(key):
            return f"attribute '{key}' is {found.get(key)!r}, expected {expected.get(key)!r}"
    return None


def _attrs_from(provenance: dict) -> dict:
    # h5py attributes take scalars and strings; nested values travel as JSON text.
    out = {}
    for key, value in provenance.items():
        if value is None:
            value = "none"
        if isinstance(value, str):
            value = str(value)  # str subclasses (torch.__version__) have no HDF5 conversion
        elif not isinstance(value, (int, float, bool)):
            value = json.dumps(value)
        out[key] = value
    return out


def _provenance_from(attrs) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _normalised(provenance: dict) -> dict:
    """The provenance as it reads back from HDF5 attributes, so written and read dicts compare equal."""
    return _provenance_from(_attrs_from(provenance))


# --------------------------------------------------------------------------------------------- writing

class ShardWriter:
    """Append videos to one shard; resumable after a crash at any instant.

    >>> with ShardWriter(path, provenance, feature_dim=512) as w:
    ...     if "vid" not in w.committed_ids:
    ...         w.append_video("vid", feats, frame_index, timestamps, fps, n_src, duration)
    ...     w.finalize()
    """

    def __init__(self, path: str | Path, provenance: dict, feature_dim: int, grid: int | None = None,
                 durable: bool = True):
        self.path = Path(path)
        # durable: fsync rows, then the commit line, so that a power loss or kernel crash (not only a
        # killed process) also leaves a journal whose commits point at rows on disk. ~10 ms a video.
        self.durable = durable
        self.journal = self.path.with_suffix(".journal")
        self.provenance = _normalised({**provenance, "schema_version": SCHEMA_VERSION})
        self.feature_dim = int(feature_dim)
        self.tokens_per_frame = int(grid) ** 2 if grid else 0
        self._finalized: dict[str, dict] = {}
        if self.path.exists():
            self._load_finalized()
        self._open_journal()

    # The committed set spans the finalized shard (earlier runs) and the journal (this run).
    @property
    def committed_ids(self) -> set[str]:
        return set(self._finalized) | set(self._commits)

    def _check_provenance(self, found: dict, where: Path) -> None:
        diff = provenance_difference(self.provenance, found)
        if diff:
            raise ProvenanceError(f"{where}: made with different settings ({diff}); "
                                  "use another --cache folder or the same settings")

    def _load_finalized(self) -> None:
        with h5py.File(self.path, "r") as f:
            self._check_provenance(_provenance_from(f.attrs), self.path)
            for row in f["videos"][:]:
                self._finalized[row["video_id"].decode()] = {name: row[name] for name in VIDEO_DTYPE.names}

    def _open_journal(self) -> None:
        self.journal.mkdir(parents=True, exist_ok=True)
        meta = self.journal / "provenance.json"
        if meta.exists():
            self._check_provenance(json.loads(meta.read_text()), meta)
        else:
            _write_atomic(meta, json.dumps(self.provenance, sort_keys=True))
        self._commits: dict[str, dict] = {}
        log = self.journal / "commits.jsonl"
        good_bytes = 0
        if log.exists():
            data = log.read_bytes()
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # a commit line cut by a crash: that video is not committed
                record = json.loads(line)
                self._commits[record["video_id"]] = record
                good_bytes += len(line)
            if good_bytes != len(data):
                with open(log, "r+b") as fh:
                    fh.truncate(good_bytes)
        self.num_rows = sum(r["num_rows"] for r in self._commits.values())
        # Rows written after the last commit belong to no video: cut them off.
        row_bytes = {"features.f16": self.feature_dim * 2, "frames.bin": 16,
                     "tokens.f16": self.tokens_per_frame * self.feature_dim * 2}
        self._files = {}
        for name, nbytes in row_bytes.items():
            if nbytes == 0:
                continue
            fh = open(self.journal / name, "a+b")
            fh.truncate(self.num_rows * nbytes)
            self._files[name] = fh
        self._log = open(log, "ab")

    def append_video(self, video_id: str, features: np.ndarray, frame_index: np.ndarray,
                     timestamps: np.ndarray, fps: float, num_source_frames: int, duration: float,
                     tokens: np.ndarray | None = None) -> None:
        if video_id in self.committed_ids:
            raise CacheError(f"{self.path}: video {video_id!r} is already committed")
        features = np.asarray(features)
        t = features.shape[0]
        if features.ndim != 2 or features.shape[1] != self.feature_dim or t == 0:
            raise CacheError(f"{video_id}: features have shape {features.shape}, "
                             f"expected [T>0, {self.feature_dim}]")
        if len(frame_index) != t or len(timestamps) != t:
            raise CacheError(f"{video_id}: {t} feature rows but {len(frame_index)} frame indices "
                             f"and {len(timestamps)} timestamps")
        if bool(self.tokens_per_frame) != (tokens is not None):
            raise CacheError(f"{video_id}: tokens given={tokens is not None}, shard expects "
                             f"{self.tokens_per_frame} tokens per frame")
        frames = np.empty(t, dtype=[("frame_index", "<i8"), ("timestamp", "<f8")])
        frames["frame_index"], frames["timestamp"] = frame_index, timestamps
        self._files["features.f16"].write(features.astype("<f2").tobytes())
        self._files["frames.bin"].write(frames.tobytes())
        if tokens is not None:
            tokens = np.asarray(tokens, dtype="<f2")
            if tokens.shape != (t, self.tokens_per_frame, self.feature_dim):
                raise CacheError(f"{video_id}: tokens have shape {tokens.shape}")
            self._files["tokens.f16"].write(tokens.tobytes())
        for fh in self._files.values():
            fh.flush()
            if self.durable:
                os.fsync(fh.fileno())
        # The commit line is written only once the rows it points to are on disk.
        record = {"video_id": video_id, "row_start": self.num_rows, "num_rows": t, "fps": float(fps),
                  "num_source_frames": int(num_source_frames), "duration": float(duration)}
        self._log.write((json.dumps(record) + "\n").encode())
        self._log.flush()
        if self.durable:
            os.fsync(self._log.fileno())
        self._commits[video_id] = record
        self.num_rows += t

    def close(self) -> None:
        for fh in [*self._files.values(), self._log]:
            fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def finalize(self) -> Path:
        """Write the HDF5 shard (old shard + journal, sorted by video id) atomically; drop the journal."""
        if self.path.exists() and not self._commits:
            self.close()  # nothing new since the shard was written: keep its bytes
            shutil.rmtree(self.journal)
            return self.path
        for fh in [*self._files.values(), self._log]:
            fh.flush()
        old = h5py.File(self.path, "r") if self._finalized else None
        journal_rows = {
            name: np.memmap(self.journal / name, mode="r", dtype=dtype, shape=shape)
            for name, dtype, shape in [
                ("features.f16", "<f2", (self.num_rows, self.feature_dim)),
                ("frames.bin", [("frame_index", "<i8"), ("timestamp", "<f8")], (self.num_rows,)),
                ("tokens.f16", "<f2", (self.num_rows, self.tokens_per_frame, self.feature_dim)),
            ] if self.num_rows and (name != "tokens.f16" or self.tokens_per_frame)
        }
        entries = {vid: ("old", r) for vid, r in self._finalized.items()}
        entries.update({vid: ("new", r) for vid, r in self._commits.items() if vid not in entries})
        order = sorted(entries)
        total = sum(int(entries[v][1]["num_rows"]) for v in order)
        tmp = self.path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs.update(_attrs_from(self.provenance))
            chunk = (min(CHUNK_ROWS, max(total, 1)),)
            feats = f.create_dataset("features", (total, self.feature_dim), "<f2",
                                     chunks=chunk + (self.feature_dim,))
            toks = (f.create_dataset("tokens", (total, self.tokens_per_frame, self.feature_dim), "<f2",
                                     chunks=(min(16, max(total, 1)), self.tokens_per_frame, self.feature_dim))
                    if self.tokens_per_frame else None)
            fidx = f.create_dataset("frame_index", (total,), "<i8", chunks=chunk)
            stamps = f.create_dataset("timestamps", (total,), "<f8", chunks=chunk)
            table = np.zeros(len(order), VIDEO_DTYPE)
            row = 0
            for i, vid in enumerate(order):
                source, rec = entries[vid]
                lo, n = int(rec["row_start"]), int(rec["num_rows"])
                if source == "old":
                    feats[row:row + n] = old["features"][lo:lo + n]
                    fidx[row:row + n] = old["frame_index"][lo:lo + n]
                    stamps[row:row + n] = old["timestamps"][lo:lo + n]
                    if toks is not None:
                        toks[row:row + n] = old["tokens"][lo:lo + n]
                else:
                    feats[row:row + n] = journal_rows["features.f16"][lo:lo + n]
                    fidx[row:row + n] = journal_rows["frames.bin"]["frame_index"][lo:lo + n]
                    stamps[row:row + n] = journal_rows["frames.bin"]["timestamp"][lo:lo + n]
                    if toks is not None:
                        toks[row:row + n] = journal_rows["tokens.f16"][lo:lo + n]
                table[i] = (vid.encode(), row, n, rec["fps"], rec["num_source_frames"], rec["duration"])
                row += n
            f.create_dataset("videos", data=table)
        if old is not None:
            old.close()
        del journal_rows
        os.replace(tmp, self.path)
        self.close()
        shutil.rmtree(self.journal)
        return self.path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- reading

def is_cache_folder(p: Path) -> bool:
    """Shards, an unfinished journal or texts.h5: something `extract` or `texts` wrote."""
    return any(p.glob(SHARD_GLOB)) or any(p.glob("frames-*-of-*.journal")) or (p / "texts.h5").exists()


def locate_cache(path: str | Path) -> Path:
    """The cache folder: `path` itself when it holds a cache, else the only one in <dataset>/<model>/ below."""
    path = Path(path)
    if not path.is_dir():
        raise CacheError(f"{path}: cache folder does not exist")
    if is_cache_folder(path):
        return path
    found = sorted(p for depth in ("*", "*/*") for p in path.glob(depth) if p.is_dir() and is_cache_folder(p))
    if len(found) == 1:
        return found[0]
    if found:
        raise CacheError(f"{path}: holds several caches ({', '.join(str(f) for f in found[:5])}); "
                         "pass the one to use with --cache")
    raise CacheError(f"{path}: no feature shards ({SHARD_GLOB}) here or in <dataset>/<model>/ below; "
                     "run `cmdcl-cache extract` first")


class Cache:
    """Read every finalized shard of one cache folder as one table of videos.

    Files are opened lazily and reopened after a fork, so one Cache can be handed to DataLoader workers.
    """

    def __init__(self, cache_dir: str | Path, require_complete: bool = True):
        self.dir = Path(cache_dir)
        self.shard_paths = sorted(self.dir.glob(SHARD_GLOB))
        if not self.shard_paths:
            journals = sorted(self.dir.glob("frames-*-of-*.journal"))
            hint = (f" ({len(journals)} unfinished extraction journal(s) found: rerun `cmdcl-cache extract`"
                    " with the same options to finish them)") if journals else ""
            raise CacheError(f"{self.dir}: no feature shards ({SHARD_GLOB}){hint}")
        self._index: dict[str, tuple[int, int, int]] = {}
        self._videos: dict[str, dict] = {}
        self.provenance: dict | None = None
        counts = set()
        for s, path in enumerate(self.shard_paths):
            try:
                with h5py.File(path, "r") as f:
                    prov = _provenance_from(f.attrs)
                    table = f["videos"][:]
                    dim = f["features"].shape[1]
                    tokens = f["tokens"].shape[1] if "tokens" in f else 0
            except (OSError, KeyError) as err:
                raise CacheError(f"{path}: not a readable cmdcl shard ({err})") from err
            if self.provenance is None:
                self.provenance = {k: v for k, v in prov.items() if k not in PER_SHARD_KEYS}
                self.feature_dim, self.tokens_per_frame = dim, tokens
            else:
                diff = provenance_difference(self.provenance, prov)
                if diff:
                    raise ProvenanceError(f"{path}: does not match {self.shard_paths[0].name}: {diff}")
            counts.add(prov.get("shard_count"))
            for row in table:
                vid = row["video_id"].decode()
                if vid in self._index:
                    other = self.shard_paths[self._index[vid][0]].name
                    raise CacheError(f"{path}: video {vid!r} is also in {other}")
                self._index[vid] = (s, int(row["row_start"]), int(row["num_rows"]))
                self._videos[vid] = {name: row[name].item() for name in VIDEO_DTYPE.names[1:]}
        count = next(iter(counts)) if len(counts) == 1 else None
        if require_complete and isinstance(count, int):
            # A rank that has not finished leaves no shard: reading 7 of 8 would train on 7/8 of the data.
            missing = [shard_name(i, count) for i in range(count) if not (self.dir / shard_name(i, count)).exists()]
            if missing:
                raise CacheError(f"{self.dir}: {len(missing)} of {count} shards missing ({', '.join(missing[:3])}"
                                 f"{', ...' if len(missing) > 3 else ''}); finish those ranks' `cmdcl-cache extract`")
        self.video_ids = sorted(self._index)
        self.has_tokens = self.tokens_per_frame > 0
        self._files: list | None = None
        self._pid = None

    def _file(self, shard: int) -> h5py.File:
        if self._files is None or self._pid != os.getpid():
            self._files = [h5py.File(p, "r") for p in self.shard_paths]
            self._pid = os.getpid()
        return self._files[shard]

    def _rows(self, video_id: str, name: str) -> np.ndarray:
        try:
            shard, start, n = self._index[video_id]
        except KeyError:
            raise CacheError(f"{self.dir}: video {video_id!r} is not in the cache") from None
        return self._file(shard)[name][start:start + n]

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def features(self, video_id: str) -> np.ndarray:
        return self._rows(video_id, "features")

    def tokens(self, video_id: str) -> np.ndarray:
        if not self.has_tokens:
            raise CacheError(f"{self.dir}: this cache has no grid tokens (extract with --tokens grid)")
        return self._rows(video_id, "tokens")

    def frame_info(self, video_id: str) -> tuple[np.ndarray, np.ndarray]:
        return self._rows(video_id, "frame_index"), self._rows(video_id, "timestamps")

    def num_frames(self, video_id: str) -> int:
        return self._index[video_id][2]

    def video_info(self, video_id: str) -> dict:
        """fps, num_source_frames, duration and num_rows of one video."""
        return dict(self._videos[video_id])

    def close(self) -> None:
        for f in self._files or []:
            f.close()
        self._files = None


# ----------------------------------------------------------------------------------------------- texts

@dataclass
class TextEmbeddings:
    """Label text embeddings of one label set, CLIP style: each prompt normalised, averaged, normalised."""

    names: list[str]          # label names as in labels.json
    texts: list[str]          # the readable text put into the prompts
    templates: list[str]      # prompt templates with "{}" for the text
    per_prompt: np.ndarray    # float32 [C, P, D], as the text tower returns them
    ensemble: np.ndarray      # float32 [C, D], L2-normalised

    @staticmethod
    def ensemble_of(per_prompt: np.ndarray) -> np.ndarray:
        x = per_prompt / np.linalg.norm(per_prompt, axis=-1, keepdims=True)
        x = x.mean(axis=1)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_texts(path: str | Path, label_sets: dict[str, TextEmbeddings], provenance: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(_attrs_from({**provenance, "schema_version": SCHEMA_VERSION}))
        for name, t in label_sets.items():
            g = f.create_group(name)
            g.create_dataset("names", data=np.array(t.names, dtype=h5py.string_dtype()))
            g.create_dataset("texts", data=np.array(t.texts, dtype=h5py.string_dtype()))
            g.create_dataset("templates", data=np.array(t.templates, dtype=h5py.string_dtype()))
            g.create_dataset("per_prompt", data=np.asarray(t.per_prompt, np.float32))
            g.create_dataset("ensemble", data=np.asarray(t.ensemble, np.float32))
    os.replace(tmp, path)


def read_texts(path: str | Path) -> dict[str, TextEmbeddings]:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no label text embeddings; run `cmdcl-cache texts` for this cache")
    out = {}
    with h5py.File(path, "r") as f:
        for name, g in f.items():
            out[name] = TextEmbeddings(
                names=[s.decode() for s in g["names"][:]], texts=[s.decode() for s in g["texts"][:]],
                templates=[s.decode() for s in g["templates"][:]],
                per_prompt=g["per_prompt"][:], ensemble=g["ensemble"][:])
    return out


def texts_provenance(path: str | Path) -> dict:
    with h5py.File(path, "r") as f:
        return _provenance_from(f.attrs)


# ------------------------------------------------------------------------------------------ synthetic

def write_synthetic_cache(cache_dir: str | Path, features: dict[str, np.ndarray],
                          texts: dict[str, TextEmbeddings] | None = None, provenance: dict | None = None,
                          num_shards: int = 1, tokens: dict[str, np.ndarray] | None = None) -> Path:
    """Write a cache in the real format from arrays (tests and benchmarks); returns the folder."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dim = next(iter(features.values())).shape[1]
    grid = int(round(next(iter(tokens.values())).shape[1] ** 0.5)) if tokens else None
    prov = {"dataset": "synthetic", "model": "synthetic", "pretrained": "none", "precision": "fp32",
            **(provenance or {}), "shard_count": num_shards}
    ids = sorted(features)
    for s in range(num_shards):
        path = cache_dir / shard_name(s, num_shards)
        with ShardWriter(path, {**prov, "shard_index": s}, dim, grid=grid, durable=False) as w:
            for vid in ids[s::num_shards]:
                x = features[vid]
                t = len(x)
                w.append_video(vid, x, np.arange(t), np.arange(t, dtype=np.float64), fps=1.0,
                               num_source_frames=t, duration=float(t),
                               tokens=tokens[vid] if tokens else None)
            w.finalize()
    if texts:
        write_texts(cache_dir / "texts.h5", texts, prov)
    return cache_dir
