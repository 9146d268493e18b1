"""Bookkeeping of the training steps, and the guards that stop a training gone non-finite.

No host synchronisation inside a step: the loss, the skipped-step count, the streak of consecutive bad
steps and the first bad step's parameters are accumulated on the device (`StepStats`); a bad step is
skipped inside the fused AdamW kernel (`found_inf`, as torch's GradScaler does: cmdcl_heads/train.py); the
host reads them once per epoch (and the streak every few steps, to stop a run that only produces
non-finite gradients). `describe_bad` names the model parts a non-finite gradient reached; `check_collapse`
stops a training whose epoch is no result.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .errors import TrainingError


def grad_norms(params) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, per-parameter norms) of the gradients, on the device; a missing gradient counts 0."""
    grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in params]
    per_param = torch.stack(torch._foreach_norm(grads))   # what clip_grad_norm_ computes, one kernel
    return per_param.norm(), per_param


class StepStats:
    """Per-epoch step statistics kept on the device (no host sync per step); `check` stops the training after
    `max_bad` skipped steps in a row."""

    def __init__(self, device, num_params: int, max_bad: int):
        self.max_bad = max_bad
        zero = torch.zeros((), device=device)
        self.loss_sum, self.count, self.skipped = zero.clone(), zero.clone(), zero.clone()
        self.streak, self.worst = zero.clone(), zero.clone()
        self.first_step = torch.full((), -1.0, device=device)
        self.first_params = torch.zeros(num_params, dtype=torch.bool, device=device)

    def add(self, step: int, loss, n: int, bad, bad_params) -> None:
        good = (~bad).float()
        self.loss_sum += torch.where(bad, torch.zeros_like(loss), loss) * n
        self.count += good * n
        self.skipped += bad.float()
        self.streak = (self.streak + 1) * bad.float()
        self.worst = torch.maximum(self.worst, self.streak)
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_params = torch.where(first, bad_params, self.first_params)

    def _bad_names(self, model) -> list[str]:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return [n for n, b in zip(names, self.first_params.tolist()) if b]

    def check(self, epoch: int, step: int | None, model) -> None:
        if self.worst.item() >= self.max_bad:
            where = f"step {step}" if step else "its end"
            raise TrainingError(f"{int(self.worst.item())} steps in a row had a non-finite loss or gradient (epoch "
                                f"{epoch}, {where}; first at step {int(self.first_step.item())}: "
                                f"{describe_bad(self._bad_names(model), model)}): stopping; lower --lr, use "
                                "--precision fp32, or check the cache with `cmdcl-cache verify`; last holds the "
                                "last whole epoch")

    def record(self, model) -> dict:
        count = self.count.item()
        out = {"train_loss": self.loss_sum.item() / count if count else None, "skipped_steps": int(self.skipped.item())}
        if self.first_step.item() >= 0:
            out["nonfinite_grads"] = {"step": int(self.first_step.item()), "params": self._bad_names(model)}
        return out


def describe_bad(bad: list[str], model) -> str:
    """Which parts of the model a non-finite gradient reached: backward carries NaN from the op that made it
    to every parameter used before that op and to none used after it, so in a temporal encoder the deepest
    block named is the one nearest the origin."""
    total = sum(1 for p in model.parameters() if p.requires_grad)
    if not bad:
        return "every gradient finite: the loss itself was not finite, or the norm overflowed"
    parts = list(dict.fromkeys(_model_part(name) for name in bad))
    return f"non-finite in {len(bad)} of {total} parameter tensors: {', '.join(parts)}"


def _model_part(name: str) -> str:
    """'encoder.blocks.3.time.attn.in_proj_weight' -> 'encoder.blocks.3', 'encoder.proj.weight' ->
    'encoder.proj', 'tci.attn.q.weight' -> 'tci', 'log_scale' -> 'log_scale'."""
    bits = name.split(".")
    if bits[0] != "encoder":
        return bits[0]
    return ".".join(bits[:3] if bits[1:2] == ["blocks"] else bits[:2])


def check_collapse(epoch: int, record: dict, model, config: TrainConfig) -> None:
    """Stop a training that collapsed, naming the epoch: every step skipped, weights no longer finite, or a
    non-finite loss on an evaluated split. Such an epoch is never a result (nor a best, nor a last)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    losses = {r["split"]: r["eval_loss"] for r in (record.get("select"), record.get("eval")) if r}
    if record["train_loss"] is None:
        why = f"all {record['skipped_steps']} steps had a non-finite loss or gradient and were skipped"
    elif bad:
        why = f"weights {', '.join(bad[:3])} are no longer finite"
    elif any(not math.isfinite(v) for v in losses.values()):
        why = "; ".join(f"the {k} loss is {v}" for k, v in losses.items() if not math.isfinite(v))
    else:
        return
    raise TrainingError(f"training collapsed in epoch {epoch}: {why} (--lr {config.lr:g}); lower --lr, use "
                        "--precision fp32, or check the cache with `cmdcl-cache verify`; metrics.jsonl has the "
                        "epoch" + (f", last.safetensors the one before ({epoch - 1})" if epoch > 1 else ""))
