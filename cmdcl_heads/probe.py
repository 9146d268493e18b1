"""The linear probe of the CLIP paper (Radford et al. 2021, appendix A.3): L2-regularised logistic regression
on frozen features, fitted to convergence with L-BFGS, its regularisation strength chosen on a validation split.

Input: one vector per video, the mean of its L2-normalised frames over the T centre-sampled rows, exactly
what `LinearHead` reads at evaluation (cmdcl_heads/models.py), so that the fitted weights go into the head
unchanged. Objective, with x centred on the training mean (an exact reparametrisation that only helps
L-BFGS; the bias absorbs the mean afterwards) and the bias left unpenalised, as in sklearn:

- single-label: multinomial logistic regression, mean_n CE(W x_n + b, y_n) + l2/2 ||W||^2;
- multi-label: one-vs-rest, sum_c [mean_n BCE(w_c x_n + b_c, y_nc) + l2/2 ||w_c||^2], i.e. one independent
  binary problem per class, all with the same l2.

l2 = 1 / (C N) in sklearn's terms. Choice of l2: with a validation split, every value of `L2_GRID`
(1e-6 ... 1, half-decade steps) is fitted on the training videos, from the strongest to the weakest, each
starting from the previous solution; the value with the best validation top-1 (mAP for multi-label) wins,
ties broken by the lower validation loss, then by the larger l2. As in the CLIP paper, the chosen l2 is then
refitted on training + validation videos. Without a validation split, l2 = DEFAULT_L2 = 1e-4 (the value
the grid search picks on the demo set's val split, with the lowest val loss there) on the training videos.

Deterministic: float64 on one CPU thread, zero initialisation, no random numbers. Sizes: a few seconds for
hundreds of videos; one fit of a COIN-sized split (9,030 x 512, 180 classes) takes about 5 s per 20 L-BFGS
iterations on one core, so a grid search there takes minutes.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .metrics import compute_metrics, primary_metric

L2_GRID = tuple(float(10.0 ** (e / 2)) for e in range(-12, 1))   # 1e-6, 3.2e-6, ..., 0.32, 1
DEFAULT_L2 = 1e-4
MAX_ITER = 500


class ProbeError(ValueError):
    """The probe cannot be fitted on these features (non-finite values, no videos)."""


@dataclass
class ProbeFit:
    weight: torch.Tensor            # float32 [C, D]
    bias: torch.Tensor              # float32 [C]
    l2: float                       # the regularisation strength used
    chosen_on: str                  # the split that chose l2, or "default"
    train_loss: float               # cross-entropy (BCE) of the final fit on its videos, without the penalty
    iterations: int                 # L-BFGS iterations of the final fit
    fitted_on: list[str] = field(default_factory=list)   # splits of the final fit
    sweep: list[dict] = field(default_factory=list)      # per l2: val metric, val loss, iterations

    def summary(self) -> dict:
        """Plain numbers for metrics.jsonl and summary.json (no tensors)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("weight", "bias")}
        out["parameters"] = int(self.weight.numel() + self.bias.numel())
        return out


def _objective(x, y, weight, bias, l2: float, multi_label: bool, grad: bool = False):
    """The objective of the module docstring and, with `grad`, its gradients in closed form (no autograd:
    at these sizes autograd's bookkeeping would cost more than the arithmetic)."""
    logits = x @ weight.T + bias
    n = len(x)
    if multi_label:
        data = F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / n
        residual = (torch.sigmoid(logits) - y) / n           # d data / d logits
    else:
        log_p = torch.log_softmax(logits, dim=1)
        data = -log_p.gather(1, y[:, None]).mean()
        residual = log_p.exp()
        residual[torch.arange(n), y] -= 1.0
        residual /= n
    loss = data + 0.5 * l2 * weight.pow(2).sum()
    if not grad:
        return loss
    return loss, residual.T @ x + l2 * weight, residual.sum(dim=0)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, multi_label: bool, l2: float,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = MAX_ITER):
    """Minimise the objective of the module docstring on float64 x [N, D] (already centred) with L-BFGS.

    Returns (weight [C, D], bias [C], final objective, iterations), float64.
    """
    if init is not None:
        weight, bias = init[0].clone(), init[1].clone()
    else:
        weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
        bias = torch.zeros(num_classes, dtype=torch.float64)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        loss, weight.grad, bias.grad = _objective(x, y, weight, bias, l2, multi_label, grad=True)
        return loss

    with _one_thread():
        optimizer.step(closure)
    loss = float(_objective(x, y, weight, bias, l2, multi_label))
    return weight, bias, loss, int(optimizer.state[weight].get("n_iter", 0))


@contextlib.contextmanager
def _one_thread():
    """The fit runs on one CPU thread: the same bits whatever torch's thread setting, and faster here than a
    pool of threads fighting over small matrices (measured: 10x at 60 x 32, 2x at 9,030 x 512 x 180)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_inputs(x, y, multi_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64 if multi_label else torch.int64)
    if x.ndim != 2 or len(x) == 0 or len(y) != len(x):
        raise ProbeError(f"expected features [N, D] with N >= 1 and N targets, got {tuple(x.shape)} and {len(y)}")
    if not torch.isfinite(x).all():
        rows = torch.nonzero(~torch.isfinite(x).all(dim=1)).flatten().tolist()
        raise ProbeError(f"features of {len(rows)} video(s) hold NaN/Inf (rows {rows[:5]})")
    return x, y


def _scores(x, y, centre, weight, bias, l2: float, multi_label: bool) -> tuple[float | None, float]:
    """(primary metric, or None when it is undefined, e.g. mAP without positives; data loss) on held-out
    features. None rather than NaN: the sweep goes into JSON files that jq must read."""
    logits = (x - centre) @ weight.T + bias
    loss = float(_objective(x - centre, y, weight, bias, 0.0, multi_label))
    value = compute_metrics(logits.numpy(), y.numpy(), multi_label)[primary_metric(multi_label)]
    return (None if np.isnan(value) else float(value)), loss


def _rank(record: dict) -> tuple:
    """Sort key of the sweep: the higher metric, then the lower loss, then the larger l2."""
    metric = record["val_metric"]
    return (float("-inf") if metric is None else metric, -record["val_loss"], record["l2"])


def fit_linear_probe(train_x, train_y, num_classes: int, multi_label: bool, val_x=None, val_y=None,
                     grid=L2_GRID, default_l2: float = DEFAULT_L2, val_name: str = "val") -> ProbeFit:
    """Fit the probe of the module docstring on features [N, D] and targets (int [N] or multi-hot [N, C]).

    With `val_x`/`val_y`, l2 is chosen on them over `grid` and refitted on train + val; else `default_l2`.
    """
    x, y = _as_inputs(train_x, train_y, multi_label)
    sweep, chosen_on, l2, fitted_on = [], "default", float(default_l2), ["train"]
    if val_x is not None:
        vx, vy = _as_inputs(val_x, val_y, multi_label)
        centre = x.mean(dim=0)
        init = None
        for value in sorted(grid, reverse=True):   # strongest first: each solution starts the next fit
            weight, bias, _, iterations = fit_logistic(x - centre, y, num_classes, multi_label, value, init)
            init = (weight, bias)
            metric, loss = _scores(vx, vy, centre, weight, bias, value, multi_label)
            sweep.append({"l2": value, "val_metric": metric, "val_loss": loss, "iterations": iterations})
        best = max(sweep, key=_rank)
        chosen_on, l2, fitted_on = val_name, best["l2"], ["train", val_name]
        x, y = torch.cat([x, vx]), torch.cat([y, vy])
    centre = x.mean(dim=0)
    weight, bias, _, iterations = fit_logistic(x - centre, y, num_classes, multi_label, l2)
    loss = float(_objective(x - centre, y, weight, bias, 0.0, multi_label))
    bias = bias - weight @ centre              # undo the centring: W (x - mu) + b = W x + (b - W mu)
    return ProbeFit(weight=weight.float(), bias=bias.float(), l2=l2, chosen_on=chosen_on, train_loss=loss,
                    iterations=iterations, fitted_on=fitted_on, sweep=sweep)


# ------------------------------------------------------------------------------------ the trainer's hook

@torch.no_grad()
def pooled_features(head, feats, batch_size: int = 256) -> torch.Tensor:
    """`head.pooled` of every video of a split, centre-sampled as in evaluation: float32 [N, D] on the CPU."""
    n = len(feats.split.video_ids)
    out = [head.pooled(frames).float().cpu() for _, frames, _ in feats.batches(batch_size, torch.arange(n), None)]
    return torch.cat(out)


def fit_linear_head(head, train, select, num_classes: int, multi_label: bool, batch_size: int = 256) -> dict:
    """Fit the LinearHead `head` on `train` = (SplitVideos, features), with l2 chosen on `select` = (name,
    SplitVideos, features) when there is a selection split, and load the weights into it; returns
    ProbeFit.summary() for metrics.jsonl and summary.json. The data loader has checked every video for NaN."""
    x = pooled_features(head, train[1], batch_size)
    val = (None, None)
    if select is not None:
        val = (pooled_features(head, select[2], batch_size), select[1].targets)
    fit = fit_linear_probe(x, train[0].targets, num_classes, multi_label, *val,
                           val_name=select[0] if select is not None else "val")
    device = head.fc.weight.device
    with torch.no_grad():
        head.fc.weight.copy_(fit.weight.to(device))
        head.fc.bias.copy_(fit.bias.to(device))
    return fit.summary()
