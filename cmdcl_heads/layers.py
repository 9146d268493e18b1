"""Building blocks shared by the heads: temporal (and divided space-time) transformer layers, attention over
a fixed dictionary, and the cosine classifier.

`TemporalEncoder` computes X = STA^H(Linear(F) + pos). With frame features only, each layer is a pre-norm
transformer block attending over time. With grid tokens [B, T, P, D], every frame is the sequence
[frame feature; P patch tokens] and each layer attends first over time (per position), then over space
(per frame): divided space-time attention as in TimeSformer. The output is the frame-feature position,
[B, T, D], so the rest of a head does not care which input it had.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

MAX_LOG_SCALE = math.log(100.0)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def cosine_logits(scale: torch.Tensor | float, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """scale * cos(video, text) in fp32 even under autocast: in bf16 the cosines times a scale of 100 are off
    by up to ~0.1 logit."""
    with torch.autocast(device_type=video.device.type, enabled=False):
        return scale * normalise(video.float()) @ normalise(text.float()).transpose(-1, -2)


@torch.no_grad()
def clamp_logit_scales(model: nn.Module) -> None:
    """After each optimiser step, cap every learnable logit scale at 100, as CLIP's training does:
    an unbounded scale can grow until the loss overflows."""
    for module in model.modules():
        scale = getattr(module, "log_scale", None)
        if isinstance(scale, nn.Parameter):
            scale.clamp_(max=MAX_LOG_SCALE)


class DictionaryAttention(nn.Module):
    """out = softmax(Q Wq (K Wk)^T / sqrt d + log prior) K Wv, single head, over a fixed key set K [N, D].

    Adding log prior inside the softmax equals multiplying the attention by the prior and renormalising:
    softmax(s + log p)_k = A_k p_k / sum_j A_j p_j. That is our reading (*inferred*) of the NWGM term
    (A * prior) V_P Wv: without the renormalisation its weights sum to sum_k A_k p_k ~ 1/K, a scale that
    shrinks with the dictionary size and that the next layer would have to undo.
    """

    def __init__(self, dim: int, zero_values: bool = False):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        if zero_values:
            nn.init.zeros_(self.v.weight)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, log_prior: torch.Tensor | None = None):
        scores = self.q(query) @ self.k(keys).T * self.scale          # [..., Nq, N]
        if log_prior is not None:
            scores = scores + log_prior
        attn = scores.softmax(dim=-1)
        return attn @ self.v(keys), attn


class MLP(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(nn.functional.gelu(self.fc(x))))


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with a residual, over the second-to-last axis."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-2], shape[-1])
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x.reshape(shape)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, spatial: bool):
        super().__init__()
        self.time = Attention(dim, heads, dropout)
        self.space = Attention(dim, heads, dropout) if spatial else None
        self.ln = nn.LayerNorm(dim)
        self.mlp = MLP(dim, dropout)

    def forward(self, x):
        # x: [B, T, D] or [B, T, S, D] with S = 1 + P spatial positions per frame.
        if x.dim() == 4:
            x = self.time(x.transpose(1, 2)).transpose(1, 2)  # attend over T for each position
            x = self.space(x)                                  # attend over S within each frame
        else:
            x = self.time(x)
        return x + self.mlp(self.ln(x))


class TemporalEncoder(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, max_frames: int = 512, dropout: float = 0.1,
                 tokens_per_frame: int = 0):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        # Start as identity so that an untrained encoder keeps CLIP's feature geometry.
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.time_pos = nn.Parameter(torch.zeros(max_frames, dim))
        self.space_pos = nn.Parameter(torch.zeros(1 + tokens_per_frame, dim)) if tokens_per_frame else None
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, spatial=bool(tokens_per_frame))
                                    for _ in range(layers))
        self.ln = nn.LayerNorm(dim) if layers else nn.Identity()

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        t = frames.shape[1]
        if t > self.time_pos.shape[0]:
            raise ValueError(f"{t} frames exceed the position table ({self.time_pos.shape[0]}); "
                             "raise max_frames")
        if tokens is not None:
            built_for = 0 if self.space_pos is None else self.space_pos.shape[0] - 1
            if tokens.shape[2] != built_for:
                raise ValueError(f"{tokens.shape[2]} grid tokens per frame given, but the encoder was built for "
                                 + (f"{built_for}" if built_for else "frame features only")
                                 + " (set HeadConfig.tokens_per_frame from the cache)")
            x = torch.cat([frames.unsqueeze(2), tokens], dim=2)          # [B, T, 1 + P, D]
            x = self.proj(x) + self.time_pos[:t, None] + self.space_pos
        else:
            x = self.proj(frames) + self.time_pos[:t]
        for block in self.blocks:
            x = block(x)
        if x.dim() == 4:
            x = x[:, :, 0]                                               # the frame-feature position
        return self.ln(x)
