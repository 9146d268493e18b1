"""One picture of why a CMDCL head predicted what it did for one video.

Four panels: the mediator's attention S over the top-k fine labels (atomic actions) along time; the
top-5 predicted classes with their probabilities; the cross-sample attention over the top-k entries of the
visual dictionary Z along time; the textual intervention's weights over V_P for the predicted class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def centre_indices(num_frames: int, t: int) -> np.ndarray:
    """TSN evaluation sampling: the centre frame of each of t equal segments (repeats when t > num_frames)."""
    edges = np.linspace(0, num_frames, t + 1)
    return np.minimum(((edges[:-1] + edges[1:]) / 2).astype(np.int64), num_frames - 1)


@torch.no_grad()
def explain_video(head, features: np.ndarray, tokens: np.ndarray | None = None,
                  frames: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run `head.explain` on one video's cached features; returns (maps without the batch axis, indices)."""
    t = frames or head.cfg.frames
    idx = centre_indices(len(features), t)
    device = next(head.parameters()).device
    x = torch.as_tensor(np.asarray(features, np.float32)[idx], device=device)[None]
    tok = torch.as_tensor(np.asarray(tokens, np.float32)[idx], device=device)[None] if tokens is not None else None
    was_training = head.training
    head.eval()
    try:
        out = head.explain(x, tok)
    finally:
        head.train(was_training)
    maps = {k: v.float().cpu().numpy() for k, v in out.items()}
    return {k: (v if k == "tci" else v[0]) for k, v in maps.items()}, idx


def _top(weights_over_time: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-weights_over_time.mean(axis=0), kind="stable")[:k]


def plot_explanation(maps: dict[str, np.ndarray], class_names: list[str], fine_names: list[str],
                     out: str | Path, times: np.ndarray | None = None, vp_names: list[str] | None = None,
                     top_k: int = 8, title: str = "", truth: str | None = None) -> Path:
    """Write the four-panel PNG; `maps` as returned by `explain_video`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logits = maps["logits"]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    steps = len(next(iter(v for k, v in maps.items() if k in ("mediator", "cross_sample")), np.zeros(1)))
    xt = times if times is not None else np.arange(steps)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), gridspec_kw={"width_ratios": [2.2, 1]})

    def heat(ax, w, names, what):
        order = _top(w, min(top_k, w.shape[1]))
        im = ax.imshow(w[:, order].T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=8)
        ticks = np.linspace(0, w.shape[0] - 1, min(8, w.shape[0])).astype(int)
        ax.set_xticks(ticks, [f"{xt[i]:.0f}" for i in ticks], fontsize=8)
        ax.set_xlabel("time (s)" if times is not None else "sampled frame")
        ax.set_title(what, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.03)

    def missing(ax, what):
        ax.text(0.5, 0.5, f"{what}: switched off", ha="center", va="center")
        ax.axis("off")

    if "mediator" in maps:
        heat(axes[0, 0], maps["mediator"], fine_names, f"mediator S: top-{top_k} atomic actions over time")
    else:
        missing(axes[0, 0], "mediator")
    top5 = np.argsort(-probs, kind="stable")[:5]
    ax = axes[0, 1]
    ax.barh(range(len(top5))[::-1], probs[top5], color=["tab:green" if class_names[i] == truth else "tab:blue"
                                                          for i in top5])
    ax.set_yticks(range(len(top5))[::-1], [f"{class_names[i]} ({logits[i]:.1f})" for i in top5], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_title("top-5 prediction: probability (logit)" + (f"\ntruth: {truth}" if truth else ""), fontsize=10)
    if "cross_sample" in maps:
        z_names = [f"z{i}" for i in range(maps["cross_sample"].shape[1])]
        heat(axes[1, 0], maps["cross_sample"], z_names, f"cross-sample approximator: top-{top_k} entries of Z")
    else:
        missing(axes[1, 0], "cross-sample term")
    ax = axes[1, 1]
    if "tci_pred" in maps:
        w = maps["tci_pred"]
        order = np.argsort(-w, kind="stable")[:top_k]
        names = vp_names or [f"b{i}" for i in range(len(w))]
        ax.barh(range(len(order))[::-1], w[order])
        ax.set_yticks(range(len(order))[::-1], [names[i] for i in order], fontsize=8)
        ax.set_title(f"textual intervention: V_P weights for '{class_names[top5[0]]}'", fontsize=10)
    else:
        missing(ax, "textual intervention")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
