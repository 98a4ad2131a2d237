"""What the built-in samplers share: where a run starts, which sigmas it visits, and the
parameters that say so."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from scoretk.components import Condition, Noise, ProgressFn, Sampler, Schedule
from scoretk.registry import Params
from scoretk.score import ScoreFn

Init = Literal["uniform", "gaussian", "data"]


class StartParams(Params):
    init: Init = Field("gaussian", description="starting point: gaussian N(0, sigma_1^2 I) "
                       "(the process's prior), uniform U[0,1]^D, or data (a training item "
                       "plus sigma_1 noise; the core then loads the dataset)")
    clamp: bool = Field(False, description="clip the result to [0, 1] (image writers "
                        "quantise, and so clip, anyway)")


class GridParams(StartParams):
    spacing: Literal["schedule", "rho"] = Field(
        "schedule", description="sigmas visited: the schedule's own levels (every net), or "
        "EDM's rho-spaced sigmas between its ends (nets that accept any sigma)")
    steps: Annotated[int, Field(ge=2)] | None = Field(
        None, description="number of rho-spaced sigmas (spacing: rho); default the "
        "schedule's number of levels")
    rho: Annotated[float, Field(gt=0)] = Field(7.0, description="EDM's rho: larger packs "
                                               "the sigmas closer to sigma_min")

    @model_validator(mode="after")
    def _steps_need_rho(self) -> "GridParams":
        if self.steps is not None and self.spacing != "rho":
            raise ValueError("steps applies to spacing: rho (the schedule fixes its own)")
        return self


def geometric_ratio(sigmas: Tensor) -> float:
    """sigma_{i-1}/sigma_i as the geometric mean of consecutive ratios (exact for geometric)."""
    s = sigmas.double()
    return float((s[0] / s[-1]) ** (1 / (len(s) - 1)))


def rho_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float) -> list[float]:
    """Karras et al.'s grid: n sigmas, evenly spaced in sigma^(1/rho), ends included."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + k / (n - 1) * (b - a)) ** rho for k in range(n)]


def sigma_grid(schedule: Schedule, spacing: str, steps: int | None, rho: float) -> list[float]:
    """The sigmas a fixed-step sampler visits, largest first (one host copy of the schedule)."""
    levels = schedule.sigmas.tolist()
    if spacing == "schedule":
        return levels
    return rho_sigmas(levels[0], levels[-1], steps or len(levels), rho)


def initial_state(init: Init, noise: Noise, shape: tuple[int, ...], sigma_max: float,
                  data: Tensor | None, device: torch.device | str) -> Tensor:
    """The starting batch; `data` only for init 'data' (an exact draw from p_sigma_max)."""
    if data is not None and init != "data":
        raise ValueError(f"an init tensor was given but sampler.init is {init!r}; "
                         "use init: data to start from data + sigma_1 noise")
    if init == "uniform":
        return noise.rand(shape).to(device)
    if init == "gaussian":
        return noise.randn(shape).to(device) * sigma_max
    if data is None:
        raise ValueError("sampler.init='data' needs the `init` tensor of starting data")
    return data.to(device=device, dtype=torch.float32) + sigma_max * noise.randn(shape).to(device)


def noised(condition: Condition | None, x: Tensor, sigma: float, noise: Noise) -> Tensor:
    """x with the condition's known part at noise level sigma, fresh noise each call (what
    the stochastic samplers do before every evaluation); x itself without a condition."""
    if condition is None:
        return x
    return condition.impose(x, sigma, noise.randn(tuple(x.shape[1:])).to(x.device))


class ParamsSampler(Sampler):
    """A sampler configured by its params model `p` (with StartParams' init and clamp)."""

    def __init__(self, p: StartParams):
        self.p = p

    @property
    def starts_from_data(self) -> bool:
        return self.p.init == "data"

    def start(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
              init: Tensor | None, device: torch.device | str, progress: ProgressFn | None,
              sigma_max: float, limit: int | None = None) -> tuple[ScoreFn, Tensor]:
        """Check the net, then (the score function counting evaluations, the first state)."""
        self.check_net(net)
        score = ScoreFn(net, schedule.sigmas, progress=progress, limit=limit,
                        total=self.evaluations_per_sample(schedule))
        return score, initial_state(self.p.init, noise, tuple(shape), sigma_max, init, device)

    def finish(self, x: Tensor, score: ScoreFn, condition: Condition | None) -> Tensor:
        """Record the evaluations made; the known part exact; the optional clip."""
        self.last_evaluations = score.evaluations
        if condition is not None:
            x = condition.impose(x, 0.0)
        return x.clamp_(0, 1) if self.p.clamp else x
