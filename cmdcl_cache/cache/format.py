"""File formats of the feature cache: one shard and texts.h5, their checksums, and reading them.

Which files make a cache folder, and how they are found and compared, is `cmdcl_cache/cache/folder.py`'s job;
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

Writing a shard (through a journal, under a lock) is writer.py's.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cmdcl_cache.cache.provenance import (PROVENANCE_CRC, attrs_from, json_crc32, provenance_checksum,
                                          provenance_from_attrs)
from cmdcl_cache.errors import CacheError, StorageError
from cmdcl_cache.files import disk_full

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


def rows_checksum(features: np.ndarray, frames: np.ndarray, tokens: np.ndarray | None = None) -> int:
    """crc32 of one video's stored rows: float16 features, (frame_index, timestamp) records, tokens."""
    crc = zlib.crc32(np.ascontiguousarray(features, dtype="<f2"))
    crc = zlib.crc32(np.ascontiguousarray(frames, dtype=FRAME_DTYPE), crc)
    if tokens is not None:
        crc = zlib.crc32(np.ascontiguousarray(tokens, dtype="<f2"), crc)
    return crc


def record_checksum(record: dict) -> int:
    """crc32 of every field of one video's record but this checksum: fps, duration, frame count, rows, crc32
    of the rows, source size and mtime, decoder, id. Floats travel as repr (exact), so it reads back equal."""
    return json_crc32([record[name] for name in LEGACY_VIDEO_FIELDS])


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
