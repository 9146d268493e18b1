"""Epoch time of head training from the HDF5 cache (lazy mode) against the same data in memory, in one run.

    python benchmarks/train_epoch_time.py --videos 2000 --rows 128 --dim 512 --model text4vis --device cuda

Writes a synthetic cache in the real format (write_synthetic_cache), trains the same head with the same seed
in memory mode and in lazy mode, and prints mean epoch seconds, videos/s, the ratio lazy / memory and the
final metrics of both (equal on CPU; on GPU equal up to kernel non-determinism).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cmdcl_cache.store import TextEmbeddings, write_synthetic_cache
from cmdcl_heads.config import HeadConfig
from cmdcl_heads.train import TrainOptions, train


def make(root: Path, videos: int, rows: int, dim: int, classes: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((classes, dim)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    feats, records = {}, []
    for i in range(videos):
        c = (i // 5) % classes  # every class in both splits (test = every 5th video)
        t = int(rng.integers(rows // 2, rows * 3 // 2))
        x = dirs[c] + 2.0 * rng.standard_normal((t, dim)).astype(np.float32) / np.sqrt(dim)
        vid = f"v{i:06d}"
        feats[vid] = (10 * x).astype(np.float16)
        records.append({"video_id": vid, "path": vid, "split": "test" if i % 5 == 0 else "train",
                        "labels": {"task": f"c{c}"}})
    per_prompt = (dirs[:, None] + 0.1 * rng.standard_normal((classes, 2, dim))).astype(np.float32)
    names = [f"class {c}" for c in range(classes)]
    texts = {"task": TextEmbeddings(names, names, ["{}", "a video of {}."], per_prompt,
                                    TextEmbeddings.ensemble_of(per_prompt))}
    cache = write_synthetic_cache(root / "cache", feats, texts, num_shards=4)
    man = root / "manifest"
    man.mkdir()
    labels = {"dataset": "bench", "default_label_set": "task", "fine_label_set": None, "split_schemes": ["default"],
              "label_sets": {"task": {"multi_label": False, "labels": [{"key": f"c{c}", "name": n}
                                                                        for c, n in enumerate(names)]}},
              "source": "synthetic", "licence": "CC0"}
    (man / "labels.json").write_text(json.dumps(labels))
    (man / "videos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cache, man


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=600)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--model", default="text4vis")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache, man = make(Path(tmp), a.videos, a.rows, a.dim, a.classes)
        print(f"synthetic cache: {a.videos} videos x ~{a.rows} rows x {a.dim} in {time.perf_counter() - t0:.1f} s")
        cfg = HeadConfig(model=a.model, frames=a.frames, layers=a.layers)
        results = {}
        for mode in ("memory", "lazy"):
            opts = TrainOptions(cache=str(cache), dataset=str(man), out=f"{tmp}/run-{mode}", epochs=a.epochs,
                                batch_size=a.batch_size, lr=1e-3, device=a.device, data_mode=mode,
                                workers=a.workers, quiet=True)
            s = train(opts, HeadConfig(**cfg.to_dict()))
            hist = [json.loads(x) for x in (Path(opts.out) / "metrics.jsonl").read_text().splitlines()]
            # the first epoch carries warm-up costs (CUDA context, allocator); report the others
            times = [r["epoch_seconds"] for r in hist[1:]] or [hist[0]["epoch_seconds"]]
            results[mode] = (float(np.mean(times)), s["metrics"], s["device"])
        n_train = a.videos - len(range(0, a.videos, 5))
        for mode, (sec, m, dev) in results.items():
            print(f"{mode:6s} on {dev}: {sec:.3f} s/epoch, {n_train / sec:,.0f} videos/s, top1 {m['top1']:.4f}")
        print(f"lazy / memory epoch time: {results['lazy'][0] / results['memory'][0]:.2f}x")
        print(f"same metrics in both modes: {results['memory'][1] == results['lazy'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
