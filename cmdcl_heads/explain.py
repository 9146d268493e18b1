"""One picture of why a CMDCL head predicted what it did for one video (a cached id or a video file).

Four panels: the mediator's attention S over the top-k fine labels (atomic actions) along time; the
top-5 predicted classes (all of them when there are 5 or fewer) with their probabilities, the true ones in
green (legend); the approximator's attention along time, over the top-k entries of the visual dictionary Z
(the dictionary approximator) or of the debiased texts T' (the figure-4 approximator, no Z), whichever the
run's head has; the textual intervention's weights over V_P for the predicted class. Each panel's title
gives the k it shows, each colour bar says what it measures.

Dictionary entries are named by their nearest label text (cosine with the head's own label table: its fine
vocabulary, else its target labels), e.g. "z3 ~ crack egg (0.41)"; V_P entries of class prototypes by their
class. A video file (not in any manifest) is decoded and encoded as the run's cache was, as
`predict --video` does; an unknown id gets the closest ids of the cache.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def _short(text: str, limit: int = 40) -> str:
    """Long label names (COIN steps, demo descriptions) would squeeze the plots: cut them. A trailing number
    in brackets ('z3 ~ crack egg (0.41)': the similarity) is kept: the name before it is cut."""
    if len(text) <= limit:
        return text
    name, bracket, number = text.rpartition(" (")
    if bracket and number.endswith(")") and len(number) + 3 < limit:
        return name[:limit - len(number) - 3] + "…" + bracket + number
    return text[:limit - 1] + "…"


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


def _class_panel(ax, probs, logits, top, class_names, truths) -> None:
    from matplotlib.patches import Patch

    is_true = [class_names[i] in truths for i in top]
    ax.barh(range(len(top))[::-1], probs[top], color=["tab:green" if t else "tab:blue" for t in is_true])
    ax.set_yticks(range(len(top))[::-1], [f"{_short(class_names[i])} ({logits[i]:.1f})" for i in top],
                  fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    ax.legend(handles=[Patch(color="tab:green", label="truth"), Patch(color="tab:blue", label="not the truth")]
              if truths else [Patch(color="tab:blue", label="truth unknown")], fontsize=7, loc="lower right")
    ax.set_title(f"top-{len(top)} of {len(probs)} classes: probability (logit)" +
                 (f"\ntruth: {_short(', '.join(sorted(truths)), 45)}" if truths else ""), fontsize=10)


def nearest_names(entries, texts, names: list[str], prefix: str) -> list[str]:
    """'z3 ~ crack egg (0.41)': each dictionary entry with the label text nearest to it by cosine."""
    from .layers import normalise

    sim = normalise(torch.as_tensor(entries).float()) @ normalise(torch.as_tensor(texts).float()).T
    best, which = sim.max(dim=1)
    return [f"{prefix}{i} ~ {_short(names[j], 28)} ({b:.2f})" for i, (b, j) in enumerate(zip(best.tolist(),
                                                                                           which.tolist()))]


def explanation_figure(maps: dict[str, np.ndarray], class_names: list[str], fine_names: list[str],
                       times: np.ndarray | None = None, vp_names: list[str] | None = None, top_k: int = 8,
                       title: str = "", truth: str | list[str] | None = None, multi_label: bool = False,
                       z_names: list[str] | None = None):
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
    steps = len(next(iter(v for k, v in maps.items() if k in ("mediator", "cross_sample", "approximator")),
                     np.zeros(1)))
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
        fig.colorbar(im, ax=ax, fraction=0.03, label="attention weight (sums to 1 over all entries)")

    def missing(ax, what):
        ax.text(0.5, 0.5, f"{what}: switched off", ha="center", va="center")
        ax.axis("off")

    if "mediator" in maps:
        heat(axes[0, 0], maps["mediator"], fine_names, "mediator S: top-{k} atomic actions over time")
    else:
        missing(axes[0, 0], "mediator")
    top = np.argsort(-probs, kind="stable")[:min(5, len(probs))]
    _class_panel(axes[0, 1], probs, logits, top, class_names, truths)
    if "cross_sample" in maps:
        names = z_names or [f"z{i}" for i in range(maps["cross_sample"].shape[1])]
        heat(axes[1, 0], maps["cross_sample"], names, "approximator over the frame dictionary Z: top-{k} entries")
    elif "approximator" in maps:   # the figure-4 approximator reads T' (one entry per class), no Z
        heat(axes[1, 0], maps["approximator"], class_names, "approximator over the debiased texts T': top-{k}")
    else:
        missing(axes[1, 0], "approximator (cross-sample term)")
    ax = axes[1, 1]
    if "tci_pred" in maps:
        w = maps["tci_pred"]
        order = np.argsort(-w, kind="stable")[:top_k]
        names = vp_names or [f"b{i}" for i in range(len(w))]
        ax.barh(range(len(order))[::-1], w[order])
        ax.set_yticks(range(len(order))[::-1], [_short(names[i]) for i in order], fontsize=8)
        ax.set_xlabel("weight A*P(b) (sums to 1 over V_P)")
        ax.set_title(f"textual intervention: top-{len(order)} V_P weights\nfor '{_short(class_names[top[0]], 30)}'",
                     fontsize=10)
    else:
        missing(ax, "textual intervention")
    return fig, fig.suptitle(textwrap.fill(title, 110))


def plot_explanation(maps: dict[str, np.ndarray], class_names: list[str], fine_names: list[str],
                     out: str | Path, times: np.ndarray | None = None, vp_names: list[str] | None = None,
                     top_k: int = 8, title: str = "", truth: str | list[str] | None = None,
                     multi_label: bool = False, z_names: list[str] | None = None) -> Path:
    """Write the four-panel PNG of `explanation_figure`; `maps` as returned by `explain_video`."""
    from .report import save_png

    fig, _ = explanation_figure(maps, class_names, fine_names, times, vp_names, top_k, title, truth, multi_label,
                                z_names)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out, dpi=110)
    return out


@dataclass
class Subject:
    """What explain draws for one video: its features and what is known about it."""

    features: np.ndarray
    tokens: np.ndarray | None
    times: np.ndarray
    truth: list[str] | None
    title: str
    stem: str            # for the default file name


def cached_subject(r, video_id: str, checkpoint: str) -> Subject:
    """A video of the run's cache (open_run's `r`); an unknown id gets the closest ids of the cache."""
    from cmdcl_cache import file_names

    from .data import check_finite
    from .figures import did_you_mean

    cache_, man = r.data.cache, r.data.manifest
    if video_id not in cache_:
        raise did_you_mean(f"video (id or file) in the cache {r.data.folder}", video_id,
                           [v.video_id for v in man.videos if v.video_id in cache_])
    feats = np.asarray(cache_.features(video_id))
    check_finite(cache_, video_id, feats)
    tokens = cache_.tokens(video_id) if r.ckpt.meta["tokens"] else None
    record, labels, truth = man.by_id().get(video_id), r.data.labels, None
    if record is not None and labels.label_set in record.labels:
        ls = man.label_sets[labels.label_set]
        value = record.labels[labels.label_set]
        truth = [ls.names[ls.index(k)] for k in ([value] if isinstance(value, str) else value)]
    return Subject(feats, tokens, np.asarray(cache_.frame_info(video_id)[1]), truth,
                   f"{video_id} ({man.dataset}, {checkpoint})", file_names([video_id])[video_id])


def file_subject(meta: dict, path: Path, device: str, pretrained: str | None, checkpoint: str) -> Subject:
    """A video file in no manifest, decoded and encoded as the run's cache was (what `predict --video` does)."""
    from cmdcl_cache import encode_files

    [(_, result)] = list(encode_files(meta["cache_provenance"], [path], device, pretrained))
    if isinstance(result, Exception):
        raise ValueError(f"{path}: {type(result).__name__}: {result}")
    return Subject(result.features, result.tokens if meta["tokens"] else None, result.timestamps, None,
                   f"{path.name} (a file, {checkpoint})", path.stem)


def entry_names(head, class_names: list[str], fine_names: list[str]) -> tuple[list[str] | None, list[str] | None]:
    """(V_P names, Z names): each entry with its nearest label of the head's own table (fine, else target)."""
    t, tf = head.tables()
    fine = tf is not None
    table = tf if fine else t
    names = fine_names if fine else class_names
    vp = nearest_names(head.tci.vp, table.detach(), names, "b") if getattr(head, "tci", None) is not None else None
    z = nearest_names(head.z, table.detach(), names, "z") if getattr(head, "z", None) is not None else None
    return vp, z


def prototype_names(r, count: int) -> list[str] | None:
    """V_P entries of class prototypes (confounders.h5 `vp_labels`) named by their class, when the file still
    holds the dictionary the run was trained with (same size)."""
    from cmdcl_heads.confounders import Confounders

    path = r.data.folder.confounders_path
    if not path.exists():
        return None
    conf = Confounders.load(path)
    man = r.data.manifest
    if not conf.vp_labels or len(conf.vp_labels) != count or conf.settings.get("label_set") not in man.label_sets:
        return None
    ls = man.label_sets[conf.settings["label_set"]]
    return [ls.names[ls.index(k)] for k in conf.vp_labels]


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:   # a name too long for the file system (a 300-character id) is no file
        return False


def cached_run(run, video: str, checkpoint: str, cache, dataset, device):
    """The opened run where `video` (also a file here) is an id of its cache: the id wins; else None."""
    from cmdcl_cache import CacheError

    from .evaluate import open_run

    try:
        r = open_run(run, checkpoint, cache, dataset, device)
    except (CacheError, OSError, ValueError, KeyError):   # no cache to ask: the file it is
        return None
    return r if video in r.data.cache else None


def check_cached(r, video: str) -> None:
    """A `video` that is not in the cache: a missing file or a folder gets its own message."""
    from cmdcl_cache import VIDEO_EXTENSIONS

    if video in r.data.cache:
        return
    path = Path(video)
    try:
        folder = path.is_dir()
    except OSError:
        folder = False
    if folder:
        raise ValueError(f"--video {video}: a folder: explain takes one video (a file or an id of the cache)")
    if "/" in video or path.suffix.lower() in VIDEO_EXTENSIONS:
        raise ValueError(f"--video {video}: no such file (and no id of the cache {r.data.folder})")


def explain_run(run: str | Path, video: str, out: str | Path | None = None, checkpoint: str = "best",
                cache: str | None = None, dataset: str | None = None, device: str = "auto",
                top_k: int = 8, pretrained: str | None = None) -> Path:
    """The PNG for one video of a trained `cmdcl` run (default: RUN/explain-VIDEO.png). `video`: an id of the
    run's cache, or a video file (needs only the run folder, and `pretrained` where the cache was made from a
    checkpoint file)."""
    from .evaluate import load_run, open_run

    path = Path(video)
    r = cached_run(run, video, checkpoint, cache, dataset, device) if is_file(path) else \
        open_run(run, checkpoint, cache, dataset, device)
    if r is None:   # a file that is no id of the run's cache (or no cache to ask)
        ckpt, cfg, _, head = load_run(run, checkpoint, device)
        meta = ckpt.meta
        class_names, fine_names = list(meta["label_names"]), list(meta["fine_label_names"])
    else:
        check_cached(r, video)
        cfg, head, meta = r.cfg, r.head, r.ckpt.meta
        class_names, fine_names = list(r.data.labels.names), list(r.data.labels.fine_names)
    if cfg.model != "cmdcl":
        raise ValueError(f"{run}: explain draws CMDCL attention maps, this run trained '{cfg.model}'")
    subject = file_subject(meta, path, device, pretrained, checkpoint) if r is None else \
        cached_subject(r, video, checkpoint)
    maps, idx = explain_video(head, subject.features, subject.tokens, cfg.frames)
    if "mediator" in maps and maps["mediator"].shape[1] != len(fine_names):
        fine_names = class_names  # no finer set: the mediator read the target labels
    vp_names, z_names = entry_names(head, class_names, fine_names)
    if r is not None and vp_names is not None:
        vp_names = prototype_names(r, len(vp_names)) or vp_names
    out = Path(out) if out is not None else Path(run) / f"explain-{subject.stem}.png"
    return plot_explanation(maps, class_names, fine_names, out, times=subject.times[idx], vp_names=vp_names,
                            top_k=top_k, title=subject.title, truth=subject.truth,
                            multi_label=bool(meta["multi_label"]), z_names=z_names)
