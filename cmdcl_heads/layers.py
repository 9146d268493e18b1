"""Temporal (and divided space-time) transformer layers shared by the Text4Vis-style and CMDCL heads.

`TemporalEncoder` computes X = STA^H(Linear(F) + pos). With frame features only, each layer is a pre-norm
transformer block attending over time. With grid tokens [B, T, P, D], every frame is the sequence
[frame feature; P patch tokens] and each layer attends first over time (per position), then over space
(per frame): divided space-time attention as in TimeSformer. The output is the frame-feature position,
[B, T, D], so the rest of a head does not care which input it had.
"""

from __future__ import annotations

import torch
from torch import nn


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
