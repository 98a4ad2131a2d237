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

from scoretk.components import Condition, Noise, ProgressFn, Schedule
from scoretk.flow import flow_derivative, integrate_adaptive
from scoretk.score import ScoreFn, require_any_sigma

from .common import GridParams, ParamsSampler
from .heun import Heun, HeunParams


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


class ProbabilityFlow(ParamsSampler):
    p: FlowParams

    def __init__(self, p: FlowParams):
        super().__init__(p)
        grid = p.model_dump(include={"spacing", "steps", "rho", "denoise", "init", "clamp"})
        self.fixed = None if p.solver == "adaptive" else Heun(HeunParams(**grid))
        if self.fixed is not None:
            self.fixed.kind = "probability_flow"  # names this sampler when it refuses a net

    def evaluations_per_sample(self, schedule: Schedule) -> int:
        if self.fixed is not None:
            return self.fixed.evaluations_per_sample(schedule)
        return self.p.max_evaluations  # at most; last_evaluations says how many

    def check_net(self, net: nn.Module) -> None:
        if self.fixed is not None:
            self.fixed.check_net(net)
        else:
            require_any_sigma(net, "sampler probability_flow with solver: adaptive")

    def settings(self, schedule: Schedule) -> dict:
        p = self.p
        out = dict(kind="probability_flow", solver=p.solver, denoise=p.denoise, init=p.init,
                   clamp=p.clamp)
        if self.fixed is not None:
            out.update(spacing=p.spacing, steps=p.steps or schedule.num_levels, rho=p.rho)
        else:
            out.update(method=p.method, rtol=p.rtol, atol=p.atol,
                       evaluations_rule="adaptive: at most evaluations_per_sample")
        return {**out, "evaluations_per_sample": self.evaluations_per_sample(schedule)}

    @torch.no_grad()
    def sample(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
               *, device: torch.device | str = "cpu", init: Tensor | None = None,
               progress: ProgressFn | None = None,
               condition: Condition | None = None) -> Tensor:
        if self.fixed is not None:
            x = self.fixed.sample(net, schedule, shape, noise, device=device, init=init,
                                  progress=progress, condition=condition)
            self.last_evaluations = self.fixed.last_evaluations
            return x
        p, s_max, s_min = self.p, float(schedule.sigmas[0]), float(schedule.sigmas[-1])
        score, x = self.start(net, schedule, shape, noise, init, device, progress, s_max,
                              limit=p.max_evaluations)
        x = adaptive_flow(score, x, s_max, s_min, noise, rtol=p.rtol, atol=p.atol,
                          method=p.method, denoise=p.denoise, condition=condition)
        return self.finish(x, score, condition)
