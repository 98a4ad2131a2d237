"""Schedules: `geometric` (NCSN's levels), and two that draw a continuous sigma per training
sample (docs/theory.md#continuous-noise): `log_uniform` (score_sde's VE) and `log_normal` (EDM).

`geometric`: sigma_1 > ... > sigma_L with a constant ratio, given or derived from data.
`sigma_max: auto` applies NCSNv2 Technique 1 and `num_levels: auto` Technique 2
(docs/theory.md#technique-1, #technique-2); `resolve(data)`
fills them in once, before `build`, so the resolved numbers can be recorded with the run.
`log_uniform` takes the same parameters: its levels are the sampling discretisation.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from scoretk import hookimpl
from scoretk.components import Dataset, Schedule
from scoretk.registry import Params

from . import ncsn_theory as theory

Auto = Literal["auto"]


class GeometricParams(Params):
    sigma_max: Annotated[float, Field(gt=0)] | Auto = Field(
        description="sigma_1, the largest level; auto: NCSNv2 technique 1, the largest distance "
        "between two of up to 10k training items")
    sigma_min: Annotated[float, Field(gt=0)] = Field(0.01, description="sigma_L, the smallest "
                                                     "level")
    num_levels: Annotated[int, Field(ge=2)] | Auto = Field(
        description="L, the number of levels; auto: NCSNv2 technique 2, the fewest levels whose "
        "neighbours overlap by `overlap`")
    overlap: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.5, description="C of technique 2 for num_levels: auto (0.5 in the paper; the released "
        "configs match about 0.567)")

    @model_validator(mode="after")
    def _order(self) -> "GeometricParams":
        if self.sigma_max != "auto" and self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
        return self

    def resolve(self, data: Dataset | None, *, max_points: int = 10_000,
                generator: torch.Generator | None = None) -> "GeometricParams":
        """A copy with the autos computed from `data`: sigma_max by Technique 1 (on a random
        subset of at most `max_points` items, seeded 0 by default so it is reproducible),
        num_levels by Technique 2 with D = the item size."""
        if "auto" not in (self.sigma_max, self.num_levels):
            return self
        if data is None:
            which = "schedule.sigma_max" if self.sigma_max == "auto" else "schedule.num_levels"
            raise ValueError(f"{which} is 'auto' but no dataset was given to derive it from; "
                             "give a number or a dataset")
        notes, sigma_max = [], self.sigma_max
        if sigma_max == "auto":
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            idx = torch.randperm(len(data), generator=g)[:max_points].sort().values
            sigma_max = theory.max_pairwise_distance(data.batch(idx))
            if not sigma_max > self.sigma_min:
                raise ValueError(f"schedule.sigma_max: the data's largest pairwise distance "
                                 f"{sigma_max:.4g} is not above sigma_min {self.sigma_min}")
            notes.append(f"sigma_max = {sigma_max:.6g} (NCSNv2 technique 1: the largest "
                         f"distance between two of {len(idx):,} training items)")
        L = self.num_levels
        if L == "auto":
            dim = math.prod(data.shape)
            L = theory.num_levels(sigma_max, self.sigma_min, dim, self.overlap)
            notes.append(f"num_levels = {L} (NCSNv2 technique 2: overlap C = {self.overlap:g} "
                         f"between neighbouring levels in D = {dim} dimensions gives ratio "
                         f"{theory.gamma_for_overlap(dim, self.overlap):.4f})")
        resolved = self.model_copy(update={"sigma_max": float(sigma_max), "num_levels": int(L)})
        return resolved.noted(*notes)

class GeometricSchedule(Schedule):
    def __init__(self, sigma_max: float, sigma_min: float, num_levels: int):
        self.sigma_max, self.sigma_min = float(sigma_max), float(sigma_min)
        self.sigmas = theory.geometric_sigmas(sigma_max, sigma_min, num_levels)

    @property
    def gamma(self) -> float:
        """sigma_{i-1}/sigma_i."""
        return (self.sigma_max / self.sigma_min) ** (1 / (self.num_levels - 1))

    def __repr__(self) -> str:
        return (f"GeometricSchedule({self.sigma_max:g} -> {self.sigma_min:g}, "
                f"L={self.num_levels}, gamma={self.gamma:.5f})")


class LogUniformSchedule(GeometricSchedule):
    """Training draws log sigma uniformly between the ends (score_sde's VE SDE); sampling
    walks the geometric levels."""

    continuous = True

    def sample_sigmas(self, batch_size: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else "cpu")
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        sigma = (lo + u * (hi - lo)).exp().float().to(device)
        return sigma, self.nearest_level(sigma)

    def __repr__(self) -> str:
        return "LogUniform" + super().__repr__()


def _numbers(params: GeometricParams) -> tuple[float, float, int]:
    for name in ("sigma_max", "num_levels"):
        if getattr(params, name) == "auto":
            raise ValueError(f"schedule.{name} is 'auto': resolve it from the dataset first "
                             "(params.resolve(dataset)) or give a number")
    return params.sigma_max, params.sigma_min, params.num_levels


def build(params: GeometricParams) -> GeometricSchedule:
    return GeometricSchedule(*_numbers(params))


def build_log_uniform(params: GeometricParams) -> LogUniformSchedule:
    return LogUniformSchedule(*_numbers(params))


# --- log_normal (EDM) ----------------------------------------------------------------------

class LogNormalParams(Params):
    """EDM's defaults, for data in scoretk's [0, 1] convention: EDM's images span [-1, 1], twice
    the range, so its sigmas are halved here (P_mean -1.2 - ln 2, sigma 0.002..80 -> 0.001..40)."""

    p_mean: float = Field(-1.2 - math.log(2), description="mean of log sigma in training")
    p_std: float = Field(1.2, gt=0, description="standard deviation of log sigma in training")
    sigma_max: float = Field(40.0, gt=0, description="largest sampling level")
    sigma_min: float = Field(0.001, gt=0, description="smallest sampling level")
    num_levels: int = Field(18, ge=2, description="sampling levels, rho-spaced")
    rho: float = Field(7.0, gt=0, description="levels evenly spaced in sigma^(1/rho); larger "
                       "packs them towards sigma_min")

    @model_validator(mode="after")
    def _order(self) -> "LogNormalParams":
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
        return self


def rho_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float) -> Tensor:
    """EDM's levels: n sigmas evenly spaced in sigma^(1/rho), ends included; (n,) float32,
    descending, computed in float64 so the ends are exact."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((a + t * (b - a)) ** rho).float()


class LogNormalSchedule(Schedule):
    """Training draws ln sigma ~ N(P_mean, P_std^2) (EDM); sampling walks rho-spaced levels."""

    continuous = True

    def __init__(self, p: LogNormalParams):
        self.p_mean, self.p_std = p.p_mean, p.p_std
        self.sigmas = rho_sigmas(p.sigma_max, p.sigma_min, p.num_levels, p.rho)

    def sample_sigmas(self, batch_size: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        n = torch.randn(batch_size, generator=generator, dtype=torch.float64,
                        device=generator.device if generator is not None else "cpu")
        sigma = (self.p_mean + self.p_std * n).exp().float().to(device)
        return sigma, self.nearest_level(sigma)

    def __repr__(self) -> str:
        return (f"LogNormalSchedule(ln sigma ~ N({self.p_mean:g}, {self.p_std:g}^2), "
                f"L={self.num_levels}: {float(self.sigmas[0]):g} -> {float(self.sigmas[-1]):g})")


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("schedule", "geometric", build, GeometricParams,
                 "geometric sigmas; sigma_max/num_levels may be 'auto' (NCSNv2 techniques 1, 2)")
    registry.add("schedule", "log_uniform", build_log_uniform, GeometricParams,
                 "training draws log sigma uniformly in [sigma_min, sigma_max] (score_sde VE); "
                 "samplers walk geometric levels")
    registry.add("schedule", "log_normal", LogNormalSchedule, LogNormalParams,
                 "training draws ln sigma ~ N(p_mean, p_std^2) (EDM); samplers walk "
                 "rho-spaced levels")
