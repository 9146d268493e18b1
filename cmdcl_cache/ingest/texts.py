"""Label text embeddings read from a file (`cmdcl-cache texts --from-file`), for any
cache: .npy [C, D] or [C, P, D], or .npz / .safetensors with one array per label set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmdcl_cache.cache.folder import Cache, CacheFolder, texts_lock
from cmdcl_cache.cache.format import TextEmbeddings, write_texts
from cmdcl_cache.cache.provenance import text_provenance_for
from cmdcl_cache.files import file_sha256
from cmdcl_cache.ingest.sources import PICKLED, SourceError, VideoProblem, load_npy, pickled_message


def read_text_embeddings(path: str | Path, manifest, dim: int, label_set: str | None = None
                         ) -> dict[str, TextEmbeddings]:
    """Label text embeddings from a file: .npy [C, D] or [C, P, D] (rows in labels.json order) for one label
    set, or .npz/.safetensors with one such array per label set name. Checked for count, dimension, values."""
    path = Path(path)
    arrays = text_arrays(path, manifest, label_set)
    out = {}
    for name, x in arrays.items():
        names = list(manifest.label_sets[name].names)
        where = f"{path} (label set {name!r})"
        if x.dtype.kind not in "f" or x.ndim not in (2, 3):
            raise SourceError(f"{where}: {x.dtype} {tuple(x.shape)}; expected float [C, D] or [C, P, D]")
        if x.shape[0] != len(names) or x.shape[-1] != dim:
            raise SourceError(f"{where}: shape {tuple(x.shape)}, expected [{len(names)}, {dim}]: one row per label "
                              f"of {manifest.root}/labels.json, in its order, of the features' dimension {dim}")
        per_prompt = np.asarray(x if x.ndim == 3 else x[:, None, :], dtype=np.float32)
        if not np.isfinite(per_prompt).all():
            raise SourceError(f"{where}: holds NaN/Inf")
        zero = np.flatnonzero((np.linalg.norm(per_prompt, axis=-1) == 0).any(axis=1))
        if len(zero):
            raise SourceError(f"{where}: label {names[zero[0]]!r} (row {zero[0]}) has an all-zero embedding")
        templates = [f"(from {path.name}{f', prompt {p}' if per_prompt.shape[1] > 1 else ''})"
                     for p in range(per_prompt.shape[1])]
        out[name] = TextEmbeddings(names=names, texts=names, templates=templates, per_prompt=per_prompt,
                                   ensemble=TextEmbeddings.ensemble_of(per_prompt))
    return out


def text_arrays(path: Path, manifest, label_set: str | None) -> dict[str, np.ndarray]:
    """{label set: array} of a text embeddings file (nothing is unpickled)."""
    suffix = path.suffix.lower()
    if suffix in PICKLED:
        raise SourceError(pickled_message(path))
    if suffix not in (".npy", ".npz", ".safetensors"):
        raise SourceError(f"{path}: expected a .npy, .npz or .safetensors file")
    if label_set is not None and suffix != ".npy":
        raise SourceError(f"--label-set: only for an .npy file; {path.name} names its label sets itself")
    try:
        if suffix == ".npy":
            arrays = {label_set or manifest.default_label_set: load_npy(path)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file
            arrays = load_file(str(path))
    except VideoProblem as err:
        raise SourceError(err.message) from None
    except Exception as err:   # noqa: BLE001 - OSError, ValueError, zipfile's and safetensors' own errors
        raise SourceError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    strange = [k for k in arrays if k not in manifest.label_sets]
    if strange:
        raise SourceError(f"{path}: {strange[0]!r} is not a label set of {manifest.root}/labels.json "
                          f"({', '.join(manifest.label_sets)})")
    return arrays


def write_texts_from_file(folder: CacheFolder, manifest, path: str | Path,
                          label_set: str | None = None) -> tuple[Path, list[str]]:
    """texts.h5 from a file of embeddings, for any cache (imported or extracted); returns (texts.h5, the
    manifest's label sets the file does not cover)."""

    path = Path(path).expanduser().resolve()
    cache = Cache(folder, require_complete=False)
    dim, prov = cache.feature_dim, dict(cache.provenance)
    cache.close()
    sets = read_text_embeddings(path, manifest, dim, label_set)
    sha = file_sha256(path)
    source = {"file": str(path), "sha256": sha, "label_sets": sorted(sets)}
    templates = next(iter(sets.values())).templates
    with texts_lock(folder, "texts"):
        write_texts(folder.texts_path, sets, text_provenance_for(prov, source, templates))
    return folder.texts_path, [name for name in manifest.label_sets if name not in sets]
