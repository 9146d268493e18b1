"""Label texts for the text tower: readable names, prompt templates, CLIP-style prompt ensembles.

Readable names (`readable_label`):
- CamelCase keys (COIN tasks) are split into lower-case words, acronyms kept:
  `ChangeCarTire` -> "change car tire", `ReplaceCDDriveWithSSD` -> "replace CD drive with SSD".
- snake_case keys (Breakfast actions) become words: `stir_tea` -> "stir tea" (an underscore is a space).
- Any other word is kept as written: `iPhone`, `C++`, `T-shirt`, `3D_printer` -> "3D printer",
  `crème_brûlée` -> "crème brûlée" (so two different names never become one text by losing characters).
- Anything that already reads as text (COIN step names such as "remove the tire") is kept as is.
- Breakfast's `SIL` ("silence") is named "background" by its manifest builder (our mapping, not the
  dataset's): the closest thing a text tower knows.

Templates come in named sets (`TEMPLATE_SETS`, CLIP-style ensembles in the spirit of CLIP's ImageNet and
Kinetics prompts and ActionCLIP's video prompts; the CMDCL paper does not list its prompts), one per kind of
label name:

- `actions` (the default): verb phrases, "change car tire", "stir tea" -> "a video of a person stir tea."
- `things`: noun phrases without an article, "cartoon rabbit", "vehicles" -> "a video of the cartoon rabbit."
- `generic`: any phrase, read as a title, "cartoon rabbit", "stir tea", "a red circle sliding"
  -> "a video titled cartoon rabbit."; what `manifest build --dataset folder` writes unless told otherwise.

`choose_templates` picks them, first match wins: `--prompts` (a set name, or a file of templates: one per
line, each with one "{}", blank lines and "#" comments skipped; `./actions` means a file named actions),
then the manifest's labels.json `prompts` (a set name), then `actions`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cmdcl_cache.cache.folder import CacheFolder, texts_lock
from cmdcl_cache.cache.format import TextEmbeddings
from cmdcl_cache.cache.provenance import ImportSpec, normalised, provenance_difference
from cmdcl_cache.errors import CacheError
from cmdcl_cache.manifest.prompts import DEFAULT_TEMPLATES, choose_templates, readable_label


def imported_cache(given, dataset: str) -> CacheFolder | None:
    """The one cache at or below `given` when it holds imported features, else None."""
    from cmdcl_cache.cache.folder import locate
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

    from cmdcl_cache.cache.provenance import CacheSpec
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
    from cmdcl_cache.cache.format import texts_provenance, write_texts

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
