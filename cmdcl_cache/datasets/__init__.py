"""Manifest builders, one module per dataset. Each exposes `build(annotations) -> (videos, labels_json)`."""

from __future__ import annotations

from pathlib import Path

from cmdcl_cache.manifest import Manifest, write_manifest

BUILDERS = ("coin", "breakfast", "charades")


def build_records(dataset: str, annotations) -> tuple[list[dict], dict]:
    if dataset == "coin":
        from cmdcl_cache.datasets import coin as mod
    elif dataset == "breakfast":
        from cmdcl_cache.datasets import breakfast as mod
    elif dataset == "charades":
        from cmdcl_cache.datasets import charades as mod
    else:
        raise ValueError(f"no builder for dataset {dataset!r}; have {', '.join(BUILDERS)}")
    return mod.build(Path(annotations))


def build_manifest(dataset: str, annotations, out) -> Manifest:
    """Build `dataset` from its annotation files and write the manifest folder `out`."""
    videos, labels = build_records(dataset, annotations)
    return write_manifest(out, videos, labels)
