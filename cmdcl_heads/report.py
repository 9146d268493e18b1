"""What a run shows: PNG plots in its folder and rich tables on the terminal (its files: run.py)."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np


def write_outputs(run: Path, logits, split, names, metric, history, best_epoch, trained: bool, split_name: str = "") -> None:
    """curves.png (trained heads only: a zero-shot run has no curve) and confusion.png or per_class_ap.png."""
    from .metrics import confusion_matrix, per_class_ap
    if trained:
        plot_curves(history, metric, run / "curves.png", best_epoch)
    else:
        (run / "curves.png").unlink(missing_ok=True)
    if split.multi_label:
        plot_per_class_ap(per_class_ap(logits, split.targets), names, run / "per_class_ap.png", split_name)
    else:
        cm = confusion_matrix(split.targets, logits.argmax(1), len(names))
        plot_confusion(cm, names, run / "confusion.png", split_name)


# ------------------------------------------------------------------------------------------------ plots

def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], metric: str, path: Path, best_epoch: int | None = None) -> bool:
    """Loss (train, and each evaluated split) and the headline metric of each evaluated split, per epoch.

    Records hold the evaluated splits under "select" (the split that picks best) and "eval" (the
    reported split, for the curves only); a dotted line marks the selected epoch when there is one.
    Without a trained epoch (zero-shot, the L-BFGS linear probe: one record, epoch 0) there is no curve to
    draw: nothing is written, a stale `path` is removed, and False is returned.
    """
    if not any(r.get("epoch", 0) >= 1 for r in history):
        Path(path).unlink(missing_ok=True)
        return False
    parts = [(part, role, color) for part, role, color in (("select", "selection", "tab:orange"),
                                                           ("eval", "eval", "tab:green"))
             if any(part in r for r in history)]
    plt = pyplot()
    # no split evaluated per epoch (no selection split, no --eval-each-epoch): the loss panel alone
    fig, axes = plt.subplots(1, 2 if parts else 1, figsize=(10 if parts else 5.5, 4), layout="constrained",
                             squeeze=False)
    ax_loss, ax_metric = axes[0][0], (axes[0][1] if parts else None)
    pts = [(r["epoch"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    if pts:
        ax_loss.plot(*zip(*pts), marker="o", label="train loss", color="tab:blue")
    for part, role, color in parts:
        rows = [r for r in history if part in r]
        label = f"{rows[0][part]['split']} ({role})"
        for ax, key in ((ax_loss, "eval_loss"), (ax_metric, metric)):
            pts = [(r["epoch"], r[part][key]) for r in rows if r[part].get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=f"{label} loss" if key == "eval_loss" else label)
    if ax_metric is None:
        ax_loss.set_title("no split evaluated per epoch (--eval-each-epoch draws the eval split)", fontsize=9)
    elif best_epoch is not None:
        ax_metric.axvline(best_epoch, color="grey", linestyle=":", label=f"selected epoch {best_epoch}")
    from matplotlib.ticker import MaxNLocator

    for ax, ylabel in ((ax_loss, "loss"), (ax_metric, metric)):
        if ax is None:
            continue
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    save_png(fig, path)
    return True


def save_png(fig, path, dpi: int = 100) -> None:
    """Write (atomically) and close a figure. bbox_inches="tight" grows the canvas to whatever its text needs: a class
    name too long for the layout engine would otherwise be cut at the edge."""
    import warnings

    from cmdcl_cache import write_atomic

    buffer = io.BytesIO()
    with warnings.catch_warnings():   # the layout engine gives up on such a name; the tight box covers it
        warnings.filterwarnings("ignore", message="constrained_layout not applied")
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    pyplot().close(fig)
    write_atomic(Path(path), buffer.getvalue())   # a viewer reloading curves.png mid-run never reads half a file


WRAP_CLASSES, WRAP_WIDTH = 40, 24   # up to 40 classes, names wrap at 24 characters; beyond, one line each


def class_label(name: str, classes: int) -> str:
    """A whole class name for an axis: wrapped onto short lines where the cells are large enough."""
    return textwrap.fill(name, WRAP_WIDTH, break_long_words=False) if classes <= WRAP_CLASSES else name


def confusion_figure(cm: np.ndarray, names: list[str], split: str | None = None):
    """The row-normalised confusion matrix as a matplotlib Figure, readable from 2 to about 200 classes:
    whole class names (wrapped up to 40 classes), the split and its size in the title, values in the cells
    up to 20 classes. The layout engine keeps every label and the title on the canvas."""
    plt = pyplot()
    c = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    size = min(40.0, max(6.0, 0.18 * c + 3))
    fig, ax = plt.subplots(figsize=(size, size), layout="constrained")
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    step = max(1, math.ceil(c / 200))  # every class up to 200 (cells stay ~19 px at this size)
    ticks = np.arange(0, c, step)
    font = 8 if c <= 40 else 7
    labels = [class_label(names[i], c) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels, fontsize=font)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    where = f", {split} split" if split else ""
    ax.set_title(f"confusion matrix{where}: {int(cm.sum())} videos, rows normalised")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, split: str | None = None) -> None:
    """Write `confusion_figure` as a PNG."""
    fig = confusion_figure(cm, names, split)
    save_png(fig, path)


def plot_per_class_ap(ap: np.ndarray, names: list[str], path: Path, split: str | None = None) -> None:
    """Per-class AP sorted from best to worst, whole class names; classes without a positive are left out."""
    plt = pyplot()
    keep = [i for i in np.argsort(-np.nan_to_num(ap, nan=-1)) if not np.isnan(ap[i])]
    c = len(keep)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.16 * c + 1)), layout="constrained")
    ax.barh(np.arange(c), ap[keep], color="tab:blue")
    ax.set_yticks(np.arange(c), [names[i] for i in keep], fontsize=8 if c <= 60 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    where = f", {split} split" if split else ""
    ax.set_title(f"per-class AP{where} (mAP {np.nanmean(ap) if c else float('nan'):.3f})")
    save_png(fig, path)


def plot_probe_sweep(probe: dict, metric: str, path: Path) -> bool:
    """The linear probe's search for l2 (cmdcl_heads/probe.py): validation metric and loss against l2, the
    chosen value marked. Nothing is written (False) when l2 was not searched (no validation split)."""
    sweep = probe.get("sweep") or []
    if not sweep:
        return False
    plt = pyplot()
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    l2 = [r["l2"] for r in sweep]
    for ax, key, label in ((ax_metric, "val_metric", f"{probe['chosen_on']} {metric}"),
                           (ax_loss, "val_loss", f"{probe['chosen_on']} loss")):
        ax.plot(l2, [r[key] for r in sweep], marker="o")
        ax.axvline(probe["l2"], color="grey", linestyle=":", label=f"chosen l2 = {probe['l2']:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("l2 (weight of ||W||^2 / 2)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"linear probe: l2 chosen on {probe['chosen_on']}, then refitted on "
                 f"{' + '.join(probe['fitted_on'])}")
    save_png(fig, path)
    return True


# ------------------------------------------------------------------------------------------------ terminal

def metrics_table(title: str, rows: dict[str, dict], caption: str | None = None):
    """A rich Table: one row per name, one column per metric (caption: e.g. how the checkpoint was chosen)."""
    from rich.table import Table

    table = Table(title=title, caption=caption)
    table.add_column("")
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    for k in keys:
        table.add_column(k, justify="right")
    for name, r in rows.items():
        table.add_row(name, *(_fmt(r.get(k)) for k in keys))
    return table


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
