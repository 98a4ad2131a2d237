"""Schedule `geometric`: params validation, auto resolution from data, the sigmas it builds."""
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
