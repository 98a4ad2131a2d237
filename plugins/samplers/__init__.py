"""Built-in samplers, one module each, registered through the plugin hook
(docs/theory.md#annealed-langevin, docs/theory.md#samplers-beyond-langevin)."""
from __future__ import annotations

from scoretk import hookimpl

from .consistent import ConsistentAnnealed, ConsistentParams
from .flow import FlowParams, ProbabilityFlow
from .heun import Heun, HeunParams
from .langevin import AnnealedLangevin, LangevinParams
from .langevin import build as build_langevin
from .pc import PCParams, PredictorCorrector

__all__ = ["AnnealedLangevin", "ConsistentAnnealed", "Heun", "PredictorCorrector",
           "ProbabilityFlow", "scoretk_register"]


@hookimpl
def scoretk_register(registry) -> None:
    add = lambda name, factory, params, text: registry.add("sampler", name, factory, params, text)  # noqa: E731
    add("annealed_langevin", build_langevin, LangevinParams,
        "annealed Langevin dynamics, eps by NCSNv2 Proposition 3 unless given")
    add("consistent_annealed", ConsistentAnnealed, ConsistentParams,
        "consistent annealed sampling: one evaluation per level, noise kept at the schedule")
    add("pc", PredictorCorrector, PCParams,
        "predictor-corrector: reverse-diffusion predictor, Langevin corrector at a fixed snr")
    add("heun", Heun, HeunParams,
        "EDM's second-order sampler (Heun steps, optional churn) on the schedule or rho grid")
    add("probability_flow", ProbabilityFlow, FlowParams,
        "the probability-flow ODE: fixed Heun steps or an adaptive solver (torchdiffeq)")
