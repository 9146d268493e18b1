"""What a cache was made with, and how two provenances are compared (here and nowhere else).

A spec (CacheSpec for extracted caches, ImportSpec for imported ones) names a cache folder and states the
attributes of its shards and texts.h5. Provenance travels as HDF5 attributes (`attrs_from`) and reads back
as plain values (`provenance_from_attrs`); `normalised` is that round trip, so written and read dicts
compare equal. Shards of one cache agree except on PER_SHARD_KEYS; texts.h5 agrees with the shards on
what the text tower depends on (`texts_difference`).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmdcl_cache.cache.sampling import SamplingPolicy
from cmdcl_cache.errors import CacheError, ProvenanceError

INIT_SEED = 0   # torch seed of random weights (--pretrained none), recorded as init_seed

# Attributes that legitimately differ between the shards of one cache (the run that finalised each).
PER_SHARD_KEYS = frozenset({"shard_index"})
# What texts.h5 and the shards may disagree on: texts do not depend on frames, sampling or shards.
TEXT_ONLY_KEYS = frozenset({"templates", "text_source"})
FRAME_ONLY_KEYS = frozenset({"sampling", "decoder", "shard_index", "shard_count", "tokens", "grid", "import"})


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "x"


def provenance_difference(expected: dict, found: dict, ignore=PER_SHARD_KEYS) -> str | None:
    """A sentence naming the first attribute that differs, or None when they agree."""
    for key in sorted((set(expected) | set(found)) - set(ignore)):
        if expected.get(key) != found.get(key):
            return f"attribute '{key}' is {found.get(key)!r}, expected {expected.get(key)!r}"
    return None


def texts_difference(shard_prov: dict, texts_prov: dict) -> str | None:
    """The first setting (model, weights, precision...) in which texts.h5 and the shards disagree, or None."""
    ignore = PER_SHARD_KEYS | TEXT_ONLY_KEYS | FRAME_ONLY_KEYS | {"schema_version"}
    common = {k: v for k, v in shard_prov.items() if k in texts_prov}
    return provenance_difference(common, {k: v for k, v in texts_prov.items() if k in shard_prov}, ignore=ignore)


@dataclass(frozen=True)
class CacheSpec:
    """What makes two caches comparable: the encoder's identity, its precision, tokens and sampling."""

    model: str
    pretrained: str = "none"
    precision: str = "fp16"
    tokens: str = "cls"
    grid: int = 4
    sampling: SamplingPolicy = field(default_factory=SamplingPolicy)

    @classmethod
    def from_provenance(cls, prov: dict, pretrained: str | None = None) -> "CacheSpec":
        """The spec a cache was made with, read back from its attributes. A cache of a checkpoint file records
        only its sha256: pass the file as `pretrained` (it is checked against that sha256)."""
        weights = str(prov.get("pretrained", "none"))
        if weights.startswith("sha256:"):
            from cmdcl_cache.files import file_sha256
            if pretrained is None or not Path(pretrained).is_file():
                raise CacheError(f"the cache was made with a checkpoint file ({weights[:19]}...): pass that file "
                                 "with --pretrained")
            if "sha256:" + file_sha256(pretrained) != weights:
                raise ProvenanceError(f"{pretrained}: not the checkpoint the cache was made with (its sha256 "
                                      f"differs from {weights[:19]}...)")
            weights = str(pretrained)
        sampling = prov.get("sampling", "{}")
        sampling = json.loads(sampling) if isinstance(sampling, str) else sampling
        return cls(model=prov["model"], pretrained=weights, precision=prov.get("precision", "fp32"),
                   tokens=prov.get("tokens", "cls"), grid=int(prov.get("grid") or 4),
                   sampling=SamplingPolicy.from_dict(sampling))

    @property
    def tag(self) -> str:
        """Folder name: model + weights (+ grid). A checkpoint file gives its stem."""
        p = "none" if self.pretrained is None or str(self.pretrained).lower() == "none" else str(self.pretrained)
        if "/" in p or "\\" in p or Path(p).suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
            p = Path(p).stem
        return f"{safe_name(self.model)}-{safe_name(p)}" + (f"-grid{int(self.grid)}" if self.tokens == "grid" else "")

    def difference(self, prov: dict, pretrained_id: str, dataset: str, world: int) -> str | None:
        """The first setting of this spec (weights as their recorded id) that a shard's attributes contradict,
        without loading the model: what `extract` compares before deciding there is nothing to do."""
        expected = normalised({"model": self.model, "pretrained": pretrained_id, "precision": self.precision,
                               "tokens": self.tokens, "grid": int(self.grid) if self.tokens == "grid" else 0,
                               "sampling": self.sampling.to_dict(), "dataset": dataset, "shard_count": world})
        return provenance_difference(expected, {k: prov.get(k) for k in expected}, ignore=())

    def frame_provenance(self, encoder_provenance: dict, dataset: str, decoder: str, rank: int, world: int) -> dict:
        """The attributes of this spec's shard of rank `rank` of `world`: every setting that decides its bytes
        (not paths or worker counts, so that a cache made elsewhere or resumed with other workers is identical)."""
        return _with_seed({**encoder_provenance, "dataset": dataset, "sampling": self.sampling.to_dict(),
                           "decoder": decoder, "shard_index": rank, "shard_count": world})

    def text_provenance(self, encoder_provenance: dict, dataset: str, templates: list[str]) -> dict:
        return _with_seed({**encoder_provenance, "dataset": dataset, "templates": list(templates)})


def _with_seed(prov: dict) -> dict:
    if prov.get("pretrained") == "none":
        prov["init_seed"] = INIT_SEED
    # JSON round trip: plain str/int/float/list values (torch.__version__ is a str subclass h5py refuses)
    return normalised(json.loads(json.dumps(prov)))


@dataclass(frozen=True)
class ImportSpec:
    """A cache of features made by another pipeline (`cmdcl-cache import`): the model name the user gives
    and how the features were read (`source`: format, source path, dimension, timestamps, sha256 of the
    source files). Its folder is `<model>-imported`; its shards carry `import` and pretrained "imported",
    so they never mix with extracted shards nor with an import of other files or settings."""

    model: str
    source: dict = field(default_factory=dict)
    pretrained: str = "imported"
    tokens: str = "cls"

    @property
    def tag(self) -> str:
        return f"{safe_name(self.model)}-{self.pretrained}"

    @classmethod
    def from_provenance(cls, provenance: dict) -> "ImportSpec":
        """The spec of an imported cache, from what its files say (CacheFolder.provenance())."""
        source = provenance.get("import")
        if source is None:
            raise CacheError(f"attributes {sorted(provenance)} are not those of an imported cache")
        return cls(model=provenance["model"], source=json.loads(source) if isinstance(source, str) else source)

    def frame_provenance(self, dataset: str) -> dict:
        return normalised({"dataset": dataset, "model": self.model, "pretrained": self.pretrained,
                           "tokens": self.tokens, "grid": 0, "import": self.source,
                           "shard_index": 0, "shard_count": 1})

    def text_provenance(self, encoder_provenance: dict, dataset: str, templates: list[str]) -> dict:
        """texts.h5 of an imported cache encoded by an open_clip text tower (what texts.ensure_texts asks)."""
        return text_provenance_for(self.frame_provenance(dataset), {"open_clip": encoder_provenance}, templates)


def text_provenance_for(frame_provenance: dict, text_source: dict, templates: list[str]) -> dict:
    """texts.h5 attributes for label texts that the cache's own encoder did not make (imported features, or
    embeddings read from a file): the shards' settings that texts are compared on, plus `text_source`."""
    ignore = PER_SHARD_KEYS | FRAME_ONLY_KEYS | {"schema_version"}
    kept = {k: v for k, v in frame_provenance.items() if k not in ignore}
    return normalised(json.loads(json.dumps({**kept, "templates": list(templates), "text_source": text_source})))


# The attribute holding the crc32 of all the others, written at finalize (a shard without it: unchecked).
PROVENANCE_CRC = "provenance_crc32"


def attrs_from(provenance: dict) -> dict:
    """Provenance as HDF5 attributes: scalars and strings; nested values travel as JSON text."""
    out = {}
    for key, value in provenance.items():
        if value is None:
            value = "none"
        if isinstance(value, str):
            value = str(value)  # str subclasses (torch.__version__) have no HDF5 conversion
        elif not isinstance(value, (int, float, bool)):
            value = json.dumps(value, sort_keys=True)
        out[key] = value
    return out


def provenance_from_attrs(attrs) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def normalised(provenance: dict) -> dict:
    """The provenance as it reads back from HDF5 attributes, so written and read dicts compare equal."""
    return provenance_from_attrs(attrs_from(provenance))


def json_crc32(values) -> int:
    """crc32 of plain values as JSON (floats as repr, exact): the record, attribute and commit checksums."""
    return zlib.crc32(json.dumps(values, ensure_ascii=False).encode("utf-8"))


def provenance_checksum(provenance: dict) -> int:
    """crc32 of a shard's attributes as they read back (sorted, floats as repr), this checksum left out."""
    return json_crc32(sorted((k, v) for k, v in provenance.items() if k != PROVENANCE_CRC))
