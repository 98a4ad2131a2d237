"""Log-likelihoods and bits per dimension of data under a score net (docs/theory.md#likelihood).

The probability-flow ODE dx/dsigma = f(x, sigma) = -sigma s(x, sigma) maps p_sigma_min to
p_sigma_max, and along it d log p / dsigma = -div f (the instantaneous change of variables).
Integrating x up from sigma_min with the divergence gives

    log p_sigma_min(x) = log N(x(sigma_max); 0, sigma_max^2 I) + integral of div f dsigma,

the prior standing in for p_sigma_max. The divergence is Hutchinson's estimate v^T (df/dx) v
with one Rademacher v per sample for the whole path (one vector-Jacobian product per
evaluation), so each sample's estimate is unbiased and noisy; averages over many samples are
what to report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from scoretk.components import Noise, Schedule
from scoretk.flow import integrate_adaptive, integrate_heun
from scoretk.score import ScoreFn, require_any_sigma


@dataclass
class Likelihood:
    log_density: Tensor
    """(B,) nats: the estimate of log p_sigma_min(x) for each sample."""
    evaluations: int
    """Network evaluations per sample, each with a vector-Jacobian product."""
    dim: int
    """Values per sample (D)."""

    def bits_per_dim(self, bins: int | None = 256) -> Tensor:
        """(B,) bits per dimension; `bins` levels per value for dequantised discrete data
        (8-bit images: 256, adding log2(256) = 8 for the [0, 1] scale), None for real data."""
        offset = math.log(bins) if bins else 0.0
        return (-self.log_density / self.dim + offset) / math.log(2)


def dequantise(x: Tensor, noise: Noise, levels: int = 256) -> Tensor:
    """Uniform dequantisation of data in [0, 1] on a grid of `levels` values:
    (k + u) / levels with k = round(x (levels - 1)), u ~ U[0, 1) per value."""
    k = torch.round(x * (levels - 1))
    return (k + noise.rand(tuple(x.shape[1:])).to(x.device)) / levels


def log_likelihood(net: nn.Module, schedule: Schedule, x: Tensor, noise: Noise, *,
                   solver: Literal["adaptive", "heun"] = "adaptive", rtol: float = 1e-5,
                   atol: float = 1e-5, method: str = "dopri5",
                   max_evaluations: int = 5000) -> Likelihood:
    """log p_sigma_min(x) for a batch x, by the probability-flow ODE from sigma_min to
    sigma_max. `solver: heun` steps through the schedule's own sigmas (any net, coarse);
    `adaptive` needs torchdiffeq and a net that accepts any sigma. `noise` gives each
    sample's Rademacher vector."""
    if solver == "adaptive":
        require_any_sigma(net, "the adaptive likelihood solver")
    sigmas = schedule.sigmas.tolist()
    score = ScoreFn(net, sigmas, limit=max_evaluations)
    v = torch.where(noise.rand(tuple(x.shape[1:])).to(x.device) < 0.5, -1.0, 1.0).to(x.dtype)

    def derivative(sigma: float, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            f = -sigma * score(y, sigma)
            vjp, = torch.autograd.grad((f * v).sum(), y)
        return f.detach(), (vjp * v).flatten(1).sum(1)

    state = (x.detach(), x.new_zeros(x.shape[0]))
    if solver == "adaptive":
        end = integrate_adaptive(derivative, state, sigmas[-1], sigmas[0], rtol=rtol,
                                 atol=atol, method=method)
    else:
        end = integrate_heun(derivative, state, sigmas[::-1])
    x_end, delta = end
    dim = x[0].numel()
    prior = (-0.5 * x_end.flatten(1).pow(2).sum(1) / sigmas[0] ** 2
             - dim * math.log(sigmas[0]) - 0.5 * dim * math.log(2 * math.pi))
    return Likelihood(prior + delta, score.evaluations, dim)
