"""The probability-flow ODE of the variance-exploding process and two ways to integrate it
(docs/theory.md#probability-flow).

dx/dsigma = -sigma s(x, sigma) carries p_sigma_max to p_sigma_min deterministically, so one net
serves a sampler (integrate down) and a likelihood (integrate up, with the divergence). States
are a tensor or a tuple of tensors (the likelihood carries x and the log-density change).
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

from scoretk.components import Condition
from scoretk.score import ScoreFn, SolverError

State = Union[Tensor, tuple[Tensor, ...]]
Derivative = Callable[[float, State], State]


def _step(y: State, h: float, d: State) -> State:
    if isinstance(y, Tensor):
        return y + h * d
    return tuple(a + h * b for a, b in zip(y, d))


def _mean(a: State, b: State) -> State:
    if isinstance(a, Tensor):
        return 0.5 * (a + b)
    return tuple(0.5 * (u + v) for u, v in zip(a, b))


def heun_step(f: Derivative, t: float, y: State, t_next: float) -> State:
    """One step of Heun's method (trapezoid predictor-corrector) from t to t_next; an Euler
    step when t_next is 0, where the derivative is undefined (the score grows like 1/sigma^2).
    Two evaluations of f, one for the Euler step."""
    d = f(t, y)
    y_next = _step(y, t_next - t, d)
    if t_next == 0:
        return y_next
    return _step(y, t_next - t, _mean(d, f(t_next, y_next)))


def integrate_heun(f: Derivative, y: State, ts: list[float]) -> State:
    """Heun steps through the grid ts (any direction)."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        y = heun_step(f, t, y, t_next)
    return y


def integrate_adaptive(f: Derivative, y: State, t0: float, t1: float, *, rtol: float,
                       atol: float, method: str = "dopri5") -> State:
    """torchdiffeq's adaptive solver from sigma t0 to sigma t1 (both > 0), in u = log sigma:
    dy/du = sigma dy/dsigma. The solver steps past its end point and interpolates back, and
    in sigma that would evaluate the net at negative noise levels; in log sigma every point
    is a noise level, and steps come out geometric, as the schedules are. The step size
    follows the error of the whole batch, so a sample agrees across batch layouts to the
    tolerances, not bit for bit."""
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ValueError("the adaptive ODE solver needs torchdiffeq: pip install "
                         "'scoretk[ode]', or use the fixed-step solver (solver: heun)") from None
    if not (t0 > 0 and t1 > 0):
        raise ValueError(f"the adaptive solver integrates between positive noise levels "
                         f"(got {t0} to {t1})")
    first = y if isinstance(y, Tensor) else y[0]
    u = torch.tensor([math.log(t0), math.log(t1)], dtype=first.dtype, device=first.device)

    def in_log_sigma(u_now: Tensor, state: State) -> State:
        sigma = math.exp(float(u_now))
        d = f(sigma, state)
        return d * sigma if isinstance(d, Tensor) else tuple(part * sigma for part in d)

    try:
        out = odeint(in_log_sigma, y, u, rtol=rtol, atol=atol, method=method)
    except AssertionError as exc:  # torchdiffeq's "underflow in dt": the error never fell
        raise SolverError(f"the adaptive ODE solver failed ({exc}): the net's output is "
                          "too rough for rtol/atol, or not finite; try tighter tolerances "
                          "or the fixed-step solver") from None
    return out[-1] if isinstance(out, Tensor) else tuple(o[-1] for o in out)


def flow_derivative(score: ScoreFn, condition: Condition | None = None,
                    z: Tensor | None = None) -> Callable[[float, Tensor], Tensor]:
    """dx/dsigma = -sigma s(x, sigma). With a condition, the known part moves along
    y + sigma z (z drawn once: a deterministic path) and the score sees it imposed."""
    if condition is None:
        return lambda sigma, x: -sigma * score(x, sigma)

    def derivative(sigma: float, x: Tensor) -> Tensor:
        d = -sigma * score(condition.impose(x, sigma, z), sigma)
        return d - condition.project(d) + condition.project(z)
    return derivative
