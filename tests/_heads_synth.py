"""A small synthetic cache + manifest where the label is learnable (the `synth` fixture of tests/conftest.py).

Each task class c has a unit direction u_c; a video's frames are a*u_c + shared offset + per-frame noise,
so single frames are noisy but a mean over frames is informative. Text embeddings are u_c plus a little
noise per prompt, so zero-shot cosine works too. Steps (multi-label) are two fixed steps per task plus one
random step whose direction is also added to the frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cmdcl_cache.ingest.synthetic import write_synthetic_cache
from cmdcl_cache.cache.format import TextEmbeddings

NUM_TASKS, NUM_STEPS, DIM = 6, 10, 32


def _texts(rng, dirs, names):
    per_prompt = (dirs[:, None, :] + 0.15 * rng.standard_normal((len(dirs), 3, dirs.shape[1]))).astype(np.float32)
    return TextEmbeddings(names=names, texts=names, templates=["a video of {}.", "{}", "someone doing {}."],
                          per_prompt=per_prompt, ensemble=TextEmbeddings.ensemble_of(per_prompt))


def make_synthetic(root: Path, seed: int = 0, train_per_class: int = 10, test_per_class: int = 5,
                   val_per_class: int = 0, dim: int = DIM, noise: float = 0.45, grid: int | None = None, provenance: dict | None = None,
                   drop_from_cache: tuple = (), task_names: list[str] | None = None) -> tuple[Path, Path]:
    """Write `root/cache` and `root/manifest`; returns (cache_dir, manifest_dir).

    Val videos (none by default) are drawn after the others, so adding them leaves train and test unchanged.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    task_dirs = q[:NUM_TASKS]                                   # orthonormal class directions
    step_dirs = rng.standard_normal((NUM_STEPS, dim))
    step_dirs /= np.linalg.norm(step_dirs, axis=1, keepdims=True)
    offset = 0.8 * rng.standard_normal(dim) / np.sqrt(dim)      # CLIP features share a common component
    task_steps = [[(2 * c) % NUM_STEPS, (2 * c + 1) % NUM_STEPS] for c in range(NUM_TASKS)]
    feats, tokens, records = {}, {}, []
    for split, per_class in (("train", train_per_class), ("test", test_per_class), ("val", val_per_class)):
        for c in range(NUM_TASKS):
            for i in range(per_class):
                vid = f"{split}_{c}_{i:03d}"
                steps = sorted(set(task_steps[c]) | {int(rng.integers(NUM_STEPS))})
                t = int(rng.integers(4, 40))                     # some videos shorter than T frames
                x = (1.0 * task_dirs[c] + 0.3 * step_dirs[steps].sum(0) + offset
                     + noise * rng.standard_normal((t, dim)))
                x *= rng.uniform(5, 15)                          # unnormalised, as the image tower returns
                if vid not in drop_from_cache:
                    feats[vid] = x.astype(np.float16)
                    if grid:
                        tokens[vid] = (x[:, None, :] + noise * rng.standard_normal((t, grid * grid, dim))
                                       ).astype(np.float16)
                records.append({"video_id": vid, "path": f"videos/{vid}.mp4", "split": split,
                                "labels": {"task": f"t{c}", "steps": [f"s{s}" for s in steps]},
                                "splits": {"alt": "test" if split == "train" and i < 2 else split}})
    task_names = task_names or [f"task number {c}" for c in range(NUM_TASKS)]
    step_names = [f"step number {s}" for s in range(NUM_STEPS)]
    texts = {"task": _texts(rng, task_dirs, task_names), "steps": _texts(rng, step_dirs, step_names)}
    cache = write_synthetic_cache(root / "cache", feats, texts, provenance=provenance, num_shards=2,
                                  tokens=tokens or None)
    manifest = root / "manifest"
    manifest.mkdir(parents=True, exist_ok=True)
    labels = {"dataset": "synthetic", "default_label_set": "task", "fine_label_set": "steps",
              "split_schemes": ["default", "alt"],
              "label_sets": {"task": {"multi_label": False,
                                      "labels": [{"key": f"t{c}", "name": task_names[c]}
                                                 for c in range(NUM_TASKS)]},
                             "steps": {"multi_label": True,
                                       "labels": [{"key": f"s{s}", "name": n} for s, n in enumerate(step_names)]}},
              "source": "synthetic", "licence": "CC0"}
    (manifest / "labels.json").write_text(json.dumps(labels, indent=2))
    (manifest / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cache, manifest
