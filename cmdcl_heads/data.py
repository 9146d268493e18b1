"""The feature dataset: the cache's videos paired with the manifest's records of one split.

Sampling is TSN style: the cached rows of a video are cut into T equal segments and one row is taken per
segment, at a random offset in training and at the centre in evaluation. With u in [0, 1) per segment,
row_i = floor((i + u_i) * n / T), clamped to n - 1; evaluation uses u = 0.5. A video with fewer than T cached
rows gets segments shorter than one row, so the same formula repeats rows in order.

Two ways to hold the features, which give the same batches for the same random numbers:

- `MemoryFeatures`: every row of the split in one tensor on the training device (ragged: rows of all
  videos one after the other, with offsets); a batch is index arithmetic plus one gather, so an epoch is
  compute-bound.
- `LazyFeatures`: h5py reads in a torch Dataset with DataLoader workers (the Cache reopens its files in
  each worker process, the very files it indexed: a shard finalized again meanwhile is not seen, see
  cmdcl_cache/cache/folder.py's Cache), for splits that do not fit the memory budget.

The random numbers (order and per-segment offsets) are drawn by the trainer from a torch.Generator, so the
mode, the number of workers and the device do not change which rows a step sees.

Every split that train, eval, predict or explain reads is checked for NaN/Inf: memory mode checks each video
as it is loaded, lazy mode each video as it is read; either way the error names the video and its shard.

`open_data` is what a run reads: the cache (found from `--cache` by cmdcl_cache.cache.folder.locate), the manifest
and the label texts, checked against each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmdcl_cache import Cache, CacheFolder, locate
from cmdcl_cache import CacheError, load_manifest

MEMORY_FRACTION = 0.25  # share of available RAM (or free GPU memory) that memory mode may take


class MissingVideosError(CacheError):
    """Videos of the split are not in the cache."""


class NonFiniteFeatures(CacheError):
    """A video's cached features hold NaN or Inf."""


def check_finite(cache: Cache, video_id: str, x: np.ndarray, what: str = "features") -> None:
    if not np.isfinite(x).all():
        rows = np.nonzero(~np.isfinite(np.asarray(x, np.float32).reshape(len(x), -1)).all(axis=1))[0]
        raise NonFiniteFeatures(f"{cache.shard_of(video_id)}: video {video_id!r} has NaN/Inf in {len(rows)} of its "
                                f"{len(x)} cached {what} rows (first row {rows[0]}); run `cmdcl-cache verify`, "
                                "then extract that video again (or leave it out of the manifest)")


# ------------------------------------------------------------------------------------------- sampling

def tsn_indices(num_rows: int, frames: int, train: bool, rng: np.random.Generator | None = None,
                offsets: np.ndarray | None = None) -> np.ndarray:
    """Rows to take from a video of `num_rows` cached rows: one per segment of T = `frames` equal segments.

    Training: a random offset per segment (from `offsets` in [0, 1) or drawn from `rng`); evaluation: centre.
    """
    if num_rows < 1 or frames < 1:
        raise ValueError(f"need num_rows >= 1 and frames >= 1, got {num_rows} and {frames}")
    if not train:
        u = np.full(frames, 0.5)
    elif offsets is not None:
        u = np.asarray(offsets, dtype=np.float64)
    else:
        u = (rng or np.random.default_rng()).random(frames)
    rows = np.floor((np.arange(frames) + u) * num_rows / frames).astype(np.int64)
    return np.minimum(rows, num_rows - 1)


def tsn_rows(lengths: torch.Tensor, frames: int, offsets: torch.Tensor | None) -> torch.Tensor:
    """Batched `tsn_indices` in torch: lengths [B] -> rows [B, T] (offsets [B, T] in [0, 1) or None = centre).

    Computed in float64 so that CPU and GPU, memory and lazy modes pick the very same rows.
    """
    n = lengths.to(torch.float64)[:, None]
    i = torch.arange(frames, device=lengths.device, dtype=torch.float64)[None]
    u = torch.full_like(i, 0.5) if offsets is None else offsets.to(device=lengths.device, dtype=torch.float64)
    rows = torch.floor((i + u) * n / frames).to(torch.int64)
    return torch.minimum(rows, lengths[:, None] - 1)


# ------------------------------------------------------------------------------------------- the run's data

@dataclass
class Labels:
    """The target label set and the mediator's fine vocabulary, with their text ensembles."""

    label_set: str
    names: list[str]
    keys: list[str]
    multi_label: bool
    text: torch.Tensor                # [C, D] target ensemble
    fine_label_set: str
    fine_names: list[str]
    fine_text: torch.Tensor           # [Cf, D]


@dataclass
class RunData:
    """The cache, manifest and label texts a run reads, checked against each other."""

    folder: CacheFolder
    cache: Cache
    manifest: object
    labels: Labels

    def split(self, name: str, scheme: str | None, skip_missing: bool) -> "SplitVideos":
        return pair_split(self.cache, self.manifest, name, self.labels.label_set, scheme, skip_missing)


def open_data(cache: str | Path, dataset: str, label_set: str | None, fine_label_set: str | None = None) -> RunData:

    manifest = load_manifest(dataset)
    folder = locate(cache, manifest.dataset)
    c = folder.open()
    label_set = label_set or manifest.default_label_set
    fine = fine_label_set or manifest.fine_label_set or label_set
    for what, name in (("label set", label_set), ("fine label set", fine)):
        if name not in manifest.label_sets:
            raise ValueError(f"{manifest.root}: no {what} {name!r}; have {', '.join(manifest.label_sets)}")
    texts = folder.texts_for(manifest, c.provenance, c.feature_dim, dict.fromkeys((label_set, fine)))
    ls, fs = manifest.label_sets[label_set], manifest.label_sets[fine]
    labels = Labels(label_set=label_set, names=list(ls.names), keys=list(ls.keys), multi_label=ls.multi_label,
                    text=torch.from_numpy(np.asarray(texts[label_set].ensemble, np.float32)),
                    fine_label_set=fine, fine_names=list(fs.names),
                    fine_text=torch.from_numpy(np.asarray(texts[fine].ensemble, np.float32)))
    return RunData(folder=folder, cache=c, manifest=manifest, labels=labels)


# ------------------------------------------------------------------------------------------- pairing


@dataclass
class SplitVideos:
    """Videos of one split that are in the cache, with their targets."""

    video_ids: list[str]
    lengths: np.ndarray          # int64 [N] cached rows per video
    targets: np.ndarray          # int64 [N] or float32 [N, C] multi-hot
    multi_label: bool
    missing: list[str]           # videos of the split that the cache lacks (skipped)


def pair_split(cache: Cache, manifest, split: str, label_set: str, scheme: str | None = None,
               skip_missing: bool = False) -> SplitVideos:
    """Records of `split` (under `scheme`) that the cache holds; error when some are missing unless skipped."""
    records = manifest.select(split, scheme)
    if not records:
        raise ValueError(f"{manifest.root}: no videos in split {split!r}"
                         + (f" of scheme {scheme!r}" if scheme else ""))
    missing = [r.video_id for r in records if r.video_id not in cache]
    if missing and not skip_missing:
        few = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise MissingVideosError(
            f"{cache.dir}: {len(missing)} of {len(records)} {split} videos are not in the cache ({few}); "
            "extract them (see failures.jsonl) or pass --skip-missing to train without them")
    kept = [r for r in records if r.video_id in cache]
    if not kept:
        raise MissingVideosError(f"{cache.dir}: none of the {len(records)} {split} videos is in the cache")
    targets = manifest.targets(kept, label_set)
    return SplitVideos(video_ids=[r.video_id for r in kept],
                       lengths=np.array([cache.num_frames(r.video_id) for r in kept], dtype=np.int64),
                       targets=targets, multi_label=manifest.label_sets[label_set].multi_label,
                       missing=missing)


# ------------------------------------------------------------------------------------------- holding

def estimated_bytes(cache: Cache, split: SplitVideos, tokens: bool) -> int:
    per_row = cache.feature_dim * 2 * (1 + (cache.tokens_per_frame if tokens else 0))
    return int(split.lengths.sum()) * per_row


def memory_budget(device: torch.device) -> int:
    """Bytes memory mode may use: a share of free GPU memory on cuda, of available RAM otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(MEMORY_FRACTION * free)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        available = info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(MEMORY_FRACTION * available)


def choose_mode(mode: str, cache: Cache, split: SplitVideos, tokens: bool, device: torch.device) -> str:
    if mode in ("memory", "lazy"):
        return mode
    if mode != "auto":
        raise ValueError(f"--data-mode must be auto, memory or lazy, got {mode!r}")
    return "memory" if estimated_bytes(cache, split, tokens) < memory_budget(device) else "lazy"


class MemoryFeatures:
    """All rows of a split in one ragged float16 tensor on `device`; batches by gather."""

    mode = "memory"

    def __init__(self, cache: Cache, split: SplitVideos, frames: int, device: torch.device, tokens: bool):
        self.split, self.frames, self.device, self.cache = split, frames, torch.device(device), cache
        lengths = torch.as_tensor(split.lengths)
        self.lengths = lengths.to(self.device)
        self.offsets = (torch.cumsum(lengths, 0) - lengths).to(self.device)
        self.features = self._load(cache.features, split, (cache.feature_dim,))
        self.tokens = (self._load(cache.tokens, split, (cache.tokens_per_frame, cache.feature_dim))
                       if tokens else None)

    def _load(self, read, split: SplitVideos, row_shape: tuple) -> torch.Tensor:
        out = torch.empty((int(split.lengths.sum()), *row_shape), dtype=torch.float16)
        start = 0
        for vid, n in zip(split.video_ids, split.lengths):
            x = np.ascontiguousarray(read(vid), dtype=np.float16)
            check_finite(self.cache, vid, x)
            out[start:start + n] = torch.from_numpy(x)
            start += n
        return out.to(self.device)

    def batches(self, batch_size: int, order: torch.Tensor, offsets: torch.Tensor | None):
        """Yield (positions [B] cpu, frames [B, T, D] float32, tokens [B, T, P, D] float32 | None)."""
        for chunk in torch.split(order, batch_size):
            pos = chunk.to(self.device)
            rows = tsn_rows(self.lengths[pos], self.frames, None if offsets is None else offsets[chunk])
            rows = rows + self.offsets[pos, None]
            frames = self.features[rows].float()
            tokens = self.tokens[rows].float() if self.tokens is not None else None
            yield chunk, frames, tokens


class _VideoDataset(torch.utils.data.Dataset):
    """Item = (position, offsets row or None): reads that video's rows from HDF5 and samples T of them."""

    def __init__(self, cache: Cache, split: SplitVideos, frames: int, tokens: bool):
        self.cache, self.split, self.frames, self.tokens = cache, split, frames, tokens

    def __len__(self):
        return len(self.split.video_ids)

    def __getitem__(self, item):
        pos, u = item
        vid = self.split.video_ids[pos]
        n = torch.tensor([int(self.split.lengths[pos])])
        rows = tsn_rows(n, self.frames, None if u is None else u[None])[0].numpy()
        x = np.asarray(self.cache.features(vid))
        check_finite(self.cache, vid, x)
        frames = torch.from_numpy(x[rows])
        if not self.tokens:
            return pos, frames
        toks = np.asarray(self.cache.tokens(vid))
        check_finite(self.cache, vid, toks, "grid token")
        return pos, frames, torch.from_numpy(toks[rows])


class LazyFeatures:
    """HDF5 reads in DataLoader workers; same batches as MemoryFeatures for the same order and offsets."""

    mode = "lazy"

    def __init__(self, cache: Cache, split: SplitVideos, frames: int, device: torch.device, tokens: bool,
                 workers: int = 2):
        self.split, self.frames, self.device = split, frames, torch.device(device)
        self.dataset = _VideoDataset(cache, split, frames, tokens)
        self.workers = workers
        for vid in split.video_ids:   # one streaming pass now, so that a NaN stops the run before it starts
            check_finite(cache, vid, np.asarray(cache.features(vid)))
            if tokens:
                check_finite(cache, vid, np.asarray(cache.tokens(vid)), "grid token")

    def batches(self, batch_size: int, order: torch.Tensor, offsets: torch.Tensor | None):
        chunks = torch.split(order, batch_size)
        plan = [[(int(p), None if offsets is None else offsets[int(p)]) for p in chunk] for chunk in chunks]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=plan, num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            # its own generator: a DataLoader otherwise draws its base seed from the global RNG, which
            # would shift dropout's random numbers relative to memory mode
            generator=torch.Generator().manual_seed(0),
            multiprocessing_context="fork" if self.workers and os.name == "posix" else None)
        for chunk, batch in zip(chunks, _worker_errors_unwrapped(loader)):
            frames = batch[1].to(self.device, non_blocking=True).float()
            tokens = batch[2].to(self.device, non_blocking=True).float() if len(batch) > 2 else None
            yield chunk, frames, tokens


def _worker_errors_unwrapped(loader):
    """The loader's batches; a CacheError raised in a worker comes back as itself, without the "Caught ... in
    DataLoader worker process 0. Original Traceback" text torch wraps around its message."""
    try:
        yield from loader
    except CacheError as err:
        raise type(err)(worker_message(err)) from None


def worker_message(err: BaseException) -> str:
    """The original message of an error that torch re-raised from a DataLoader worker (else its message)."""
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    for name in (f"{type(err).__module__}.{type(err).__qualname__}: ", f"{type(err).__name__}: "):
        at = text.rfind("\n" + name)
        if at >= 0:
            return text[at + 1 + len(name):].strip()
    return text


def make_features(cache: Cache, split: SplitVideos, frames: int, device, mode: str = "auto",
                  tokens: bool = False, workers: int = 2):
    """MemoryFeatures or LazyFeatures for `split` (mode auto: memory when it fits the budget)."""
    device = torch.device(device)
    if tokens and not cache.has_tokens:
        raise CacheError(f"{cache.dir}: this cache has no grid tokens (extract with --tokens grid)")
    chosen = choose_mode(mode, cache, split, tokens, device)
    if chosen == "memory":
        return MemoryFeatures(cache, split, frames, device, tokens)
    return LazyFeatures(cache, split, frames, device, tokens, workers=workers)
