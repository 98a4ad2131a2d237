"""NCSNv2's configuration rules (docs/theory.md#ncsnv2-techniques) against closed forms and
released configs."""
import math

import pytest
import torch

from scoretk_plugins import ncsn_theory as th

Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731


# --- Technique 1 -------------------------------------------------------------------------------

def test_max_distance_known_points():
    # unit cube corners in 3-D: the diagonal sqrt(3); plus an interior point that must not win
    corners = torch.tensor([[i >> k & 1 for k in range(3)] for i in range(8)], dtype=torch.float32)
    x = torch.cat([corners, torch.full((1, 3), 0.5)])
    for chunk in (1, 2, 3, 1024):
        assert th.max_pairwise_distance(x, chunk=chunk) == pytest.approx(math.sqrt(3), rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_max_distance_matches_cdist(chunk):
    x = torch.randn(301, 2, 4, 3, generator=torch.Generator().manual_seed(0))  # image-shaped
    flat = x.flatten(1)
    brute = torch.cdist(flat, flat).max().item()
    assert th.max_pairwise_distance(x, chunk=chunk) == pytest.approx(brute, rel=1e-5)


def test_max_distance_subset_is_bounded_and_seeded():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    full = th.max_pairwise_distance(x)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    sub = th.max_pairwise_distance(x, max_points=50, chunk=8, generator=g())
    assert 0 < sub <= full + 1e-5
    assert sub == th.max_pairwise_distance(x, max_points=50, chunk=8, generator=g())


# --- Technique 2 -------------------------------------------------------------------------------

def test_overlap_formula():
    assert th.overlap(1.0, 100) == pytest.approx(Phi(3) - Phi(-3), abs=1e-12)
    g, D = 1.05, 3072
    a = math.sqrt(2 * D) * (g - 1)
    assert th.overlap(g, D) == pytest.approx(Phi(a + 3 * g) - Phi(a - 3 * g), abs=1e-12)


@pytest.mark.parametrize("D,C", [(64, 0.5), (3072, 0.567), (196608, 0.2)])
def test_gamma_solves_overlap(D, C):
    g = th.gamma_for_overlap(D, C)
    assert g > 1 and th.overlap(g, D) == pytest.approx(C, abs=1e-10)


def test_gamma_unreachable_raises():
    with pytest.raises(ValueError):
        th.gamma_for_overlap(4, 0.5)  # sqrt(2D) <= 3: the overlap never falls to C
    with pytest.raises(ValueError):
        th.gamma_for_overlap(64, 0.999)


@pytest.mark.parametrize("D,s1,L", [
    (3 * 32 * 32, 50, 232),     # CIFAR-10
    (3 * 64 * 64, 90, 500),     # CelebA 64
    (3 * 96 * 96, 140, 788),    # LSUN church
    (3 * 128 * 128, 190, 1086),  # LSUN bedroom
    (3 * 256 * 256, 348, 2311),  # FFHQ
])
def test_num_levels_released_configs(D, s1, L):
    # Rounding down reproduces all five released L at C = 0.567 (round-to-nearest would give
    # 789 and 1087 for church and bedroom; rounding up 233 for CIFAR-10).
    assert th.num_levels(s1, 0.01, D, C=0.567) == L


def test_digits_numbers():
    # docs/theory.md#worked-example-digits: D = 64, sigma 4.81 -> 0.01, C = 0.5.
    g = th.gamma_for_overlap(64, 0.5)
    assert g == pytest.approx(1.361, abs=5e-4)
    exact = 1 + math.log(4.81 / 0.01) / math.log(g)
    assert exact == pytest.approx(21.04, abs=0.01)
    # 21.04 rounded UP would be 22; the rule fixed by the released configs (round down, see
    # above) gives 21. The eps numbers quoted there use gamma ~ 1.361.
    assert th.num_levels(4.81, 0.01, 64, 0.5) == 21
    # quoted values must agree to the digits quoted (half a unit of the last digit)
    for T, eps, e_tol, ratio, r_tol in [(5, 2.4e-5, 5e-7, 1.18, 5e-3),
                                        (20, 9.9e-6, 5e-8, 1.064, 5e-4),
                                        (60, 4.3e-6, 5e-8, 1.026, 5e-4)]:
        e, r = th.solve_eps(T, 0.01, g)
        assert e == pytest.approx(eps, abs=e_tol) and r == pytest.approx(ratio, abs=r_tol)


def test_geometric_sigmas():
    s = th.geometric_sigmas(50, 0.01, 232)
    assert s.dtype == torch.float32 and s.shape == (232,)
    assert s[0].item() == 50.0 and s[-1].item() == pytest.approx(0.01, rel=1e-7)
    ratios = (s[:-1].double() / s[1:].double())
    assert (ratios > 1).all()
    assert ratios.std().item() < 1e-6 and ratios.mean().item() == pytest.approx(5000 ** (1 / 231))


# --- Proposition 3 -----------------------------------------------------------------------------

def test_prop3_ratio_is_the_variance_recurrence():
    eps, T, sL, g = 3e-5, 7, 0.01, 1.2
    u = eps / sL**2
    b_doc = 2 * eps / (sL**2 - sL**2 * (1 - u) ** 2)  # as written in docs/theory.md#proposition-3
    ratio_doc = (1 - u) ** (2 * T) * (g**2 - b_doc) + b_doc
    v = g**2  # variance / sigma_i^2, stepped with x <- (1 - u) x + sqrt(2 u sigma_i^2) z
    for _ in range(T):
        v = (1 - u) ** 2 * v + 2 * u
    assert th.prop3_ratio(eps, T, sL, g) == pytest.approx(ratio_doc, rel=1e-12)
    assert th.prop3_ratio(eps, T, sL, g) == pytest.approx(v, rel=1e-12)


@pytest.mark.parametrize("T,L,s1,config,minimiser", [
    (5, 232, 50, 6.2e-6, 6.17e-6),     # CIFAR-10
    (5, 500, 90, 3.3e-6, 3.34e-6),     # CelebA
    (3, 1086, 190, 1.8e-6, 1.76e-6),   # LSUN bedroom
    (3, 2311, 348, 9e-7, 8.93e-7),     # FFHQ (config given to one digit)
])
def test_solve_eps_released_configs(T, L, s1, config, minimiser):
    gamma = (s1 / 0.01) ** (1 / (L - 1))
    eps, ratio = th.solve_eps(T, 0.01, gamma)
    digits = 1 if config == 9e-7 else 2
    assert float(f"{eps:.{digits - 1}e}") == config
    assert eps == pytest.approx(minimiser, rel=0.01)
    assert ratio == pytest.approx(th.prop3_ratio(eps, T, 0.01, gamma))
    # it is the minimum of |ratio - 1| on (0, 2 sigma_L^2): a dense grid does no better
    grid = torch.linspace(1e-9, 2 - 1e-9, 200_001, dtype=torch.float64) * 0.01**2
    assert (th.prop3_ratio(grid, T, 0.01, gamma) - 1).abs().min().item() >= abs(ratio - 1) - 1e-12
    assert ratio > 1  # b = 2/(2-u) > 1 makes every ratio > 1: never reachable for finite T


def test_solve_eps_cifar_ratio():
    eps, ratio = th.solve_eps(5, 0.01, 5000 ** (1 / 231))
    assert ratio == pytest.approx(1.055, abs=5e-4)


def test_solve_eps_rejects_nonsense():
    with pytest.raises(ValueError):
        th.solve_eps(0, 0.01, 1.1)
    with pytest.raises(ValueError):
        th.solve_eps(5, 0.01, 1.0)
