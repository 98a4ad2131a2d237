"""Sampler `probability_flow`: integrate the probability-flow ODE dx/dsigma = -sigma s(x, sigma)
from sigma_1 down (Song et al., ICLR 2021; docs/theory.md#probability-flow).

`solver: heun` takes fixed Heun steps through the schedule's sigmas or a rho-spaced grid (the
`heun` sampler without churn); `solver: adaptive` hands the ODE to torchdiffeq (optional
extra `ode`), which picks its steps for the tolerances, then denoises once at sigma_min.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import Condition, Noise, ProgressFn, Sampler, Schedule
from scoretk.flow import flow_derivative, integrate_adaptive
from scoretk.score import ScoreFn, require_any_sigma

from .common import GridParams, finish, initial_state, sigma_grid
from .heun import heun


class FlowParams(GridParams):
    solver: Literal["heun", "adaptive"] = Field(
        "heun", description="heun: fixed steps through the sigma grid; adaptive: "
        "torchdiffeq's solver (needs the `ode` extra and a net that accepts any sigma)")
    method: str = Field("dopri5", description="torchdiffeq method for solver: adaptive")
    rtol: Annotated[float, Field(gt=0)] = Field(1e-5, description="relative tolerance (adaptive)")
    atol: Annotated[float, Field(gt=0)] = Field(1e-5, description="absolute tolerance (adaptive)")
    max_evaluations: Annotated[int, Field(ge=2)] = Field(
        2000, description="adaptive: stop with an error past this many evaluations per sample")
    denoise: bool = Field(True, description="end with Tweedie's denoising at sigma_min "
                          "(one evaluation)")


def adaptive_flow(score: ScoreFn, x: Tensor, sigma_max: float, sigma_min: float, noise: Noise,
                  *, rtol: float, atol: float, method: str, denoise: bool,
                  condition: Condition | None = None) -> Tensor:
    """The ODE from sigma_max to sigma_min by an adaptive solver, then the optional denoising."""
    z = None
    if condition is not None:
        z = noise.randn(tuple(x.shape[1:])).to(x.device)
        x = condition.impose(x, sigma_max, z)
    x = integrate_adaptive(flow_derivative(score, condition, z), x, sigma_max, sigma_min,
                           rtol=rtol, atol=atol, method=method)
    if denoise:
        if condition is not None:
            x = condition.impose(x, sigma_min, z)
        x = score.denoise(x, sigma_min)
    return x


class ProbabilityFlow(Sampler):
    def __init__(self, p: FlowParams):
        self.p = p

    def evaluations_per_sample(self, schedule: Schedule) -> int:
        if self.p.solver == "adaptive":
            return self.p.max_evaluations  # at most; last_evaluations says how many
        return 2 * ((self.p.steps or schedule.num_levels) - 1) + int(self.p.denoise)

    @property
    def starts_from_data(self) -> bool:
        return self.p.init == "data"

    def check_net(self, net: nn.Module) -> None:
        if self.p.solver == "adaptive":
            require_any_sigma(net, "sampler probability_flow with solver: adaptive")
        elif self.p.spacing == "rho":
            require_any_sigma(net, "sampler probability_flow with spacing: rho")

    def settings(self, schedule: Schedule) -> dict:
        out = dict(kind="probability_flow", solver=self.p.solver, denoise=self.p.denoise,
                   init=self.p.init, clamp=self.p.clamp)
        if self.p.solver == "adaptive":
            out.update(method=self.p.method, rtol=self.p.rtol, atol=self.p.atol,
                       evaluations_rule="adaptive: at most evaluations_per_sample")
        else:
            out.update(spacing=self.p.spacing, steps=self.p.steps or schedule.num_levels,
                       rho=self.p.rho)
        return {**out, "evaluations_per_sample": self.evaluations_per_sample(schedule)}

    @torch.no_grad()
    def sample(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
               *, device: torch.device | str = "cpu", init: Tensor | None = None,
               progress: ProgressFn | None = None,
               condition: Condition | None = None) -> Tensor:
        self.check_net(net)
        p, total = self.p, self.evaluations_per_sample(schedule)
        adaptive = p.solver == "adaptive"
        score = ScoreFn(net, schedule.sigmas, progress=progress, total=total,
                        limit=total if adaptive else None)
        s_max, s_min = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
        x = initial_state(p.init, noise, tuple(shape), s_max, init, device)
        if adaptive:
            x = adaptive_flow(score, x, s_max, s_min, noise, rtol=p.rtol, atol=p.atol,
                              method=p.method, denoise=p.denoise, condition=condition)
        else:
            sigmas = sigma_grid(schedule, p.spacing, p.steps, p.rho) + [0.0] * p.denoise
            x = heun(score, x, sigmas, noise, condition=condition)
        self.last_evaluations = score.evaluations
        return finish(x, condition, p.clamp)
