"""Schedules: `geometric` (params, auto resolution from data, its sigmas) and the continuous
`log_uniform` and `log_normal` (their draws against their distributions, nearest levels)."""
import math

import pytest
import torch
from pydantic import ValidationError

from scoretk.components import Dataset
from scoretk_plugins import ncsn_theory as th
from scoretk_plugins import schedules

from conftest import registry_of


class Tensors(Dataset):
    def __init__(self, x):
        self.x = x

    @property
    def shape(self):
        return tuple(self.x.shape[1:])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture
def registry():
    return registry_of(schedules)


def test_explicit(registry):
    s = registry.build("schedule", {"kind": "geometric", "sigma_max": 50, "sigma_min": 0.01,
                                    "num_levels": 232})
    assert s.num_levels == 232 and s.sigmas.dtype == torch.float32
    assert s.sigmas[0].item() == 50.0 and s.sigmas[-1].item() == pytest.approx(0.01)
    assert (s.sigmas[:-1] > s.sigmas[1:]).all()
    assert s.gamma == pytest.approx((5000) ** (1 / 231))
    lv = s.sample_levels(1000, torch.Generator().manual_seed(0))
    assert lv.dtype == torch.long and lv.min() >= 0 and lv.max() < 232


@pytest.mark.parametrize("bad", [
    {"sigma_max": -1, "num_levels": 10},
    {"sigma_max": 1, "num_levels": 1},
    {"sigma_max": 1, "num_levels": -3},
    {"sigma_max": 1, "num_levels": 10, "sigma_min": 0},
    {"sigma_max": 1, "num_levels": 10, "overlap": 1.5},
    {"sigma_max": 0.01, "num_levels": 10},               # not above sigma_min
    {"sigma_max": "big", "num_levels": 10},
    {"sigma_max": 1, "num_levels": 10, "sigmas": 3},     # unknown key
    {"num_levels": 10},                                  # sigma_max is required
])
def test_params_validation(registry, bad):
    with pytest.raises(ValidationError):
        registry.build("schedule", {"kind": "geometric", **bad})


def test_auto_needs_data_and_resolution(registry):
    with pytest.raises(ValueError, match="schedule.sigma_max"):
        registry.build("schedule", {"kind": "geometric", "sigma_max": "auto", "num_levels": 10})
    p = schedules.GeometricParams(sigma_max="auto", num_levels=10)
    with pytest.raises(ValueError, match="schedule.sigma_max"):
        p.resolve(None)
    p = schedules.GeometricParams(sigma_max=3.0, num_levels="auto")
    with pytest.raises(ValueError, match="schedule.num_levels"):
        p.resolve(None)


def test_resolve_from_data():
    x = torch.rand(300, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p = schedules.GeometricParams(sigma_max="auto", num_levels="auto", overlap=0.5)
    r = p.resolve(Tensors(x))
    brute = torch.cdist(x.flatten(1), x.flatten(1)).max().item()
    assert r.sigma_max == pytest.approx(brute, rel=1e-5)
    assert r.num_levels == th.num_levels(brute, 0.01, 16, 0.5)
    assert p.sigma_max == "auto"  # a copy: the original is untouched
    assert r.resolve(None) == r  # nothing left to resolve
    s = schedules.build(r)
    assert s.sigmas[0].item() == pytest.approx(brute, rel=1e-5)
    # the subset (at most max_points items) is drawn reproducibly
    a = p.resolve(Tensors(x), max_points=40).sigma_max
    assert a <= brute + 1e-5 and a == p.resolve(Tensors(x), max_points=40).sigma_max


def test_resolve_keeps_explicit_values():
    x = torch.rand(50, 8, generator=torch.Generator().manual_seed(0))
    r = schedules.GeometricParams(sigma_max=7.0, num_levels="auto", overlap=0.567).resolve(Tensors(x))
    exact = 1 + math.log(7.0 / 0.01) / math.log(th.gamma_for_overlap(8, 0.567))
    assert r.sigma_max == 7.0 and r.num_levels == math.floor(exact)


# --- continuous schedules -----------------------------------------------------------------

def brute_nearest(sigmas, sigma):
    """argmin_i |log sigma - log sigma_i|, by comparing with every level."""
    return (sigma.double().log()[:, None] - sigmas.double().log()[None]).abs().argmin(1)


def test_discrete_draws_are_levels_and_nearest_level_finds_them(registry):
    s = registry.build("schedule", {"kind": "geometric", "sigma_max": 5, "num_levels": 7})
    assert not s.continuous
    sigma, level = s.sample_sigmas(500, torch.Generator().manual_seed(0))
    assert torch.equal(sigma, s.sigmas[level])
    assert torch.equal(s.nearest_level(s.sigmas), torch.arange(7))
    step = s.gamma ** 0.5  # half a level on a log scale
    beyond = torch.tensor([5 * step * 1.001, 5 * step * 0.999, 0.01 / step / 1.001,
                           0.01 / step * 1.001])
    assert s.nearest_level(beyond).tolist() == [-1, 0, -1, 6]


def test_log_uniform_draws_log_sigma_uniformly(registry):
    s = registry.build("schedule", {"kind": "log_uniform", "sigma_max": 8.0, "sigma_min": 0.05,
                                    "num_levels": 12})
    geometric = registry.build("schedule", {"kind": "geometric", "sigma_max": 8.0,
                                            "sigma_min": 0.05, "num_levels": 12})
    assert s.continuous and torch.equal(s.sigmas, geometric.sigmas)  # the sampling levels
    n = 100_000
    sigma, level = s.sample_sigmas(n, torch.Generator().manual_seed(1))
    assert sigma.dtype == torch.float32 and level.dtype == torch.long and sigma.shape == (n,)
    u = (sigma.double().log() - math.log(0.05)) / math.log(8.0 / 0.05)  # U[0, 1] if right
    assert u.min() >= 0 and u.max() <= 1 + 1e-6
    # mean 1/2 and variance 1/12, each within 4 standard errors
    assert abs(u.mean().item() - 0.5) < 4 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 4 * (1 / 180 / n) ** 0.5
    assert torch.equal(level, brute_nearest(s.sigmas, sigma))  # never beyond the levels
    again, _ = s.sample_sigmas(n, torch.Generator().manual_seed(1))
    assert torch.equal(sigma, again)


def test_log_normal_draws_and_rho_spaced_levels(registry):
    s = registry.build("schedule", {"kind": "log_normal", "p_mean": -1.0, "p_std": 0.8,
                                    "sigma_max": 2.0, "sigma_min": 0.05, "num_levels": 9,
                                    "rho": 7.0})
    assert s.continuous and s.num_levels == 9
    assert s.sigmas[0].item() == 2.0 and s.sigmas[-1].item() == pytest.approx(0.05, rel=1e-6)
    root = s.sigmas.double() ** (1 / 7)
    assert torch.allclose(root.diff(), root.diff()[:1].expand(8), rtol=1e-5)  # even in sigma^(1/7)
    n = 100_000
    sigma, level = s.sample_sigmas(n, torch.Generator().manual_seed(2))
    log_s = sigma.double().log()
    assert abs(log_s.mean().item() + 1.0) < 4 * 0.8 / n**0.5
    assert abs(log_s.std().item() - 0.8) < 4 * 0.8 / (2 * n) ** 0.5
    inside = level >= 0
    assert torch.equal(level[inside], brute_nearest(s.sigmas, sigma[inside]))
    # beyond: ln sigma above ln sigma_1 + half the first log step, or below the last level's
    log_l = s.sigmas.double().log()
    top, bottom = 1.5 * log_l[0] - 0.5 * log_l[1], 1.5 * log_l[-1] - 0.5 * log_l[-2]
    cdf = lambda v: 0.5 * (1 + math.erf((v + 1.0) / (0.8 * math.sqrt(2))))  # noqa: E731
    p_beyond = 1 - cdf(top.item()) + cdf(bottom.item())
    assert p_beyond > 0.005  # about 1,000 of the draws
    assert abs((~inside).double().mean().item() - p_beyond) < 4 * (p_beyond / n) ** 0.5


@pytest.mark.parametrize("bad", [
    {"p_std": 0}, {"sigma_min": 0}, {"sigma_max": 0.001, "sigma_min": 0.01}, {"num_levels": 1},
    {"rho": -1}, {"p_mea": 1},
])
def test_log_normal_params_validation(registry, bad):
    with pytest.raises(ValidationError):
        registry.build("schedule", {"kind": "log_normal", **bad})


def test_level_only_nets_refuse_continuous_schedules(toy_recipe):
    from torch import nn

    from scoretk import assemble
    from scoretk.assemble import ComponentError
    from scoretk.plugins import load_plugins
    from scoretk.recipe import Recipe

    class LevelsOnly(nn.Module):
        accepts_any_sigma = False

    registry = load_plugins(autoload=False).registry
    registry.add("net", "levels_only", lambda p, **_: LevelsOnly(), plugin="test")
    toy_recipe["net"] = {"kind": "levels_only"}
    assemble.build_model(Recipe.from_dict(toy_recipe, registry), registry, (2,))  # discrete: fine
    toy_recipe["schedule"]["kind"] = "log_uniform"
    with pytest.raises(ComponentError, match="net .'levels_only'.*reads only the level index, "
                       "but schedule 'log_uniform' draws sigmas between the levels"):
        assemble.build_model(Recipe.from_dict(toy_recipe, registry), registry, (2,))
