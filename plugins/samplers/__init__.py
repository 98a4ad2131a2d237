"""Built-in samplers, one module each, registered through the plugin hook."""
from __future__ import annotations

from scoretk import hookimpl

from .langevin import AnnealedLangevin, LangevinParams
from .langevin import build as build_langevin

__all__ = ["AnnealedLangevin", "LangevinParams", "scoretk_register"]


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("sampler", "annealed_langevin", build_langevin, LangevinParams,
                 "annealed Langevin dynamics, eps by NCSNv2 Proposition 3 unless given")
