"""`cmdcl-cache texts`: a cache's label texts through an open_clip text tower, into texts.h5.

Each label set's names become readable texts and go into the prompt templates (both manifest/prompts.py's);
each prompt is encoded, then they are ensembled CLIP-style (normalise, average, normalise). texts.h5 is
rewritten only when its provenance (model, weights, templates...) would change, under its own lock. An
imported cache takes the text tower of the model whose space its features share (`write_imported_texts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from cmdcl_cache.cache.folder import CacheFolder, locate, texts_lock
from cmdcl_cache.cache.format import TextEmbeddings, texts_provenance, write_texts
from cmdcl_cache.cache.provenance import CacheSpec, ImportSpec, normalised, provenance_difference
from cmdcl_cache.config import option
from cmdcl_cache.errors import CacheError
from cmdcl_cache.manifest.prompts import DEFAULT_TEMPLATES, PROMPTS_HELP, choose_templates, readable_label


@dataclass(frozen=True)
class TextsConfig:
    """`cmdcl-cache texts`: which cache folder, which text tower, which prompts."""

    dataset: str = option(None, "Built-in manifest or a manifest folder.", required=True)
    cache: str = option(None, "A cache folder, or a folder above it (the root).", required=True)
    model: str | None = option(None, "open_clip model name (default: the one the cache's shards were made with).")
    pretrained: str | None = option(None, "Weight tag, checkpoint file, or none (default: the cache's; a "
                                          "checkpoint-file cache needs the file).")
    precision: Literal["fp32", "fp16", "bf16"] = option("fp16", "Autocast precision on CUDA.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    tokens: Literal["cls", "grid"] = option("cls", "Which cache folder: cls or grid (as extracted).")
    grid: int = option(4, "Grid side, with --tokens grid.")
    prompts: str | None = option(None, PROMPTS_HELP)
    force: bool = option(False, "Rewrite even when texts.h5 has the same provenance.")
    text_embeddings: str | None = option(None, "Embeddings from a file instead of a text tower: .npy [C, D] (one "
                                               "row per label of --label-set, in labels.json order), or .npz / "
                                               ".safetensors with one such array per label set; checked for "
                                               "count and dimension. --model/--pretrained then choose the cache.")
    label_set: str | None = option(None, "With an .npy --text-embeddings: its label set (default: the "
                                         "manifest's default label set).")


def imported_cache(given, dataset: str) -> CacheFolder | None:
    """The one cache at or below `given` when it holds imported features, else None."""
    try:
        folder = locate(given, dataset)
    except CacheError:
        return None
    return folder if "import" in folder.provenance() else None


def write_imported_texts(folder: CacheFolder, manifest, model: str, pretrained: str, precision: str = "fp16",
                         device: str = "auto", prompts=None, force: bool = False) -> tuple[Path, bool]:
    """texts.h5 of an imported cache from an open_clip text tower whose space the features share (CLIP
    features: the text tower of the same model); its provenance names that tower (`text_source`)."""
    import open_clip

    from cmdcl_cache.extract.encoder import EncoderSpec, load_encoder

    spec = ImportSpec.from_provenance(folder.provenance())
    dim = int(spec.source.get("dim", 0))

    def check(width) -> None:
        if dim and width is not None and int(width) != dim:
            raise CacheError(f"{model} ({pretrained}) embeds texts in {width} dimensions, the imported features "
                             f"of {folder.path} have {dim}: use the text tower of the model that made them, or "
                             "pass --text-embeddings FILE")

    check((open_clip.get_model_config(model) or {}).get("embed_dim"))   # before loading any weights
    encoder = load_encoder(EncoderSpec.of(CacheSpec(model=model, pretrained=pretrained, precision=precision), device))
    check(encoder.feature_dim)
    return ensure_texts(folder, manifest, encoder, spec, prompts, force=force)


def build_text_embeddings(encoder, label_set_names: dict[str, list[str]],
                          templates: Sequence[str] = DEFAULT_TEMPLATES,
                          batch_size: int = 256) -> dict[str, TextEmbeddings]:
    """Encode every label of every set with every template.

    label_set_names maps a set name to its label names (labels.json `name`s, or keys); the readable text
    of each goes into the templates. Returns per-prompt embeddings [C, P, D] as the text tower gives
    them, and the ensemble [C, D] (normalise each prompt, average, normalise: CLIP's convention).
    """
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates")
    out = {}
    for set_name, names in label_set_names.items():
        names = list(names)
        texts = [readable_label(n) for n in names]
        prompts = [t.format(text) for text in texts for t in templates]  # label-major: [C * P]
        emb = encoder.encode_texts(prompts, batch_size=batch_size).numpy().astype(np.float32)
        per_prompt = emb.reshape(len(names), len(templates), -1)
        out[set_name] = TextEmbeddings(names=names, texts=texts, templates=templates,
                                       per_prompt=per_prompt,
                                       ensemble=TextEmbeddings.ensemble_of(per_prompt))
    return out


def ensure_texts(folder, manifest, encoder, spec, prompts: str | Path | None = None,
                 force: bool = False, command: str = "texts") -> tuple[Path, bool]:
    """Write `folder`'s texts.h5 unless it exists with the same provenance; returns (path, written).

    folder: a cache.CacheFolder; spec: its cache.CacheSpec (whose text provenance is recorded); command: who
    writes (named by a second writer's refusal)."""
    templates = choose_templates(prompts, manifest)   # --prompts, else the manifest's set, else actions
    prov = spec.text_provenance(encoder.provenance(), manifest.dataset, templates)
    with texts_lock(folder, command):
        return _ensure_texts(folder, manifest, encoder, prov, templates, force)


def _ensure_texts(folder, manifest, encoder, prov: dict, templates: list[str], force: bool) -> tuple[Path, bool]:

    path = folder.texts_path
    if path.exists() and not force:
        try:
            found = texts_provenance(path)
        except Exception:   # noqa: BLE001 - an unreadable texts.h5 is rewritten
            found = None
        if found is not None and provenance_difference(normalised(prov), found, ignore={"schema_version"}) is None:
            return path, False
    sets = {name: list(ls.names) for name, ls in manifest.label_sets.items()}
    embeddings = build_text_embeddings(encoder, sets, templates)
    folder.path.mkdir(parents=True, exist_ok=True)
    write_texts(path, embeddings, prov)
    return path, True
