"""A small full-resolution residual conv net: the quick-start net for tiny images.

RefineNets down-sample, which leaves nothing of an 8x8 digit; this net keeps the full
resolution and widens its view with dilations instead. It is sigma-normalised like NCSNv2
(s(x, sigma) = s'(x, log sigma) / sigma). A net this small also needs to be told the level:
log sigma is fed as an input channel and, with `film`, shifts every block's features.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import ScoreNet
from scoretk.registry import Params


class ConvNetParams(Params):
    channels: int = Field(64, gt=0, description="feature channels of every residual block")
    blocks: int = Field(4, gt=0, description="residual blocks, dilation alternating 1 and 2")
    sigma_input: bool = Field(True, description="feed log(sigma) as an extra input channel")
    film: bool = Field(False, description="per-block feature shift from an embedding of log sigma")


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)


class _ResBlock(nn.Module):
    def __init__(self, ch: int, dilation: int, emb_dim: int):
        super().__init__()
        self.conv1 = nn.Sequential(_norm(ch), nn.SiLU(),
                                   nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation))
        self.shift = nn.Linear(emb_dim, ch) if emb_dim else None
        self.conv2 = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.conv1(x)
        if self.shift is not None:
            h = h + self.shift(emb)[:, :, None, None]
        return x + self.conv2(h)


class ConvScoreNet(ScoreNet):
    batch_independent = True  # group norm is per sample

    def __init__(self, in_ch: int, p: ConvNetParams):
        super().__init__()
        self.sigma_input = p.sigma_input
        emb_dim = 4 * p.channels if p.film else 0
        self.embed = nn.Sequential(nn.Linear(32, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim)) if p.film else None
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(16), 16)),
                             persistent=False)
        self.head = nn.Conv2d(in_ch + int(p.sigma_input), p.channels, 3, padding=1)
        self.blocks = nn.ModuleList(_ResBlock(p.channels, 1 + i % 2, emb_dim)
                                    for i in range(p.blocks))
        self.tail = nn.Sequential(_norm(p.channels), nn.SiLU(),
                                  nn.Conv2d(p.channels, in_ch, 3, padding=1))

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
        log_sigma = sigma.log()
        h = 2 * x - 1
        if self.sigma_input:
            h = torch.cat([h, log_sigma.expand(-1, 1, *x.shape[2:])], dim=1)
        emb = None
        if self.embed is not None:
            angles = log_sigma.view(-1, 1) * self.freqs
            emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.head(h)
        for block in self.blocks:
            h = block(h, emb)
        return self.tail(h) / sigma


def build_convnet(p: ConvNetParams, *, shape: tuple[int, ...], num_levels: int) -> ConvScoreNet:
    if len(shape) != 3:
        raise ValueError(f"convnet needs image data (C, H, W), got item shape {shape}")
    return ConvScoreNet(shape[0], p)
