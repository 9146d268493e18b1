"""The CMDCL paper's diagnostic figures (../shared/paper/, README "The paper's diagnostic figures"), on your runs.

Each figure is a PNG with its numbers beside it in a JSON file of the same name (so they can be checked):

- `cooccurrence` (paper fig. 1b, a dataset statistic, no run): for activity a and atomic action f,
  freq[a, f] = (videos of a whose fine labels include f) / (videos of a). A video's fine labels are those of
  its segments in the fine label set; a video without such segments counts the fine labels of its `labels`.
- `similarity` (fig. 5, a cmdcl run): cosine similarity between the atomic-action texts, before and after
  the textual intervention: E (the frozen CLIP texts, what Text4Vis classifies with), T (the learned table)
  and T' = TCI(T). Fine labels are grouped by the activity they belong to: the activity in whose videos they
  occur most often (freq above, over the whole manifest; ties: the first activity), dashed boxes per group.
- `matching` (fig. 1c / 7c, one or two runs): the cross-modal matching probability of each atomic-action text
  with each activity's videos, defined (*inferred*: the paper's text is unavailable, and its numbers do not
  sum to 1 over the texts, so its normalisation differs) as

      P(f | a) = mean over the videos v of activity a (in the split) of softmax_f( s * cos(v, t_f) )

  over ALL fine texts t_f of the vocabulary; v is the head's video feature (cmdcl: V'; text4vis: mean_t X;
  zeroshot / linear: the mean normalised frame), t_f its fine texts (cmdcl: T'_f; the others: the frozen
  CLIP texts E_f), s its logit scale (100 for zeroshot / linear). For each video the probabilities sum to 1
  over the vocabulary, so each activity's row sums to 1 too; the plot shows the texts of the chosen
  activities only.
- `attention` (fig. 7a/b, runs trained on grid tokens): the last temporal layer's spatial attention of the
  frame-feature position over the P patches of each sampled frame (mean over heads), upsampled onto the frame
  as the model saw it (decoded from the video file with the decoder the cache records, resized and cropped
  as the encoder did).

Activities (`--activity`, keys or names, repeatable) default to the first two of the label set that have
videos; an unknown one gets the closest names and exit 2.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import torch

from .layers import cosine_logits, normalise
from .report import pyplot, save_png

DEFAULT_ACTIVITIES = 2


def did_you_mean(what: str, given: str, choices) -> ValueError:
    """The error for an unknown name: the closest known ones (difflib), or a few of them."""
    choices = list(choices)
    close = difflib.get_close_matches(given, choices, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"known: {', '.join(choices[:8])}" + (
        ", ..." if len(choices) > 8 else "")
    return ValueError(f"no {what} {given!r}; {hint}")


def save_figure(fig, out: Path, numbers: dict) -> Path:
    """The PNG, and its numbers as JSON beside it (same name, .json)."""
    from cmdcl_cache import write_atomic


    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out, dpi=110)
    write_atomic(out.with_suffix(".json"), json.dumps(numbers, indent=1, allow_nan=False) + "\n")
    return out


# ---------------------------------------------------------------------------------- co-occurrence (fig. 1b)

def fine_keys_of(record, fine_set: str) -> set[str]:
    """The fine labels of one video: its segments' in `fine_set`, else its labels[fine_set]."""
    keys = {s["label"] for s in record.segments if s["set"] == fine_set}
    if keys:
        return keys
    value = record.labels.get(fine_set, [])
    return {value} if isinstance(value, str) else set(value)


def cooccurrence(manifest, label_set: str | None = None, fine_set: str | None = None,
                 split: str | None = None) -> dict:
    """{activities, fine, videos [A], counts [A, F], freq [A, F]} over the manifest's videos (or one split)."""
    label_set = label_set or manifest.default_label_set
    fine_set = fine_set or manifest.fine_label_set
    if not fine_set or fine_set == label_set:
        raise ValueError(f"{manifest.root}: no fine label set (atomic actions) besides {label_set!r}")
    for name in (label_set, fine_set):
        if name not in manifest.label_sets:
            raise did_you_mean(f"label set of {manifest.root}", name, manifest.label_sets)
    acts, fine = manifest.label_sets[label_set], manifest.label_sets[fine_set]
    records = manifest.select(split) if split else manifest.videos
    counts = np.zeros((len(acts), len(fine)), np.int64)
    videos = np.zeros(len(acts), np.int64)
    for r in records:
        value = r.labels.get(label_set)
        if value is None:
            continue
        held = [fine.index(k) for k in fine_keys_of(r, fine_set)]
        for a in ([value] if isinstance(value, str) else value):
            videos[acts.index(a)] += 1
            counts[acts.index(a), held] += 1
    freq = counts / np.maximum(videos, 1)[:, None]
    return {"label_set": label_set, "fine_set": fine_set, "split": split, "activities": list(acts.names),
            "activity_keys": list(acts.keys), "fine": list(fine.names), "fine_keys": list(fine.keys),
            "videos": videos.tolist(), "counts": counts.tolist(), "freq": freq.tolist()}


def pick_activities(stats: dict, wanted: list[str] | None) -> list[int]:
    """Rows of `stats` named by `wanted` (keys or names); default: the first two with videos."""
    if not wanted:
        rows = [i for i, n in enumerate(stats["videos"]) if n > 0][:DEFAULT_ACTIVITIES]
        if not rows:
            raise ValueError("no video of any activity in the manifest (or split)")
        return rows
    by_name = {**{k: i for i, k in enumerate(stats["activity_keys"])},
               **{n: i for i, n in enumerate(stats["activities"])}}
    rows = []
    for w in wanted:
        if w not in by_name:
            raise did_you_mean("activity", w, list(dict.fromkeys([*stats["activity_keys"], *stats["activities"]])))
        rows.append(by_name[w])
    return list(dict.fromkeys(rows))


def owners(freq: np.ndarray, rows: list[int]) -> tuple[list[int], list[int]]:
    """(fine labels occurring in the chosen activities, the chosen activity each belongs to), grouped:
    ordered by owner (in `rows` order), then by falling frequency. Owner = argmax_a freq[a, f] over `rows`."""
    sub = np.asarray(freq, np.float64)[rows]
    present = np.nonzero(sub.max(axis=0) > 0)[0]
    if not len(present):
        raise ValueError("no atomic action occurs in the chosen activities' videos (the manifest links none: no "
                         "segments or fine labels in those videos)")
    own = sub[:, present].argmax(axis=0)   # first maximum: ties go to the first activity
    order = sorted(range(len(present)), key=lambda j: (own[j], -sub[own[j], present[j]], present[j]))
    return [int(present[j]) for j in order], [int(own[j]) for j in order]


def cooccurrence_figure(stats: dict, rows: list[int], out: Path) -> Path:
    plt = pyplot()
    freq = np.asarray(stats["freq"])
    fine, own = owners(freq, rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(fine) * len(rows) ** 0.5 + 2), 4.5), layout="constrained")
    width = 0.8 / len(rows)
    for k, a in enumerate(rows):
        x = np.arange(len(fine)) + (k - (len(rows) - 1) / 2) * width
        bars = ax.bar(x, freq[a, fine], width, label=f"{stats['activities'][a]} ({stats['videos'][a]} videos)")
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(range(len(fine)), [stats["fine"][f] for f in fine], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of the activity's videos that hold the action")
    ax.set_title(f"co-occurrence of atomic actions per activity ({stats['fine_set']}"
                 + (f", split {stats['split']})" if stats["split"] else ", all videos)"), fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, out, {**stats, "shown_activities": rows, "shown_fine": fine, "owner": [rows[o] for o in own],
                        "definition": "freq[a][f] = counts[a][f] / videos[a]"})


def cooccurrence_run(dataset: str, out: Path, activities: list[str] | None = None, split: str | None = None,
                     label_set: str | None = None) -> Path:
    from cmdcl_cache import load_manifest

    stats = cooccurrence(load_manifest(dataset), label_set, split=split)
    return cooccurrence_figure(stats, pick_activities(stats, activities), out)


# ------------------------------------------------------------------------------------ similarity (fig. 5)

def cosine_matrix(x) -> np.ndarray:
    x = normalise(torch.as_tensor(np.asarray(x, np.float32)))
    return (x @ x.T).numpy()


@torch.no_grad()
def text_tables(head, labels) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(names, {"E": frozen CLIP texts, "T": learned table, "T'": TCI(T)}) of the head's fine vocabulary
    (the target labels where the head has no fine table of its own)."""
    if getattr(head, "tci", None) is None:
        raise ValueError("this run has no textual intervention (a cmdcl head trained with --tci): T' = T, so "
                         "there is nothing to compare")
    t, tf = head.tables()
    fine = tf is not None
    table = tf if fine else t
    names = labels.fine_names if fine else labels.names
    frozen = labels.fine_text if fine else labels.text
    tables = {"E": frozen.float(), "T": table.detach().float().cpu(), "T'": head.tci(table)[0].float().cpu()}
    if not head.cfg.learn_text:
        del tables["T"]   # the table was never trained: T = E
    return list(names), tables


PANEL_TITLES = {"E": "E: frozen CLIP texts (Text4Vis)", "T": "T: learned texts (before TCI)",
                "T'": "T': after TCI (CMDCL)"}


def similarity_figure(names: list[str], tables: dict, groups: list[tuple[str, int, int]], out: Path,
                      title: str) -> Path:
    """One cosine-similarity heat map per table, over the labels `names` (already chosen and ordered);
    `groups` (activity, first, end) draws a dashed box per activity."""
    plt = pyplot()
    mats = {k: cosine_matrix(v) for k, v in tables.items()}
    lo = min(0.0, min(float(m.min()) for m in mats.values()))
    n = len(names)
    size = max(4.0, 0.35 * n + 2)
    fig, axes = plt.subplots(1, len(mats), figsize=(size * len(mats), size), layout="constrained", squeeze=False)
    for ax, (k, m) in zip(axes[0], mats.items()):
        im = ax.imshow(m, vmin=lo, vmax=1.0, cmap="viridis")
        if n <= 30:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] < (lo + 1) / 2 else "black")
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        for _, a, b in groups:
            ax.add_patch(plt.Rectangle((a - 0.5, a - 0.5), b - a, b - a, fill=False, ls="--", lw=1.5, ec="red"))
        ax.set_title(PANEL_TITLES[k], fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, label="cosine similarity")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out, {"labels": names, "groups": [list(g) for g in groups], "definition":
                        "cosine similarity of the L2-normalised label texts", **{k: m.tolist() for k, m in mats.items()}})


def similarity_run(run: Path, out: Path | None = None, activities: list[str] | None = None,
                   checkpoint: str = "best", cache: str | None = None, dataset: str | None = None,
                   device: str = "auto") -> Path:
    from .evaluate import open_run

    r = open_run(run, checkpoint, cache, dataset, device)
    if r.cfg.model != "cmdcl":
        raise ValueError(f"{run}: the text similarity before/after TCI needs a cmdcl run, this one trained "
                         f"'{r.cfg.model}'")
    names, tables = text_tables(r.head, r.data.labels)
    keep, groups = list(range(len(names))), []
    man = r.data.manifest
    fine_set = r.data.labels.fine_label_set
    if r.head.has_fine and fine_set != r.data.labels.label_set:   # grouped by activity through the segments
        stats = cooccurrence(man, r.data.labels.label_set, fine_set)
        rows = pick_activities(stats, activities)
        keep, own = owners(np.asarray(stats["freq"]), rows)
        for k, a in enumerate(rows):
            members = [i for i, o in enumerate(own) if o == k]
            if members:
                groups.append((stats["activities"][a], members[0], members[-1] + 1))
    elif activities:
        raise ValueError(f"{run}: the head has no fine vocabulary of its own, so its labels are not grouped by "
                         "activity; leave out --activity")
    out = Path(out or Path(run) / "figures" / "similarity.png")
    return similarity_figure([names[i] for i in keep], {k: v[keep] for k, v in tables.items()}, groups, out,
                             f"{run} ({checkpoint}): label-text similarity, grouped by activity")


# ------------------------------------------------------------------------------ matching (fig. 1c / 7c)

@torch.no_grad()
def fine_logits(head, model: str, frames, tokens, frozen_fine: torch.Tensor, texts=None) -> torch.Tensor:
    """s * cos(v, t_f) [B, Cf] over the fine texts, with the video feature v, the texts t_f and the scale s
    each head type (`model`, its HeadConfig.model) has (see the module docstring). `texts`: a cmdcl head's
    text_features(), computed once per run rather than per batch (they do not depend on the videos)."""
    if model == "cmdcl":
        t_prime, tf_prime, _ = texts if texts is not None else head.text_features()
        # T'_f where the head has a fine table of its own; otherwise its tf_prime is T' over the classes
        tf = tf_prime if head.has_fine else frozen_fine.to(frames.device)
        v, _, _ = head.video_features(frames, tokens, tf_prime, t_prime=t_prime)
        logits = cosine_logits(head.logit_scale, v, tf)
        if logits.dim() == 3:   # cross_sample_mode backdoor: V'_z per stratum, averaged with P(z) as the head does
            logits = torch.einsum("bzc,z->bc", logits, head.z_log_prior.softmax(0))
        return logits
    tf = frozen_fine.to(frames.device)
    if model == "text4vis":
        x = head.encoder(normalise(frames), normalise(tokens) if tokens is not None else None)
        return cosine_logits(head.log_scale.exp(), x.mean(dim=1), tf)
    return cosine_logits(100.0, normalise(normalise(frames).mean(dim=1)), tf)


def matching_probability(logits: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """P [A, Cf]: row a = mean over the videos of activity a of softmax over the fine texts of their logits.
    `membership` [N, A] (0/1: video n is of activity a; a multi-label video counts for each of its labels)."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    m = np.asarray(membership, np.float64)
    return (m.T @ p) / np.maximum(m.sum(axis=0), 1)[:, None]


def run_matching(run: Path, checkpoint: str, split: str | None, cache, dataset, device: str = "auto") -> dict:
    """{P [A, Cf], fine names, activity names, videos per activity, model} of one run on one split."""
    from .evaluate import open_run

    r = open_run(run, checkpoint, cache, dataset, device)
    labels = r.data.labels
    if labels.fine_label_set == labels.label_set:
        raise ValueError(f"{run}: the manifest has no fine label set (atomic actions) besides {labels.label_set!r}")
    split = split or r.train.eval_split
    videos, feats = r.features(split)
    r.head.eval()
    with torch.no_grad():
        texts = r.head.text_features() if r.cfg.model == "cmdcl" else None
    logits = torch.cat([fine_logits(r.head, r.cfg.model, f, t, labels.fine_text, texts).float().cpu()
                        for _, f, t in feats.batches(r.train.batch_size, torch.arange(len(videos.video_ids)), None)])
    targets = np.asarray(videos.targets)
    membership = targets if videos.multi_label else np.eye(len(labels.names))[targets]
    return {"run": str(run), "model": r.cfg.model, "split": split, "fine": list(labels.fine_names),
            "activities": list(labels.names), "activity_keys": list(labels.keys),
            "videos": membership.sum(axis=0).astype(int).tolist(),
            "P": matching_probability(logits.numpy(), membership).tolist(), "manifest": r.data.manifest,
            "fine_set": labels.fine_label_set, "label_set": labels.label_set}


def matching_figure(results: list[dict], rows: list[int], fine: list[int], out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 0.45 * len(fine) * len(rows) + 2),
                             layout="constrained", squeeze=False, sharey=True)
    names = results[0]["fine"]
    height = 0.8 / len(rows)
    for ax, res in zip(axes[0], results):
        p = np.asarray(res["P"])
        for k, a in enumerate(rows):
            y = np.arange(len(fine))[::-1] + (k - (len(rows) - 1) / 2) * height
            bars = ax.barh(y, p[a, fine], height, label=f"{res['activities'][a]} ({res['videos'][a]} videos)")
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_yticks(np.arange(len(fine))[::-1], [names[f] for f in fine], fontsize=8)
        ax.set_xlabel("mean softmax over all fine texts (inferred definition)")
        ax.set_title(f"{res['model']}: {Path(res['run']).name} ({res['split']})", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("cross-modal matching probability of atomic-action texts with each activity's videos", fontsize=10)
    return save_figure(fig, out, {"definition": "P[a][f] = mean over the videos of activity a of softmax_f(s cos(v, t_f)) "
                                      "over all fine texts (inferred)", "shown_activities": rows,
                        "shown_fine": fine, "runs": [{k: v for k, v in r.items() if k != "manifest"}
                                                     for r in results]})


def matching_run(runs: list[Path], out: Path | None = None, activities: list[str] | None = None,
                 split: str | None = None, checkpoint: str = "best", cache: str | None = None,
                 dataset: str | None = None, device: str = "auto") -> Path:
    if not 1 <= len(runs) <= 2:
        raise ValueError(f"give one run, or two to compare side by side (got {len(runs)})")
    results = [run_matching(run, checkpoint, split, cache, dataset, device) for run in runs]
    if len(results) == 2 and (results[0]["fine"] != results[1]["fine"]
                              or results[0]["activities"] != results[1]["activities"]):
        raise ValueError(f"{runs[0]} and {runs[1]} do not share their labels: compare runs of one dataset")
    first = results[0]
    stats = cooccurrence(first["manifest"], first["label_set"], first["fine_set"])
    rows = pick_activities({**stats, "videos": first["videos"]}, activities)
    empty = [first["activities"][a] for a in rows if first["videos"][a] == 0]
    if empty:   # a zero row would read as "never matched"
        raise ValueError(f"no video of activity {', '.join(map(repr, empty))} in the split {first['split']!r}; "
                         "choose another --activity or --split")
    fine, _ = owners(np.asarray(stats["freq"]), rows)
    out = Path(out or Path(runs[-1]) / "figures" / "matching.png")
    return matching_figure(results, rows, fine, out)


# ------------------------------------------------------------------------------- spatial attention (fig. 7)

def check_spatial(head, where) -> None:
    """Exit-2 reasons why a head has no spatial attention to show."""
    encoder = getattr(head, "encoder", None)
    if encoder is None or encoder.space_pos is None:
        raise ValueError(f"{where}: this head has no spatial attention: it was trained on frame features only "
                         "(extract the cache with --tokens grid and train with --tokens)")
    if not len(encoder.blocks):
        raise ValueError(f"{where}: this head has no spatial attention: it has no temporal layers (--layers 0)")


@torch.no_grad()
def spatial_attention(head, frames: torch.Tensor, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(attention [B, T, P] of the frame-feature position over the patches, its weight on itself [B, T]) in the
    last layer's spatial attention, mean over heads; per frame, the two sum to 1. Read with hooks on the
    head's own forward pass, so what is shown is what the prediction used."""
    attn = head.encoder.blocks[-1].space.attn
    seen = []

    def ask_weights(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

    def keep(module, args, output):
        seen.append(output[1])

    hooks = [attn.register_forward_pre_hook(ask_weights, with_kwargs=True), attn.register_forward_hook(keep)]
    try:
        head.eval()(frames, tokens)
    finally:
        for h in hooks:
            h.remove()
    b, t = frames.shape[:2]
    w = seen[-1].float().cpu().reshape(b, t, *seen[-1].shape[1:])[:, :, 0]   # row of the frame position
    return w[..., 1:].numpy(), w[..., 0].numpy()


def decoded_frames(cache, video_id: str, rows: np.ndarray, video_root: Path | None, manifest,
                   path: Path | None = None) -> np.ndarray:
    """uint8 [k, S, S, 3]: the cached rows' source frames, decoded with the decoder the cache records and
    resized / cropped as the encoder saw them (cmdcl_cache's decoders and transform, not a new decoder)."""
    from cmdcl_cache import decoders_of_provenance, resolve_decoder
    from cmdcl_cache import BrokenFile
    from cmdcl_cache import resolve_video_path
    from cmdcl_cache import TransformSpec, resize_crop

    prov = cache.provenance
    if path is None:
        if video_root is None:
            raise ValueError("--video-root is needed to decode the frames (the folder the manifest's paths are "
                             "relative to)")
        path = resolve_video_path(manifest.by_id()[video_id], video_root)
    index = np.asarray(cache.frame_info(video_id)[0])[rows]
    decoder, fallback = decoders_of_provenance(cache.video_info(video_id).get("decoder") or prov.get("decoder", ""))
    try:
        frames = resolve_decoder(decoder)(str(path), 1).get_batch(index)
    except Exception as err:   # noqa: BLE001 - the fallback the extraction would have used (e.g. a rotated file)
        if fallback == "none" or isinstance(err, BrokenFile):   # as decode_video: a cut file never falls back
            raise
        frames = resolve_decoder(fallback)(str(path), 1).get_batch(index)
    size = prov.get("image_size", 224)
    size = json.loads(size) if isinstance(size, str) else size
    size = (size, size) if isinstance(size, (int, float)) else tuple(size)
    spec = TransformSpec(size=size, resize_mode=prov.get("resize_mode", "shortest"),
                         interpolation=prov.get("interpolation", "bicubic"))
    return resize_crop(spec, np.ascontiguousarray(frames, np.uint8))


def overlay(image: np.ndarray, grid_weights: np.ndarray) -> np.ndarray:
    """The per-patch weights [g, g] (scaled to their maximum) upsampled onto the image [S, S, 3] as a heat map."""
    import PIL.Image
    from matplotlib import colormaps

    g = grid_weights / max(float(grid_weights.max()), 1e-12)
    h, w = image.shape[:2]
    up = np.asarray(PIL.Image.fromarray((255 * g).astype(np.uint8)).resize((w, h), PIL.Image.BILINEAR)) / 255.0
    heat = colormaps["jet"](up)[..., :3]
    return (0.5 * image / 255.0 + 0.5 * heat).clip(0, 1)


def attention_figure(images: np.ndarray, maps: dict[str, np.ndarray], times: np.ndarray, out: Path,
                     title: str, numbers: dict) -> Path:
    plt = pyplot()
    k = len(images)
    fig, axes = plt.subplots(1 + len(maps), k, figsize=(2.2 * k, 2.3 * (1 + len(maps))), layout="constrained",
                             squeeze=False)
    for j in range(k):
        axes[0, j].imshow(images[j])
        axes[0, j].set_title(f"t = {times[j]:.1f} s", fontsize=8)
        for i, (name, m) in enumerate(maps.items(), start=1):
            g = int(round(m.shape[1] ** 0.5))
            axes[i, j].imshow(overlay(images[j], m[j].reshape(g, g)))
            if j == 0:
                axes[i, 0].set_ylabel(name, fontsize=8)
    axes[0, 0].set_ylabel("frames (as encoded)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title + "\nspatial attention of the last layer (red: most attended patch of the frame)", fontsize=9)
    return save_figure(fig, out, numbers)


def attention_run(runs: list[Path], video_id: str, out: Path | None = None, video_root: Path | None = None,
                  shown: int = 4, checkpoint: str = "best", cache: str | None = None, dataset: str | None = None,
                  device: str = "auto") -> Path:
    from .data import check_finite
    from .evaluate import open_run
    from .explain import centre_indices

    if not 1 <= len(runs) <= 2:
        raise ValueError(f"give one run, or two to compare side by side (got {len(runs)})")
    opened = [open_run(run, checkpoint, cache, dataset, device) for run in runs]
    for run, r in zip(runs, opened):
        check_spatial(r.head, run)
    first = opened[0]
    c = first.data.cache
    if video_id not in c:
        raise did_you_mean("video in the cache", video_id, sorted(first.data.manifest.by_id()))
    feats, toks = np.asarray(c.features(video_id), np.float32), np.asarray(c.tokens(video_id), np.float32)
    check_finite(c, video_id, feats)
    maps, numbers = {}, {"video_id": video_id, "definition": "last layer's spatial attention of the frame position "
                         "over the patches, mean over heads; with the self weight it sums to 1 per frame"}
    idx = centre_indices(len(feats), first.cfg.frames)   # the same frames for both runs
    pick = np.linspace(0, len(idx) - 1, min(shown, len(idx))).round().astype(int)
    rows = idx[pick]
    for run, r in zip(runs, opened):
        dev = r.device
        w, self_w = spatial_attention(r.head, torch.from_numpy(feats[idx])[None].to(dev),
                                      torch.from_numpy(toks[idx])[None].to(dev))
        maps[f"{r.cfg.model}: {Path(run).name}"] = w[0][pick]
        numbers[str(run)] = {"rows": rows.tolist(), "patches": w[0][pick].tolist(), "self": self_w[0][pick].tolist()}
    images = decoded_frames(c, video_id, rows, video_root, first.data.manifest)
    times = np.asarray(c.frame_info(video_id)[1])[rows]
    numbers["frame_index"] = np.asarray(c.frame_info(video_id)[0])[rows].tolist()
    out = Path(out or Path(runs[-1]) / "figures" / f"attention-{_safe(video_id)}.png")
    return attention_figure(images, maps, times, out, f"{video_id} ({first.data.manifest.dataset})", numbers)


def _safe(video_id: str) -> str:
    from cmdcl_cache import file_names

    return file_names([video_id])[video_id]
