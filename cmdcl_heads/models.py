"""The head registry and the baselines, all on the same data path as CMDCL.

Every head maps frames [B, T, D] (raw cached features, float32) and optional grid tokens [B, T, P, D] to
logits [B, C]; heads L2-normalise what they read because the cache stores features unnormalised.

- `zeroshot`: CLIP zero-shot. Mean of the L2-normalised frames, normalised again, cosine with the label
  text ensemble, times CLIP's fixed scale 100. No trainable parameter, never trained.
- `linear`: a linear probe on the mean of the L2-normalised frames, fitted by L-BFGS (cmdcl_heads/probe.py).
- `text4vis`: Text4Vis-style: TemporalEncoder (cfg.layers layers) + mean over time, classifier = the frozen
  text ensemble, cosine times a learnable scale initialised at cfg.logit_scale_init (100, CLIP's).
- `cmdcl`: cmdcl_heads.cmdcl.CMDCLHead (imported only when asked for).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import HeadConfig
from .layers import TemporalEncoder

MAX_LOG_SCALE = math.log(100.0)


@torch.no_grad()
def clamp_logit_scales(model: nn.Module) -> None:
    """After each optimiser step, cap every learnable logit scale at 100, as CLIP's training does:
    an unbounded scale can grow until the loss overflows."""
    for module in model.modules():
        scale = getattr(module, "log_scale", None)
        if isinstance(scale, nn.Parameter):
            scale.clamp_(max=MAX_LOG_SCALE)

MODELS = ("zeroshot", "linear", "text4vis", "cmdcl")
CLIP_SCALE = 100.0


def normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def cosine_logits(scale: torch.Tensor | float, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """scale * cos(video, text) in fp32 even under autocast: in bf16 the cosines times a scale of 100 are off
    by up to ~0.1 logit."""
    with torch.autocast(device_type=video.device.type, enabled=False):
        return scale * normalise(video.float()) @ normalise(text.float()).transpose(-1, -2)


class ZeroShotHead(nn.Module):
    trainable = False

    def __init__(self, text: torch.Tensor):
        super().__init__()
        self.register_buffer("text", normalise(text.float()))

    def forward(self, frames, tokens=None):
        video = normalise(normalise(frames).mean(dim=1))
        return CLIP_SCALE * video @ self.text.t()


class LinearHead(nn.Module):
    """fc(mean_t normalise(frames)); `cmdcl-heads train` fits fc with cmdcl_heads/probe.py (L-BFGS)."""

    trainable = True

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def pooled(self, frames):
        """What the probe reads: the mean of the L2-normalised frames [B, T, D] -> [B, D]."""
        return normalise(frames).mean(dim=1)

    def forward(self, frames, tokens=None):
        return self.fc(self.pooled(frames))


class Text4VisHead(nn.Module):
    trainable = True

    def __init__(self, cfg: HeadConfig, text: torch.Tensor, tokens_per_frame: int = 0):
        super().__init__()
        dim = text.shape[1]
        self.encoder = TemporalEncoder(dim, cfg.layers, cfg.heads, cfg.max_frames, cfg.dropout,
                                       tokens_per_frame=tokens_per_frame)
        self.register_buffer("text", normalise(text.float()))  # frozen classifier
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def forward(self, frames, tokens=None):
        x = self.encoder(normalise(frames), normalise(tokens) if tokens is not None else None)
        return cosine_logits(self.log_scale.exp(), x.mean(dim=1), self.text)


def build_head(cfg: HeadConfig, text: torch.Tensor, fine_text: torch.Tensor | None = None,
               confounders=None) -> nn.Module:
    """The head named by cfg.model; `text` is the target label set's ensemble [C, D].

    Grid tokens: cfg.tokens_per_frame (set by the trainer from the cache; 0 = frame features only).
    """
    name = cfg.model
    if name == "zeroshot":
        return ZeroShotHead(text)
    if name == "linear":
        return LinearHead(text.shape[1], text.shape[0])
    if name == "text4vis":
        return Text4VisHead(cfg, text, cfg.tokens_per_frame)
    if name == "cmdcl":
        from .cmdcl import CMDCLHead  # lazily: the baselines do not need it

        return CMDCLHead(cfg, text, fine_text, confounders)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def is_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())
