"""The optimiser of the epoch loop and its learning-rate schedule.

AdamW, fused, with weight decay on matrices only (biases, norms and logit scales are not pulled towards 0);
the learning rate is stepped once per training step: linear warm-up over `warmup_steps`, then cosine decay
to 0 at `total_steps`.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel, and a skipped step costs no host sync); matrices decay, the rest not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=True)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """A LambdaLR: `last` keeps its step count, the factor itself is rebuilt from the options on resume."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
