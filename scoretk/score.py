"""A score net as the function samplers and likelihoods call: s(x, sigma) for a float sigma.

Nets take `net(x, sigma, level)`; samplers think in sigmas. `ScoreFn` fills in the level (the
schedule's nearest, which level-conditioned nets read and the others ignore), counts network
evaluations and reports them as progress, so every sampler counts its cost the same way.
"""
from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor, nn

from scoretk.components import ProgressFn


def accepts_any_sigma(net: nn.Module) -> bool:
    """Whether `net` may be evaluated between the schedule's levels (wrappers such as the CPU
    batch split carry the wrapped net's flag)."""
    return bool(getattr(net, "accepts_any_sigma", True))


def require_any_sigma(net: nn.Module, who: str) -> None:
    """ValueError naming `who` when `net` knows only its schedule's levels (NCSN v1)."""
    if not accepts_any_sigma(net):
        raise ValueError(f"{who} evaluates the net between the schedule's noise levels, but "
                         f"{type(net).__name__} knows only its levels (accepts_any_sigma is "
                         "False); keep to the schedule's sigmas")


class SolverError(RuntimeError):
    """An ODE solver gave up (past its evaluation budget, or its step size underflowed); the
    message is one line saying what to try."""


class ScoreFn:
    """s(x, sigma) = net(x, sigma, nearest level), counting evaluations of the whole batch.

    `progress(done, total)` is called after every evaluation; `limit` (evaluations) stops an
    adaptive solver that would run away instead of letting it spin for hours.
    """

    def __init__(self, net: nn.Module, sigmas: Tensor | list[float], *,
                 progress: ProgressFn | None = None, total: int | None = None,
                 limit: int | None = None):
        self.net, self.progress, self.total, self.limit = net, progress, total, limit
        levels = sigmas.tolist() if isinstance(sigmas, Tensor) else list(sigmas)  # one host copy
        self._neg_log = [-math.log(s) for s in levels]  # ascending, for bisect
        self.evaluations = 0

    def level(self, sigma: float) -> int:
        """Index of the schedule level nearest to `sigma` in log scale."""
        if sigma <= 0:
            return len(self._neg_log) - 1
        key = -math.log(sigma)
        i = bisect.bisect_left(self._neg_log, key)
        if i == 0:
            return 0
        if i == len(self._neg_log):
            return i - 1
        return i if self._neg_log[i] - key < key - self._neg_log[i - 1] else i - 1

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        if self.limit is not None and self.evaluations >= self.limit:
            raise SolverError(f"the solver needed more than {self.limit} network evaluations "
                              "per sample; raise the sampler's max_evaluations or its tolerances")
        B = x.shape[0]
        s = float(sigma)
        sig = torch.full((B,), s, device=x.device, dtype=x.dtype)
        lvl = torch.full((B,), self.level(s), device=x.device, dtype=torch.long)
        out = self.net(x, sig, lvl)
        self.evaluations += 1
        if self.progress is not None:
            self.progress(self.evaluations, self.total or self.evaluations)
        return out

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        """Tweedie's posterior mean E[x_0 | x] = x + sigma^2 s(x, sigma)."""
        return x + sigma**2 * self(x, sigma)
