"""DSM loss against its closed-form minimum.

Data x ~ N(0, I_D), x~ = x + sigma z ~ N(0, (1 + sigma^2) I): the exact score is
s*(x~) = -x~/(1 + sigma^2). With lambda = sigma^2, sigma s* + z = (z - sigma x)/(1 + sigma^2), so
the per-sample loss is 0.5 chi2_D / (1 + sigma^2): mean 0.5 D/(1 + sigma^2) and variance
0.5 D/(1 + sigma^2)^2 at each level. (It is 1/(1 + sigma^2), not sigma^2/(1 + sigma^2): the
residual is Var(z | x~) = 1/(1 + sigma^2) per dimension.) A scaled score c s* gives
0.5 D (1 - sigma^2 (2c - c^2)/(1 + sigma^2)), larger for every c != 1. For general power p
the level mean is multiplied by sigma^(p - 2). A continuous schedule draws sigma per sample:
the same formulas hold per sample, and for log sigma ~ U[a, b] the p = 2 mean is
0.5 D [t - ln(1 + e^(2t))/2]_a^b / (b - a), the integral of 1/(1 + e^(2t)).
"""
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from scoretk_plugins import losses
from scoretk_plugins.schedules import (GeometricSchedule, LogNormalParams, LogNormalSchedule,
                                       LogUniformSchedule)

from conftest import registry_of

D, B = 4, 200_000


class GaussScore(nn.Module):
    """c times the exact score of N(0, I) data noised at sigma."""

    def __init__(self, c=1.0):
        super().__init__()
        self.c = c

    def forward(self, x, sigma, level):
        self.sigma, self.level = sigma, level
        return -self.c * x / (1 + sigma[:, None] ** 2)


def build(**params):
    return registry_of(losses).build("loss", {"kind": "dsm", **params})


@pytest.fixture(scope="module")
def sched():
    return GeometricSchedule(3.0, 0.1, 5)


def data(seed=0):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def closed_form(sched, counts, power=2.0, c=1.0):
    """Expected loss given the level counts, and its standard error."""
    s2 = sched.sigmas.double() ** 2
    lam = s2 ** (power / 2)
    mean = 0.5 * D * lam / s2 * (1 - s2 * (2 * c - c * c) / (1 + s2))
    var = 0.5 * D * (lam / s2 / (1 + s2)) ** 2  # exact at c = 1 (scaled chi2_D)
    n = counts.double()
    return ((n * mean).sum() / B).item(), ((n * var).sum().sqrt() / B).item(), mean, var


@pytest.mark.parametrize("power", [2.0, 1.0])
def test_exact_score_reaches_the_minimum(sched, power):
    loss, stats = build(power=power)(GaussScore(), data(), sched, torch.Generator().manual_seed(1))
    expected, se, level_mean, level_var = closed_form(sched, stats["level_count"], power)
    assert abs(loss.item() - expected) < 4 * se, (loss.item(), expected, se)
    n = stats["level_count"].double()
    per_level = stats["level_loss_sum"] / n
    assert ((per_level - level_mean).abs() < 4 * (level_var / n).sqrt()).all()
    if power == 2.0:  # unconditional: 0.5 D mean_i 1/(1 + sigma_i^2), level draw included
        s2 = sched.sigmas.double() ** 2
        c = 1 / (1 + s2)
        total_var = (0.5 * D * c**2).mean() + (0.5 * D * c).var(unbiased=False)
        assert abs(loss.item() - (0.5 * D * c).mean().item()) < 4 * (total_var / B).sqrt().item()


@pytest.mark.parametrize("c", [0.8, 1.25])
def test_scaled_score_is_worse(sched, c):
    loss_fn, x = build(), data()
    best, _ = loss_fn(GaussScore(1.0), x, sched, torch.Generator().manual_seed(2))
    worse, stats = loss_fn(GaussScore(c), x, sched, torch.Generator().manual_seed(2))
    expected, _, _, _ = closed_form(sched, stats["level_count"], c=c)
    assert worse.item() > best.item()
    assert worse.item() == pytest.approx(expected, rel=0.01)


def test_single_point_data_gives_zero():
    # p = delta at x0: the exact noised score -(x~ - x0)/sigma^2 equals the target exactly.
    x0 = torch.tensor([0.3, -1.0, 2.0])

    class Exact(nn.Module):
        def forward(self, x, sigma, level):
            return -(x - x0) / sigma[:, None] ** 2

    loss, _ = build()(Exact(), x0.expand(64, 3), GeometricSchedule(5.0, 0.05, 7))
    assert loss.item() == pytest.approx(0, abs=1e-10)


def test_stats_and_net_arguments(sched):
    seen = {}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, sigma, level):
            seen.update(sigma=sigma, level=level)
            return self.w * x

    x = torch.randn(64, 2, 3, 3)
    net = Net()
    loss, stats = build()(net, x, sched, torch.Generator().manual_seed(0))
    assert seen["sigma"].shape == (64,) and seen["level"].dtype == torch.long
    assert torch.equal(seen["sigma"], sched.sigmas[seen["level"]])
    assert stats["level_loss_sum"].shape == stats["level_count"].shape == (5,)
    assert stats["level_count"].sum().item() == 64
    assert stats["level_loss_sum"].sum().item() == pytest.approx(loss.item() * 64, rel=1e-5)
    assert torch.equal(stats["level_count"], torch.bincount(seen["level"], minlength=5))
    assert not stats["level_loss_sum"].requires_grad
    loss.backward()
    assert net.w.grad is not None
    again, _ = build()(net, x, sched, torch.Generator().manual_seed(0))
    assert again.item() == loss.item()  # the generator fixes levels and noise
    build()(net, x, sched)  # global RNG when no generator is given


def test_params_validation():
    with pytest.raises(ValidationError):
        build(power="x")
    with pytest.raises(ValidationError):
        build(weighting=2)


# --- continuous sigmas ----------------------------------------------------------------------

@pytest.mark.parametrize("power", [2.0, 1.0])
def test_continuous_sigma_reaches_the_minimum(power):
    sched = LogUniformSchedule(3.0, 0.1, 5)
    net = GaussScore()
    loss, stats = build(power=power)(net, data(), sched, torch.Generator().manual_seed(3))
    sigma = net.sigma.double()
    assert len(sigma.unique()) > B // 2  # a sigma per sample, not one of 5 levels
    scale = sigma ** (power - 2) / (1 + sigma**2)
    mean, var = 0.5 * D * scale, 0.5 * D * scale**2  # given each sample's sigma
    se = (var.sum().sqrt() / B).item()
    assert abs(loss.item() - mean.mean().item()) < 4 * se
    if power == 2.0:  # over the draw of sigma too, against the integral
        a, b = math.log(0.1), math.log(3.0)
        antiderivative = lambda t: t - 0.5 * math.log1p(math.exp(2 * t))  # noqa: E731
        expected = 0.5 * D * (antiderivative(b) - antiderivative(a)) / (b - a)
        total_se = ((var.mean() + mean.var()) / B).sqrt().item()
        assert abs(loss.item() - expected) < 4 * total_se


@pytest.mark.parametrize("c", [0.8, 1.25])
def test_continuous_scaled_score_is_worse(c):
    sched, loss_fn, x = LogUniformSchedule(3.0, 0.1, 5), build(), data()
    best, _ = loss_fn(GaussScore(1.0), x, sched, torch.Generator().manual_seed(4))
    worse, _ = loss_fn(GaussScore(c), x, sched, torch.Generator().manual_seed(4))
    assert worse.item() > best.item()


def test_stats_leave_out_sigmas_beyond_the_levels():
    # Single-point data x0 and the exact score plus 1 per dimension: the residual is exactly 1,
    # so each sample's loss is 0.5 sigma^2 D, known without the noise.
    x0 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    seen = {}

    class Offset(nn.Module):
        def forward(self, x, sigma, level):
            seen.update(sigma=sigma, level=level)
            return -(x - x0) / sigma[:, None] ** 2 + 1

    sched = LogNormalSchedule(LogNormalParams(p_mean=0.0, p_std=1.5, sigma_max=3.0,
                                              sigma_min=0.3, num_levels=6))
    loss, stats = build()(Offset(), x0.expand(4000, 3), sched, torch.Generator().manual_seed(5))
    per, level = 0.5 * seen["sigma"] ** 2 * 3, seen["level"]
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-9)
    inside = level >= 0
    assert 0 < inside.sum() < 4000
    assert torch.equal(stats["level_count"], torch.bincount(level[inside], minlength=6))
    expected = torch.zeros(6, dtype=torch.float64).index_add_(0, level[inside], per[inside])
    assert torch.allclose(stats["level_loss_sum"], expected, rtol=1e-9)
