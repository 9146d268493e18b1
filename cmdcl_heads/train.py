"""Training of a head on cached features: `train()`, read top to bottom.

The loop: AdamW (weight decay on matrices only), a per-step schedule of linear warm-up then cosine decay,
fp32 by default (TF32 matmuls on CUDA; `--precision bf16` for bf16 autocast), gradient clipping, a guard
that skips a step whose loss or gradient is not finite, cross-entropy for single-label and BCE for
multi-label targets. After every epoch: the selection split is evaluated, `last` is saved and `best` when
the selection metric improved, the epoch's scalars go to TensorBoard (cmdcl_heads/events.py) and curves.png
is drawn again. At the end `best` is evaluated once on the eval split.

Model selection never looks at the eval split. `best` is the epoch whose *selection split* (`select_split`,
default `auto` = `val` when the manifest has val videos for the label set and scheme) scores the highest
primary metric; without a selection split (`none`, or `auto` on a manifest without val videos, e.g. COIN
and Breakfast) `best` is the last epoch. The eval split is evaluated once, at the end, with `best` (and
every epoch only with --eval-each-epoch, for the curves); selecting on it is refused, because the reported
number would then be chosen on the data it reports on.

No host synchronisation inside a step: what the loop keeps about its steps stays on the device, and a bad
step is skipped inside the fused AdamW kernel; the host reads it once per epoch and the streak of bad steps
every MAX_BAD_STEPS steps, to stop a run that only produces non-finite gradients.

The pieces the loop uses, each in its module: prepare.py (the set-up, all of it checked before the run
folder is touched), resume.py (checkpoint metadata and exact resume: interrupting after epoch k and resuming
gives the metrics of a run never interrupted), optim.py (the optimiser and its schedule), steps.py (step
bookkeeping and the non-finite guards), finish.py (the evaluation at the end, summary.json and the table).
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from . import report
from .config import HeadConfig, TrainConfig
from .data import RunData, open_data
from .evaluate import autocast, evaluate_logits, loss_fn, predict_logits, resolve_device
from .events import RunEvents
from .finish import finish
from .layers import clamp_logit_scales
from .metrics import primary_metric
from .models import HeadInputs, build_head, is_trainable
from .optim import make_optimizer, make_scheduler
from .prepare import Splits, check_select_split, load_confounders, resolve_config
from .probe import fit_linear_head
from .resume import checkpoint_meta, epoch_generator, restore, seed_everything, start_or_resume
from .run import RunFolder
from .steps import StepStats, check_collapse, grad_norms

# names that callers and tests import from here; the modules named own them
from .errors import TrainingError  # noqa: F401
from .prepare import training_weights, warn_one_frame_videos  # noqa: F401
from .steps import describe_bad  # noqa: F401

MAX_BAD_STEPS = 20  # consecutive skipped steps before training stops


# ------------------------------------------------------------------------------------------------ the loop

def train(config: TrainConfig, head: HeadConfig, on_epoch_end=None) -> dict:
    """Train (or, for zeroshot, only evaluate) and write the run folder; returns summary.json's content.

    `on_epoch_end(epoch, record)` is called after each epoch's checkpoints are written (tests use it to
    interrupt a run). Neither configuration is modified: resolved copies are written to config.toml.
    The run folder is locked from its first write to the end (a second train on it exits 2 naming this one).
    """
    run = RunFolder(config.out)
    try:
        return _train(config, head, run, on_epoch_end)
    finally:
        run.release()


def _train(config: TrainConfig, head: HeadConfig, run: RunFolder, on_epoch_end) -> dict:
    check_select_split(config)
    requested = config.select_split
    device = resolve_device(config.device)
    data = open_data(config.cache, config.dataset, config.label_set, head.fine_label_set)
    confounders = load_confounders(data, head, config)
    config, head = resolve_config(config, head, data, confounders)
    splits = Splits.load(data, config, head, device)   # a bad split name or a missing video: nothing written yet
    run.claim(create=not config.resume)
    resumed = start_or_resume(run, config, head, data)
    run.write_config(head, config)
    # a resumed run hides what an interrupted one logged from its first epoch on; a fresh one purges from 0,
    # which writes the SessionLog START TensorBoard's plugin reader needs to do so (cmdcl_heads/events.py)
    with RunEvents(run.path, purge_step=resumed.meta["epoch"] + 1 if resumed else 0) as events:
        return fit(run, config, head, data, confounders, splits, device, resumed, requested, events, on_epoch_end)


def fit(run: RunFolder, config: TrainConfig, head: HeadConfig, data: RunData, confounders, splits: Splits, device,
        resumed, requested: str, events: RunEvents, on_epoch_end=None) -> dict:
    """The head built, trained epoch by epoch (or fitted once) and finished: `train` after its checks."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 = TF32 on CUDA

    seed_everything(config.seed)
    model = build_head(head)
    model.initialise(HeadInputs(text=data.labels.text, fine_text=data.labels.fine_text, confounders=confounders))
    model.to(device)
    meta = checkpoint_meta(config, head, data)
    if not is_trainable(model):   # zero-shot, or the linear probe: no epoch loop
        probe = fit_without_epochs(run, config, head, data, model, splits, meta)
        return finish(run, config, head, data, model, splits, device, trainable_params=0, requested=requested,
                      probe=probe, events=events)

    steps_per_epoch = math.ceil(len(splits.train.video_ids) / config.batch_size)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, round(config.warmup * steps_per_epoch), config.epochs * steps_per_epoch)
    state = {"epoch": 0, "best_epoch": 0, "best_value": -math.inf}
    if resumed is not None:
        state = restore(resumed, run, config, model, optimizer, scheduler)
    metric = primary_metric(data.labels.multi_label)
    progress = progress_bar(config.quiet)
    with progress:
        task = progress.add_task("train", total=(config.epochs - state["epoch"]) * steps_per_epoch)
        for epoch in range(state["epoch"] + 1, config.epochs + 1):
            record = train_epoch(model, splits, optimizer, scheduler, config, epoch, device,
                                 lambda: progress.advance(task))
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                record.update(evaluate_epoch(model, splits, config, device))
            run.append_metrics(record)
            events.epoch(record)
            check_collapse(epoch, record, model, config)   # before the checkpoints: last keeps the epoch before
            value = record.get("select", {}).get(metric)
            # no selection split: best = the last epoch; a nan metric (no positives) never improves
            improved = splits.select is None or (value is not None and (value > state["best_value"]
                                                                        or not run.checkpoint_path("best").exists()))
            if improved:
                state.update(best_epoch=epoch, best_value=None if splits.select is None else value)
            ckpt_meta = {**meta, "epoch": epoch, "best_epoch": state["best_epoch"], "best_value": state["best_value"]}
            if improved:  # best first: a kill between the two never leaves last naming a lost best
                run.save_checkpoint("best", ckpt_meta, model)
            run.save_checkpoint("last", ckpt_meta, model, optimizer, scheduler, with_rng=True)
            report.plot_curves(run.read_metrics(), metric, run.path / "curves.png",
                               state["best_epoch"] if splits.select is not None else None)
            progress.console.print(epoch_line(epoch, config.epochs, record, metric), soft_wrap=True,
                                   markup=False, highlight=False)
            if on_epoch_end:
                on_epoch_end(epoch, record)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return finish(run, config, head, data, model, splits, device, trainable_params=trainable, requested=requested,
                  events=events)


def fit_without_epochs(run: RunFolder, config: TrainConfig, head: HeadConfig, data: RunData, model, splits,
                       meta: dict) -> dict | None:
    """Zero-shot (nothing to fit) or the CLIP paper's linear probe (L-BFGS, l2 chosen on the selection split):
    nothing is selected, so the one model is best and last. Returns the probe's summary, or None."""
    probe = None
    if head.model == "linear":
        probe = fit_linear_head(model, (splits.train, splits.train_feats), splits.select, head.num_classes,
                                data.labels.multi_label, config.batch_size)
    for name in ("last", "best"):
        run.save_checkpoint(name, {**meta, "epoch": 0, "best_epoch": 0, "best_value": None}, model)
    run.truncate_metrics(-1)   # a resumed run wrote its epoch-0 record already: it is written once
    run.append_metrics({"epoch": 0, "train_loss": probe["train_loss"] if probe else None,
                        **({"probe": probe} if probe else {})})
    return probe


def train_epoch(model, splits: Splits, optimizer, scheduler, config: TrainConfig, epoch: int, device,
                advance) -> dict:
    """One pass over the training split; the host waits on the device only at the end (see module doc)."""
    model.train()
    n = len(splits.train.video_ids)
    gen = epoch_generator(config.seed, epoch)
    order = torch.randperm(n, generator=gen)
    offsets = torch.rand(n, splits.train_feats.frames, generator=gen).to(device)   # one copy an epoch
    params = [p for p in model.parameters() if p.requires_grad]
    stats = StepStats(device, len(params), MAX_BAD_STEPS)
    t0 = time.perf_counter()
    for step, (pos, frames, toks) in enumerate(splits.train_feats.batches(config.batch_size, order, offsets), 1):
        pos = pos.to(device)
        y = splits.targets[pos]
        with autocast(device, config.precision), _attention_kernels(device, config.cudnn_attention):
            logits = model(frames, toks)
        weights = splits.weights[pos] if splits.weights is not None else None
        loss = loss_fn(logits.float(), y, splits.train.multi_label, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm before clipping: clipping by a NaN norm would make every gradient NaN and hide which
        # parameters the bad values reached
        total, per_param = grad_norms(params)
        bad = ~(torch.isfinite(total) & torch.isfinite(loss))
        if config.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, config.clip_grad, total)
        optimizer.found_inf = bad.float()   # the fused AdamW kernel skips the update when it is 1
        optimizer.step()
        clamp_logit_scales(model)
        scheduler.step()
        stats.add(step, loss.detach(), len(pos), bad, ~torch.isfinite(per_param))
        advance()
        if step % MAX_BAD_STEPS == 0:
            stats.check(epoch, step, model)
    stats.check(epoch, None, model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"epoch": epoch, **stats.record(model), "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - t0}


def evaluate_epoch(model, splits: Splits, config: TrainConfig, device) -> dict:
    """{"select": {"split": name, metrics...}} (and "eval" with --eval-each-epoch), after an epoch."""
    out = {}
    t0 = time.perf_counter()
    for part, name, videos, feats in splits.per_epoch(config):
        logits = predict_logits(model, feats, config.batch_size, device, config.precision)
        out[part] = {"split": name, **evaluate_logits(logits, videos)}
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def epoch_line(epoch: int, epochs: int, record: dict, metric: str) -> str:
    parts = [f"epoch {epoch}/{epochs}", f"train loss {record['train_loss']:.4f}"
             if record["train_loss"] is not None else "train loss -"]
    for part in ("select", "eval"):
        r = record.get(part)
        if r:
            label = f"{r['split']} (selects)" if part == "select" else r["split"]
            parts.append(f"{label} {metric} {r[metric]:.4f} loss {r['eval_loss']:.4f}")
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} step(s) skipped (non-finite; first: "
                     f"{', '.join(record['nonfinite_grads']['params'][:3]) or 'loss'})")
    return " | ".join(parts) + f" ({record['epoch_seconds']:.2f} s)"


# ------------------------------------------------------------------------------------------------ pieces

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


def progress_bar(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cmdcl_cache.progress import console
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=quiet, transient=True, console=console(quiet=quiet))
