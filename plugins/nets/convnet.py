"""A small full-resolution residual conv net: the quick-start net for tiny images.

RefineNets down-sample, which leaves nothing of an 8x8 digit; this net keeps the full
resolution and widens its view with dilations instead. It is sigma-normalised like NCSNv2
(s(x, sigma) = s'(x, log sigma) / sigma) and also sees log sigma as an input channel, which a
net this small needs to tell the levels apart.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import ScoreNet
from scoretk.registry import Params


class ConvNetParams(Params):
    channels: int = Field(64, gt=0)
    blocks: int = Field(4, gt=0)
    sigma_input: bool = Field(True, description="feed log(sigma) as an extra input channel")


class _ResBlock(nn.Module):
    def __init__(self, ch: int, dilation: int):
        super().__init__()
        groups = 8 if ch % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation),
            nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvScoreNet(ScoreNet):
    def __init__(self, in_ch: int, p: ConvNetParams):
        super().__init__()
        self.sigma_input = p.sigma_input
        self.head = nn.Conv2d(in_ch + int(p.sigma_input), p.channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(p.channels, 1 + i % 2) for i in range(p.blocks)])
        self.tail = nn.Sequential(nn.GroupNorm(8 if p.channels % 8 == 0 else 1, p.channels),
                                  nn.SiLU(), nn.Conv2d(p.channels, in_ch, 3, padding=1))

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1)
        h = 2 * x - 1
        if self.sigma_input:
            h = torch.cat([h, sigma.log().expand(-1, 1, *x.shape[2:])], dim=1)
        return self.tail(self.blocks(self.head(h))) / sigma


def build_convnet(p: ConvNetParams, *, shape: tuple[int, ...], num_levels: int) -> ConvScoreNet:
    if len(shape) != 3:
        raise ValueError(f"convnet needs image data (C, H, W), got item shape {shape}")
    return ConvScoreNet(shape[0], p)
