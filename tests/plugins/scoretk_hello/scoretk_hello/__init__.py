"""A complete third-party scoretk plugin: a Schedule, `linear`, and two ScoreNets: `tiny`, to
train, and `gaussian`, an exact score with nothing to train."""
import math

import torch
from pydantic import Field
from torch import nn

from scoretk import hookimpl
from scoretk.components import Schedule, ScoreNet
from scoretk.registry import Params


class LinearParams(Params):  # extra="forbid": an unknown recipe key is an error
    sigma_max: float = Field(gt=0, description="the largest noise level, sigma_1")
    sigma_min: float = Field(gt=0, description="the smallest noise level, sigma_L")
    num_levels: int = Field(ge=2, description="L, the number of levels")


class LinearSchedule(Schedule):
    def __init__(self, p: LinearParams):
        self.sigmas = torch.linspace(p.sigma_max, p.sigma_min, p.num_levels)


class TinyParams(Params):
    hidden: int = Field(64, gt=0, description="width of the hidden layer")


class TinyNet(ScoreNet):
    """s(x, sigma) = f(x, log sigma) / sigma for items of any shape (flattened)."""

    batch_independent = True  # no batch norm: each output depends on its own input alone

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(),
                                  nn.Linear(hidden, dim))

    def forward(self, x, sigma, level):
        # x: (B, *shape); sigma: (B,) float; level: (B,) long, unused by this net
        log_sigma = sigma.log().to(x.dtype).view(-1, 1)
        out = self.body(torch.cat([x.flatten(1), log_sigma], dim=1))
        return (out / sigma.to(x.dtype).view(-1, 1)).view_as(x)


def build_tiny(p: TinyParams, *, shape, num_levels):
    # shape: one item's shape, e.g. (2,) or (1, 8, 8); num_levels: L of the schedule
    return TinyNet(math.prod(shape), p.hidden)


class GaussianParams(Params):
    mean: float = Field(0.0, description="every value's mean")
    std: float = Field(1.0, gt=0, description="every value's standard deviation")


class GaussianScore(ScoreNet):
    """The exact score of N(mean, std^2 I) noised at sigma: -(x - mean) / (std^2 + sigma^2).
    No trainable parameters: `scoretk sample --recipe` samples it without a checkpoint."""

    batch_independent = True

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.var = mean, std**2

    def forward(self, x, sigma, level):
        sigma = sigma.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        return -(x - self.mean) / (self.var + sigma**2)


def build_gaussian(p: GaussianParams, *, shape, num_levels):
    return GaussianScore(p.mean, p.std)


@hookimpl
def scoretk_register(registry):
    registry.add("schedule", "linear", LinearSchedule, LinearParams,
                 "sigmas evenly spaced from sigma_max down to sigma_min")
    registry.add("net", "tiny", build_tiny, TinyParams,
                 "one-hidden-layer MLP divided by sigma, for any item shape")
    registry.add("net", "gaussian", build_gaussian, GaussianParams,
                 "the exact score of N(mean, std^2 I) data, for any item shape (no training)")
