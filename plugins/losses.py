"""Loss `dsm`: denoising score matching over all noise levels (docs/theory.md#dsm-loss).

One level per sample, so every batch trains every part of the schedule; per-level sums are
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
    def __init__(self, power: float = 2.0):
        self.power = power

    def __call__(self, net: nn.Module, x: Tensor, schedule: Schedule,
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        B, L = x.shape[0], schedule.num_levels
        level = schedule.sample_levels(B, generator, device=x.device)
        sigma = schedule.sigmas.to(device=x.device, dtype=x.dtype)[level]
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                        device=generator.device if generator is not None else x.device).to(x.device)
        s = sigma.view(B, *(1,) * (x.dim() - 1))
        score = net(x + s * z, sigma, level)
        # lambda(sigma) * 0.5 ||score - target||^2 with target = -z/sigma
        per = 0.5 * (score + z / s).flatten(1).pow(2).sum(1) * sigma**self.power
        stats = {
            "level_loss_sum": per.detach().new_zeros(L).scatter_add_(0, level, per.detach()),
            "level_count": level.new_zeros(L).scatter_add_(0, level, torch.ones_like(level)),
        }
        return per.mean(), stats


def build(params: DSMParams) -> DSMLoss:
    return DSMLoss(params.power)


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("loss", "dsm", build, DSMParams,
                 "denoising score matching, one random level per sample, lambda = sigma^power")
