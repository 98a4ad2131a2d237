"""Loss `dsm`: denoising score matching over all noise levels (docs/theory.md#dsm-loss).

One sigma per sample, drawn by the schedule (a level of a discrete schedule, any sigma of a
continuous one), so every batch trains every part of the schedule. Per-level sums are
accumulated on the device (scatter_add) so logging costs no host sync.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk import hookimpl
from scoretk.components import Loss, Schedule
from scoretk.registry import Params


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


def build(params: DSMParams) -> DSMLoss:
    return DSMLoss(params.power)


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("loss", "dsm", build, DSMParams,
                 "denoising score matching, one sigma per sample, lambda = sigma^power")
