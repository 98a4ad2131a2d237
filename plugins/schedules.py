"""Schedule `geometric`: sigma_1 > ... > sigma_L with a constant ratio, given or derived from data.

`sigma_max: auto` applies NCSNv2 Technique 1 and `num_levels: auto` Technique 2
(docs/theory.md#technique-1, #technique-2); `resolve(data)`
fills them in once, before `build`, so the resolved numbers can be recorded with the run.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

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


def build(params: GeometricParams) -> GeometricSchedule:
    for name in ("sigma_max", "num_levels"):
        if getattr(params, name) == "auto":
            raise ValueError(f"schedule.{name} is 'auto': resolve it from the dataset first "
                             "(params.resolve(dataset)) or give a number")
    return GeometricSchedule(params.sigma_max, params.sigma_min, params.num_levels)


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("schedule", "geometric", build, GeometricParams,
                 "geometric sigmas; sigma_max/num_levels may be 'auto' (NCSNv2 techniques 1, 2)")
