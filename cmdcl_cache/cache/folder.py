"""The cache folder contract: where a cache lives, what it is made of, how it is found and compared.

    <root>/<dataset>/<tag>/              a cache folder; <tag> = CacheSpec.tag (model-weights[-gridN])
        frames-0000r-of-0000n.h5         finished shard of rank r of n (format: format.py)
        frames-0000r-of-0000n.journal/   unfinished shard of rank r (an extract is running or was killed)
        frames-0000r-of-0000n.h5.lock    flock of the extract (or import) writing that shard: "pid host command"
        texts.h5.lock, confounders.h5.lock  the same for the writer of texts.h5 and of confounders.h5
        texts.h5                         label text embeddings of every label set
        failures.jsonl, extract_log.jsonl, confounders.h5
        import_sources.jsonl             sha256 of each source file of an imported cache (`cmdcl-cache import`)

`--cache` means the same in every command: a cache folder itself, or any folder above one (the root, or
<root>/<dataset>). Commands that read a cache (`locate`) take the one cache found there (at most two
levels down) that matches the --dataset/--model/--pretrained given; several matches are an error that
lists them with the model and weights read from their files. Commands that write one (`for_writing`:
extract, texts) use the folder itself when it is a cache (and refuse it when it holds another model's
cache), else `<folder>/<tag>` when the folder already holds caches (a dataset folder), else
`<folder>/<dataset>/<tag>`. So `extract --cache <cache folder>` resumes that folder instead of nesting a
second cache inside it.

Provenance (the shards' attributes) is compared here and nowhere else: shards of one cache must agree
except on PER_SHARD_KEYS; texts.h5 must agree with the shards on what the text tower depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from cmdcl_cache.cache.format import frame_records, read_shard, read_texts, rows_checksum, texts_provenance
from cmdcl_cache.cache.provenance import PER_SHARD_KEYS, CacheSpec, provenance_difference, safe_name, texts_difference
from cmdcl_cache.cache.runlog import FAILURES_FILE, RUN_LOG
from cmdcl_cache.errors import CacheError, ProvenanceError

SHARD_GLOB = "frames-*-of-*.h5"
JOURNAL_GLOB = "frames-*-of-*.journal"
SHARD_RE = re.compile(r"frames-(\d+)-of-(\d+)\.h5$")
TEXTS_FILE = "texts.h5"
CONFOUNDERS_FILE = "confounders.h5"
IMPORT_SOURCES_FILE = "import_sources.jsonl"
FRAME_BLOCK = 4096   # frame rows read at once to check videos' crc32 (64 KiB)


def shard_name(index: int, count: int) -> str:
    return f"frames-{index:05d}-of-{count:05d}.h5"


class CacheFolder:
    """One cache folder: the files it holds and what their attributes say."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CacheFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @staticmethod
    def holds_cache(path: Path) -> bool:
        """Shards, an unfinished journal or texts.h5: something `extract` or `texts` wrote."""
        path = Path(path)
        return path.is_dir() and (any(path.glob(SHARD_GLOB)) or any(path.glob(JOURNAL_GLOB))
                                  or any(path.glob(SHARD_GLOB + ".lock")) or (path / TEXTS_FILE).exists())

    @property
    def shard_paths(self) -> list[Path]:
        return sorted(self.path.glob(SHARD_GLOB))

    @property
    def journals(self) -> list[Path]:
        return sorted(self.path.glob(JOURNAL_GLOB))

    def shard_path(self, rank: int, world: int) -> Path:
        return self.path / shard_name(rank, world)

    texts_path = property(lambda self: self.path / TEXTS_FILE)
    confounders_path = property(lambda self: self.path / CONFOUNDERS_FILE)
    failures_path = property(lambda self: self.path / FAILURES_FILE)
    log_path = property(lambda self: self.path / RUN_LOG)
    sources_path = property(lambda self: self.path / IMPORT_SOURCES_FILE)

    def provenance(self) -> dict:
        """What the folder's files say it holds (the first readable shard, else a journal, else texts.h5)."""
        for shard in self.shard_paths:
            try:
                return {k: v for k, v in read_shard(shard)[0].items() if k not in PER_SHARD_KEYS}
            except CacheError:
                continue
        for journal in self.journals:
            meta = journal / "provenance.json"
            try:
                found = json.loads(meta.read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                continue   # the writer names a damaged journal when it opens it
            if isinstance(found, dict):
                return found
        if self.texts_path.exists():
            try:
                return texts_provenance(self.texts_path)
            except CacheError:
                pass
        return {}

    def describe(self) -> str:
        prov = self.provenance()
        return (f"{self.path} (dataset {prov.get('dataset', '?')}, model {prov.get('model', '?')}, "
                f"weights {prov.get('pretrained', '?')})")

    def open(self, require_complete: bool = True) -> "Cache":
        return Cache(self, require_complete=require_complete)

    def texts_problems(self, manifest, shard_prov: dict, dim: int | None, label_sets=None) -> list[str]:
        """Everything wrong with texts.h5 for `label_sets` (default: all of the manifest's) and these shards."""
        path = self.texts_path
        if not path.exists():
            return ["texts.h5: missing; run `cmdcl-cache texts` (or rerun extract on rank 0)"]
        try:
            diff = texts_difference(shard_prov, texts_provenance(path))
            texts = read_texts(path)
        except CacheError as err:
            return [f"texts.h5: unreadable ({err})"]
        p = [] if diff is None else [f"texts.h5: made with other settings than the frame shards ({diff}); rerun "
                                     "`cmdcl-cache texts` with the extraction's options"]
        for name in (label_sets or manifest.label_sets):
            p += _label_set_problems(name, texts.get(name), manifest, dim)
        return p

    def texts_for(self, manifest, shard_prov: dict, dim: int, label_sets) -> dict:
        """Text embeddings of `label_sets`, after refusing a texts.h5 that does not fit (its first problem)."""
        if self.texts_path.exists():
            diff = texts_difference(shard_prov, texts_provenance(self.texts_path))
            if diff:   # e.g. texts of another model's weights: zero-shot and T's initialisation would be wrong
                raise ProvenanceError(f"{self.texts_path}: made with other settings than the frame shards ({diff}); "
                                      "rerun `cmdcl-cache texts` with the extraction's options")
        problems = self.texts_problems(manifest, shard_prov, dim, label_sets)
        if problems:
            raise CacheError(f"{self.texts_path}: {problems[0].removeprefix('texts.h5: ')}")
        return read_texts(self.texts_path)


def _label_set_problems(name: str, t, manifest, dim: int | None) -> list[str]:
    if t is None:
        return [f"texts.h5: label set '{name}' is missing; run `cmdcl-cache texts` with this manifest"]
    p = []
    names = list(manifest.label_sets[name].names)
    c = len(names)
    if t.names != names:
        i = next((i for i, (a, b) in enumerate(zip(t.names, names)) if a != b), min(len(t.names), c))
        p.append(f"texts.h5: label set '{name}' has other names than {manifest.root}/labels.json "
                 f"({len(t.names)} vs {c} labels; first difference at label {i})")
    if t.ensemble.ndim != 2 or t.ensemble.shape[0] != c or (dim and t.ensemble.shape[1] != dim):
        p.append(f"texts.h5: label set '{name}': ensemble has shape {t.ensemble.shape}, expected "
                 f"[{c}, {dim or 'D'}] (the frame features have D={dim})")
    elif not np.isfinite(t.ensemble).all():
        p.append(f"texts.h5: label set '{name}': ensemble holds NaN/Inf")
    elif not np.allclose(np.linalg.norm(t.ensemble, axis=1), 1.0, atol=1e-3):
        p.append(f"texts.h5: label set '{name}': ensemble rows are not L2-normalised")
    if t.per_prompt.ndim != 3 or t.per_prompt.shape[0] != c or t.per_prompt.shape[1] != len(t.templates):
        p.append(f"texts.h5: label set '{name}': per_prompt has shape {t.per_prompt.shape}, expected "
                 f"[{c}, {len(t.templates)}, D]")
    return p


def candidates(given: Path) -> list[CacheFolder]:
    """Cache folders at `given`, one level and two levels below it."""
    found = [p for depth in ("", "*", "*/*") for p in ([given] if not depth else sorted(given.glob(depth)))
             if CacheFolder.holds_cache(p)]
    return [CacheFolder(p) for p in found]


def _matches(folder: CacheFolder, dataset: str | None, model: str | None, pretrained: str | None) -> bool:
    prov = folder.provenance()
    if dataset is not None and prov.get("dataset") != dataset:
        return False
    if model is not None and prov.get("model") != model:
        return False
    if pretrained is not None:
        if Path(pretrained).expanduser().is_file():   # a checkpoint file: its sha256 is what shards record
            from cmdcl_cache.files import file_sha256
            pretrained = "sha256:" + file_sha256(Path(pretrained).expanduser())
        want = "none" if str(pretrained).lower() == "none" else str(pretrained)
        return str(prov.get("pretrained")) == want
    return True


def locate(given: str | Path, dataset: str | None = None, model: str | None = None,
           pretrained: str | None = None) -> CacheFolder:
    """The cache folder `given` itself when it is one (what it holds is then checked by the caller, against
    a manifest or a checkpoint), else the one cache below it that matches what is named (None: anything)."""
    given = Path(given)
    if not given.is_dir():
        raise CacheError(f"{given}: cache folder does not exist")
    if CacheFolder.holds_cache(given):
        return CacheFolder(given)
    found = candidates(given)
    if not found:
        raise CacheError(f"{given}: no feature cache here or up to two folders below (no {SHARD_GLOB}); "
                         "run `cmdcl-cache extract` first")
    named = [f for f in found if _matches(f, dataset, model, pretrained)]
    if len(named) == 1:
        return named[0]
    what = ", ".join(f"{k} {v}" for k, v in (("dataset", dataset), ("model", model), ("weights", pretrained)) if v)
    listing = "; ".join(f.describe() for f in (named or found)[:8])
    if not named:
        raise CacheError(f"{given}: no cache of {what} here; found {listing}")
    raise CacheError(f"{given}: holds {len(named)} caches{' of ' + what if what else ''}: {listing}; pass the "
                     "one to use with --cache, or name it with --model/--pretrained")


def for_writing(given: str | Path, dataset: str, spec: CacheSpec) -> CacheFolder:
    """The folder that `spec`'s cache of `dataset` is written to when the user passes `--cache given`."""
    given = Path(given)
    if CacheFolder.holds_cache(given):
        prov = CacheFolder(given).provenance()
        wanted = {"dataset": dataset, "model": spec.model, "tokens": spec.tokens}
        clash = {k: prov[k] for k, v in wanted.items() if k in prov and prov[k] != v}
        if clash:
            raise CacheError(f"{given}: is a cache of other settings ({', '.join(f'{k} {v!r}' for k, v in clash.items())}); "
                             f"pass its parent folder (the cache root) or the settings it was made with")
        return CacheFolder(given)
    if given.is_dir() and any(CacheFolder.holds_cache(p) for p in given.iterdir() if p.is_dir()):
        return CacheFolder(given / spec.tag)
    return CacheFolder(given / safe_name(dataset) / spec.tag)


def check_not_nested(folder: CacheFolder) -> None:
    """Refuse to create a cache inside another one, or around one: what a writer checks right before it
    creates its folder, since another writer (an extract loading its model, an import hashing its sources)
    may have made a cache there after this one chose its folder."""
    target = folder.path
    others = [p for p in list(target.parents)[:2] if CacheFolder.holds_cache(p)]
    others += [f.path for f in candidates(target) if f.path != target] if target.is_dir() else []
    if others:
        raise CacheError(f"{target}: would nest one cache inside another ({others[0]} is a cache folder"
                         f"{_writer_of(others[0])}); pass that cache folder itself, or another --cache")


def _writer_of(path: Path) -> str:
    """', written by `cmdcl-cache extract` (pid N)' from the lock files the writers leave, or ''."""
    for lock in sorted(path.glob("*.lock")):
        try:
            pid, _, command = lock.read_text().split(maxsplit=2)
        except (OSError, ValueError):
            continue
        return f", written by `cmdcl-cache {command.strip()}` (pid {pid})"
    return ""


class Cache:
    """Every finalized shard of one cache folder, read as one table of videos.

    One snapshot for the whole run: each shard is opened once, here, and that descriptor is kept. HDF5 opens
    lazily (again in each DataLoader worker after a fork) by name while the name is still that file (same
    device and inode), else through the kept descriptor (`/proc/self/fd/N`): a shard that an extract
    finalizes meanwhile (a rename over the old name) is not seen, the reader keeps reading the file whose
    table it indexed. Without /proc a replaced shard stops the reader with an error naming it, never a
    silent mix of two versions. A shard rewritten in place (same inode: truncated, copied over) is found by its
    size and time stamps, recorded at the first open; a video's rows are checked against their crc32 the
    first time they are read after the cache was opened (a forked DataLoader worker inherits what the parent
    checked: it reads the same file).
    """

    def __init__(self, folder: CacheFolder | str | Path, require_complete: bool = True):
        self.folder = folder if isinstance(folder, CacheFolder) else CacheFolder(folder)
        self.dir = self.folder.path
        self.shard_paths = self.folder.shard_paths
        if not self.shard_paths:
            journals = self.folder.journals
            hint = (f" ({len(journals)} unfinished extraction journal(s) found: rerun `cmdcl-cache extract`"
                    " with the same options to finish them)") if journals else ""
            raise CacheError(f"{self.dir}: no feature shards ({SHARD_GLOB}){hint}")
        self._index: dict[str, tuple[int, int, int]] = {}
        self._videos: dict[str, dict] = {}
        self.provenance: dict | None = None
        counts = set()
        self._fds: list[int] = []
        self._stamps: list[tuple] = []   # size, mtime, ctime, links of each shard at its first open
        self._verified: set[str] = set()   # videos whose rows matched their crc32 since the cache was opened
        self._last_checked: tuple = (None, {})   # (video id, its rows read for the check, not yet returned)
        for s, path in enumerate(self.shard_paths):
            prov, table, dim, tokens = self._snapshot(path)
            if self.provenance is None:
                self.provenance = {k: v for k, v in prov.items() if k not in PER_SHARD_KEYS}
                self.feature_dim, self.tokens_per_frame = dim, tokens
            else:
                diff = provenance_difference(self.provenance, prov)
                if diff:
                    raise ProvenanceError(f"{path}: does not match {self.shard_paths[0].name}: {diff}")
            counts.add(prov.get("shard_count"))
            for row in table:
                vid = row["video_id"]
                if vid in self._index:
                    other = self.shard_paths[self._index[vid][0]].name
                    raise CacheError(f"{path}: video {vid!r} is also in {other}")
                self._index[vid] = (s, int(row["row_start"]), int(row["num_rows"]))
                self._videos[vid] = {k: v for k, v in row.items() if k != "video_id"}
        count = next(iter(counts)) if len(counts) == 1 else None
        if require_complete and isinstance(count, int):
            self._check_complete(count)
        self.video_ids = sorted(self._index)
        self.has_tokens = self.tokens_per_frame > 0
        self._files: list | None = None
        self._pid = None
        self._frame_block: tuple = (-1, 0, None)   # (shard, first row, frame records) last read for checking

    def _snapshot(self, path: Path):
        """Open `path` for good and read its table; the descriptor kept is the file whose table was read."""
        for _ in range(3):
            fd = os.open(path, os.O_RDONLY)
            found = read_shard(path)
            if _identity(os.stat(path)) == _identity(os.fstat(fd)):   # not replaced while it was read
                self._fds.append(fd)
                self._stamps.append(_stamp(os.fstat(fd)))
                return found
            os.close(fd)
        raise CacheError(f"{path}: replaced again and again while it was being opened; rerun once the extract "
                         "writing it has finished")

    def _check_complete(self, count: int) -> None:
        # A rank that has not finished leaves no shard: reading 7 of 8 would train on 7/8 of the data.
        missing = [shard_name(i, count) for i in range(count) if not (self.dir / shard_name(i, count)).exists()]
        if missing:
            raise CacheError(f"{self.dir}: {len(missing)} of {count} shards missing ({', '.join(missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''}); finish those ranks' `cmdcl-cache extract`")

    def _file(self, shard: int):
        if self._files is None or self._pid != os.getpid():
            if not self._fds:
                raise CacheError(f"{self.dir}: this reader was closed; open the cache again")
            self._files = [self._open_snapshot(s) for s in range(len(self.shard_paths))]
            # a forked worker reads the very file the parent checked (same descriptor and stamps), so the
            # videos checked stay checked: once per open, not once per worker and epoch
            self._pid, self._frame_block, self._last_checked = os.getpid(), (-1, 0, None), (None, {})
        self._check_unchanged(shard)
        return self._files[shard]

    def _check_unchanged(self, shard: int) -> None:
        """The snapshot's file was not rewritten in place (truncate, `cp` over it, bytes overwritten): its
        size and time stamps are those of the first open. A rename over its name is not a change of it."""
        if not _same_contents(self._stamps[shard], _stamp(os.fstat(self._fds[shard]))):
            raise CacheError(f"{self.shard_paths[shard]}: changed in place since this run opened it (truncated, "
                             "copied over or overwritten); stopped rather than read rows of a file that is not "
                             "the one whose table this run indexed: run `cmdcl-cache verify`, then rerun")

    def _open_snapshot(self, shard: int):
        """h5py.File of the shard this Cache indexed, in this process (a forked worker inherits the descriptor):
        by name while the name is still that file, else through the descriptor (its own offset, read-only)."""
        import h5py
        self._check_unchanged(shard)   # before HDF5 meets a truncated file
        fd, path = self._fds[shard], self.shard_paths[shard]
        try:
            f = h5py.File(path, "r")
            if _identity(os.fstat(f.id.get_vfd_handle())) == _identity(os.fstat(fd)):
                return f
            f.close()
        except OSError:
            pass   # gone or unreadable under its name: the snapshot below still holds the file
        via = f"/proc/self/fd/{fd}"
        if not os.path.exists(via):
            raise CacheError(f"{path}: replaced since this run opened the cache (another process finalized it); "
                             "stopped rather than read rows of a file whose table this run did not index: rerun")
        return h5py.File(open(via, "rb"), "r")   # a new open file description: no offset shared with others

    def _rows(self, video_id: str, name: str) -> np.ndarray:
        try:
            shard, start, n = self._index[video_id]
        except KeyError:
            raise CacheError(f"{self.dir}: video {video_id!r} is not in the cache") from None
        try:
            f = self._file(shard)
            held, rows = self._last_checked
            if held == video_id and name in rows:   # read for the check just now (features, then tokens)
                return rows.pop(name)
            if video_id not in self._verified:   # the first read of a video checks its rows
                rows = self._checked_rows(f, video_id, shard, start, n)
                self._last_checked = (video_id, rows)
                return rows.pop(name)
            return f[name][start:start + n]
        except OSError as err:
            raise CacheError(f"{self.shard_paths[shard]}: rows of video {video_id!r} cannot be read ({err}); "
                             "run `cmdcl-cache verify`") from None

    def _checked_rows(self, f, video_id: str, shard: int, start: int, n: int) -> dict:
        """Every stored row of a video, after checking them against the crc32 of its record."""
        rows = {name: f[name][start:start + n] for name in ("features", "tokens") if name in f}
        frames = self._frame_rows(f, shard, start, n)
        rows["frame_index"] = np.ascontiguousarray(frames["frame_index"])
        rows["timestamps"] = np.ascontiguousarray(frames["timestamp"])
        crc = rows_checksum(rows["features"], frames, rows.get("tokens"))
        if crc != int(self._videos[video_id]["crc32"]):
            raise CacheError(f"{self.shard_paths[shard]}: the rows of video {video_id!r} do not match their "
                             "checksum: the shard is damaged (bit rot or a bad copy); run `cmdcl-cache verify`, "
                             "move the shard aside and rerun `cmdcl-cache extract` for it")
        self._verified.add(video_id)
        return rows

    def _frame_rows(self, f, shard: int, start: int, n: int) -> np.ndarray:
        """(frame_index, timestamp) records of rows start..start+n, read FRAME_BLOCK rows at a time: two small
        HDF5 reads per video would cost more than the checksum (videos are mostly read in row order)."""
        held, lo, block = self._frame_block
        if held != shard or block is None or not lo <= start <= start + n <= lo + len(block):
            lo, hi = start, min(max(start + n, start + FRAME_BLOCK), len(f["frame_index"]))
            block = frame_records(f["frame_index"][lo:hi], f["timestamps"][lo:hi])
            self._frame_block = (shard, lo, block)
        return block[start - lo:start - lo + n]

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

    def shard_of(self, video_id: str) -> Path:
        return self.shard_paths[self._index[video_id][0]]

    def video_info(self, video_id: str) -> dict:
        """num_rows, fps, num_source_frames, duration, crc32, source_size, source_mtime_ns, decoder."""
        return dict(self._videos[video_id])

    def fingerprint(self) -> str:
        """sha256 over the sorted provenance, every (video id, frame count) and the rows of each shard."""
        shard_rows = [0] * len(self.shard_paths)
        for shard, _, n in self._index.values():
            shard_rows[shard] += n
        payload = {
            "provenance": {k: self.provenance[k] for k in sorted(self.provenance)},
            "videos": [[vid, self.num_frames(vid)] for vid in self.video_ids],
            "shards": [[p.name, rows] for p, rows in zip(self.shard_paths, shard_rows)],
            "feature_dim": self.feature_dim,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def close(self) -> None:
        for f in self._files or []:
            f.close()
        self._files = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self):
        for fd in getattr(self, "_fds", []):
            try:
                os.close(fd)
            except OSError:
                pass


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink


def _same_contents(first: tuple, now: tuple) -> bool:
    """Size and mtime unchanged, and ctime too unless the link count changed: a rename over the shard's name
    unlinks the old file, which moves its ctime but not its bytes."""
    return first[:2] == now[:2] and (first[2] == now[2] or first[3] != now[3])


def split_ids(ids: Iterable[str], rank: int, world: int) -> list[str]:
    """This rank's videos: every world-th of the sorted ids, starting at rank."""
    if not 0 <= rank < world:
        raise ValueError(f"split: rank {rank} is outside 0..{world - 1}")
    return sorted(ids)[rank::world]


def texts_lock(folder, command: str):
    """The exclusive lock of `folder`'s texts.h5, held from the check to the write by whoever writes it."""
    from cmdcl_cache.files import WriterLock, lock_path_of
    folder.path.mkdir(parents=True, exist_ok=True)
    return WriterLock(lock_path_of(folder.texts_path), TEXTS_FILE, command)
