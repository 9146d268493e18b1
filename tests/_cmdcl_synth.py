"""A small synthetic LTAR dataset in the real formats (manifest folder + HDF5 cache + texts.h5).

Each activity is an ordered sequence of atomic actions; a frame is its action's visual prototype plus a
background vector (the confounder) plus noise. Fine-grained segments are written in seconds, matching the
cache's timestamps (frame i at i seconds).
"""

from __future__ import annotations

import numpy as np

from cmdcl_cache.manifest.io import make_labels_json, write_manifest
from cmdcl_cache.ingest.synthetic import write_synthetic_cache
from cmdcl_cache.cache.format import TextEmbeddings

ACTIVITIES = ["make_tea", "make_coffee", "fry_egg", "make_salad"]
ACTIONS = ["boil_water", "pour_water", "add_teabag", "grind_beans", "crack_egg", "stir", "cut_lettuce",
           "add_dressing"]
RECIPES = {0: [0, 2, 1, 5], 1: [3, 0, 1, 5], 2: [4, 5, 4, 5], 3: [6, 7, 6, 5]}


def _texts(protos: np.ndarray, names: list[str], rng, noise: float) -> TextEmbeddings:
    per_prompt = protos[:, None, :] + noise * rng.standard_normal((len(names), 2, protos.shape[1]))
    readable = [n.replace("_", " ") for n in names]  # labels.json names
    return TextEmbeddings(names=readable, texts=readable,
                          templates=["a video of {}.", "{}"], per_prompt=per_prompt.astype(np.float32),
                          ensemble=TextEmbeddings.ensemble_of(per_prompt))


def make_dataset(root, n_train: int = 24, n_test: int = 8, d: int = 32, frames: int = 16, seed: int = 0,
                 grid: int | None = None, planted: np.ndarray | None = None, with_segments: bool = True):
    """Write `root/manifest` and `root/cache`; returns (cache_dir, manifest_dir).

    `planted`: features [T, D] of one extra TEST video ("planted") added to cache and manifest.
    """
    rng = np.random.default_rng(seed)
    action_protos = rng.standard_normal((len(ACTIONS), d))
    backgrounds = rng.standard_normal((3, d)) * 0.8
    features, tokens, videos = {}, {}, []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        act = i % len(ACTIVITIES)
        steps = RECIPES[act]
        per = frames // len(steps)
        ids = np.repeat(steps, per)
        bg = backgrounds[rng.integers(len(backgrounds))]
        x = action_protos[ids] + bg + 0.3 * rng.standard_normal((len(ids), d))
        vid = f"{split}{i:03d}"
        features[vid] = (3.0 * x).astype(np.float16)  # not unit norm, like raw CLIP features
        if grid:
            tokens[vid] = (x[:, None, :] + 0.5 * rng.standard_normal((len(ids), grid * grid, d))).astype(np.float16)
        segments = [{"label": ACTIONS[a], "set": "actions", "start": float(k * per), "end": float((k + 1) * per)}
                    for k, a in enumerate(steps)] if with_segments else []
        videos.append({"video_id": vid, "path": vid, "split": split,
                       "labels": {"activity": ACTIVITIES[act], "actions": sorted({ACTIONS[a] for a in steps})},
                       **({"segments": segments} if segments else {})})
    if planted is not None:
        features["planted"] = planted.astype(np.float16)
        if grid:
            tokens["planted"] = np.repeat(planted[:, None, :], grid * grid, axis=1).astype(np.float16)
        videos.append({"video_id": "planted", "path": "planted", "split": "test",
                       "labels": {"activity": ACTIVITIES[0], "actions": [ACTIONS[0]]},
                       "segments": [{"label": ACTIONS[0], "set": "actions", "start": 0.0,
                                     "end": float(len(planted))}]})
    labels = make_labels_json(
        "synthetic", {"activity": (False, [(a, a.replace("_", " ")) for a in ACTIVITIES]),
                      "actions": (True, [(a, a.replace("_", " ")) for a in ACTIONS])},
        default_label_set="activity", fine_label_set="actions", split_schemes=["default"],
        source="synthetic", licence="CC0")
    manifest_dir = root / "manifest"
    write_manifest(manifest_dir, videos, labels)
    activity_protos = np.stack([action_protos[RECIPES[a]].mean(0) for a in range(len(ACTIVITIES))])
    texts = {"activity": _texts(activity_protos, ACTIVITIES, rng, 0.6),
             "actions": _texts(action_protos, ACTIONS, rng, 0.6)}
    cache_dir = write_synthetic_cache(root / "cache", features, texts, tokens=tokens or None)
    return cache_dir, manifest_dir
