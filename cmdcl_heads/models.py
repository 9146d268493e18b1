"""The head registry and the baselines, all on the same data path as CMDCL.

Every head is built from its HeadConfig alone (`build_head(cfg)`: shapes included, no data), then given
its data once before training (`head.initialise(inputs)`: the label texts, the fine vocabulary, the
confounder dictionaries). A trained head is rebuilt from a checkpoint's config and its state dict, as
nanoGPT rebuilds `GPT(GPTConfig(**model_args))`, without opening any cache.

Every head maps frames [B, T, D] (raw cached features, float32) and optional grid tokens [B, T, P, D] to
logits [B, C]; heads L2-normalise what they read because the cache stores features unnormalised.

- `zeroshot`: CLIP zero-shot. Mean of the L2-normalised frames, normalised again, cosine with the label
  text ensemble, times CLIP's fixed scale 100. No trainable parameter, never trained.
- `linear`: a linear probe on the mean of the L2-normalised frames, fitted by L-BFGS (cmdcl_heads/probe.py).
- `text4vis`: Text4Vis-style: TemporalEncoder (cfg.layers layers) + mean over time, classifier = the frozen
  text ensemble, cosine times a learnable scale initialised at cfg.logit_scale_init (100, CLIP's).
- `cmdcl`: cmdcl_heads.cmdcl.CMDCLHead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .cmdcl import CMDCLHead
from .config import MODELS, HeadConfig
from .layers import TemporalEncoder, cosine_logits, normalise

CLIP_SCALE = 100.0


@dataclass
class HeadInputs:
    """What a head is initialised from before training (never needed to load a trained one)."""

    text: torch.Tensor                 # [C, D] target label ensemble
    fine_text: torch.Tensor | None     # [Cf, D] fine vocabulary (None: the target labels)
    confounders: object = None         # confounders.Confounders, when the head reads V_P or Z


class ZeroShotHead(nn.Module):
    trainable = False

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.register_buffer("text", torch.zeros(cfg.num_classes, cfg.dim))

    def initialise(self, inputs: HeadInputs) -> None:
        self.text.copy_(normalise(inputs.text.float()))

    def forward(self, frames, tokens=None):
        video = normalise(normalise(frames).mean(dim=1))
        return CLIP_SCALE * video @ self.text.t()


class LinearHead(nn.Module):
    """fc(mean_t normalise(frames)); `cmdcl-heads train` fits fc with cmdcl_heads/probe.py (L-BFGS)."""

    trainable = False   # not by the epoch loop: fitted once by L-BFGS

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.dim, cfg.num_classes)

    def initialise(self, inputs: HeadInputs) -> None:
        pass   # fitted by the trainer

    def pooled(self, frames):
        """What the probe reads: the mean of the L2-normalised frames [B, T, D] -> [B, D]."""
        return normalise(frames).mean(dim=1)

    def forward(self, frames, tokens=None):
        return self.fc(self.pooled(frames))


class Text4VisHead(nn.Module):
    trainable = True

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.encoder = TemporalEncoder(cfg.dim, cfg.layers, cfg.heads, cfg.max_frames, cfg.dropout,
                                       tokens_per_frame=cfg.tokens_per_frame)
        self.register_buffer("text", torch.zeros(cfg.num_classes, cfg.dim))  # frozen classifier
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def initialise(self, inputs: HeadInputs) -> None:
        self.text.copy_(normalise(inputs.text.float()))

    def forward(self, frames, tokens=None):
        x = self.encoder(normalise(frames), normalise(tokens) if tokens is not None else None)
        return cosine_logits(self.log_scale.exp(), x.mean(dim=1), self.text)


HEADS = {"zeroshot": ZeroShotHead, "linear": LinearHead, "text4vis": Text4VisHead, "cmdcl": CMDCLHead}
assert tuple(HEADS) == MODELS


def build_head(cfg: HeadConfig) -> nn.Module:
    """The head named by cfg.model, with the shapes of cfg (dim, num_classes, ... set by the trainer)."""
    if cfg.model not in HEADS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(HEADS)}")
    if cfg.dim < 1 or cfg.num_classes < 1:
        raise ValueError(f"head config has no shapes (dim={cfg.dim}, num_classes={cfg.num_classes}); the trainer "
                         "sets them from the data, a checkpoint stores them")
    return HEADS[cfg.model](cfg)


def make_head(cfg: HeadConfig, text: torch.Tensor, fine_text: torch.Tensor | None = None,
              confounders=None) -> nn.Module:
    """A head for these label texts (and dictionaries): cfg's shapes filled in from them, then initialised.

    What the trainer does with a run's data, for callers that hold tensors (tests, notebooks)."""

    from .confounders import needs_z

    text = torch.as_tensor(text, dtype=torch.float32)
    shares = fine_text is None or torch.equal(torch.as_tensor(fine_text, dtype=torch.float32), text)
    cfg = replace(cfg, dim=text.shape[1], num_classes=text.shape[0], num_fine=0 if shares else len(fine_text),
                  kp=len(confounders.vp) if confounders is not None and cfg.tci else 0,
                  kz=len(confounders.z) if confounders is not None and needs_z(cfg) else 0)
    head = build_head(cfg)
    head.initialise(HeadInputs(text=text, fine_text=None if fine_text is None else torch.as_tensor(fine_text),
                               confounders=confounders))
    return head


def is_trainable(model: nn.Module) -> bool:
    return getattr(model, "trainable", True) and any(p.requires_grad for p in model.parameters())
