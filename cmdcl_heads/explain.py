"""One picture of why a CMDCL head predicted what it did for one video.

Four panels: the mediator's attention S over the top-k fine labels (atomic actions) along time; the
top-5 predicted classes (all of them when there are 5 or fewer) with their probabilities; the cross-sample
attention over the top-k entries of the visual dictionary Z along time; the textual intervention's weights
over V_P for the predicted class. Each panel's title gives the k it shows.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch


def _short(text: str, limit: int = 40) -> str:
    """Long label names (COIN steps, demo descriptions) would squeeze the plots: cut them."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def centre_indices(num_frames: int, t: int) -> np.ndarray:
    """TSN evaluation sampling (the trainer's rows): the centre row of each of t equal segments."""
    from cmdcl_heads.data import tsn_indices

    return tsn_indices(num_frames, t, train=False)


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


def explanation_figure(maps: dict[str, np.ndarray], class_names: list[str], fine_names: list[str],
                       times: np.ndarray | None = None, vp_names: list[str] | None = None, top_k: int = 8,
                       title: str = "", truth: str | list[str] | None = None, multi_label: bool = False):
    """The four-panel matplotlib Figure of `plot_explanation`; returns (figure, its title artist).

    Every panel says how many entries it shows (k never exceeds what there is: 3 classes give a top-3
    panel), and the layout engine keeps the (wrapped) title and all labels on the canvas.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logits = maps["logits"]
    if multi_label:
        probs = 1 / (1 + np.exp(-logits))
    else:
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
    truths = set([truth] if isinstance(truth, str) else truth or [])
    steps = len(next(iter(v for k, v in maps.items() if k in ("mediator", "cross_sample")), np.zeros(1)))
    xt = times if times is not None else np.arange(steps)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), gridspec_kw={"width_ratios": [2.2, 1]}, layout="constrained")

    def heat(ax, w, names, what):
        order = _top(w, min(top_k, w.shape[1]))
        im = ax.imshow(w[:, order].T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(order)), [_short(names[i]) for i in order], fontsize=8)
        ticks = np.linspace(0, w.shape[0] - 1, min(8, w.shape[0])).astype(int)
        ax.set_xticks(ticks, [f"{xt[i]:.1f}" if times is not None else f"{xt[i]:.0f}" for i in ticks], fontsize=8)
        ax.set_xlabel("time (s)" if times is not None else "sampled frame")
        ax.set_title(what.format(k=len(order)), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.03)

    def missing(ax, what):
        ax.text(0.5, 0.5, f"{what}: switched off", ha="center", va="center")
        ax.axis("off")

    if "mediator" in maps:
        heat(axes[0, 0], maps["mediator"], fine_names, "mediator S: top-{k} atomic actions over time")
    else:
        missing(axes[0, 0], "mediator")
    top = np.argsort(-probs, kind="stable")[:min(5, len(probs))]
    ax = axes[0, 1]
    ax.barh(range(len(top))[::-1], probs[top], color=["tab:green" if class_names[i] in truths else "tab:blue"
                                                      for i in top])
    ax.set_yticks(range(len(top))[::-1], [f"{_short(class_names[i])} ({logits[i]:.1f})" for i in top],
                  fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_title(f"top-{len(top)} of {len(probs)} classes: probability (logit)" +
                 (f"\ntruth: {_short(', '.join(sorted(truths)), 45)}" if truths else ""), fontsize=10)
    if "cross_sample" in maps:
        z_names = [f"z{i}" for i in range(maps["cross_sample"].shape[1])]
        heat(axes[1, 0], maps["cross_sample"], z_names, "cross-sample approximator: top-{k} entries of Z")
    else:
        missing(axes[1, 0], "cross-sample term")
    ax = axes[1, 1]
    if "tci_pred" in maps:
        w = maps["tci_pred"]
        order = np.argsort(-w, kind="stable")[:top_k]
        names = vp_names or [f"b{i}" for i in range(len(w))]
        ax.barh(range(len(order))[::-1], w[order])
        ax.set_yticks(range(len(order))[::-1], [_short(names[i]) for i in order], fontsize=8)
        ax.set_title(f"textual intervention: top-{len(order)} V_P weights\nfor '{_short(class_names[top[0]], 30)}'",
                     fontsize=10)
    else:
        missing(ax, "textual intervention")
    return fig, fig.suptitle(textwrap.fill(title, 110))


def plot_explanation(maps: dict[str, np.ndarray], class_names: list[str], fine_names: list[str],
                     out: str | Path, times: np.ndarray | None = None, vp_names: list[str] | None = None,
                     top_k: int = 8, title: str = "", truth: str | list[str] | None = None,
                     multi_label: bool = False) -> Path:
    """Write the four-panel PNG of `explanation_figure`; `maps` as returned by `explain_video`."""
    from .report import save_png

    fig, _ = explanation_figure(maps, class_names, fine_names, times, vp_names, top_k, title, truth, multi_label)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out, dpi=110)
    return out


def explain_run(run: str | Path, video_id: str, out: str | Path | None = None, checkpoint: str = "best",
                cache: str | None = None, dataset: str | None = None, device: str = "auto",
                top_k: int = 8) -> Path:
    """The PNG for one video of a trained `cmdcl` run (default: RUN/explain-VIDEO.png)."""
    from cmdcl_heads.confounders import Confounders
    from cmdcl_heads.data import check_finite
    from cmdcl_heads.evaluate import open_run

    r = open_run(run, checkpoint, cache, dataset, device)
    if r.cfg.model != "cmdcl":
        raise ValueError(f"{run}: explain draws CMDCL attention maps, this run trained '{r.cfg.model}'")
    cache_ = r.data.cache
    if video_id not in cache_:
        raise ValueError(f"{r.data.folder}: video {video_id!r} is not in the cache")
    feats = np.asarray(cache_.features(video_id))
    check_finite(cache_, video_id, feats)
    tokens = cache_.tokens(video_id) if r.ckpt.meta["tokens"] else None
    maps, idx = explain_video(r.head, feats, tokens, r.cfg.frames)
    _, times = cache_.frame_info(video_id)
    man, labels = r.data.manifest, r.data.labels
    fine_names = labels.fine_names
    if "mediator" in maps and maps["mediator"].shape[1] != len(fine_names):
        fine_names = list(labels.names)  # no finer set: the mediator read the target labels
    vp_names = None
    conf_path = r.data.folder.confounders_path
    if "tci" in maps and conf_path.exists():
        conf = Confounders.load(conf_path)
        if conf.vp_labels and conf.settings.get("label_set") in man.label_sets:
            ls = man.label_sets[conf.settings["label_set"]]
            vp_names = [ls.names[ls.index(k)] for k in conf.vp_labels]
    record = man.by_id().get(video_id)
    truth = None
    if record is not None and labels.label_set in record.labels:
        ls = man.label_sets[labels.label_set]
        value = record.labels[labels.label_set]
        truth = [ls.names[ls.index(k)] for k in ([value] if isinstance(value, str) else value)]
    if out is None:   # a video id is not a file name: export's safe name for it (any id, any length)
        from cmdcl_cache.export import file_names
        out = Path(run) / f"explain-{file_names([video_id])[video_id]}.png"
    out = Path(out)
    return plot_explanation(maps, list(labels.names), fine_names, out, times=times[idx], vp_names=vp_names,
                            top_k=top_k, title=f"{video_id} ({man.dataset}, {checkpoint})", truth=truth,
                            multi_label=labels.multi_label)
