"""Writing one shard crash-safely: the journal, its commit lines, finalize (the layout is format.py's).

Why a journal: an HDF5 file that is being written is not crash-safe (a SIGKILL while the library evicts
metadata can leave a file that no longer opens). So while a shard is being extracted, its rows go to an
append-only journal folder (`frames-00000-of-00004.journal/`: raw float16 rows, raw frame info, and
`commits.jsonl`, one line per video, written only after that video's rows are on disk, with the crc32 of
those rows, and line_crc32 of all the line's fields). On resume the journal is cut back to its last
complete commit line, and a commit whose line does not match its line_crc32, or whose rows are missing (a
truncated data file) or do not match their checksum, is dropped, so that video is extracted again.
`finalize()` writes the HDF5 shard to a temporary file and renames it into place, so a shard that exists
is always whole.

Why a lock: two processes appending to one journal interleave their rows. A writer holds an exclusive
`flock` on `<shard>.lock` from the moment it opens the shard until it has finalised or closed it; a second
writer fails at once, naming the holder's pid. The kernel drops the lock when its process dies, so a
killed run never blocks its own resume. The same WriterLock guards texts.h5, confounders.h5 and run
folders. (flock is reliable on local disks; on NFS it depends on the client, see
docs/reference/limitations.md.)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cmdcl_cache.cache.format import (FRAME_DTYPE, LEGACY_VIDEO_FIELDS, SCHEMA_VERSION, VIDEO_DTYPE, frame_records,
                                      read_shard, record_checksum, rows_checksum, storable_video_id)
from cmdcl_cache.cache.provenance import (PROVENANCE_CRC, attrs_from, json_crc32, normalised, provenance_checksum,
                                          provenance_difference, provenance_from_attrs)
from cmdcl_cache.errors import CacheError, ProvenanceError, StorageError
from cmdcl_cache.files import WriterLock, disk_full, fsync_path, lock_path_of, write_atomic

COMMITS_FILE = "commits.jsonl"   # a journal's commit lines, one per video
CHUNK_ROWS = 256


def ShardLock(shard: Path, command: str = "extract") -> WriterLock:   # noqa: N802 - reads as the class it was
    return WriterLock(lock_path_of(shard), "this shard", command)


@dataclass
class PreparedVideo:
    """One video's checked rows and commit record (without its row_start), ready for ShardWriter.commit."""

    record: dict
    features: np.ndarray
    frames: np.ndarray
    tokens: np.ndarray | None


class ShardWriter:
    """Append videos to one shard; resumable after a crash at any instant; one writer at a time.

    >>> with ShardWriter(path, provenance, feature_dim=512) as w:
    ...     if "vid" not in w.committed_ids:
    ...         w.append_video("vid", feats, frame_index, timestamps, fps, n_src, duration)
    ...     w.finalize()

    `dropped` lists (video_id, reason) for journal commits found damaged on opening (to be re-extracted).
    """

    def __init__(self, path: str | Path, provenance: dict, feature_dim: int, grid: int | None = None,
                 durable: bool = True, command: str = "extract"):
        self.path = Path(path)
        # durable: fsync rows, then the commit line, so that a power loss or kernel crash (not only a
        # killed process) also leaves a journal whose commits point at rows on disk. ~10 ms a video.
        self.durable = durable
        self.journal = self.path.with_suffix(".journal")
        self.provenance = normalised({**provenance, "schema_version": SCHEMA_VERSION})
        self.feature_dim = int(feature_dim)
        self.tokens_per_frame = int(grid) ** 2 if grid else 0
        self._row_bytes = {"features.f16": self.feature_dim * 2, "frames.bin": FRAME_DTYPE.itemsize,
                           "tokens.f16": self.tokens_per_frame * self.feature_dim * 2}
        self._finalized: dict[str, dict] = {}
        self._files: dict = {}
        self._log = None
        self.dropped: list[tuple[str, str]] = []
        self._lock = ShardLock(self.path, command)   # first: nothing below reads a journal another process writes
        try:
            if self.path.exists():
                self._load_finalized()
            self._open_journal()
        except BaseException:
            self.close()
            raise

    @property
    def committed_ids(self) -> set[str]:
        """Videos in the finalized shard (earlier runs) or in the journal (this run)."""
        return set(self._finalized) | set(self._commits)

    def record(self, video_id: str) -> dict | None:
        """The commit record of a video (the journal's when it was extracted again), or None."""
        return self._commits.get(video_id) or self._finalized.get(video_id)

    def _check_provenance(self, found: dict, where: Path) -> None:
        diff = provenance_difference(self.provenance, found)
        if diff:
            raise ProvenanceError(f"{where}: made with different settings ({diff}); "
                                  "use another --cache folder or the same settings")

    def _load_finalized(self) -> None:
        prov, table, _, _ = read_shard(self.path)
        self._check_provenance(prov, self.path)
        for row in table:
            self._finalized[row["video_id"]] = row

    def _open_journal(self) -> None:
        self.journal.mkdir(parents=True, exist_ok=True)
        meta = self.journal / "provenance.json"
        if meta.exists():
            try:
                found = json.loads(meta.read_text())
                assert isinstance(found, dict)
            except (ValueError, UnicodeDecodeError, AssertionError):
                raise CacheError(f"{meta}: unreadable, so the journal's settings cannot be checked; move the "
                                 f"journal aside (`mv {self.journal} {self.journal}.bad`) to extract this shard's "
                                 "unfinished videos again") from None
            self._check_provenance(found, meta)
        else:
            write_atomic(meta, json.dumps(self.provenance, sort_keys=True))
        self._commits, end = self._read_commits()
        self._files = {}
        for name, nbytes in self._row_bytes.items():
            if nbytes:
                fh = open(self.journal / name, "a+b")
                fh.truncate(end * nbytes)   # rows written after the last commit belong to no video
                self._files[name] = fh
        self.num_rows = end
        self._drop_damaged()
        self._log = open(self.journal / COMMITS_FILE, "ab")

    def _read_commits(self) -> tuple[dict[str, dict], int]:
        """Complete commit lines whose rows are all in the data files; returns (commits, end row)."""
        log = self.journal / COMMITS_FILE
        data = log.read_bytes() if log.exists() else b""
        rows_on_disk = min((os.path.getsize(self.journal / n) // b if (self.journal / n).exists() else 0)
                           for n, b in self._row_bytes.items() if b)
        commits, good_bytes, end = {}, 0, 0
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.endswith(b"\n"):
                break   # a commit line cut by a crash: that video is not committed
            record = parse_commit_line(line)
            if record is not None and not commit_line_holds(record):   # a changed fps, size, decoder...
                self.dropped.append((record["video_id"], "its commit line does not match its checksum (the "
                                     "journal was edited or damaged); the video is extracted again"))
                continue
            if record is None:   # edited or damaged by hand: it and what follows are not trusted
                self.dropped.append((f"(line {number} of {log})", "not a commit line; it and the lines after "
                                                                  "it are dropped"))
                break
            stop = record["row_start"] + record["num_rows"]
            if stop > rows_on_disk:   # a data file shorter than its commits (truncated, disk trouble)
                self.dropped.append((record["video_id"], f"its rows {record['row_start']}..{stop} are past "
                                     f"the end of the journal's data ({rows_on_disk} rows)"))
                continue
            commits[record["video_id"]] = record
            good_bytes, end = good_bytes + len(line), max(end, stop)
        if self.dropped or good_bytes != len(data):   # keep only the commits that hold: rewrite the log
            good = b"".join(json.dumps(r).encode() + b"\n" for r in commits.values())
            write_atomic(log, good)
        return commits, end

    def _drop_damaged(self) -> None:
        """Commits whose rows no longer match their crc32 are dropped (their rows stay, unreferenced)."""
        damaged = [vid for vid, rec in self._commits.items()
                   if rows_checksum(*self._journal_rows(rec)) != rec["crc32"]]
        for vid in damaged:
            self.dropped.append((vid, "its journal rows do not match their checksum"))
            del self._commits[vid]
        if damaged:
            good = b"".join(json.dumps(r).encode() + b"\n" for r in self._commits.values())
            write_atomic(self.journal / COMMITS_FILE, good)

    def _journal_rows(self, rec: dict):
        lo, n = int(rec["row_start"]), int(rec["num_rows"])

        def read(name, dtype, shape):
            return np.fromfile(self.journal / name, dtype=dtype, count=n * int(np.prod(shape)),
                               offset=lo * self._row_bytes[name]).reshape(n, *shape)

        feats = read("features.f16", "<f2", (self.feature_dim,))
        frames = read("frames.bin", FRAME_DTYPE, ()).reshape(n)
        toks = read("tokens.f16", "<f2", (self.tokens_per_frame, self.feature_dim)) if self.tokens_per_frame else None
        return feats, frames, toks

    def append_video(self, video_id: str, features: np.ndarray, frame_index: np.ndarray,
                     timestamps: np.ndarray, fps: float, num_source_frames: int, duration: float,
                     tokens: np.ndarray | None = None, source_size: int = -1, source_mtime_ns: int = -1,
                     decoder: str = "", replace: bool = False) -> None:
        """Write one video's rows, then its commit line. `replace`: the video is in the finalized shard
        and is extracted again (its source changed); the new rows win at finalize."""
        self.commit([self.prepare(video_id, features, frame_index, timestamps, fps, num_source_frames,
                                  duration, tokens, source_size, source_mtime_ns, decoder, replace)])

    def prepare(self, video_id: str, features: np.ndarray, frame_index: np.ndarray,
                timestamps: np.ndarray, fps: float, num_source_frames: int, duration: float,
                tokens: np.ndarray | None = None, source_size: int = -1, source_mtime_ns: int = -1,
                decoder: str = "", replace: bool = False) -> "PreparedVideo":
        """Check one video's rows and compute its checksum, writing nothing; CacheError if they do not fit.
        `commit` writes what `prepare` returns (append_video = commit([prepare(...)]))."""
        storable_video_id(video_id)
        if video_id in self._commits or (video_id in self._finalized and not replace):
            raise CacheError(f"{self.path}: video {video_id!r} is already committed")
        features = np.ascontiguousarray(features, dtype="<f2")
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
        if tokens is not None:
            tokens = np.ascontiguousarray(tokens, dtype="<f2")
            if tokens.shape != (t, self.tokens_per_frame, self.feature_dim):
                raise CacheError(f"{video_id}: tokens have shape {tokens.shape}")
        frames = frame_records(frame_index, timestamps)
        record = {"video_id": video_id, "num_rows": t, "fps": float(fps),
                  "num_source_frames": int(num_source_frames), "duration": float(duration),
                  "crc32": rows_checksum(features, frames, tokens), "source_size": int(source_size),
                  "source_mtime_ns": int(source_mtime_ns), "decoder": str(decoder)}
        return PreparedVideo(record, features, frames, tokens)

    def commit(self, videos: list["PreparedVideo"]) -> None:
        """Write the rows of `videos`, then their commit lines: a group commit (with `durable`, one fsync
        per journal file for the whole group, rows before commit lines, as for a single video)."""
        ids = [v.record["video_id"] for v in videos]
        if len(set(ids)) != len(ids) or any(vid in self._commits for vid in ids):
            raise CacheError(f"{self.path}: a video is committed twice in one group ({', '.join(ids[:5])})")
        records, row = [], self.num_rows
        for v in videos:   # row_start second in the line, as before group commits existed
            record = {"video_id": v.record["video_id"], "row_start": row, **v.record}
            records.append({**record, "line_crc32": commit_checksum(record)})
            row += v.record["num_rows"]
        try:
            for v in videos:
                self._files["features.f16"].write(v.features.tobytes())
                self._files["frames.bin"].write(v.frames.tobytes())
                if v.tokens is not None:
                    self._files["tokens.f16"].write(v.tokens.tobytes())
            for fh in self._files.values():
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            # The commit lines are written only once the rows they point to are on disk.
            self._log.write(b"".join((json.dumps(r) + "\n").encode() for r in records))
            self._log.flush()
            if self.durable:
                os.fsync(self._log.fileno())
        except OSError as err:
            raise self._write_error(err, self.journal) from err
        for r in records:
            self._commits[r["video_id"]] = r
        self.num_rows = row

    def _write_error(self, err: OSError, where: Path) -> StorageError:
        what = "disk full" if disk_full(err) else f"{type(err).__name__}: {err.strerror or err}"
        return StorageError(f"{where}: {what} while writing; what is committed is kept, rerun the same command "
                          "to resume once the problem is fixed")

    def close(self) -> None:
        for fh in [*self._files.values(), self._log]:
            if fh is not None:
                fh.close()
        self._files, self._log = {}, None
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def finalize(self) -> Path:
        """Write the HDF5 shard (old shard + journal, sorted by video id; the journal's rows win for a
        video in both) atomically; drop the journal. On a write error the journal is kept."""
        if self.path.exists() and not self._commits:
            self.close()  # nothing new since the shard was written: keep its bytes
            shutil.rmtree(self.journal)
            return self.path
        for fh in [*self._files.values(), self._log]:
            fh.flush()
        entries = {vid: ("old", r) for vid, r in self._finalized.items()}
        entries.update({vid: ("new", r) for vid, r in self._commits.items()})
        self._check_room(entries)
        tmp = self.path.with_suffix(".h5.tmp")
        try:
            self._write_shard(tmp, entries)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            self.close()
            raise self._write_error(err, tmp) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(tmp)            # the shard's bytes are on disk before its name points at them
        os.replace(tmp, self.path)
        fsync_path(self.path.parent)   # and the rename itself survives a power loss
        self.close()
        shutil.rmtree(self.journal)
        return self.path

    def _check_room(self, entries: dict) -> None:
        """Refuse to start the shard's HDF5 write when the disk cannot hold it (see write_small_h5: HDF5 that
        meets a full disk can crash the process); the journal stays, the same command finishes later."""
        rows = sum(int(r["num_rows"]) for _, r in entries.values())
        needed = int(rows * sum(self._row_bytes.values()) * 1.02) + 256 * len(entries) + (1 << 20)
        free = shutil.disk_usage(self.path.parent).free
        if free < needed:
            raise StorageError(f"{self.path}: disk full: the shard needs about {needed / 2**20:.1f} MiB, "
                               f"{free / 2**20:.1f} MiB are free; the journal is kept: free space and rerun "
                               "the same command to finish")

    def _write_shard(self, tmp: Path, entries: dict) -> None:
        order = sorted(entries)
        total = sum(int(entries[v][1]["num_rows"]) for v in order)
        old = h5py.File(self.path, "r") if self._finalized else None
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(attrs_from(self.provenance))
                f.attrs[PROVENANCE_CRC] = provenance_checksum(provenance_from_attrs(f.attrs))
                def rows(name, shape, dtype, chunk_rows):   # no chunks for a shard of no rows (all failed)
                    chunks = (min(chunk_rows, total), *shape) if total else None
                    return f.create_dataset(name, (total, *shape), dtype, chunks=chunks)

                feats = rows("features", (self.feature_dim,), "<f2", CHUNK_ROWS)
                toks = (rows("tokens", (self.tokens_per_frame, self.feature_dim), "<f2", 16)
                        if self.tokens_per_frame else None)
                fidx = rows("frame_index", (), "<i8", CHUNK_ROWS)
                stamps = rows("timestamps", (), "<f8", CHUNK_ROWS)
                table = np.zeros(len(order), VIDEO_DTYPE)
                row = 0
                for i, vid in enumerate(order):
                    source, rec = entries[vid]
                    x, frames, tok = self._rows_of(source, rec, old)
                    if source == "new" and rows_checksum(x, frames, tok) != rec["crc32"]:
                        raise CacheError(f"{self.journal}: rows of video {vid!r} changed after they were "
                                         "committed (disk corruption?); rerun extract: resume re-checks the "
                                         "journal and extracts damaged videos again")
                    n = len(x)
                    feats[row:row + n], fidx[row:row + n], stamps[row:row + n] = (
                        x, frames["frame_index"], frames["timestamp"])
                    if toks is not None:
                        toks[row:row + n] = tok
                    values = {**rec, "video_id": vid, "row_start": row, "num_rows": n}
                    table[i] = (*(values[k] for k in LEGACY_VIDEO_FIELDS), record_checksum(values))
                    row += n
                f.create_dataset("videos", data=table)
        finally:
            if old is not None:
                old.close()

    def _rows_of(self, source: str, rec, old):
        if source == "new":
            return self._journal_rows(rec)
        lo, n = int(rec["row_start"]), int(rec["num_rows"])
        frames = frame_records(old["frame_index"][lo:lo + n], old["timestamps"][lo:lo + n])
        tok = old["tokens"][lo:lo + n] if self.tokens_per_frame else None
        return old["features"][lo:lo + n], frames, tok


COMMIT_KEYS = {"video_id": str, "row_start": int, "num_rows": int, "fps": float, "num_source_frames": int,
               "duration": float, "crc32": int, "source_size": int, "source_mtime_ns": int, "decoder": str}


def commit_checksum(record: dict) -> int:
    """crc32 of every field of a commit line but this checksum (the crc32 of the rows covers only the rows)."""
    return json_crc32([record[key] for key in COMMIT_KEYS])


def commit_line_holds(record: dict) -> bool:
    """A commit line matches its checksum; a line of a journal written before lines had one is unchecked."""
    return "line_crc32" not in record or record["line_crc32"] == commit_checksum(record)


def parse_commit_line(line: bytes) -> dict | None:
    """One commit line as written by append_video, or None when it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or set(record) - {"line_crc32"} != set(COMMIT_KEYS):
        return None
    if "line_crc32" in record and (isinstance(record["line_crc32"], bool)
                                   or not isinstance(record["line_crc32"], int)):
        return None
    for key, kind in COMMIT_KEYS.items():
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
            return None
    if record["row_start"] < 0 or record["num_rows"] < 1 or not record["video_id"]:
        return None
    return record
