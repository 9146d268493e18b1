"""Manifest builders, one module per dataset. Each exposes `build(...) -> (videos, labels_json)`.

coin, breakfast and charades read official annotation files (`build(annotations)`); folder reads the user's
own videos (`build(videos, csv_path=None, ...)`, see cmdcl_cache/manifest/builders/folder.py).
"""

from __future__ import annotations

from pathlib import Path

from cmdcl_cache.manifest.format import Manifest
from cmdcl_cache.manifest.io import write_manifest

BUILDERS = ("coin", "breakfast", "charades", "folder")


def build_records(dataset: str, annotations=None, **options) -> tuple[list[dict], dict]:
    """(videos.jsonl records, labels.json object); `options` go to the folder builder."""
    if dataset == "folder":
        from cmdcl_cache.manifest.builders import folder

        return folder.build(**options)
    if dataset == "coin":
        from cmdcl_cache.manifest.builders import coin as mod
    elif dataset == "breakfast":
        from cmdcl_cache.manifest.builders import breakfast as mod
    elif dataset == "charades":
        from cmdcl_cache.manifest.builders import charades as mod
    else:
        raise ValueError(f"no builder for dataset {dataset!r}; have {', '.join(BUILDERS)}")
    return mod.build(Path(annotations))


def build_manifest(dataset: str, annotations, out, **options) -> Manifest:
    """Build `dataset` from its annotation files (or, for folder, from `options`) and write the folder `out`.

    The folder builder's dataset name defaults to the name of `out`.
    """
    if dataset == "folder" and not options.get("name"):
        options["name"] = Path(out).resolve().name
    videos, labels = build_records(dataset, annotations, **options)
    return write_manifest(out, videos, labels)
