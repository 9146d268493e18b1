"""Two debiasing mechanisms, *ours* (not in the CMDCL paper), each behind one switch that is off by default.

Both were designed for the regime where the paper-reading head shows no gain: a fine vocabulary that spans
the whole feature space (COIN's 778 step texts in 512 dimensions), where projecting frames onto the
text span (`--mediator-mode project`) is the identity. BENCHMARKS.md "Causal study" measures them.

`--static-removal LAMBDA` (HeadConfig, cmdcl head): every normalised frame loses LAMBDA times its video's
    temporal mean before the temporal encoder, x_t <- normalise(x_t - LAMBDA mean_s x_s). Why it should
    work: a scene (kitchen, workshop, lighting, camera) is mostly constant over one video, while the
    atomic actions that make up an activity change from step to step. What is constant over the video is
    removed whatever direction it has, inside the text span or not. When it fails: when what is static is
    the label (an activity recognised by its tool or object alone), when the scene changes inside a video,
    when a video has one step only.

`--reweight-strata K` (TrainConfig; text4vis and cmdcl, the heads with an epoch loop): a back-door
    adjustment by stratification. The training videos are clustered into K strata (k-means on their mean
    normalised frame over the --frames frames sampled at segment centres: an inferred stand-in for the
    confounder, because no scene label is given), and each video's loss is weighted by P(y) / P(y | z)
    (Laplace-smoothed counts; normalised to mean 1, capped at WEIGHT_CAP, normalised to mean 1 again, so
    the largest weight can end a little above the cap). The
    weighted training set then has y independent of the stratum: the distribution sum_z P(z) P(x | y, z)
    that the back-door formula averages over, estimated by inverse propensity weighting. Why it should
    work: videos whose scene is unusual for their label (the counter-examples of the shortcut) count
    more, so the shortcut stops paying. When it fails: when the dominant cluster structure of whole-video
    features is the label itself (then P(y | z) ~ 1 and every weight is ~1), when strata are so fine
    that each holds one label, and when the counter-examples are too few to carry the weight (tens of
    videos, each counted ten times, can be fitted without giving up the shortcut). Single-label targets
    only; K must be smaller than the number of training videos.

Measured (docs/causal-heads.md; BENCHMARKS.md "Causal study"): neither meets
the study's target; static removal wins only where scenes are static and the fine texts span little.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WEIGHT_CAP = 10.0   # mean-1 weights above this are cut to it (then renormalised): one counter-example must not dominate


def remove_static(x: torch.Tensor, share: float) -> torch.Tensor:
    """x [B, T, D] (or grid tokens [B, T, P, D]): normalise(x_t - share * mean_t x_t); share 0 returns x."""
    if share == 0:
        return x
    return F.normalize(x - share * x.mean(dim=1, keepdim=True), dim=-1)


def assign_strata(video_means: np.ndarray, strata: int, seed: int) -> np.ndarray:
    """The stratum [N] of each video: spherical k-means (seeded) on its mean normalised frame [N, D]."""
    from .confounders import nearest_centroid_index, spherical_or_l2_kmeans

    x = np.ascontiguousarray(F.normalize(torch.as_tensor(video_means, dtype=torch.float32), dim=-1).numpy())
    centroids, _ = spherical_or_l2_kmeans(x, strata, niter=25, seed=seed, spherical=True, name="--reweight-strata")
    return nearest_centroid_index(centroids, spherical=True).search(x, 1)[1][:, 0]


def stratum_weights(video_means: np.ndarray, targets: np.ndarray, strata: int, num_classes: int,
                    seed: int) -> tuple[np.ndarray, dict]:
    """Per-video loss weights P(y) / P(y | z) over `strata` k-means strata (see the module docstring).

    video_means [N, D] (the mean normalised frame of each training video), targets [N] class indices.
    Returns (weights [N] float32 with mean 1, a summary for summary.json)."""
    return weights_given_strata(assign_strata(video_means, strata, seed), targets, num_classes)


def weights_given_strata(z: np.ndarray, targets: np.ndarray, num_classes: int) -> tuple[np.ndarray, dict]:
    """stratum_weights for strata z [N] already assigned."""
    k = int(z.max()) + 1
    counts = np.zeros((k, num_classes))
    np.add.at(counts, (z, targets), 1.0)
    p_y_given_z = (counts + 1.0) / (counts.sum(1, keepdims=True) + num_classes)   # Laplace smoothing
    p_y = (counts.sum(0) + 1.0) / (counts.sum() + num_classes)
    w = p_y[targets] / p_y_given_z[z, targets]
    w = np.minimum(w / w.mean(), WEIGHT_CAP)
    w = (w / w.mean()).astype(np.float32)
    sizes = np.bincount(z, minlength=k)
    return w, {"strata": int(k), "stratum_sizes": sorted(sizes.tolist(), reverse=True),
               "weight_min": float(w.min()), "weight_max": float(w.max()),
               "effective_videos": float(w.sum() ** 2 / (w ** 2).sum())}
