"""Losses: `dsm`, denoising score matching over all noise levels (docs/theory.md#dsm-loss), and
`edm`, the same objective under EDM's weighting (docs/theory.md#edm).

One sigma per sample, drawn by the schedule (a level of a discrete schedule, any sigma of a
continuous one), so every batch trains every part of the schedule. Per-level sums are
accumulated on the device (scatter_add) so logging costs no host sync.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk import hookimpl
from scoretk.components import Dataset, Loss, Schedule
from scoretk.registry import Params

from .nets.edm import edm_loss_weight, resolve_sigma_data


class DSMParams(Params):
    power: float = Field(2.0, description="lambda(sigma) = sigma**power; 2 makes every level O(D)")


class DSMLoss(Loss):
    """weight(sigma) ||s(x + sigma z, sigma) + z/sigma||^2, averaged over the batch."""

    def __init__(self, power: float = 2.0):
        self.power = power

    def weight(self, sigma: Tensor) -> Tensor:
        """0.5 lambda(sigma), lambda = sigma^power."""
        return 0.5 * sigma**self.power

    def __call__(self, net: nn.Module, x: Tensor, schedule: Schedule,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        B = x.shape[0]
        sigma, level = schedule.sample_sigmas(B, generator, device=x.device)
        sigma = sigma.to(x.dtype)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                        device=generator.device if generator is not None else x.device).to(x.device)
        s = sigma.view(B, *(1,) * (x.dim() - 1))
        score = net(x + s * z, sigma, level)
        per = (score + z / s).flatten(1).pow(2).sum(1) * self.weight(sigma)
        return per.mean(), level_stats(per.detach(), level, schedule.num_levels)


def level_stats(per: Tensor, level: Tensor, num_levels: int) -> dict[str, Tensor]:
    """Per-level loss sums and counts; samples off the levels (level -1) are left out."""
    inside = level >= 0
    idx = level.clamp(min=0)
    return {"level_loss_sum": per.new_zeros(num_levels).scatter_add_(
                0, idx, torch.where(inside, per, torch.zeros_like(per))),
            "level_count": level.new_zeros(num_levels).scatter_add_(0, idx, inside.long())}


class EDMLossParams(Params):
    sigma_data: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="the data's standard deviation in [0, 1] units (as the edm net's); "
        "auto: measured on the training data")

    def resolve(self, data: Dataset | None) -> "EDMLossParams":
        return resolve_sigma_data(self, data, "loss")


class EDMLoss(DSMLoss):
    """EDM's lambda(sigma) ||D(x + sigma n, sigma) - x||^2, written through the score
    (D - x = sigma^2 (s + z/sigma)): the weight on the score's error is lambda sigma^4."""

    def __init__(self, sigma_data: float):
        super().__init__()
        self.sigma_data = sigma_data

    def weight(self, sigma: Tensor) -> Tensor:
        return edm_loss_weight(sigma, self.sigma_data) * sigma**4


def build(params: DSMParams) -> DSMLoss:
    return DSMLoss(params.power)


def build_edm(params: EDMLossParams) -> EDMLoss:
    if params.sigma_data == "auto":
        raise ValueError("loss.sigma_data is 'auto': resolve it from the dataset first "
                         "(params.resolve(dataset)) or give a number")
    return EDMLoss(params.sigma_data)


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("loss", "dsm", build, DSMParams,
                 "denoising score matching, one sigma per sample, lambda = sigma^power")
    registry.add("loss", "edm", build_edm, EDMLossParams,
                 "denoising score matching with EDM's weighting (sigma^2 + sigma_data^2)/"
                 "(sigma sigma_data)^2 on ||D - x||^2")
