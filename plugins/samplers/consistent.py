"""Sampler `consistent_annealed`: consistent annealed sampling (Jolicoeur-Martineau et al.,
ICLR 2021; docs/theory.md#consistent-annealed).

One evaluation per level. The step a_i = eta sigma_i^2 moves x towards the denoised point; the
added noise beta sigma_{i+1} z, beta^2 = 1 - (1 - eta)^2 (sigma_i/sigma_{i+1})^2, makes the
noise x carries exactly sigma_{i+1} for data that are a single point, where annealed
Langevin's drifts with the step size (Proposition 3).
"""
from __future__ import annotations

import math
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import Condition, Noise, ProgressFn, Schedule
from scoretk.score import ScoreFn

from .common import ParamsSampler, StartParams, noised


class ConsistentParams(StartParams):
    eps: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="step at sigma_L in annealed Langevin's convention: "
        "a_i = eps sigma_i^2/sigma_L^2; auto: eps = sigma_L^2 (1 - 1/gamma^2), gamma the "
        "largest ratio of neighbouring sigmas (the ancestral step)")
    denoise: bool = Field(True, description="the last level takes the full Tweedie step "
                          "x + sigma_L^2 s (no extra evaluation)")


def eta_bounds(sigmas: list[float]) -> tuple[float, float]:
    """eta = eps/sigma_L^2 must keep beta real at every level: |1 - eta| <= sigma_{i+1}/sigma_i."""
    if len(sigmas) < 2:
        return 0.0, 2.0
    r = min(b / a for a, b in zip(sigmas[:-1], sigmas[1:]))
    return 1 - r, 1 + r


def consistent_annealed(score: ScoreFn, x: Tensor, sigmas: list[float], noise: Noise, *,
                        eta: float, denoise: bool = True, condition: Condition | None = None,
                        callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """x at noise sigmas[0] -> a sample; `callback(i, x)` after level i (x then carries noise
    sigmas[i+1])."""
    shape = tuple(x.shape[1:])
    for i, sigma in enumerate(sigmas):
        last = i + 1 == len(sigmas)
        s = score(noised(condition, x, sigma, noise), sigma)
        x = x + (1.0 if last and denoise else eta) * sigma**2 * s
        if not last:
            nxt = sigmas[i + 1]
            beta = math.sqrt(max(0.0, 1 - ((1 - eta) * sigma / nxt) ** 2))
            x = x + beta * nxt * noise.randn(shape).to(x.device)
        if callback is not None:
            callback(i, x)
    return x


class ConsistentAnnealed(ParamsSampler):
    p: ConsistentParams

    def resolve_eta(self, schedule: Schedule) -> float:
        sigmas = schedule.sigmas.tolist()
        lo, hi = eta_bounds(sigmas)
        if self.p.eps == "auto":
            return 1.0 if len(sigmas) < 2 else 1 - (1 - lo) ** 2
        eta = self.p.eps / sigmas[-1] ** 2
        if not lo <= eta <= hi:
            raise ValueError(f"sampler.eps={self.p.eps:g} must lie in [{lo * sigmas[-1]**2:.4g}, "
                             f"{hi * sigmas[-1]**2:.4g}] (sigma_L^2 (1 -+ the smallest ratio "
                             "sigma_(i+1)/sigma_i)) for the added noise to be real")
        return eta

    def evaluations_per_sample(self, schedule: Schedule) -> int:
        return schedule.num_levels

    def settings(self, schedule: Schedule) -> dict:
        eta = self.resolve_eta(schedule)
        return dict(kind="consistent_annealed", eps=eta * float(schedule.sigmas[-1]) ** 2,
                    eta=eta, eps_rule="ancestral" if self.p.eps == "auto" else "given",
                    denoise=self.p.denoise, init=self.p.init, clamp=self.p.clamp,
                    evaluations_per_sample=self.evaluations_per_sample(schedule))

    @torch.no_grad()
    def sample(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
               *, device: torch.device | str = "cpu", init: Tensor | None = None,
               progress: ProgressFn | None = None,
               condition: Condition | None = None) -> Tensor:
        eta, sigmas = self.resolve_eta(schedule), schedule.sigmas.tolist()
        score, x = self.start(net, schedule, shape, noise, init, device, progress, sigmas[0])
        x = consistent_annealed(score, x, sigmas, noise, eta=eta, denoise=self.p.denoise,
                                condition=condition)
        return self.finish(x, score, condition)
