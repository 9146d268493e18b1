"""Evaluation and prediction of a trained head: used by `train` (its final report), `eval`, `predict`, `explain`.

`load_run(run, checkpoint)` rebuilds the head from the checkpoint's configuration alone and loads its
weights (no cache needed for that); `open_run` then attaches the data the run was trained on, after
checking that the cache and manifest are those of the checkpoint (feature dimension, label names, the
fine vocabulary, the cache's provenance), naming what differs.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cmdcl_cache import provenance_difference
from cmdcl_cache import resolve_device
from cmdcl_cache import CacheError, ProvenanceError
from cmdcl_cache import VIDEO_EXTENSIONS, encode_files, load_manifest, locate, write_atomic

from .config import HeadConfig, TrainConfig
from .data import RunData, SplitVideos, make_features, open_data, tsn_indices
from .metrics import compute_metrics
from .models import build_head
from .run import Checkpoint, RunFolder


class CheckpointMismatch(CacheError):
    """A checkpoint and the cache / manifest it is used with disagree."""


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked for; fp32 (TF32 matmuls on CUDA) otherwise."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (BCE for multi-label). `weights` [B]: mean of weight x cross-entropy over the batch,
    not divided by the batch's weight sum (the weights have mean 1 over the training set, so the loss's scale
    and the learning rate keep their meaning)."""
    if weights is not None:
        return (F.cross_entropy(logits, targets, reduction="none") * weights).mean()
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def predict_logits(model, feats, batch_size: int, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """Logits [N, C] float32 in split order, centre sampling, eval mode."""
    model.eval()
    n = len(feats.split.video_ids)
    out = []
    for _, frames, tokens in feats.batches(batch_size, torch.arange(n), None):
        with autocast(device, precision):
            logits = model(frames, tokens)
        out.append(logits.float().cpu())
    return torch.cat(out).numpy()


def evaluate_logits(logits: np.ndarray, split: SplitVideos) -> dict:
    targets = torch.as_tensor(split.targets)
    loss = float(loss_fn(torch.from_numpy(logits), targets, split.multi_label))
    return {**compute_metrics(logits, split.targets, split.multi_label), "eval_loss": loss}


# ------------------------------------------------------------------------------------------ runs

def load_run(run: str | Path, checkpoint: str = "best", device: str = "cpu"):
    """(Checkpoint, HeadConfig, TrainConfig, head with its weights, in eval mode) from a run folder alone."""
    ckpt = RunFolder(run).load_checkpoint(checkpoint)
    path = RunFolder(run).checkpoint_path(checkpoint)
    try:
        cfg = HeadConfig.from_dict(ckpt.meta["head_config"])
        train_cfg = TrainConfig.from_dict(ckpt.meta["train_config"])
        head = build_head(cfg)
        expected = head.state_dict()
        for name, tensor in ckpt.model.items():   # load_state_dict would cast a wrong dtype silently
            if name in expected and tensor.dtype != expected[name].dtype:
                raise ValueError(f"tensor {name!r} is {tensor.dtype}, the head has {expected[name].dtype}")
        head.load_state_dict(ckpt.model)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointMismatch(f"{path}: its configuration and weights do not make a head "
                                 f"({type(err).__name__}: {str(err)[:300]})") from None
    check_own(RunFolder(run), checkpoint, ckpt.meta)
    check_run_data(RunFolder(run), checkpoint, ckpt.meta)
    return ckpt, cfg, train_cfg, head.to(resolve_device(device)).eval()


def check_own(run: RunFolder, name: str, meta: dict) -> None:
    """Refuse a checkpoint that is not its run folder's (copied from another run); name what differs."""
    problem = run.config_problem()
    if problem:
        raise CheckpointMismatch(f"{problem}; nothing was loaded")
    diff = run.foreign(name, meta)
    if diff:
        raise CheckpointMismatch(f"{run.checkpoint_path(name)}: not this run's checkpoint: {diff}; a checkpoint "
                                 "is used only in the run folder that wrote it (evaluate the other run's folder)")


def check_run_data(run: RunFolder, name: str, meta: dict) -> None:
    """The checkpoint against the data its run folder's config.toml names, where they still exist: the label
    set and its names in the dataset, the cache's provenance (compared by content, not by path: a moved cache
    still matches). Both checkpoints copied in from a run on other data agree with each other, not with this."""

    train = run.read_config()["train"]
    where, label_set = run.checkpoint_path(name), meta["label_set"]
    if not train.get("dataset"):
        return
    try:
        manifest = load_manifest(train["dataset"])
    except (OSError, ValueError, KeyError):
        return   # moved or gone: nothing here to compare against
    named = f"{run.path / 'config.toml'} names the dataset {manifest.root}"
    if label_set not in manifest.label_sets:
        raise CheckpointMismatch(f"{where}: not this run's checkpoint: it was trained on label set {label_set!r}, "
                                 f"which {manifest.root} does not have ({named})")
    check_names(f"{where} (not this run's checkpoint: attribute 'label_names')", meta["label_names"],
                f"label set {label_set!r} of {manifest.root} ({named})", list(manifest.label_sets[label_set].names))
    try:
        folder = locate(train.get("cache") or "", manifest.dataset)
        found = folder.provenance()
    except (OSError, ValueError, CacheError):
        return
    diff = provenance_difference(meta["cache_provenance"], found) if found else None
    if diff:
        raise CheckpointMismatch(f"{where}: not this run's checkpoint: the cache {folder.path} that "
                                 f"{run.path / 'config.toml'} names differs: {diff.replace('expected', 'checkpoint has')}")


def check_checkpoint(meta: dict, data: RunData, where: Path) -> None:
    """Refuse a cache or manifest that is not the one the checkpoint was trained on; name what differs."""
    labels = data.labels
    if meta["feature_dim"] != data.cache.feature_dim:
        raise CheckpointMismatch(f"{where}: feature dimension is {meta['feature_dim']} in the checkpoint but "
                                 f"{data.cache.feature_dim} in the cache {data.folder} (attribute 'feature_dim')")
    if meta["label_set"] != labels.label_set:
        raise CheckpointMismatch(f"{where}: trained on label set {meta['label_set']!r}, asked for "
                                 f"{labels.label_set!r} (attribute 'label_set')")
    check_names(f"{where} (attribute 'label_names')", meta["label_names"],
                f"label set '{labels.label_set}' of {data.manifest.root}", labels.names)
    check_names(f"{where} (attribute 'fine_label_names')", meta["fine_label_names"],
                f"label set '{labels.fine_label_set}' of {data.manifest.root}", labels.fine_names)
    diff = provenance_difference(meta["cache_provenance"], data.cache.provenance)
    if diff:
        raise ProvenanceError(f"{where}: the cache {data.folder} was not the one this checkpoint was trained "
                              f"on: {diff.replace('expected', 'checkpoint has')}")


def check_names(where_a: str, a: list[str], where_b: str, b: list[str]) -> None:
    if list(a) == list(b):
        return
    if len(a) != len(b):
        raise CheckpointMismatch(f"{where_a} has {len(a)} label names, {where_b} has {len(b)}")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    raise CheckpointMismatch(f"{where_a} and {where_b} disagree at label {i}: {a[i]!r} vs {b[i]!r}")


@dataclass
class OpenRun:
    ckpt: Checkpoint
    cfg: HeadConfig
    train: TrainConfig
    head: torch.nn.Module
    data: RunData
    device: torch.device

    def features(self, split: str, skip_missing: bool | None = None, data_mode: str = "auto"):
        """(SplitVideos, features) of `split`, sampled as the run was trained."""
        videos = self.data.split(split, self.train.split_scheme,
                                 self.train.skip_missing if skip_missing is None else skip_missing)
        feats = make_features(self.data.cache, videos, self.cfg.frames, self.device, data_mode,
                              self.ckpt.meta["tokens"], self.train.workers)
        return videos, feats

    def logits(self, feats) -> np.ndarray:
        return predict_logits(self.head, feats, self.train.batch_size, self.device, self.train.precision)


def open_run(run: str | Path, checkpoint: str = "best", cache: str | None = None, dataset: str | None = None,
             device: str = "auto") -> OpenRun:
    ckpt, cfg, train_cfg, head = load_run(run, checkpoint, device)
    meta = ckpt.meta
    data = open_data(cache or meta["cache_dir"], dataset or meta["dataset"], meta["label_set"],
                     meta["fine_label_set"])
    check_checkpoint(meta, data, RunFolder(run).checkpoint_path(checkpoint))
    return OpenRun(ckpt, cfg, train_cfg, head, data, resolve_device(device))


def evaluate_run(run: str | Path, checkpoint: str = "best", split: str | None = None, cache: str | None = None,
                 dataset: str | None = None, device: str = "auto", data_mode: str = "auto",
                 skip_missing: bool | None = None, quiet: bool = False) -> dict:
    """Metrics of a run's checkpoint on a split (default: the split it was evaluated on)."""
    out = evaluate_splits(run, checkpoint, [split] if split else None, cache, dataset, device, data_mode,
                          skip_missing, quiet)
    return next(iter(out.values()))


def evaluate_splits(run: str | Path, checkpoint: str = "best", splits: list[str] | None = None,
                    cache: str | None = None, dataset: str | None = None, device: str = "auto",
                    data_mode: str = "auto", skip_missing: bool | None = None, quiet: bool = False) -> dict:
    """{split: metrics} of a run's checkpoint on several splits (any the manifest declares), one model load;
    default: the split it was evaluated on. The table shows each split's role."""
    from cmdcl_cache.progress import console

    from . import report

    r = open_run(run, checkpoint, cache, dataset, device)
    splits = list(dict.fromkeys(splits or [r.train.eval_split]))
    out, rows = {}, {}
    for split in splits:
        videos, feats = r.features(split, skip_missing, data_mode)
        out[split] = evaluate_logits(r.logits(feats), videos)
        label = f"{split} ({r.data.manifest.role(split)}, {len(videos.video_ids)} videos)"
        rows[label if len(splits) > 1 else checkpoint] = out[split]
    console(quiet=quiet).print(report.metrics_table(
        f"{r.cfg.model} {checkpoint} (epoch {r.ckpt.meta['epoch']}) on {', '.join(splits)}", rows))
    return out


def predict_run(run: str | Path, out: str | Path, top_k: int = 5, checkpoint: str = "best",
                split: str | None = None, cache: str | None = None, dataset: str | None = None,
                device: str = "auto", data_mode: str = "auto", skip_missing: bool | None = None) -> int:
    """Per-video top-k labels with scores (softmax for single-label, sigmoid for multi-label) as JSON Lines."""
    r = open_run(run, checkpoint, cache, dataset, device)
    split = split or r.train.eval_split
    videos, feats = r.features(split, skip_missing, data_mode)
    logits = torch.from_numpy(r.logits(feats))
    labels = r.data.labels
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (vid, top) in enumerate(zip(videos.video_ids, top_labels(logits, labels, top_k))):
        truth = truth_keys(videos.targets[i], labels)
        lines.append(json.dumps({"video_id": vid, "target": truth, "top_k": top}, allow_nan=False) + "\n")
    write_atomic(out, "".join(lines))
    return len(videos.video_ids)


def truth_keys(target, labels) -> str | list[str]:
    """A video's target as label keys: one key (single-label), the list of its positive keys (multi-label)."""
    if labels.multi_label:
        return [labels.keys[j] for j in np.nonzero(target)[0]]
    return labels.keys[int(target)]


def top_labels(logits: torch.Tensor, labels, top_k: int) -> list[list[dict]]:
    """[{rank, id, key, name, score}] per row: softmax scores for single-label sets, sigmoid for multi-label."""
    scores = torch.sigmoid(logits) if labels.multi_label else torch.softmax(logits, dim=1)
    values, ids = scores.topk(min(top_k, scores.shape[1]), dim=1)
    return [[{"rank": r + 1, "id": int(c), "key": labels.keys[c], "name": labels.names[c], "score": round(float(s), 6)}
             for r, (c, s) in enumerate(zip(row_ids.tolist(), row_values.tolist()))]
            for row_ids, row_values in zip(ids, values)]


# ------------------------------------------------------------------------------------------ new files

def video_files(paths) -> list[Path]:
    """The files given, with folders replaced by the video files they hold (sorted, recursively)."""

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not out:
        raise FileNotFoundError(f"no video files in {', '.join(map(str, paths))}")
    return out


def predict_files(run: str | Path, paths, out: str | Path, top_k: int = 5, checkpoint: str = "best",
                  device: str = "auto", pretrained: str | None = None) -> tuple[int, list[tuple[Path, str]]]:
    """Top-k labels of video files that are in no manifest: each is decoded, sampled and encoded exactly as the
    run's cache was (model, weights, preprocessing, sampling from the checkpoint's cache provenance), then
    classified by the run's head. Needs only the run folder (and the weights). Writes JSON Lines, one file a
    line ({"file", "top_k"} or {"file", "error"}); returns (files predicted, [(file, error)])."""


    ckpt, cfg, train_cfg, head = load_run(run, checkpoint, device)
    meta = ckpt.meta
    labels = _Labels(meta["label_names"], meta["label_keys"], meta["multi_label"])
    dev = resolve_device(device)
    files = video_files(paths)
    lines, failed = [], []
    for path, result in encode_files(meta["cache_provenance"], files, str(dev), pretrained):
        if isinstance(result, Exception):
            failed.append((path, f"{type(result).__name__}: {result}"))
            lines.append({"file": str(path), "error": failed[-1][1]})
            continue
        rows = tsn_indices(len(result.features), cfg.frames, train=False)
        frames = torch.from_numpy(result.features[rows].astype(np.float32))[None].to(dev)
        toks = (torch.from_numpy(result.tokens[rows].astype(np.float32))[None].to(dev)
                if meta["tokens"] and result.tokens is not None else None)
        with torch.no_grad(), autocast(dev, train_cfg.precision):
            logits = head(frames, toks).float().cpu()
        lines.append({"file": str(path), "frames": len(result.features), "top_k": top_labels(logits, labels, top_k)[0]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines))
    return len(files) - len(failed), failed


@dataclass
class _Labels:
    names: list[str]
    keys: list[str]
    multi_label: bool
