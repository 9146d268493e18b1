"""Why reweighting (--reweight-strata) barely moves the shifted split: a diagnostic on TRAINING data only.

For the study's worlds and regimes (benchmarks/study.py) and the tuning data and training seeds, this
computes the weights that `--reweight-strata K` gives the training videos in training (the same
`cmdcl_heads.debias.stratum_weights` on the mean of the 16 frames sampled at segment centres, the strata
seeded by the training seed), then uses the SCM's scene labels (which no method sees) to ask what the
weighted training set looks like:

- counter-example share: the weighted share of videos shot outside their activity's home scene
  (before weighting about 1 - rho; a perfect back-door adjustment makes the scene independent of the
  activity, i.e. (1 - 1/scenes) for a uniform scene);
- scene purity of the strata: the share of videos in the most common scene of their stratum;
- activity purity of the strata: the same for the activity.

No shifted split is read. Run: PYTHONPATH=$PWD python benchmarks/study_diagnostics.py (under a minute)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from benchmarks.confounded import SCMConfig, generate
from benchmarks.study import REGIMES, TUNE_DATA_SEEDS, TUNE_TRAIN_SEEDS, WORLDS
from cmdcl_heads.data import tsn_indices
from cmdcl_heads.debias import assign_strata, weights_given_strata


def purity(groups: np.ndarray, labels: np.ndarray) -> float:
    return sum(Counter(labels[groups == g]).most_common(1)[0][1] for g in np.unique(groups)) / len(labels)


FRAMES = 16   # the study's --frames


def diagnose(world: str, regime: str, data_seed: int, strata: int, train_seed: int) -> dict:
    cfg = replace(SCMConfig(), **WORLDS[world], **REGIMES[regime], seed=data_seed)
    data = generate(cfg)
    train = [v for v in data["videos"] if v["split"] == "train"]
    feats = np.stack([data["features"][v["video_id"]] for v in train])
    feats = feats[:, tsn_indices(feats.shape[1], FRAMES, train=False)]   # what training averages
    unit = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    y = np.array([int(v["labels"]["activity"][1:]) for v in train])
    scene = np.array([v["meta"]["scene"] for v in train])
    counter = np.array([v["meta"]["scene"] != v["meta"]["home_scene"] for v in train], dtype=float)
    z = assign_strata(unit.mean(1), strata, seed=train_seed)   # as stratum_weights does in training
    w, _ = weights_given_strata(z, y, cfg.activities)
    n_scenes = cfg.scenes or cfg.activities
    return {"counter_before": counter.mean(), "counter_after": float((w * counter).sum() / w.sum()),
            "counter_ideal": 1 - 1 / n_scenes, "scene_purity": purity(z, scene), "activity_purity": purity(z, y),
            "weight_max": float(w.max())}


def main() -> None:
    print("| world | regime | K | counter-examples before → after weighting (ideal) "
          "| stratum purity: scene / activity | max weight |")
    print("|---|---|---|---|---|---|")
    for world in WORLDS:
        for regime in REGIMES:
            for k in (5, 10, 20):
                rows = [diagnose(world, regime, s, k, t) for s in TUNE_DATA_SEEDS for t in TUNE_TRAIN_SEEDS]
                m = {key: np.mean([r[key] for r in rows]) for key in rows[0]}
                print(f"| {world.split(' ')[0]} | {regime} | {k} | {100 * m['counter_before']:.1f} % → "
                      f"{100 * m['counter_after']:.1f} % ({100 * m['counter_ideal']:.1f} %) | "
                      f"{m['scene_purity']:.2f} / {m['activity_purity']:.2f} | {m['weight_max']:.1f} |")


if __name__ == "__main__":
    main()
