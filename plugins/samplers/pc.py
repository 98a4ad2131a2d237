"""Sampler `pc`: predictor-corrector sampling of the variance-exploding process on the
schedule's sigmas (Song et al., ICLR 2021; docs/theory.md#predictor-corrector).

At each level: `corrector_steps` Langevin steps whose size makes the drift-to-noise ratio
`snr`, then the reverse-diffusion predictor from sigma_i to sigma_{i+1} (sigma_{L+1} = 0, where
the predictor's mean is returned without noise: Tweedie's denoising).
"""
from __future__ import annotations

import math
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import Condition, Noise, ProgressFn, Schedule
from scoretk.score import ScoreFn

from .common import ParamsSampler, StartParams, noised


class PCParams(StartParams):
    snr: Annotated[float, Field(gt=0)] = Field(
        0.16, description="corrector's signal-to-noise ratio ||a s|| / ||sqrt(2a) z||, which "
        "sets its step a per sample (0.16: Song et al.'s CIFAR-10 value)")
    corrector_steps: Annotated[int, Field(ge=0)] = Field(
        1, description="Langevin corrector steps before each predictor step (0: predictor "
        "only, i.e. reverse diffusion)")
    norms: Literal["expected", "batch"] = Field(
        "expected", description="norms in the snr rule: expected (their values in many "
        "dimensions: a = 2 snr^2 sigma^2, the same for every sample) or batch (means over the "
        "batch, as Song et al.'s code; samples then depend on their batch)")


def corrector_step(score: ScoreFn, x: Tensor, sigma: float, noise: Noise, snr: float,
                   norms: str, condition: Condition | None) -> Tensor:
    """Langevin step a = 2 (snr ||z|| / ||s||)^2 (docs/theory.md#predictor-corrector).

    norms 'expected': ||z||^2 = D and ||s||^2 = D/sigma^2, their values for p_sigma in many
    dimensions, so a = 2 snr^2 sigma^2 for every sample. 'batch': the norms' means over the
    batch (Song et al.'s code; a sample then depends on its batch). Per-sample norms would
    make the step depend on x, which biases the chain where norms vary (few dimensions)."""
    x = noised(condition, x, sigma, noise)
    s = score(x, sigma)
    z = noise.randn(tuple(x.shape[1:])).to(x.device)
    if norms == "batch":
        a = 2 * (snr * z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2
    else:
        a = 2 * snr**2 * sigma**2
    return x + a * s + math.sqrt(2) * a**0.5 * z


def predictor_corrector(score: ScoreFn, x: Tensor, sigmas: list[float], noise: Noise, *,
                        snr: float, corrector_steps: int, norms: str = "expected",
                        condition: Condition | None = None,
                        callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    shape = tuple(x.shape[1:])
    for i, sigma in enumerate(sigmas):
        for _ in range(corrector_steps):
            x = corrector_step(score, x, sigma, noise, snr, norms, condition)
        nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
        var = sigma**2 - nxt**2
        x = x + var * score(noised(condition, x, sigma, noise), sigma)
        if nxt > 0:
            x = x + math.sqrt(var) * noise.randn(shape).to(x.device)
        if callback is not None:
            callback(i, x)
    return x


class PredictorCorrector(ParamsSampler):
    p: PCParams

    def evaluations_per_sample(self, schedule: Schedule) -> int:
        return schedule.num_levels * (self.p.corrector_steps + 1)

    def settings(self, schedule: Schedule) -> dict:
        return dict(kind="pc", predictor="reverse_diffusion", corrector="langevin",
                    snr=self.p.snr, corrector_steps=self.p.corrector_steps, norms=self.p.norms,
                    init=self.p.init,
                    clamp=self.p.clamp,
                    evaluations_per_sample=self.evaluations_per_sample(schedule))

    @torch.no_grad()
    def sample(self, net: nn.Module, schedule: Schedule, shape: tuple[int, ...], noise: Noise,
               *, device: torch.device | str = "cpu", init: Tensor | None = None,
               progress: ProgressFn | None = None,
               condition: Condition | None = None) -> Tensor:
        sigmas = schedule.sigmas.tolist()
        score, x = self.start(net, schedule, shape, noise, init, device, progress, sigmas[0])
        x = predictor_corrector(score, x, sigmas, noise, snr=self.p.snr,
                                corrector_steps=self.p.corrector_steps, norms=self.p.norms,
                                condition=condition)
        return self.finish(x, score, condition)
