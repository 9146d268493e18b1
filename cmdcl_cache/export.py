"""`export-npy`: one `<video_id>.npy` [T, D] per cached video, for ActionFormer-style consumers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .cache import Cache


def export_npy(cache_dir: str | Path, out_dir: str | Path, dtype: str = "float16",
               video_ids: list[str] | None = None) -> int:
    """Write the features of each video (all of them by default); returns how many files were written.

    Each file is written under a temporary name and renamed, so an interrupted export leaves no half file.
    Ids are used as file names; an id with a path separator is refused rather than silently rewritten.
    """
    cache = Cache(cache_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = cache.video_ids if video_ids is None else list(video_ids)
    for vid in ids:
        if "/" in vid or os.sep in vid or vid in (".", ".."):
            raise ValueError(f"video id {vid!r} cannot be a file name")
    for vid in ids:
        x = np.asarray(cache.features(vid), dtype=dtype)
        tmp = out / f"{vid}.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, x)
        os.replace(tmp, out / f"{vid}.npy")
    cache.close()
    return len(ids)
