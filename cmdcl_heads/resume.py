"""Checkpoints of a training and exact resume (cmdcl_heads/run.py writes and reads the files).

Every checkpoint a training writes holds `checkpoint_meta`: both resolved configurations, the labels, the
cache's provenance, the dataset and the feature dimension; `last` adds the optimizer, the scheduler and the
RNG states. `--resume` continues a run folder's `last` only when it is that folder's, on the same data and
with the same options (those in RESUME_FREE aside), and names every option that differs at once.

Exact resume: the sampling random numbers of epoch e come from a torch.Generator seeded with (seed, e), so
they do not depend on what ran before; dropout's global RNG state, the optimizer and the scheduler are in
`last`. Interrupting after epoch k and resuming gives the metrics of a run never interrupted.
"""

from __future__ import annotations

import math
import random
from dataclasses import fields

import numpy as np
import torch

from .config import RESUME_FREE, HeadConfig, TrainConfig
from .data import RunData
from .errors import TrainingError
from .evaluate import CheckpointMismatch, check_checkpoint, check_own
from .prepare import dataset_ref
from .run import SUMMARY_FILE, Checkpoint, RunFolder, set_rng_state


def seed_everything(seed: int) -> None:
    """The global RNGs (the head's initialisation, dropout): seeded once, then carried in `last`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Sampling RNG of one epoch: depends on (seed, epoch) only, so a resumed run draws the same numbers."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def checkpoint_meta(config: TrainConfig, head: HeadConfig, data: RunData) -> dict:
    """What every checkpoint of this training says about itself: enough to rebuild the head and to check data."""
    labels = data.labels
    return {"head_config": head.to_dict(), "train_config": config.to_dict(), "label_set": labels.label_set,
            "label_names": labels.names, "label_keys": labels.keys, "multi_label": labels.multi_label,
            "fine_label_set": labels.fine_label_set, "fine_label_names": labels.fine_names,
            "cache_provenance": data.cache.provenance, "cache_dir": str(data.folder.path.resolve()),
            "dataset": dataset_ref(config.dataset), "feature_dim": data.cache.feature_dim,
            "tokens": bool(config.tokens)}


def start_or_resume(run: RunFolder, config: TrainConfig, head: HeadConfig, data: RunData) -> Checkpoint | None:
    """Make the claimed run folder ready for this training: `last` to continue with --resume (after its checks;
    None when there is nothing to continue), or a fresh folder (refused when it holds a run)."""
    resumed = None
    if config.resume and not any(run.path.glob("last.*")) and not run.finished:   # killed before a checkpoint
        from cmdcl_cache.progress import console
        console(quiet=config.quiet).print(f"{run}: no checkpoint yet (the run stopped before its first one): "
                                          "starting it from scratch", markup=False)
        run.start_fresh()
    elif config.resume:   # refused before anything in the run folder changes
        resumed = run.load_checkpoint("last")
        check_own(run, "last", resumed.meta)
        check_checkpoint(resumed.meta, data, run.checkpoint_path("last"))
        check_resume_options(resumed.meta, config, head, run.checkpoint_path("last"))
        if run.finished:   # a run killed after its last epoch but before summary.json is finished by this train
            raise TrainingError(f"{run}: the run already finished its {config.epochs} epochs ({SUMMARY_FILE} "
                                "is written)")
    else:
        run.start_fresh()
    return resumed


def restore(ckpt: Checkpoint, run: RunFolder, config: TrainConfig, model, optimizer, scheduler) -> dict:
    """Continue from `last` (already checked against the data and options): its weights, optimizer,
    scheduler and RNGs."""
    model.load_state_dict(ckpt.model)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    set_rng_state(ckpt.rng)
    run.truncate_metrics(ckpt.meta["epoch"])
    best = ckpt.meta["best_value"]
    if not config.quiet:
        from cmdcl_cache.progress import console
        if run.metrics_note:   # the record an interrupted append left half-written
            console().print(run.metrics_note, markup=False)
        console().print(f"resuming {run} after epoch {ckpt.meta['epoch']}", markup=False)
    return {"epoch": ckpt.meta["epoch"], "best_epoch": ckpt.meta["best_epoch"],
            "best_value": -math.inf if best is None else best}


def check_resume_options(meta: dict, config: TrainConfig, head: HeadConfig, where) -> None:
    """Every option that differs from the checkpoint's, named at once (not one per try)."""
    # through from_dict: an option added since the checkpoint was written compares as its default
    before_cfg, now_cfg = HeadConfig.from_dict(meta["head_config"]).to_dict(), head.to_dict()
    derived = {f.name for f in fields(HeadConfig) if not f.metadata.get("cli", True)}
    # over the union of keys; the options the user sets are named before the shapes they imply
    keys = sorted(set(before_cfg) | set(now_cfg), key=lambda k: (k in derived, k))
    changed = [f"head option '{k}' is {before_cfg.get(k)!r} in the checkpoint, {now_cfg.get(k)!r} now"
               for k in keys if before_cfg.get(k) != now_cfg.get(k)]
    before, now = TrainConfig.from_dict(meta["train_config"]).to_dict(), config.to_dict()
    train_keys = [k for k in sorted(set(before) | set(now)) if k not in RESUME_FREE and before.get(k) != now.get(k)]
    changed += [f"option '{k}' is {before.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in train_keys]
    if changed:
        hint = " (the learning-rate schedule depends on --epochs)" if "epochs" in train_keys else ""
        raise CheckpointMismatch(f"{where}: {'; '.join(changed)}{hint}; resume with the same options")
