"""Sampler `annealed_langevin` (docs/theory.md#annealed-langevin), with eps from Proposition 3
(docs/theory.md#proposition-3) by default.

Step a_i = eps (sigma_i/sigma_L)^2 keeps the step-to-variance ratio a_i/sigma_i^2 equal at every
level, so one eps (and Prop. 3's rule for it) serves the whole schedule. The loop touches the
host only for the optional progress callback and diagnostics, so it runs ahead on a GPU.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import Condition, Noise, ProgressFn, Sampler, Schedule

from .. import ncsn_theory as theory
from .common import Init, StartParams, geometric_ratio, initial_state, noised


class LangevinParams(StartParams):
    steps_per_level: Annotated[int, Field(gt=0)] = Field(
        5, description="Langevin steps T at each noise level")
    eps: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="step at sigma_L (a_i = eps sigma_i^2/sigma_L^2, the released "
        "code's convention); auto: NCSNv2 Proposition 3 for this T")
    denoise: bool = Field(True, description="final Tweedie step x + sigma_L^2 s (one evaluation)")
    init: Init = Field("uniform", description="starting point as for the other samplers; "
                       "uniform U[0,1]^D, the released code's, by default")
    diagnostics: bool = Field(False, description="log per-level health numbers "
                              "(diagnostics_log; syncs with the device)")


class AnnealedLangevin(Sampler):
    def __init__(self, steps_per_level: int = 5, eps: float | str = "auto", denoise: bool = True,
                 init: str = "uniform", clamp: bool = False, diagnostics: bool = False):
        self.T, self.eps, self.denoise, self.init = steps_per_level, eps, denoise, init
        self.clamp, self.diagnostics = clamp, diagnostics
        self.diagnostics_log: list[dict] = []

    def resolve_eps(self, schedule: Schedule) -> tuple[float, float | None]:
        """(eps, Prop. 3 ratio s_T^2/sigma_i^2 for that eps; None with fewer than two levels)."""
        s = schedule.sigmas
        sigma_min = float(s[-1])
        gamma = geometric_ratio(s) if len(s) > 1 else None
        if self.eps == "auto":
            if gamma is None:
                raise ValueError("sampler.eps='auto' needs at least two noise levels (Prop. 3)")
            return theory.solve_eps(self.T, sigma_min, gamma)
        eps = float(self.eps)
        if eps >= 2 * sigma_min**2:
            raise ValueError(f"sampler.eps={eps:g} must be below 2 sigma_L^2 = {2 * sigma_min**2:g}: "
                             "larger steps diverge (every level's step exceeds 2 sigma_i^2)")
        return eps, None if gamma is None else float(theory.prop3_ratio(eps, self.T, sigma_min, gamma))

    def evaluations_per_sample(self, schedule: Schedule) -> int:
        return schedule.num_levels * self.T + int(self.denoise)

    @property
    def starts_from_data(self) -> bool:
        return self.init == "data"

    def settings(self, schedule: Schedule) -> dict:
        eps, ratio = self.resolve_eps(schedule)
        return dict(kind="annealed_langevin", steps_per_level=self.T, eps=eps,
                    eps_rule="prop3" if self.eps == "auto" else "given", prop3_ratio=ratio,
                    denoise=self.denoise, init=self.init, clamp=self.clamp,
                    num_levels=schedule.num_levels, sigma_max=float(schedule.sigmas[0]),
                    sigma_min=float(schedule.sigmas[-1]),
                    evaluations_per_sample=self.evaluations_per_sample(schedule))

    @torch.no_grad()
    def sample(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
               *, device: torch.device | str = "cpu", init: Tensor | None = None,
               progress: ProgressFn | None = None,
               condition: Condition | None = None) -> Tensor:
        shape, sigmas = tuple(shape), schedule.sigmas
        eps, _ = self.resolve_eps(schedule)
        s1, sL = float(sigmas[0]), float(sigmas[-1])
        x = initial_state(self.init, noise, shape, s1, init, device)
        self.diagnostics_log = []
        total = self.evaluations_per_sample(schedule)
        x = self.run_levels(net, x, sigmas, noise, eps=eps, sigma_min=sL, progress=progress,
                            total=total, condition=condition)
        if self.denoise:
            B, L = x.shape[0], schedule.num_levels
            sig = torch.full((B,), sL, device=x.device, dtype=x.dtype)
            lvl = torch.full((B,), L - 1, device=x.device, dtype=torch.long)
            x = noised(condition, x, sL, noise)
            x = x + sL**2 * net(x, sig, lvl)  # Tweedie: E[x | x~] for x~ at sigma_L
            if progress is not None:
                progress(total, total)
        self.last_evaluations = total
        if condition is not None:
            x = condition.impose(x, 0.0)
        return x.clamp_(0, 1) if self.clamp else x

    @torch.no_grad()
    def run_levels(self, net: nn.Module, x: Tensor, sigmas: Tensor, noise: Noise, *, eps: float,
                   sigma_min: float, first_level: int = 0, progress: ProgressFn | None = None,
                   total: int | None = None, condition: Condition | None = None) -> Tensor:
        """T Langevin steps at each of `sigmas` (levels first_level, first_level+1, ...).

        `sigma_min` is the schedule's sigma_L, which sets a_i = eps (sigma_i/sigma_L)^2 even when
        only some levels run (one level alone is Proposition 3's setting). A condition's known
        part is set to the known values plus fresh sigma_i noise before every step.
        """
        B, shape = x.shape[0], tuple(x.shape[1:])
        total = total if total is not None else len(sigmas) * self.T
        for k, sigma in enumerate(sigmas.tolist()):  # one host copy before the loop, none inside
            a = eps * (sigma / sigma_min) ** 2
            sig = torch.full((B,), sigma, device=x.device, dtype=x.dtype)
            lvl = torch.full((B,), first_level + k, device=x.device, dtype=torch.long)
            for _ in range(self.T):
                x = noised(condition, x, sigma, noise)
                score = net(x, sig, lvl)
                z = noise.randn(shape).to(x.device)
                x = x + a * score + math.sqrt(2 * a) * z
            if self.diagnostics:
                self.diagnostics_log.append(self._diagnose(first_level + k, sigma, a, x, score, z))
            if progress is not None:
                progress((first_level + k + 1) * self.T, total)
        return x

    @staticmethod
    def _diagnose(level: int, sigma: float, a: float, x: Tensor, score: Tensor, z: Tensor) -> dict:
        """Per-level health numbers (these sync with the device): sigma*||s|| should stay near
        sqrt(D); snr is the drift-to-noise ratio of the last step."""
        norm = lambda t: t.flatten(1).norm(dim=1).mean().item()  # noqa: E731
        return dict(level=level, sigma=sigma, step=a, x_norm=norm(x), score_norm=norm(score),
                    scaled_score_norm=sigma * norm(score),
                    snr=a * norm(score) / (math.sqrt(2 * a) * norm(z)))


def build(params: LangevinParams) -> AnnealedLangevin:
    return AnnealedLangevin(**params.model_dump())

