"""Caches written from arrays, for tests and benchmarks: the real shard format, made without videos.

`write_synthetic_cache(folder, {video_id: features [T, D]}, texts)` goes through the production
ShardWriter (journal, checksums, lock, atomic finalize), so what it writes is what `extract` writes;
only the provenance says "synthetic" and the timestamps are the row numbers (1 frame per second).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmdcl_cache.cache.folder import TEXTS_FILE, shard_name
from cmdcl_cache.cache.format import TextEmbeddings, write_texts
from cmdcl_cache.cache.writer import ShardWriter


def write_synthetic_cache(cache_dir: str | Path, features: dict[str, np.ndarray],
                          texts: dict[str, TextEmbeddings] | None = None, provenance: dict | None = None,
                          num_shards: int = 1, tokens: dict[str, np.ndarray] | None = None) -> Path:
    """Write a cache folder from arrays; returns the folder."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dim = next(iter(features.values())).shape[1]
    grid = int(round(next(iter(tokens.values())).shape[1] ** 0.5)) if tokens else None
    prov = {"dataset": "synthetic", "model": "synthetic", "pretrained": "none", "precision": "fp32",
            **(provenance or {}), "shard_count": num_shards}
    ids = sorted(features)
    for s in range(num_shards):
        path = cache_dir / shard_name(s, num_shards)
        with ShardWriter(path, {**prov, "shard_index": s}, dim, grid=grid, durable=False) as w:
            for vid in ids[s::num_shards]:
                x = features[vid]
                t = len(x)
                w.append_video(vid, x, np.arange(t), np.arange(t, dtype=np.float64), fps=1.0,
                               num_source_frames=t, duration=float(t),
                               tokens=tokens[vid] if tokens else None)
            w.finalize()
    if texts:
        write_texts(cache_dir / TEXTS_FILE, texts, prov)
    return cache_dir


def text_embeddings(names: list[str], per_prompt: np.ndarray, templates: list[str] | None = None) -> TextEmbeddings:
    """TextEmbeddings of made-up per-prompt vectors [C, P, D] (ensembled as `cmdcl-cache texts` does)."""
    per_prompt = np.asarray(per_prompt, np.float32)
    templates = templates or [f"prompt {p}: {{}}" for p in range(per_prompt.shape[1])]
    return TextEmbeddings(names=list(names), texts=list(names), templates=templates, per_prompt=per_prompt,
                          ensemble=TextEmbeddings.ensemble_of(per_prompt))
