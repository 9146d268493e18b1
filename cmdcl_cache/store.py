"""File formats of the feature cache: one shard (written crash-safely through a journal) and texts.h5.

Which files make a cache folder, and how they are found and compared, is `cmdcl_cache/cache.py`'s job;
this module only reads and writes the files themselves.

Shard layout (`frames-00000-of-00004.h5`, schema 2, one writer per file):

    features      float16 [N, D]      every frame of every video of the shard, video after video,
                                      as the image tower returns them (projected, not normalised)
    tokens        float16 [N, P, D]   optional pooled patch grid (P = grid * grid)
    frame_index   int64   [N]         source frame index of each row
    timestamps    float64 [N]         seconds of each row (the decoder's presentation time)
    videos        compound [V]        video_id (UTF-8, any length), row_start, num_rows, fps,
                                      num_source_frames, duration, crc32 (of the video's rows),
                                      source_size and source_mtime_ns (of its file when it was read),
                                      decoder (the backend that decoded it), record_crc32 (of all the
                                      other fields: a flipped byte of the record is damage, not a change)
    attrs                             provenance (schema version, model, weights, sampling, versions, shard),
                                      and provenance_crc32 (of all the others, written at finalize)

Videos are sorted by id inside a shard, so a shard's bytes depend only on what it holds, not on the order
in which worker processes happened to finish.

Why a journal: an HDF5 file that is being written is not crash-safe (a SIGKILL while the library evicts
metadata can leave a file that no longer opens). So while a shard is being extracted, its rows go to an
append-only journal folder (`frames-00000-of-00004.journal/`: raw float16 rows, raw frame info, and
`commits.jsonl`, one line per video, written only after that video's rows are on disk, with the crc32 of
those rows, and line_crc32 of all the line's fields). On resume the journal is cut back to its last
complete commit line, and a commit whose line does not match its line_crc32, or whose rows are missing (a
truncated data file) or do not match their checksum, is dropped, so that video is extracted again. `finalize()` writes the HDF5 shard to a temporary file and renames it into place, so a shard that
exists is always whole.

Why a lock: two processes appending to one journal interleave their rows. A writer holds an exclusive
`flock` on `<shard>.lock` from the moment it opens the shard until it has finalised or closed it; a second
writer fails at once, naming the holder's pid. The kernel drops the lock when its process dies, so a
killed run never blocks its own resume. The same WriterLock guards texts.h5, confounders.h5 and run
folders. (flock is reliable on local disks; on NFS it depends on the client, see
docs/reference/limitations.md.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 2
_STR = h5py.string_dtype("utf-8")
VIDEO_DTYPE = np.dtype([
    ("video_id", _STR), ("row_start", "<i8"), ("num_rows", "<i8"), ("fps", "<f8"),
    ("num_source_frames", "<i8"), ("duration", "<f8"), ("crc32", "<u4"), ("source_size", "<i8"),
    ("source_mtime_ns", "<i8"), ("decoder", _STR), ("record_crc32", "<u4"),
])
# Shards written before record_crc32 existed: read and resumed as before, their records unchecked (a
# finalize that rewrites such a shard checksums every record it copies).
LEGACY_VIDEO_FIELDS = VIDEO_DTYPE.names[:-1]
FRAME_DTYPE = np.dtype([("frame_index", "<i8"), ("timestamp", "<f8")])
CHUNK_ROWS = 256
# The attribute holding the crc32 of all the others, written at finalize (a shard without it: unchecked).
PROVENANCE_CRC = "provenance_crc32"


class CacheError(RuntimeError):
    """A cache file is missing, malformed, or does not match what it is used with."""


class ProvenanceError(CacheError):
    """Two files of one cache (or a cache and a checkpoint) were made with different settings."""


class CacheLockedError(CacheError):
    """Another process is writing this shard."""


class StorageError(CacheError):
    """Writing failed for a reason that is not the video's (disk full, I/O error, read-only file system)."""


# ----------------------------------------------------------------------------------- attributes, checks

def attrs_from(provenance: dict) -> dict:
    """Provenance as HDF5 attributes: scalars and strings; nested values travel as JSON text."""
    out = {}
    for key, value in provenance.items():
        if value is None:
            value = "none"
        if isinstance(value, str):
            value = str(value)  # str subclasses (torch.__version__) have no HDF5 conversion
        elif not isinstance(value, (int, float, bool)):
            value = json.dumps(value, sort_keys=True)
        out[key] = value
    return out


def provenance_from_attrs(attrs) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def normalised(provenance: dict) -> dict:
    """The provenance as it reads back from HDF5 attributes, so written and read dicts compare equal."""
    return provenance_from_attrs(attrs_from(provenance))


def rows_checksum(features: np.ndarray, frames: np.ndarray, tokens: np.ndarray | None = None) -> int:
    """crc32 of one video's stored rows: float16 features, (frame_index, timestamp) records, tokens."""
    crc = zlib.crc32(np.ascontiguousarray(features, dtype="<f2"))
    crc = zlib.crc32(np.ascontiguousarray(frames, dtype=FRAME_DTYPE), crc)
    if tokens is not None:
        crc = zlib.crc32(np.ascontiguousarray(tokens, dtype="<f2"), crc)
    return crc


def json_crc32(values) -> int:
    """crc32 of plain values as JSON (floats as repr, exact): the record, attribute and commit checksums."""
    return zlib.crc32(json.dumps(values, ensure_ascii=False).encode("utf-8"))


def record_checksum(record: dict) -> int:
    """crc32 of every field of one video's record but this checksum: fps, duration, frame count, rows, crc32
    of the rows, source size and mtime, decoder, id. Floats travel as repr (exact), so it reads back equal."""
    return json_crc32([record[name] for name in LEGACY_VIDEO_FIELDS])


def provenance_checksum(provenance: dict) -> int:
    """crc32 of a shard's attributes as they read back (sorted, floats as repr), this checksum left out."""
    return json_crc32(sorted((k, v) for k, v in provenance.items() if k != PROVENANCE_CRC))


def frame_records(frame_index, timestamps) -> np.ndarray:
    frames = np.empty(len(frame_index), dtype=FRAME_DTYPE)
    frames["frame_index"], frames["timestamp"] = frame_index, timestamps
    return frames


def storable_video_id(video_id) -> str:
    if not isinstance(video_id, str) or not video_id:
        raise CacheError(f"video id {video_id!r}: expected a non-empty string")
    try:
        video_id.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CacheError(f"video id {video_id!r}: not encodable as UTF-8 ({err.reason})") from None
    return video_id


def disk_full(err: OSError) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------------------------------------ lock

class WriterLock:
    """An exclusive, non-blocking flock on `lock_path`, held by the one process that writes `what`; the file
    keeps the holder's pid, host and command, so that a second writer's refusal names who holds it.

    The only lock of the project: shards (extract, import), texts.h5, confounders.h5, run folders (train)."""

    def __init__(self, lock_path: Path, what: str, command: str):
        self.path = Path(lock_path)
        self._fh = _open_lock_file(self.path)
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._fh.seek(0)
            holder = self._fh.read().split(maxsplit=2)
            self._fh.close()
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {holder[0]}" if holder else "pid unknown"
            if len(holder) > 1 and holder[1] != socket.gethostname():
                who += f" on {holder[1]}"
            other = holder[2].strip() if len(holder) > 2 else "process"
            raise CacheLockedError(f"another {other} ({who}) holds {self.path}: it is writing {what}; wait "
                                   "for it to finish or stop it (a killed process releases the lock)") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"{os.getpid()} {socket.gethostname()} {command}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()   # closing the descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _open_lock_file(path: Path):
    """The lock file, read-write, never through a symlink (its target would be overwritten) and only when it is
    a regular file: anything else is refused naming the path (CacheError, exit 2)."""
    if path.is_dir() and not path.is_symlink():
        raise CacheError(f"{path}: the lock file is a folder; move it away (`mv {path} {path}.bad`) and rerun")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise CacheError(f"{path}: the lock file is a symlink, which is never followed (its target would be "
                             "overwritten); remove the link and rerun") from None
        raise CacheError(f"{path}: the lock file cannot be opened ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(f"{path}: the lock file is not a regular file; move it away and rerun")
    return os.fdopen(fd, "r+")


def lock_path_of(target: Path) -> Path:
    """Where the lock of a written file lives: beside it, `<name>.lock`."""
    return target.with_name(target.name + ".lock")


def ShardLock(shard: Path, command: str = "extract") -> WriterLock:   # noqa: N802 - reads as the class it was
    return WriterLock(lock_path_of(shard), "this shard", command)


# --------------------------------------------------------------------------------------------- writing

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
        from .cache import provenance_difference
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
        self._log = open(self.journal / "commits.jsonl", "ab")

    def _read_commits(self) -> tuple[dict[str, dict], int]:
        """Complete commit lines whose rows are all in the data files; returns (commits, end row)."""
        log = self.journal / "commits.jsonl"
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
            write_atomic(self.journal / "commits.jsonl", good)

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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str: UTF-8) all at once: a reader sees the old file or the new one. A
    folder at `path` is refused, and a failed write leaves no `.tmp` beside it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as err:   # a full disk's error names no file: name the one that was not replaced
        tmp.unlink(missing_ok=True)
        what = "disk full" if disk_full(err) else err.strerror or str(err)
        raise OSError(err.errno, f"{what} while writing; nothing was replaced", str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------- reading

def _recovery(path: Path) -> str:
    return (f"move it aside (e.g. `mv {path} {path}.bad`) and rerun `cmdcl-cache extract` for that rank "
            "(the same command with its --shard-index/--num-shards) to write it again")


def read_shard(path: str | Path) -> tuple[dict, list[dict], int, int]:
    """(provenance, videos table as dicts with str ids, feature dim, tokens per frame) of one shard.

    Raises CacheError naming the file and the way to recover when it does not open or is not a shard, or
    when a video's record does not match its checksum.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            prov = provenance_from_attrs(f.attrs)
            recorded = prov.pop(PROVENANCE_CRC, None)
            if recorded is not None and recorded != provenance_checksum(prov):
                raise CacheError(f"{path}: its attributes (provenance: model, sampling, normalisation...) do not "
                                 "match their checksum: the shard is damaged (bit rot or a bad copy); "
                                 + _recovery(path))
            if prov.get("schema_version") != SCHEMA_VERSION:
                raise CacheError(f"{path}: written by another version of cmdcl (shard schema "
                                 f"{prov.get('schema_version')!r}; this one reads {SCHEMA_VERSION}); "
                                 "extract into a new --cache folder")
            raw = f["videos"][:]
            dim = int(f["features"].shape[1])
            tokens = int(f["tokens"].shape[1]) if "tokens" in f else 0
    except CacheError:
        raise
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise CacheError(f"{path}: not a readable cmdcl shard ({type(err).__name__}: {err}); "
                         + _recovery(path)) from None
    if raw.dtype.names not in (VIDEO_DTYPE.names, LEGACY_VIDEO_FIELDS):
        raise CacheError(f"{path}: videos table has fields {raw.dtype.names}, expected {VIDEO_DTYPE.names}; "
                         + _recovery(path))
    try:
        table = [{name: (row[name].decode("utf-8") if isinstance(row[name], bytes) else row[name].item())
                  for name in raw.dtype.names} for row in raw]
    except UnicodeDecodeError as err:
        raise CacheError(f"{path}: a video id or decoder name is not UTF-8 ({err.reason}): the shard is damaged; "
                         + _recovery(path)) from None
    for row in table:
        row.setdefault("record_crc32", None)   # a shard written before records were checksummed
        if row["record_crc32"] is not None and record_checksum(row) != row["record_crc32"]:
            raise CacheError(f"{path}: the record of video {row['video_id']!r} does not match its checksum: the "
                             "shard is damaged (bit rot or a bad copy), so its fps, duration, frame count, rows or "
                             "source stamp cannot be trusted; " + _recovery(path))
    return prov, table, dim, tokens


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


def write_small_h5(path: str | Path, fill) -> Path:
    """Write an HDF5 file that fits in memory: `fill(h5py.File)` builds it in RAM, then its bytes go to disk
    through plain file writes (a temporary name, fsync, rename). HDF5 itself never meets a full disk: when
    its own writes fail, the library can crash the process as it tears the file down."""
    import io
    path = Path(path)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", track_order=True) as f:
        fill(f)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        what = "disk full" if disk_full(err) else f"{type(err).__name__}: {err.strerror or err}"
        raise StorageError(f"{path}: {what} while writing; nothing was replaced") from None
    return path


def write_texts(path: str | Path, label_sets: dict[str, TextEmbeddings], provenance: dict) -> None:
    def fill(f):
        f.attrs.update(attrs_from({**provenance, "schema_version": SCHEMA_VERSION}))
        for name, t in label_sets.items():
            g = f.create_group(name)
            g.create_dataset("names", data=np.array(t.names, dtype=_STR))
            g.create_dataset("texts", data=np.array(t.texts, dtype=_STR))
            g.create_dataset("templates", data=np.array(t.templates, dtype=_STR))
            g.create_dataset("per_prompt", data=np.asarray(t.per_prompt, np.float32))
            g.create_dataset("ensemble", data=np.asarray(t.ensemble, np.float32))

    write_small_h5(path, fill)


def read_texts(path: str | Path) -> dict[str, TextEmbeddings]:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no label text embeddings; run `cmdcl-cache texts` for this cache")
    out = {}
    try:
        with h5py.File(path, "r") as f:
            for name, g in f.items():
                out[name] = TextEmbeddings(
                    names=[s.decode() for s in g["names"][:]], texts=[s.decode() for s in g["texts"][:]],
                    templates=[s.decode() for s in g["templates"][:]],
                    per_prompt=g["per_prompt"][:], ensemble=g["ensemble"][:])
    except (OSError, KeyError, ValueError, AttributeError, TypeError) as err:   # AttributeError: not strings
        raise CacheError(f"{path}: not a readable texts file ({type(err).__name__}: {err}); rerun "
                         "`cmdcl-cache texts` for this cache") from None
    return out


def texts_provenance(path: str | Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            return provenance_from_attrs(f.attrs)
    except (OSError, ValueError) as err:   # ValueError: an attribute that is not UTF-8
        raise CacheError(f"{path}: not a readable texts file ({err}); rerun `cmdcl-cache texts`") from None
