"""A complete third-party scoretk plugin: one Schedule, `linear`."""
import torch
from pydantic import Field

from scoretk import hookimpl
from scoretk.components import Schedule
from scoretk.registry import Params


class LinearParams(Params):
    sigma_max: float = Field(gt=0)
    sigma_min: float = Field(gt=0)
    num_levels: int = Field(ge=2)


class LinearSchedule(Schedule):
    def __init__(self, p: LinearParams):
        self.sigmas = torch.linspace(p.sigma_max, p.sigma_min, p.num_levels)


@hookimpl
def scoretk_register(registry):
    registry.add("schedule", "linear", LinearSchedule, LinearParams,
                 "sigmas evenly spaced from sigma_max down to sigma_min")
