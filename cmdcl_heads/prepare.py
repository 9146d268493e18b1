"""The set-up of a training, before anything is written: the split that selects best, the configuration
resolved against the data, the dictionaries, and the train, selection and eval splits loaded and checked.

Every refusal here comes before the run folder is touched: a bad split name, selection on the eval split (or
on a split the manifest declares a test split), a single-label set of one class, --tokens without tokens in
the cache, --reweight-strata where it cannot weight anything. What only deserves a warning is said once per
split: classes without a training video, videos of one cached frame under --static-removal, videos with
fewer cached rows than --frames.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import HeadConfig, TrainConfig
from .confounders import load_for_training, needs_z
from .data import RunData, SplitVideos, make_features
from .errors import TrainingError


def check_select_split(config: TrainConfig) -> None:
    """Refuse selection on the eval split (before anything is read or written)."""
    if config.select_split == config.eval_split:
        raise TrainingError(
            f"--select-split {config.select_split} is also the --eval-split: choosing best on the split whose "
            "metrics are reported selects the model on its own evaluation data and inflates them. Select on a held-out "
            "split (e.g. --select-split val; give the manifest val videos taken from the training videos) or "
            "pass --select-split none to report the last epoch")


def resolve_select_split(config: TrainConfig, manifest, label_set: str) -> tuple[str | None, str]:
    """(the split that picks best or None, why), from the manifest's declared splits and their roles.

    `auto`: the splits of role val that have videos of `label_set` under the scheme, minus the eval split;
    "val" when it is one of them, else the first declared. A split named explicitly must exist, and one of
    role test is refused unless --force-select."""
    if config.select_split == "none":
        return None, "--select-split none"
    if config.select_split != "auto":
        role = manifest.role(config.select_split)
        if role == "test" and not config.force_select:
            raise TrainingError(f"--select-split {config.select_split}: {manifest.root}/labels.json declares it a "
                                "test split; selecting on it makes its numbers optimistic. Select on a split of "
                                "role val, or pass --force-select")
        return config.select_split, f"--select-split {config.select_split} (role {role})"
    with_videos = [name for name in manifest.splits_with_role("val")
                   if any(label_set in v.labels for v in manifest.select(name, config.split_scheme))]
    found = [name for name in with_videos if name != config.eval_split]
    if not found:
        if with_videos:   # the only one is being reported on: selecting on it would make its numbers optimistic
            return None, f"auto: the only split of role val ({config.eval_split}) is the eval split"
        return None, "auto: no split of role val has videos of this label set"
    chosen = "val" if "val" in found else found[0]
    return chosen, "auto: the split of role val" + (f" (of {', '.join(found)})" if len(found) > 1 else "")


def load_confounders(data: RunData, head: HeadConfig, config: TrainConfig):
    """The dictionaries when the head reads them (checked against the cache and training videos), else None."""
    if head.model != "cmdcl":
        return None
    return load_for_training(data.cache, head, config.dataset, data.manifest, config.split_scheme)


def resolve_config(config: TrainConfig, head: HeadConfig, data: RunData, conf) -> tuple[TrainConfig, HeadConfig]:
    """Frozen copies with everything the data decides filled in: label sets, selection split, tokens, shapes."""
    cache, labels = data.cache, data.labels
    uses_tokens = head.model in ("text4vis", "cmdcl")
    if config.tokens and not cache.has_tokens:
        raise TrainingError(f"{cache.dir}: --tokens asked for but this cache has no grid tokens")
    tokens = uses_tokens and cache.has_tokens and config.tokens is not False
    select, why = resolve_select_split(config, data.manifest, labels.label_set)
    if not config.quiet:   # the first line of the run: the split that will choose best, and why
        from cmdcl_cache.progress import console
        chooses = f"best = the epoch with the best {select} metric" if select else "best = the last epoch"
        console().print(f"selection: {chooses} ({why}); reported: {config.eval_split}, evaluated once at the end",
                        markup=False)
    trainable = head.model != "zeroshot"
    # paths made absolute: config.toml repeats the run from any working directory
    config = replace(config, label_set=labels.label_set, select_split=(select if trainable else None) or "none",
                     tokens=tokens, cache=str(data.folder.path.resolve()), dataset=dataset_ref(config.dataset),
                     out=str(Path(config.out).resolve()))
    head = replace(head, fine_label_set=labels.fine_label_set, dim=cache.feature_dim, num_classes=len(labels.names),
                   num_fine=len(labels.fine_names) if labels.fine_label_set != labels.label_set else 0,
                   kp=len(conf.vp) if conf is not None and head.tci else 0,
                   kz=len(conf.z) if conf is not None and needs_z(head) else 0,
                   tokens_per_frame=cache.tokens_per_frame if tokens else 0)
    return config, head


@dataclass
class Splits:
    """The train, selection and eval splits of a run, paired with the cache, and their features."""

    train: SplitVideos | None
    train_feats: object
    targets: torch.Tensor | None
    select: tuple | None      # (name, SplitVideos, features)
    eval: tuple               # (name, SplitVideos, features)
    weights: torch.Tensor | None = None   # per training video loss weight (--reweight-strata), else None
    reweighting: dict | None = None       # its summary (strata sizes, weight range)

    @classmethod
    def load(cls, data: RunData, config: TrainConfig, head: HeadConfig, device) -> "Splits":
        def part(name):
            videos = data.split(name, config.split_scheme, config.skip_missing)
            feats = make_features(data.cache, videos, head.frames, device, config.data_mode, config.tokens,
                                  config.workers)
            return name, videos, feats

        if config.reweight_strata and head.model not in ("text4vis", "cmdcl"):
            raise TrainingError(f"--reweight-strata weights the loss of the epoch loop; --model {head.model} has "
                                "none (train text4vis or cmdcl, or pass --reweight-strata 0)")
        check_classes(data, None)
        ev = part(config.eval_split)
        warn_one_frame_videos(ev[0], ev[1], head)
        warn_short_videos(ev[0], ev[1], head)
        if head.model == "zeroshot":
            return cls(None, None, None, None, ev)
        select = part(config.select_split) if config.select_split != "none" else None
        _, train, train_feats = part(config.train_split)
        warn_one_frame_videos(config.train_split, train, head)
        check_classes(data, (config.train_split, train))
        warn_short_videos(config.train_split, train, head)
        weights, reweighting = None, None
        if config.reweight_strata:
            weights, reweighting = training_weights(train, train_feats, config, head, device)
        return cls(train, train_feats, torch.as_tensor(train.targets).to(device), select, ev, weights, reweighting)

    def per_epoch(self, config: TrainConfig):
        if self.select is not None:
            yield ("select", *self.select)
        if config.eval_each_epoch:
            yield ("eval", *self.eval)

    def skipped(self) -> dict:
        out = {"eval": len(self.eval[1].missing)}
        if self.train is not None:
            out["train"] = len(self.train.missing)
        if self.select is not None:
            out["select"] = len(self.select[1].missing)
        return out


def check_classes(data: RunData, train: tuple[str, SplitVideos] | None) -> None:
    """A single-label set of one class is refused: softmax over one class is 1 for every video, so nothing is
    learned and every metric is trivially perfect. Classes without a training video are named (a warning):
    the head can learn them from their label texts at most."""
    labels, where = data.labels, f"label set {data.labels.label_set!r} of {data.manifest.root}/labels.json"
    if not labels.multi_label and len(labels.names) < 2:
        raise TrainingError(f"{where} has {len(labels.names)} class ({', '.join(labels.names)}): a single-label "
                            "head scores it 1 for every video, so nothing can be learned or measured; add classes "
                            "or declare the set multi_label (one yes/no score per video)")
    if train is None:
        return
    split, videos = train
    targets = np.asarray(videos.targets)
    counts = targets.sum(axis=0) if labels.multi_label else np.bincount(targets, minlength=len(labels.names))
    empty = [labels.names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        warnings.warn(f"{len(empty)} of {len(labels.names)} classes of {where} have no video in split {split!r}: "
                      f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}; the head learns them from their "
                      "label texts at most", stacklevel=2)


def warn_one_frame_videos(split: str, videos: SplitVideos, head: HeadConfig) -> None:
    """--static-removal leaves a video of one cached frame nothing (the frame is its own mean): say how many."""
    if not head.static_removal:
        return
    n = int((videos.lengths == 1).sum())
    if n:
        warnings.warn(f"--static-removal: {n} of {len(videos.video_ids)} videos of split {split!r} hold one cached "
                      "frame; removing their temporal mean leaves them no input", stacklevel=2)


def warn_short_videos(split: str, videos: SplitVideos, head: HeadConfig) -> None:
    """--frames above a video's cached rows: TSN sampling repeats rows of that video; say for how many videos."""
    short = videos.lengths < head.frames
    if short.any():
        warnings.warn(f"--frames {head.frames}: {int(short.sum())} of {len(videos.video_ids)} videos of split "
                      f"{split!r} have fewer cached rows (shortest {int(videos.lengths.min())}); TSN sampling still "
                      f"takes one row per each of the {head.frames} segments, so their frames repeat", stacklevel=2)


@torch.no_grad()
def training_weights(train: SplitVideos, feats, config: TrainConfig, head: HeadConfig, device):
    """--reweight-strata: (loss weights [N] on the device, summary); cmdcl_heads/debias.py says why."""
    from .debias import stratum_weights

    if train.multi_label:
        raise TrainingError("--reweight-strata needs a single-label target: P(y | z) of a multi-label target is "
                            "not one distribution; train on a single-label set or pass --reweight-strata 0")
    if config.reweight_strata >= len(train.video_ids):
        raise TrainingError(f"--reweight-strata {config.reweight_strata} needs fewer strata than training videos "
                            f"({len(train.video_ids)}): with one video per stratum every weight is 1")
    means = torch.cat([F.normalize(frames.float(), dim=-1).mean(dim=1).cpu()
                       for _, frames, _ in feats.batches(config.batch_size, torch.arange(len(train.video_ids)), None)])
    weights, info = stratum_weights(means.numpy(), np.asarray(train.targets), config.reweight_strata,
                                    head.num_classes, config.seed)
    if info["weight_max"] - info["weight_min"] < 1e-6:
        warnings.warn(f"--reweight-strata {config.reweight_strata}: every weight is 1 ({info['strata']} strata, "
                      "none with a label mix to correct), so the training is unweighted", stacklevel=2)
    return torch.from_numpy(weights).to(device), info


def dataset_ref(dataset: str) -> str:
    """Built-in names stay names; folders become absolute so eval works from another directory."""
    from cmdcl_cache import BUILTIN_DATASETS
    path = Path(dataset)
    return str(path.resolve()) if path.is_dir() and ("/" in dataset or dataset not in BUILTIN_DATASETS) else dataset
