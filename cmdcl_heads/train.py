"""Training, evaluation and prediction of heads on cached features.

The loop, top to bottom: AdamW (weight decay on matrices only), a per-step schedule of linear warm-up then
cosine decay, bf16 autocast on GPU, gradient clipping, a NaN guard, cross-entropy for single-label and BCE
for multi-label targets, evaluation every `eval_every` epochs, `last.pt` every epoch and `best.pt` as chosen
by the selection rule below.

Model selection never looks at the eval split. `best.pt` is the epoch whose *selection split*
(`select_split`, default `auto` = `val` when the manifest has val videos for the label set and scheme) scores
the highest primary metric; without a selection split (`none`, or `auto` on a manifest without val videos,
e.g. COIN and Breakfast) `best.pt` is simply the last epoch. The eval split is evaluated every epoch only for
the curves in metrics.jsonl; selecting on it (`--select-split test --eval-split test`) is refused, because
the reported number would then be chosen on the data it reports on.

Exact resume: the sampling random numbers of epoch e come from a torch.Generator seeded with (seed, e), so
they do not depend on what ran before; dropout's global RNG state, the optimizer and the scheduler are in
the checkpoint. Interrupting after epoch k and resuming gives the metrics of a run never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cmdcl_cache.manifest import load_manifest
from cmdcl_cache.store import (Cache, CacheError, ProvenanceError, provenance_difference, read_texts,
                               texts_provenance)
from cmdcl_cache.verify import texts_difference

from . import report
from .config import HeadConfig
from .data import SplitVideos, make_features, pair_split, resolve_cache_dir
from .metrics import compute_metrics, confusion_matrix, per_class_ap, primary_metric
from .models import build_head, clamp_logit_scales, is_trainable
from .probe import fit_linear_head

CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, run folder in the way, ...)."""


class CheckpointMismatch(CacheError):
    """A checkpoint and the cache / manifest it is used with disagree."""


@dataclass
class TrainOptions:
    cache: str = ""
    dataset: str = ""
    out: str = ""
    label_set: str | None = None      # None: the manifest's default label set
    split_scheme: str | None = None   # None: the manifest's default scheme
    train_split: str = "train"
    eval_split: str = "test"
    select_split: str = "auto"        # auto | none | train | val | test: the split that picks best.pt
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 1.0               # epochs of linear warm-up (fractions allowed; per step)
    clip_grad: float = 1.0            # max gradient norm; 0 disables
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    data_mode: str = "auto"           # auto | memory | lazy
    workers: int = 2                  # DataLoader workers in lazy mode
    eval_every: int = 1
    amp: bool = True                  # bf16 autocast on GPU
    cudnn_attention: bool = False     # let training use cuDNN's fused attention on GPU (see _attention_kernels)
    tokens: bool | None = None        # grid tokens: None = when the cache has them and the model uses them
    skip_missing: bool = False
    quiet: bool = False
    resume: bool = False              # continue the run in `out` from its last.pt

    @classmethod
    def from_dict(cls, d: dict) -> "TrainOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


SELECT_CHOICES = ("auto", "none", "train", "val", "test")

# These may differ between an interrupted run and its resumption without changing the result.
RESUME_FREE = {"device", "data_mode", "workers", "quiet", "epochs", "eval_every", "resume", "cudnn_attention"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available on this machine")
    return device


def check_select_split(opts: TrainOptions) -> None:
    """Refuse an unknown --select-split and selection on the eval split (before anything is read or written)."""
    if opts.select_split not in SELECT_CHOICES:
        raise TrainingError(f"--select-split {opts.select_split!r}: expected one of {', '.join(SELECT_CHOICES)}")
    if opts.select_split == opts.eval_split:
        raise TrainingError(
            f"--select-split {opts.select_split} is also the --eval-split: choosing best.pt on the split whose "
            "metrics are reported selects the model on its own evaluation data and inflates them. Select on a held-out "
            "split (e.g. --select-split val; give the manifest val videos taken from the training videos) or "
            "pass --select-split none to report the last epoch")


def resolve_select_split(opts: TrainOptions, manifest, label_set: str) -> str | None:
    """The split that picks best.pt, or None (best.pt = last epoch). `auto`: `val` when some val video of the
    split scheme carries a label of `label_set` and val is not the eval split, else None."""
    if opts.select_split == "none":
        return None
    if opts.select_split != "auto":
        return opts.select_split
    has_val = any(label_set in v.labels for v in manifest.select("val", opts.split_scheme))
    return "val" if has_val and opts.eval_split != "val" else None


# ------------------------------------------------------------------------------------------------ context

@dataclass
class Context:
    """The cache, manifest and label texts a run reads, checked against each other."""

    cache_dir: Path
    cache: Cache
    manifest: object
    label_set: str
    label_names: list[str]
    label_keys: list[str]
    multi_label: bool
    text: torch.Tensor                # [C, D] target ensemble
    fine_label_set: str
    fine_text: torch.Tensor           # [Cf, D]


def open_context(cache: str | Path, dataset: str, label_set: str | None,
                 fine_label_set: str | None = None) -> Context:
    cache_dir = resolve_cache_dir(cache)
    c = Cache(cache_dir)
    manifest = load_manifest(dataset)
    label_set = label_set or manifest.default_label_set
    if label_set not in manifest.label_sets:
        raise ValueError(f"{manifest.root}: no label set {label_set!r}; have {', '.join(manifest.label_sets)}")
    fine = fine_label_set or manifest.fine_label_set or label_set
    if fine not in manifest.label_sets:
        raise ValueError(f"{manifest.root}: no fine label set {fine!r}; have {', '.join(manifest.label_sets)}")
    texts_path = cache_dir / "texts.h5"
    texts = read_texts(texts_path)
    diff = texts_difference(c.provenance, texts_provenance(texts_path))
    if diff:  # e.g. texts of another model's weights: zero-shot and T's initialisation would be wrong
        raise ProvenanceError(f"{texts_path}: made with other settings than the frame shards ({diff}); "
                              "rerun `cmdcl-cache texts` with the extraction's options")
    embeddings = {}
    for name in dict.fromkeys((label_set, fine)):
        if name not in texts:
            raise CacheError(f"{texts_path}: no text embeddings for label set {name!r} (has "
                             f"{', '.join(texts) or 'none'}); run `cmdcl-cache texts` with this manifest")
        _check_names(f"{texts_path} label set '{name}'", texts[name].names,
                     f"{manifest.root}/labels.json", manifest.label_sets[name].names)
        emb = torch.from_numpy(np.asarray(texts[name].ensemble, dtype=np.float32))
        if emb.shape[1] != c.feature_dim:
            raise CacheError(f"{texts_path}: text embeddings of {name!r} have dimension {emb.shape[1]}, "
                             f"the frame features {c.feature_dim}")
        embeddings[name] = emb
    ls = manifest.label_sets[label_set]
    return Context(cache_dir=cache_dir, cache=c, manifest=manifest, label_set=label_set,
                   label_names=list(ls.names), label_keys=list(ls.keys), multi_label=ls.multi_label,
                   text=embeddings[label_set], fine_label_set=fine, fine_text=embeddings[fine])


def _check_names(where_a: str, a: list[str], where_b: str, b: list[str]) -> None:
    if list(a) == list(b):
        return
    if len(a) != len(b):
        raise CheckpointMismatch(f"{where_a} has {len(a)} label names, {where_b} has {len(b)}")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    raise CheckpointMismatch(f"{where_a} and {where_b} disagree at label {i}: {a[i]!r} vs {b[i]!r}")


def _use_tokens(opts: TrainOptions, cfg: HeadConfig, cache: Cache) -> bool:
    wants = cfg.model in ("text4vis", "cmdcl")
    if opts.tokens is None:
        return wants and cache.has_tokens
    if opts.tokens and not cache.has_tokens:
        raise CacheError(f"{cache.dir}: --tokens asked for but this cache has no grid tokens")
    return bool(opts.tokens) and wants


def make_model(cfg: HeadConfig, ctx: Context, dataset: str, split_scheme: str | None = None) -> torch.nn.Module:
    """The head of cfg, with the confounder dictionaries when it needs them (a missing file names the
    `cmdcl-heads confounders build` command; a file built from other training videos is refused)."""
    from .confounders import load_for_training

    confounders = (load_for_training(ctx.cache, cfg, dataset, ctx.manifest, split_scheme)
                   if cfg.model == "cmdcl" else None)
    return build_head(cfg, ctx.text, ctx.fine_text, confounders)


# ------------------------------------------------------------------------------------------------ pieces

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Sampling RNG of one epoch: depends on (seed, epoch) only, so a resumed run draws the same numbers."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


MAX_BAD_STEPS = 20  # consecutive non-finite gradients before training stops


def make_optimizer(model, opts: TrainOptions) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]        # matrices decay; biases, norms, scales do not
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _attention_kernels(device: torch.device, allow_cudnn: bool):
    """The attention kernels a training forward (and so its backward) may use.

    On CUDA cuDNN's fused attention is left out unless asked for. Since torch 2.11 it is the default on
    H100/H200, and its bf16 backward has been reported to return NaN gradients for finite inputs (PyTorch
    issue #196678, with an attention mask and sequence lengths of 64 mod 128; other projects report the same
    signature: finite losses, then every gradient NaN at once). Our two bf16 H100 runs (T = 64, no mask)
    stopped that way, while the same training in bf16 on a CPU ran 994 steps without one non-finite
    gradient (BENCHMARKS.md, COIN-sized training); that this kernel caused the GPU failures is our
    inference, not yet a measurement. Flash, memory-efficient and math attention remain. Evaluation is
    forward only and keeps the default choice.
    """
    if device.type != "cuda" or allow_cudnn:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@torch.no_grad()
def predict_logits(model, feats, batch_size: int, device: torch.device, amp: bool) -> np.ndarray:
    """Logits [N, C] float32 in split order, centre sampling, eval mode."""
    model.eval()
    n = len(feats.split.video_ids)
    out = []
    for _, frames, tokens in feats.batches(batch_size, torch.arange(n), None):
        with _autocast(device, amp):
            logits = model(frames, tokens)
        out.append(logits.float().cpu())
    return torch.cat(out).numpy()


def evaluate_logits(logits: np.ndarray, split: SplitVideos) -> dict:
    targets = torch.as_tensor(split.targets)
    loss = float(loss_fn(torch.from_numpy(logits), targets, split.multi_label))
    return {**compute_metrics(logits, split.targets, split.multi_label), "eval_loss": loss}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ checkpoints

def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointMismatch(f"{path}: checkpoint version {ckpt.get('version')!r}, "
                                 f"this code reads {CHECKPOINT_VERSION}")
    return ckpt


def check_checkpoint(ckpt: dict, ctx: Context, where: Path) -> None:
    """Refuse a cache or manifest that is not the one the checkpoint was trained on; name what differs."""
    if ckpt["feature_dim"] != ctx.cache.feature_dim:
        raise CheckpointMismatch(f"{where}: feature dimension is {ckpt['feature_dim']} in the checkpoint but "
                                 f"{ctx.cache.feature_dim} in the cache {ctx.cache_dir} (attribute 'feature_dim')")
    if ckpt["label_set"] != ctx.label_set:
        raise CheckpointMismatch(f"{where}: trained on label set {ckpt['label_set']!r}, asked for "
                                 f"{ctx.label_set!r} (attribute 'label_set')")
    try:
        _check_names(f"{where} (attribute 'label_names')", ckpt["label_names"],
                     f"label set '{ctx.label_set}' of {ctx.manifest.root}", ctx.label_names)
        if "fine_label_names" in ckpt:  # the mediator's vocabulary (older checkpoints lack it)
            _check_names(f"{where} (attribute 'fine_label_names')", ckpt["fine_label_names"],
                         f"label set '{ctx.fine_label_set}' of {ctx.manifest.root}",
                         list(ctx.manifest.label_sets[ctx.fine_label_set].names))
    except CheckpointMismatch as err:
        raise CheckpointMismatch(str(err)) from None
    diff = provenance_difference(ckpt["cache_provenance"], ctx.cache.provenance)
    if diff:
        raise ProvenanceError(f"{where}: the cache {ctx.cache_dir} was not the one this checkpoint was trained "
                              f"on: {diff.replace('expected', 'checkpoint has')}")


# ------------------------------------------------------------------------------------------------ training

def train(opts: TrainOptions, cfg: HeadConfig, on_epoch_end=None) -> dict:
    """Train (or, for zeroshot, only evaluate) and write the run folder; returns summary.json's content.

    `on_epoch_end(epoch, record)` is called after each epoch's checkpoint is written (tests use it to
    interrupt a run).
    """
    if not opts.out:
        raise TrainingError("--out is required (the run folder)")
    check_select_split(opts)
    run = Path(opts.out)
    device = resolve_device(opts.device)
    ctx = open_context(opts.cache, opts.dataset, opts.label_set, cfg.fine_label_set)
    opts.label_set = ctx.label_set
    requested = opts.select_split
    select = resolve_select_split(opts, ctx.manifest, ctx.label_set)
    opts.select_split = select or "none"   # checkpoints record what was used, so resume compares like with like
    tokens = _use_tokens(opts, cfg, ctx.cache)
    cfg.tokens_per_frame = ctx.cache.tokens_per_frame if tokens else 0
    last_path = run / "last.pt"
    start = time.perf_counter()

    seed_everything(opts.seed)
    model = make_model(cfg, ctx, opts.dataset, opts.split_scheme).to(device)
    # linear probe hook: fitted once by L-BFGS (cmdcl_heads/probe.py), then saved and evaluated as zeroshot is
    probe = fit_linear_head(model, ctx, opts, cfg.frames, select) if cfg.model == "linear" else None
    trainable = is_trainable(model) and cfg.model not in ("zeroshot", "linear")
    eval_split = pair_split(ctx.cache, ctx.manifest, opts.eval_split, ctx.label_set, opts.split_scheme,
                            opts.skip_missing)
    eval_feats = make_features(ctx.cache, eval_split, cfg.frames, device, opts.data_mode, tokens, opts.workers)
    console = _console(opts.quiet)
    evaluate = {"eval": (opts.eval_split, eval_split, eval_feats)}
    meta = {"version": CHECKPOINT_VERSION, "head_config": cfg.to_dict(), "train_options": asdict(opts),
            "label_set": ctx.label_set, "label_names": ctx.label_names, "label_keys": ctx.label_keys,
            "multi_label": ctx.multi_label, "fine_label_set": ctx.fine_label_set,
            "fine_label_names": list(ctx.manifest.label_sets[ctx.fine_label_set].names),
            "cache_provenance": ctx.cache.provenance, "cache_dir": str(ctx.cache_dir.resolve()),
            "dataset": _dataset_ref(opts.dataset), "feature_dim": ctx.cache.feature_dim, "tokens": tokens}
    metric = primary_metric(ctx.multi_label)
    skipped = {"eval": len(eval_split.missing)}

    if not trainable:
        # nothing is trained, so nothing is selected: the one model is best.pt and last.pt
        select, opts.select_split = None, "none"
        meta["train_options"] = asdict(opts)
        run.mkdir(parents=True, exist_ok=True)
        (run / report.METRICS_FILE).unlink(missing_ok=True)
        t0 = time.perf_counter()
        record = {"epoch": 0, "train_loss": None, **_evaluate_splits(model, evaluate, opts, device),
                  "eval_seconds": time.perf_counter() - t0}
        if probe:  # linear probe hook
            record.update(train_loss=probe["train_loss"], probe=probe)
        report.append_metrics(run, record)
        ckpt = {**meta, "model": model.state_dict(), "epoch": 0, "best_epoch": 0, "best_value": None}
        _save_atomic(ckpt, last_path)
        _save_atomic(ckpt, run / "best.pt")
        if on_epoch_end:
            on_epoch_end(0, record)
        summary = _finish(run, opts, cfg, ctx, model, eval_feats, eval_split, device, metric, meta, skipped,
                          data_mode=eval_feats.mode, start=start, console=console, trainable_params=0,
                          select=select, requested=requested)
        if probe:  # linear probe hook: what was fitted, and how, beside the metrics
            summary.update(probe=probe, trainable_parameters=probe["parameters"])
            report.write_summary(run, summary)
            report.plot_probe_sweep(probe, metric, run / "probe.png")
        return summary

    if select is not None:
        try:
            select_videos = pair_split(ctx.cache, ctx.manifest, select, ctx.label_set, opts.split_scheme,
                                       opts.skip_missing)
        except (CacheError, ValueError) as err:
            raise type(err)(f"{err} (selection split {select!r}, from --select-split {requested}; "
                            "--select-split none trains without selection)") from None
        skipped["select"] = len(select_videos.missing)
        evaluate["select"] = (select, select_videos, make_features(ctx.cache, select_videos, cfg.frames, device,
                                                                   opts.data_mode, tokens, opts.workers))

    train_split = pair_split(ctx.cache, ctx.manifest, opts.train_split, ctx.label_set, opts.split_scheme,
                             opts.skip_missing)
    skipped["train"] = len(train_split.missing)
    train_feats = make_features(ctx.cache, train_split, cfg.frames, device, opts.data_mode, tokens, opts.workers)
    targets = torch.as_tensor(train_split.targets).to(device)
    steps_per_epoch = math.ceil(len(train_split.video_ids) / opts.batch_size)
    optimizer = make_optimizer(model, opts)
    scheduler = make_scheduler(optimizer, round(opts.warmup * steps_per_epoch), opts.epochs * steps_per_epoch)
    first_epoch, best_value, best_epoch = 1, -math.inf, 0

    if opts.resume:
        ckpt = load_checkpoint(last_path)
        check_checkpoint(ckpt, ctx, last_path)
        _check_resume_options(ckpt, opts, cfg, last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        first_epoch, best_value, best_epoch = ckpt["epoch"] + 1, ckpt["best_value"], ckpt["best_epoch"]
        report.truncate_metrics(run, ckpt["epoch"])
        console.print(f"resuming {run} after epoch {ckpt['epoch']} ("
                      + (f"best {select} {metric} {best_value:.4f} at epoch {best_epoch})" if select
                         else "no selection split: best.pt is the last epoch)"))
    else:
        if last_path.exists():
            raise TrainingError(f"{run}: already holds a run (last.pt); pass --resume to continue it "
                                "or choose another --out")
        run.mkdir(parents=True, exist_ok=True)
        (run / report.METRICS_FILE).unlink(missing_ok=True)
        (run / "best.pt").unlink(missing_ok=True)   # a stale one would stop the first epoch becoming best

    progress = _progress(opts.quiet)
    with progress:
        task = progress.add_task("train", total=(opts.epochs - first_epoch + 1) * steps_per_epoch)
        for epoch in range(first_epoch, opts.epochs + 1):
            model.train()
            gen = epoch_generator(opts.seed, epoch)
            n = len(train_split.video_ids)
            order, offsets = torch.randperm(n, generator=gen), torch.rand(n, cfg.frames, generator=gen)
            t0 = time.perf_counter()
            total, count, skipped_steps, bad_steps, first_bad = 0.0, 0, 0, 0, None
            for step, (pos, frames, toks) in enumerate(train_feats.batches(opts.batch_size, order, offsets), 1):
                y = targets[pos.to(device)]
                with _autocast(device, opts.amp), _attention_kernels(device, opts.cudnn_attention):
                    logits = model(frames, toks)
                loss = loss_fn(logits.float(), y, ctx.multi_label)
                if not torch.isfinite(loss):
                    name = "binary cross-entropy" if ctx.multi_label else "cross-entropy"
                    raise TrainingError(f"{name} loss is {loss.item()} at epoch {epoch}, step {step}/"
                                        f"{steps_per_epoch}: stopping ({_nan_diagnosis(model, frames, logits)};"
                                        " lower --lr, or check the cache for non-finite features); last.pt, "
                                        "if any, holds the last whole epoch")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # the norm before clipping: clipping by a NaN norm would make every gradient NaN and hide
                # which parameters the bad values reached
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                if torch.isfinite(grad_norm):
                    if opts.clip_grad > 0:
                        torch.nn.utils.clip_grads_with_norm_(model.parameters(), opts.clip_grad, grad_norm)
                    optimizer.step()
                    clamp_logit_scales(model)
                    bad_steps = 0
                else:
                    # A finite loss with a non-finite gradient (seen under bf16 on GPU): skip the step, as
                    # AMP's GradScaler does, rather than let one step turn every weight into NaN.
                    bad = _nonfinite_grads(model)
                    first_bad = first_bad or {"step": step, "params": bad}
                    optimizer.zero_grad(set_to_none=True)
                    skipped_steps += 1
                    bad_steps += 1
                    if bad_steps >= MAX_BAD_STEPS:
                        raise TrainingError(f"{bad_steps} steps in a row had a non-finite gradient (epoch "
                                            f"{epoch}, step {step}; {_describe_bad(bad, model)}): stopping; "
                                            "try --no-amp or a lower --lr")
                scheduler.step()
                total += loss.item() * len(pos)
                count += len(pos)
                progress.update(task, advance=1, description=f"epoch {epoch}/{opts.epochs} loss {total / count:.4f}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record = {"epoch": epoch, "train_loss": total / count, "skipped_steps": skipped_steps,
                      "lr": scheduler.get_last_lr()[0], "epoch_seconds": time.perf_counter() - t0}
            if first_bad:
                record["nonfinite_grads"] = first_bad
                console.print(f"epoch {epoch}: skipped {skipped_steps} step(s) with a non-finite gradient (first "
                              f"at step {first_bad['step']}: {_describe_bad(first_bad['params'], model)})")
            if epoch % opts.eval_every == 0 or epoch == opts.epochs:
                t1 = time.perf_counter()
                record.update(_evaluate_splits(model, evaluate, opts, device))
                record["eval_seconds"] = time.perf_counter() - t1
            report.append_metrics(run, record)
            if select is None:
                improved, best_value, best_epoch = True, None, epoch   # no selection: best.pt = last epoch
            else:
                # a metric that is nan (no positives at all) never improves: keep some best.pt anyway
                value = record.get("select", {}).get(metric)
                improved = value is not None and (value > best_value or not (run / "best.pt").exists())
                if improved:
                    best_value, best_epoch = value, epoch
            ckpt = {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(), "epoch": epoch,
                    "best_epoch": best_epoch, "best_value": best_value}
            if improved:  # best.pt first: a kill between the two never leaves last.pt naming a lost best
                _save_atomic(ckpt, run / "best.pt")
            _save_atomic(ckpt, last_path)
            if not opts.quiet:
                shown = " | ".join([f"train loss {record['train_loss']:.4f}"] + [
                    f"{r['split']} {metric} {r[metric]:.4f} loss {r['eval_loss']:.4f}"
                    for r in (record.get("select"), record.get("eval")) if r])
                progress.console.print(f"epoch {epoch}: {shown} ({record['epoch_seconds']:.2f} s)")
            if on_epoch_end:
                on_epoch_end(epoch, record)
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _finish(run, opts, cfg, ctx, model, eval_feats, eval_split, device, metric, meta, skipped,
                   data_mode=train_feats.mode, start=start, console=console, trainable_params=trainable_params,
                   select=select, requested=requested)


def _evaluate_splits(model, evaluate: dict, opts: TrainOptions, device) -> dict:
    """{"select": {"split": name, metrics...}, "eval": {...}} for the splits evaluated each epoch."""
    out = {}
    for part in ("select", "eval"):
        if part in evaluate:
            name, videos, feats = evaluate[part]
            logits = predict_logits(model, feats, opts.batch_size, device, opts.amp)
            out[part] = {"split": name, **evaluate_logits(logits, videos)}
    return out


def _check_resume_options(ckpt: dict, opts: TrainOptions, cfg: HeadConfig, where: Path) -> None:
    before_cfg, now_cfg = ckpt["head_config"], cfg.to_dict()
    if before_cfg != now_cfg:   # over the union of keys: a checkpoint from an older version lacks new ones
        diff = next(k for k in sorted(set(before_cfg) | set(now_cfg)) if before_cfg.get(k) != now_cfg.get(k))
        raise CheckpointMismatch(f"{where}: head option '{diff}' is {before_cfg.get(diff)!r} in the "
                                 f"checkpoint, {now_cfg.get(diff)!r} now; resume with the same options")
    before, now = ckpt["train_options"], asdict(opts)
    for key in sorted(set(before) - RESUME_FREE - {"label_set", "cache", "dataset", "out"}):
        if before.get(key) != now.get(key):
            raise CheckpointMismatch(f"{where}: option '{key}' is {before.get(key)!r} in the checkpoint, "
                                     f"{now.get(key)!r} now; resume with the same options")
    if now["epochs"] != before["epochs"]:
        raise CheckpointMismatch(f"{where}: --epochs {now['epochs']} differs from the interrupted run's "
                                 f"{before['epochs']} (the learning-rate schedule depends on it)")
    if ckpt["epoch"] >= opts.epochs:
        raise TrainingError(f"{where}: the run already finished its {opts.epochs} epochs")


def _nan_diagnosis(model, frames, logits) -> str:
    """Where the non-finite values are: the input, the weights (a previous step), or only this forward."""
    if not torch.isfinite(frames).all():
        return "the input frames hold NaN/Inf"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return f"non-finite weights after the previous step: {', '.join(bad[:3])}"
    return f"weights finite, logits {'finite' if torch.isfinite(logits).all() else 'non-finite'}"


def _nonfinite_grads(model) -> list[str]:
    """Names of the parameters whose gradient holds NaN/Inf, in registration order."""
    return [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]


def _describe_bad(bad: list[str], model) -> str:
    """Which parts of the model a non-finite gradient reached: backward carries NaN from the op that made it
    to every parameter used before that op and to none used after it, so in a temporal encoder the deepest
    block named is the one nearest the origin."""
    total = sum(1 for p in model.parameters() if p.requires_grad)
    if not bad:
        return "every gradient finite, their norm overflowed"
    parts = list(dict.fromkeys(_model_part(name) for name in bad))
    return f"non-finite in {len(bad)} of {total} parameter tensors: {', '.join(parts)}"


def _model_part(name: str) -> str:
    """'encoder.blocks.3.time.attn.in_proj_weight' -> 'encoder.blocks.3', 'encoder.proj.weight' ->
    'encoder.proj', 'tci.attn.q.weight' -> 'tci', 'log_scale' -> 'log_scale'."""
    bits = name.split(".")
    if bits[0] != "encoder":
        return bits[0]
    return ".".join(bits[:3] if bits[1:2] == ["blocks"] else bits[:2])


def _finish(run, opts, cfg, ctx, model, eval_feats, eval_split, device, metric, meta, skipped, *, data_mode,
            start, console, trainable_params, select, requested) -> dict:
    """Re-evaluate best.pt (so summary.json is exactly what `eval` reproduces), write the plots and summary."""
    best = load_checkpoint(run / "best.pt")
    model.load_state_dict(best["model"])
    logits = predict_logits(model, eval_feats, opts.batch_size, device, opts.amp)
    metrics = evaluate_logits(logits, eval_split)
    history = report.read_metrics(run)
    epoch_times = [r["epoch_seconds"] for r in history if r.get("epoch_seconds") is not None]
    at_best = next((r for r in history if r["epoch"] == best["epoch"]), {})
    selection = {"split": select, "metric": metric if select else None, "best_epoch": best["epoch"],
                 "value": best["best_value"] if select else None, "requested": requested,
                 "metrics": _split_part(at_best, "select") if select else None}
    summary = {
        "model": cfg.model, "dataset": meta["dataset"], "label_set": ctx.label_set, "split": opts.eval_split,
        "split_scheme": opts.split_scheme, "checkpoint": "best", "best_epoch": best["epoch"],
        "selection": selection, "primary_metric": metric, "metrics": metrics,
        "last_metrics": _split_part(history[-1], "eval") if history else {},
        "num_eval_videos": len(eval_split.video_ids), "skipped_missing": skipped,
        "epochs": opts.epochs if trainable_params else 0, "data_mode": data_mode, "device": str(device),
        "trainable_parameters": trainable_params, "mean_epoch_seconds": float(np.mean(epoch_times)) if epoch_times else None,
        "seconds_total": time.perf_counter() - start, "head_config": cfg.to_dict(), "cache_dir": meta["cache_dir"],
    }
    _write_outputs(run, logits, eval_split, ctx.label_names, metric, history, best["epoch"] if select else None,
                   opts.eval_split)
    if ctx.multi_label:
        ap = per_class_ap(logits, eval_split.targets)
        summary["per_class_ap"] = {n: (None if np.isnan(v) else float(v)) for n, v in zip(ctx.label_names, ap)}
    report.write_summary(run, summary)
    if select:
        how = f"best.pt = epoch {best['epoch']}, selected by {select} {metric}"
        rows = {f"{opts.eval_split}, best.pt": metrics, f"{opts.eval_split}, last.pt": summary["last_metrics"],
                f"{select} (selection), best.pt": selection["metrics"]}
    else:
        why = ("fitted by L-BFGS, see summary.json 'probe'" if cfg.model == "linear"   # linear probe hook
               else "nothing trained" if not trainable_params else "--select-split none" if requested == "none"
               else "auto: val is the eval split" if opts.eval_split == "val"
               else f"auto: no val videos labelled with '{ctx.label_set}'")
        how = f"best.pt = last epoch {best['epoch']} ({why})"
        rows = {f"{opts.eval_split}, best.pt = last.pt": metrics}
    console.print(report.metrics_table(f"{cfg.model} on {ctx.manifest.dataset}/{ctx.label_set}: "
                                       f"{opts.eval_split} metrics", rows, caption=how))
    console.print(f"run folder: {run}")
    return summary


def _split_part(record: dict, part: str) -> dict:
    """Metrics of one split ("eval" or "select") in a metrics.jsonl record, without the split's name."""
    return {k: v for k, v in record.get(part, {}).items() if k != "split"}


def _write_outputs(run: Path, logits, split: SplitVideos, names, metric, history, best_epoch,
                   split_name: str | None = None) -> None:
    report.plot_curves(history, metric, run / "curves.png", best_epoch)
    if split.multi_label:
        report.plot_per_class_ap(per_class_ap(logits, split.targets), names, run / "per_class_ap.png", split_name)
    else:
        cm = confusion_matrix(split.targets, logits.argmax(1), len(names))
        report.plot_confusion(cm, names, run / "confusion.png", split_name)


def _dataset_ref(dataset: str) -> str:
    """Built-in names stay names; folders become absolute so eval works from another directory."""
    path = Path(dataset)
    return str(path.resolve()) if path.is_dir() and ("/" in dataset or dataset not in ("coin", "breakfast",
                                                                                       "charades", "demo")) else dataset


def _console(quiet: bool):
    from rich.console import Console

    return Console(quiet=quiet)


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=quiet, transient=True)


# ------------------------------------------------------------------------------------------------ eval / predict

def _confounders_in(state: dict, dim: int):
    """Confounders of the shapes a CMDCL checkpoint holds (values come with load_state_dict)."""
    from .confounders import Confounders

    def table(key, prior_key):
        if key in state:
            return state[key].float(), state[prior_key].float().exp()
        return torch.zeros(1, dim), torch.ones(1)   # that part of the head is switched off

    vp, vp_prior = table("tci.vp", "tci.log_prior")
    z, z_prior = table("z", "z_log_prior")
    return Confounders(vp=vp, vp_prior=vp_prior, z=z, z_prior=z_prior)


def _open_run(run: str | Path, checkpoint: str, cache: str | None, dataset: str | None, device: str,
              data_mode: str):
    run = Path(run)
    path = run / f"{checkpoint}.pt"
    ckpt = load_checkpoint(path)
    cfg = HeadConfig.from_dict(ckpt["head_config"])
    opts = TrainOptions.from_dict(ckpt["train_options"])
    ctx = open_context(cache or ckpt["cache_dir"], dataset or ckpt["dataset"], ckpt["label_set"],
                       ckpt["fine_label_set"])
    check_checkpoint(ckpt, ctx, path)
    dev = resolve_device(device)
    if cfg.model == "cmdcl":
        # The dictionaries are buffers of the head: a run evaluates with its own, whatever confounders.h5
        # holds now (rebuilt with other K, or a cache grown by --retry-failed).
        model = build_head(cfg, ctx.text, ctx.fine_text, _confounders_in(ckpt["model"], ctx.text.shape[1]))
    else:
        model = make_model(cfg, ctx, dataset or ckpt["dataset"], opts.split_scheme)
    model = model.to(dev)
    model.load_state_dict(ckpt["model"])
    return ckpt, cfg, opts, ctx, model, dev, data_mode


def evaluate_run(run: str | Path, checkpoint: str = "best", split: str | None = None, cache: str | None = None,
                 dataset: str | None = None, device: str = "auto", data_mode: str = "auto",
                 skip_missing: bool | None = None, quiet: bool = False) -> dict:
    """Metrics of a run's checkpoint on a split (default: the split it was evaluated on)."""
    ckpt, cfg, opts, ctx, model, dev, mode = _open_run(run, checkpoint, cache, dataset, device, data_mode)
    split = split or opts.eval_split
    videos = pair_split(ctx.cache, ctx.manifest, split, ctx.label_set, opts.split_scheme,
                        opts.skip_missing if skip_missing is None else skip_missing)
    feats = make_features(ctx.cache, videos, cfg.frames, dev, mode, ckpt["tokens"], opts.workers)
    metrics = evaluate_logits(predict_logits(model, feats, opts.batch_size, dev, opts.amp), videos)
    _console(quiet).print(report.metrics_table(f"{cfg.model} {checkpoint}.pt (epoch {ckpt['epoch']}) on {split}",
                                               {checkpoint: metrics}))
    return metrics


def predict_run(run: str | Path, out: str | Path, top_k: int = 5, checkpoint: str = "best",
                split: str | None = None, cache: str | None = None, dataset: str | None = None,
                device: str = "auto", data_mode: str = "auto", skip_missing: bool | None = None) -> int:
    """Per-video top-k labels with scores (softmax for single-label, sigmoid for multi-label) as JSON Lines."""
    ckpt, cfg, opts, ctx, model, dev, mode = _open_run(run, checkpoint, cache, dataset, device, data_mode)
    split = split or opts.eval_split
    videos = pair_split(ctx.cache, ctx.manifest, split, ctx.label_set, opts.split_scheme,
                        opts.skip_missing if skip_missing is None else skip_missing)
    feats = make_features(ctx.cache, videos, cfg.frames, dev, mode, ckpt["tokens"], opts.workers)
    logits = torch.from_numpy(predict_logits(model, feats, opts.batch_size, dev, opts.amp))
    scores = torch.sigmoid(logits) if ctx.multi_label else torch.softmax(logits, dim=1)
    k = min(top_k, scores.shape[1])
    values, ids = scores.topk(k, dim=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for i, vid in enumerate(videos.video_ids):
            target = videos.targets[i]
            truth = ([ctx.label_keys[j] for j in np.nonzero(target)[0]] if ctx.multi_label
                     else ctx.label_keys[int(target)])
            fh.write(json.dumps({"video_id": vid, "target": truth, "top_k": [
                {"rank": r + 1, "id": int(c), "key": ctx.label_keys[c], "name": ctx.label_names[c],
                 "score": round(float(s), 6)} for r, (c, s) in enumerate(zip(ids[i].tolist(), values[i].tolist()))]})
                     + "\n")
    return len(videos.video_ids)
