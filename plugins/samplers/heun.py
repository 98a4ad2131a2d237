"""Sampler `heun`: the second-order sampler of Karras et al., NeurIPS 2022 (EDM), Algorithm 2
(docs/theory.md#edm-heun).

Heun steps of the probability-flow ODE dx/dsigma = (x - D(x, sigma))/sigma, with
D(x, sigma) = x + sigma^2 s(x, sigma), through the schedule's sigmas or a rho-spaced grid, and
optional "churn": before a step, noise raises sigma_i to sigma_i (1 + gamma), which the step
then removes. Without churn it is a deterministic ODE solver.
"""
from __future__ import annotations

import math
from typing import Annotated, Callable

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import Condition, Noise, ProgressFn, Schedule
from scoretk.flow import flow_derivative, heun_step
from scoretk.score import ScoreFn, require_any_sigma

from .common import GridParams, ParamsSampler, sigma_grid

MAX_GAMMA = math.sqrt(2) - 1
"""EDM's cap on the churn: sigma is raised by at most a factor sqrt(2)."""


class HeunParams(GridParams):
    s_churn: Annotated[float, Field(ge=0)] = Field(
        0.0, description="EDM's S_churn: total churn, spread as gamma = min(S_churn/N, "
        "sqrt(2)-1) over the N steps with sigma in [s_tmin, s_tmax]; 0: deterministic. "
        "Churn evaluates sigmas off the grid (nets that accept any sigma)")
    s_tmin: Annotated[float, Field(ge=0)] = Field(0.0, description="churn only where sigma >= this")
    s_tmax: Annotated[float, Field(gt=0)] | None = Field(
        None, description="churn only where sigma <= this (none: no upper bound)")
    s_noise: Annotated[float, Field(gt=0)] = Field(
        1.0, description="EDM's S_noise: the churn noise's scale (slightly above 1 offsets "
        "detail lost by an imperfect denoiser)")
    denoise: bool = Field(True, description="end with an Euler step to sigma = 0, which is "
                          "Tweedie's denoising (one evaluation); else stop at sigma_min")


def heun(score: ScoreFn, x: Tensor, sigmas: list[float], noise: Noise, *, s_churn: float = 0.0,
         s_tmin: float = 0.0, s_tmax: float | None = None, s_noise: float = 1.0,
         condition: Condition | None = None,
         callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """EDM Algorithm 2 from sigmas[0] to sigmas[-1] (a final 0 makes the last step Euler).
    With a condition the known part follows y + sigma z, z drawn once per step."""
    shape, n = tuple(x.shape[1:]), len([s for s in sigmas if s > 0])
    gamma_max = min(s_churn / n, MAX_GAMMA) if n else 0.0
    z = None
    for i, (sigma, nxt) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        churn = gamma_max > 0 and s_tmin <= sigma <= (s_tmax or math.inf)
        sigma_hat = sigma * (1 + gamma_max) if churn else sigma
        if churn:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise.randn(shape).to(x.device)
        if condition is not None and (z is None or s_churn > 0):
            z = noise.randn(shape).to(x.device)
            x = condition.impose(x, sigma_hat, z)
        x = heun_step(flow_derivative(score, condition, z), sigma_hat, x, nxt)
        if callback is not None:
            callback(i, x)
    return x


class Heun(ParamsSampler):
    """Also `probability_flow`'s fixed-step solver (without churn)."""

    p: HeunParams
    kind = "heun"

    def grid(self, schedule: Schedule) -> list[float]:
        """The sigmas visited, with the final 0 when denoising."""
        sigmas = sigma_grid(schedule, self.p.spacing, self.p.steps, self.p.rho)
        return sigmas + [0.0] if self.p.denoise else sigmas

    def evaluations_per_sample(self, schedule: Schedule) -> int:
        n = self.p.steps or schedule.num_levels
        return 2 * (n - 1) + int(self.p.denoise)

    def check_net(self, net: nn.Module) -> None:
        if self.p.spacing == "rho":
            require_any_sigma(net, f"sampler {self.kind} with spacing: rho")
        if self.p.s_churn > 0:
            require_any_sigma(net, f"sampler {self.kind} with s_churn > 0")

    def settings(self, schedule: Schedule) -> dict:
        grid = self.grid(schedule)
        return dict(kind="heun", spacing=self.p.spacing, steps=len([s for s in grid if s > 0]),
                    rho=self.p.rho, s_churn=self.p.s_churn, s_tmin=self.p.s_tmin,
                    s_tmax=self.p.s_tmax, s_noise=self.p.s_noise, denoise=self.p.denoise,
                    init=self.p.init, clamp=self.p.clamp,
                    evaluations_per_sample=self.evaluations_per_sample(schedule))

    @torch.no_grad()
    def sample(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
               *, device: torch.device | str = "cpu", init: Tensor | None = None,
               progress: ProgressFn | None = None,
               condition: Condition | None = None) -> Tensor:
        sigmas = self.grid(schedule)
        score, x = self.start(net, schedule, shape, noise, init, device, progress, sigmas[0])
        x = heun(score, x, sigmas, noise, s_churn=self.p.s_churn, s_tmin=self.p.s_tmin,
                 s_tmax=self.p.s_tmax, s_noise=self.p.s_noise, condition=condition)
        return self.finish(x, score, condition)
