"""Controlled-confounder benchmark: in-distribution and shifted top-1 of every head, in one table.

    PYTHONPATH=$PWD python benchmarks/confounded.py            # defaults: ~minutes on a 2-core CPU
    PYTHONPATH=$PWD python benchmarks/confounded.py --seeds 5 --epochs 30 --dim 128 --train-per-class 100

It writes a cache in the project's format (`write_synthetic_cache`, `texts.h5`) and a manifest folder in the
CONTRACTS.md format (label sets `activity`, single-label and default, and `action`, multi-label and fine;
splits train / val = test_id, in-distribution / test = shifted), builds the confounder dictionaries on it,
trains zero-shot, linear, text4vis, cmdcl, cmdcl --no-tci and cmdcl --no-vci, and prints one table.

The structural causal model
---------------------------

Variables (one draw per video v; all directions are fixed unit vectors in R^D drawn once from the data
seed, so random directions are nearly orthogonal for D >= 64):

    Y  activity, uniform over C activities                                        (the label)
    S  its script: an ordered sequence of L atomic actions out of A shared ones. Activities share
       actions; `order_pairs` pairs of activities use the SAME L actions in a different order, so only
       temporal order tells them apart (a mean-pooled feature cannot).
    G  segment boundaries: L contiguous segments of random length (>= 2 frames each) over T frames
    U  per-video appearance of each action: a_k(v) = a_k + tau * u_vk, u_vk ~ N(0, I/D)
       (the same action looks a little different in every video; the background does not)
    B  background (scene), one of C scenes, each activity having a "home" scene h(Y):
           B = h(Y) with probability rho, else uniform over the C scenes     (train and test_id)
           B uniform over the C scenes, independent of Y                       (test: the shifted split)
    X_t frame feature t:  alpha * a_{S[g(t)]}(v) + beta * b_B + sigma * eps_t,  eps_t ~ N(0, I/D)
       (||eps_t|| ~ 1, so alpha, beta and sigma are norms of the action, scene and noise parts)

Texts (what a CLIP text tower would give; several prompts each, ensembled CLIP-style):
    activity c:  mean_k a_k over its actions + gamma * b_{h(c)} + eta * n_c + prompt noise
                 the label text is biased toward its activity's *training* scene ("making cereal" reads
                 like "a kitchen"): the cross-modal bias B -> T of the paper's causal graph;
                 n_c is a label-specific direction that no frame carries (what a name says beyond
                 what is seen). Order pairs share their action mean, so their texts differ only through
                 the scene and name terms.
    action k:    a_k + prompt noise (fine-grained texts sit near what the frames show)

Reference caches drawn with the SAME noise, segments and labels:
    nobg:   X_t = alpha * a(v) + sigma * eps_t          background removed: what a perfectly deconfounded
                                                       model could reach
    bgonly: X_t = beta * b_B + sigma * eps_t            the shortcut alone: chance on the shifted split

Defaults (see BENCHMARKS.md for how they were calibrated): D=64, C=8, A=12, L=4, T=32 cached frames,
2 order pairs, rho=0.9, alpha=1, beta=1.5, sigma=1.5, tau=0.5, gamma=0.5, eta=0.3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cmdcl_cache.manifest import make_labels_json, write_manifest
from cmdcl_cache.store import TextEmbeddings, write_synthetic_cache

ACTION_WORDS = ["take", "pour", "cut", "stir", "crack", "fry", "spread", "butter", "add", "put", "peel",
                "squeeze", "open", "close", "wash", "dry", "fold", "press", "shake", "scoop", "whisk", "mix",
                "slice", "serve"]


@dataclass
class SCMConfig:
    dim: int = 64             # D
    activities: int = 8       # C (also the number of scenes)
    actions: int = 12         # A shared atomic actions
    steps: int = 4            # L actions per activity
    order_pairs: int = 2      # pairs of activities with the same actions in another order
    frames: int = 32          # T cached frames per video
    train_per_class: int = 40
    test_per_class: int = 40  # per split: test_id (manifest split "val") and test (shifted)
    rho: float = 0.9          # P(scene = home scene of the activity) in train and test_id
    alpha: float = 1.0        # action part of a frame
    beta: float = 1.5         # scene part of a frame
    sigma: float = 1.5        # frame noise
    tau: float = 0.5          # per-video variation of an action's appearance
    gamma: float = 0.5        # scene bias of the activity texts
    eta: float = 0.3          # label-specific text direction (absent from frames)
    prompts: int = 4          # prompts per label
    prompt_noise: float = 0.1
    seed: int = 0             # data seed

    def to_dict(self) -> dict:
        return asdict(self)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _scripts(cfg: SCMConfig, rng: np.random.Generator) -> list[list[int]]:
    """C ordered action scripts; the first 2*order_pairs come in pairs with equal sets, other orders."""
    if 2 * cfg.order_pairs > cfg.activities or cfg.steps > cfg.actions or cfg.frames < 2 * cfg.steps:
        raise ValueError("need 2*order_pairs <= activities, steps <= actions and frames >= 2*steps")
    scripts: list[list[int]] = []
    seen_sets = set()
    while len(scripts) < cfg.activities:
        s = [int(a) for a in rng.choice(cfg.actions, cfg.steps, replace=False)]
        if frozenset(s) in seen_sets:
            continue
        seen_sets.add(frozenset(s))
        scripts.append(s)
        if len(scripts) <= 2 * cfg.order_pairs and len(scripts) % 2 == 1:
            # its partner: same actions, a different order (a cyclic shift keeps it a real reordering)
            scripts.append(s[1:] + s[:1])
    return scripts


def generate(cfg: SCMConfig) -> dict:
    """Draw the whole benchmark. Returns arrays keyed by video and the texts (see module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    d, c_n = cfg.dim, cfg.activities
    act_dir = _unit(rng.standard_normal((cfg.actions, d)))
    scene_dir = _unit(rng.standard_normal((c_n, d)))
    name_dir = _unit(rng.standard_normal((c_n, d)))
    scripts = _scripts(cfg, rng)
    home = rng.permutation(c_n)  # h(c): the training scene of activity c

    videos, feats, nobg, bgonly = [], {}, {}, {}
    plan = [("train", cfg.train_per_class, True), ("val", cfg.test_per_class, True),
            ("test", cfg.test_per_class, False)]
    for split, per_class, confounded in plan:
        for c in range(c_n):
            for i in range(per_class):
                vid = f"{split}-{c:02d}-{i:04d}"
                scene = home[c] if (confounded and rng.random() < cfg.rho) else int(rng.integers(c_n))
                # segment lengths: 2 frames each + a Dirichlet share of the rest
                spare = cfg.frames - 2 * cfg.steps
                extra = np.floor(rng.dirichlet(np.full(cfg.steps, 2.0)) * spare).astype(int)
                extra[-1] += spare - extra.sum()
                cuts = np.concatenate([[0], np.cumsum(2 + extra)])
                seg = np.zeros(cfg.frames, dtype=int)
                for j in range(cfg.steps):
                    seg[cuts[j]:cuts[j + 1]] = j
                look = act_dir[scripts[c]] + cfg.tau * rng.standard_normal((cfg.steps, d)) / np.sqrt(d)
                action_part = cfg.alpha * look[seg]
                scene_part = cfg.beta * np.broadcast_to(scene_dir[scene], (cfg.frames, d))
                noise = cfg.sigma * rng.standard_normal((cfg.frames, d)) / np.sqrt(d)
                feats[vid] = (action_part + scene_part + noise).astype(np.float32)
                nobg[vid] = (action_part + noise).astype(np.float32)
                bgonly[vid] = (scene_part + noise).astype(np.float32)
                segments = [{"label": f"a{scripts[c][j]:02d}", "set": "action",
                             "start": float(cuts[j]), "end": float(cuts[j + 1])} for j in range(cfg.steps)]
                videos.append({"video_id": vid, "path": f"synthetic/{vid}", "split": split,
                               "labels": {"activity": f"c{c:02d}",
                                          "action": sorted({f"a{k:02d}" for k in scripts[c]})},
                               "duration": float(cfg.frames), "segments": segments,
                               "meta": {"scene": int(scene), "home_scene": int(home[c]),
                                        "shifted": not confounded}})

    def texts(base: np.ndarray, names: list[str]) -> TextEmbeddings:
        noise = cfg.prompt_noise * rng.standard_normal((len(base), cfg.prompts, d)) / np.sqrt(d)
        per_prompt = (_unit(base)[:, None, :] + noise).astype(np.float32)
        return TextEmbeddings(names=names, texts=names, templates=[f"prompt {p}: {{}}" for p in range(cfg.prompts)],
                              per_prompt=per_prompt, ensemble=TextEmbeddings.ensemble_of(per_prompt))

    act_text = np.stack([act_dir[s].mean(0) for s in scripts]) + cfg.gamma * scene_dir[home] + cfg.eta * name_dir
    activity_names = [" then ".join(ACTION_WORDS[k % len(ACTION_WORDS)] for k in s) for s in scripts]
    action_names = [ACTION_WORDS[k % len(ACTION_WORDS)] for k in range(cfg.actions)]
    return {"videos": videos, "features": feats, "nobg": nobg, "bgonly": bgonly,
            "texts": {"activity": texts(act_text, activity_names), "action": texts(act_dir, action_names)},
            "scripts": scripts, "home": home, "activity_names": activity_names, "action_names": action_names}


def write_benchmark(root: str | Path, cfg: SCMConfig) -> dict[str, Path]:
    """Write the manifest folder and three caches (full, nobg, bgonly) under `root`; returns their paths."""
    root = Path(root)
    data = generate(cfg)
    labels = make_labels_json(
        "confounded",
        {"activity": (False, [(f"c{c:02d}", n) for c, n in enumerate(data["activity_names"])]),
         "action": (True, [(f"a{k:02d}", n) for k, n in enumerate(data["action_names"])])},
        default_label_set="activity", fine_label_set="action", split_schemes=["default"],
        source="benchmarks/scm.py (synthetic structural causal model) " + repr(cfg.to_dict()),
        licence="generated; no licence restrictions")
    write_manifest(root / "manifest", data["videos"], labels)
    out = {"manifest": root / "manifest"}
    for name in ("features", "nobg", "bgonly"):
        tag = {"features": "full"}.get(name, name)
        path = root / "cache" / "confounded" / tag
        write_synthetic_cache(path, data[name], data["texts"],
                              provenance={"dataset": "confounded", "model": f"scm-{tag}",
                                          "scm": cfg.to_dict()})
        out[tag] = path
    return out


# ------------------------------------------------------------------------------------------- training

# (label, cache variant, model, extra HeadConfig fields); reference rows use text4vis on the other caches.
ROWS = [
    ("reference: text4vis, background removed", "nobg", "text4vis", {}),
    ("zero-shot", "full", "zeroshot", {}),
    ("linear probe", "full", "linear", {}),
    ("text4vis", "full", "text4vis", {}),
    ("cmdcl", "full", "cmdcl", {}),
    ("cmdcl --no-tci", "full", "cmdcl", {"tci": False}),
    ("cmdcl --no-vci", "full", "cmdcl", {"vci": False}),
    ("reference: text4vis, background alone", "bgonly", "text4vis", {}),
]
