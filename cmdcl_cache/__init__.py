"""cmdcl_cache: manifests, decoding, frame sampling, CLIP encoding and the HDF5 feature cache.

Rooms, from the bottom up (a room imports only the rooms below it):

    errors.py files.py config.py progress.py device.py   small pieces every room uses
    manifest/    manifests: format, parsing, prompts, video paths, the demo, dataset builders
    cache/       the cache folder: provenance, shard format, writer, folder and reader, sampling, verify, run log
    extract/     decoding, the open_clip encoder, label texts, the extract pipeline
    ingest/      features computed elsewhere (import), export, caches from arrays
    cli.py       cmdcl-cache

What cmdcl_heads uses is exported here, imported on first use: `import cmdcl_cache` stays light (the
CLI's --help and the decode workers never import torch through it).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Cache": "cmdcl_cache.cache.folder",
    "CacheFolder": "cmdcl_cache.cache.folder",
    "locate": "cmdcl_cache.cache.folder",
    "write_small_h5": "cmdcl_cache.cache.format",
    "provenance_difference": "cmdcl_cache.cache.provenance",
    "resolve_device": "cmdcl_cache.device",
    "CacheError": "cmdcl_cache.errors",
    "ProvenanceError": "cmdcl_cache.errors",
    "decoders_of_provenance": "cmdcl_cache.extract.decode",
    "resolve_decoder": "cmdcl_cache.extract.decode",
    "BrokenFile": "cmdcl_cache.extract.decoders",
    "encode_files": "cmdcl_cache.extract.run",
    "TransformSpec": "cmdcl_cache.extract.transform",
    "resize_crop": "cmdcl_cache.extract.transform",
    "WriterLock": "cmdcl_cache.files",
    "lock_path_of": "cmdcl_cache.files",
    "write_atomic": "cmdcl_cache.files",
    "file_names": "cmdcl_cache.ingest.export",
    "BUILTIN_DATASETS": "cmdcl_cache.manifest.format",
    "resolve_dataset_dir": "cmdcl_cache.manifest.format",
    "load_manifest": "cmdcl_cache.manifest.io",
    "VIDEO_EXTENSIONS": "cmdcl_cache.manifest.paths",
    "resolve_video_path": "cmdcl_cache.manifest.paths",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cmdcl_cache' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
