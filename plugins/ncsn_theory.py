"""NCSNv2's closed-form rules for picking a configuration, as pure functions
(docs/theory.md#ncsnv2-techniques).

Technique 1 (sigma_1 = largest pairwise distance), Technique 2 (the ratio gamma from the overlap
criterion, hence L) and Proposition 3 (the Langevin step eps for a given T). Kept free of any
component machinery so recipes, samplers, benchmarks and tests share one implementation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


# --- Technique 1 -------------------------------------------------------------------------------

def max_pairwise_distance(x: Tensor, max_points: int = 10_000, chunk: int = 1024,
                          generator: torch.Generator | None = None) -> float:
    """Largest Euclidean distance between two items of `x` (items flattened).

    With more than `max_points` items a random subset is used (the paper's 10k). Rows are
    processed `chunk` at a time against the rows after them, so memory is chunk x N distances,
    never N x N.
    """
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] > max_points:
        idx = torch.randperm(x.shape[0], generator=generator, device=generator.device
                             if generator is not None else "cpu")[:max_points]
        x = x[idx.to(x.device)]
    x = x.float() if not x.is_floating_point() else x
    best = x.new_zeros(())
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start:start + chunk], x[start:])  # upper triangle incl. diagonal block
        best = torch.maximum(best, d.max())
    return float(best)


# --- Technique 2 -------------------------------------------------------------------------------

def overlap(gamma: float, dim: int) -> float:
    """Phi(sqrt(2D)(g-1) + 3g) - Phi(sqrt(2D)(g-1) - 3g): how much mass of the shell at one noise
    level lies within 3 std of the next (docs/theory.md#technique-2). Written with erfc to stay
    exact in the tails."""
    a, w = math.sqrt(2 * dim) * (gamma - 1), 3 * gamma
    return 0.5 * (math.erfc((a - w) / math.sqrt(2)) - math.erfc((a + w) / math.sqrt(2)))


def gamma_for_overlap(dim: int, C: float = 0.5, tol: float = 1e-14) -> float:
    """The ratio gamma > 1 with overlap(gamma, dim) = C, by bisection.

    overlap(1) = Phi(3) - Phi(-3) ~ 0.9973, so C must be below that; for D <= 4 the overlap never
    falls to C (the shell widths grow faster than their gap) and this raises.
    """
    if not 0 < C < overlap(1.0, dim):
        raise ValueError(f"overlap C={C} must lie in (0, {overlap(1.0, dim):.4f})")
    lo, hi = 1.0, 2.0
    while overlap(hi, dim) > C:
        lo, hi = hi, 2 * hi
        if hi > 2**40:
            raise ValueError(f"overlap never falls to C={C} for dim={dim}")
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if overlap(mid, dim) > C else (lo, mid)
    return 0.5 * (lo + hi)


def num_levels(sigma_max: float, sigma_min: float, dim: int, C: float = 0.5) -> int:
    """L = 1 + log(sigma_1/sigma_L)/log(gamma), rounded DOWN (at least 2).

    Rounding down reproduces every released NCSNv2 config at C = 0.567 (exact values: CIFAR-10
    232.007, CelebA 500.04, church 788.56, bedroom 1086.52, FFHQ 2311.25); rounding to nearest
    or up would not. The resulting ratio is then slightly above gamma (overlap slightly below C).
    """
    exact = 1 + math.log(sigma_max / sigma_min) / math.log(gamma_for_overlap(dim, C))
    return max(2, math.floor(exact + 1e-9))


def geometric_sigmas(sigma_max: float, sigma_min: float, L: int) -> Tensor:
    """sigma_i = sigma_1 (sigma_L/sigma_1)^((i-1)/(L-1)): (L,) float32, descending, computed in
    float64 so the end points are exact."""
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), L,
                          dtype=torch.float64).float()


# --- Proposition 3 -----------------------------------------------------------------------------

def prop3_ratio(eps: float | Tensor, T: int, sigma_min: float, gamma: float) -> float | Tensor:
    """s_T^2 / sigma_i^2 after T Langevin steps at one level, started at N(0, sigma_{i-1}^2 I).

    With u = eps/sigma_L^2 (the step relative to sigma_i^2 at every level), each step maps the
    variance v to (1-u)^2 v + 2 u sigma_i^2, whose fixed point is b sigma_i^2 with
    b = 2 eps / (sigma_L^2 - sigma_L^2 (1-u)^2) = 2/(2-u).
    """
    u = eps / sigma_min**2
    b = 2 / (2 - u)
    return ((1 - u) ** 2) ** T * (gamma**2 - b) + b


def solve_eps(T: int, sigma_min: float, gamma: float) -> tuple[float, float]:
    """(eps, ratio): the eps in (0, 2 sigma_L^2) bringing prop3_ratio closest to 1.

    Minimises |ratio - 1|, so a root is returned wherever one exists. For this formula none
    does: b = 2/(2-u) > 1, and ratio is a convex combination of gamma^2 > 1 and b, so it is > 1
    for every eps and finite T -- the minimiser is the stationary point. A log-spaced grid over
    u = eps/sigma_L^2 finds the basin, golden-section search polishes it.
    """
    if T < 1 or not gamma > 1 or not sigma_min > 0:
        raise ValueError(f"need T >= 1, gamma > 1, sigma_min > 0 (got {T}, {gamma}, {sigma_min})")
    f = lambda u: abs(prop3_ratio(u * sigma_min**2, T, sigma_min, gamma) - 1)  # noqa: E731
    u = torch.logspace(-12, math.log10(2), 4001, dtype=torch.float64)[:-1]
    err = (prop3_ratio(u * sigma_min**2, T, sigma_min, gamma) - 1).abs()
    k = int(err.argmin())
    lo, hi = float(u[k - 1]) if k > 0 else 0.0, float(u[min(k + 1, len(u) - 1)])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(200):
        if f(a) < f(b):
            hi, b = b, a
            a = hi - g * (hi - lo)
        else:
            lo, a = a, b
            b = lo + g * (hi - lo)
        if hi - lo < 1e-15 * hi:
            break
    best = 0.5 * (lo + hi)
    if f(float(u[k])) < f(best):
        best = float(u[k])
    eps = best * sigma_min**2
    return eps, float(prop3_ratio(eps, T, sigma_min, gamma))
