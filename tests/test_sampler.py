"""Annealed Langevin dynamics with exact scores: Proposition 3, the NCSN toy mixture, plumbing."""
import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from scoretk.rng import BatchNoise, PerSampleNoise
from scoretk_plugins import ncsn_theory as th
from scoretk_plugins import samplers
from scoretk_plugins.schedules import GeometricSchedule

from conftest import registry_of


pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny kernels (conftest)


def build(**params):
    r = registry_of(samplers)
    return r.build("sampler", {"kind": "annealed_langevin", **params})


def noise(n, seed=0):
    return BatchNoise(n, torch.Generator().manual_seed(seed))


class GaussScore(nn.Module):
    """Exact score of N(0, (v0 + sigma^2) I): data N(0, v0 I) (v0 = 0: a single point at 0)."""

    def __init__(self, v0=0.0):
        super().__init__()
        self.v0, self.calls = v0, 0

    def forward(self, x, sigma, level):
        self.calls += 1
        return -x / (self.v0 + sigma.view(-1, *(1,) * (x.dim() - 1)) ** 2)


class MixtureScore(nn.Module):
    """Exact score of 0.2 N((-5,-5), I) + 0.8 N((5,5), I) noised at sigma: grad of
    logsumexp_k [log w_k + log N(x; mu_k, (1 + sigma^2) I)], i.e. softmax-weighted Gaussian scores."""

    mu = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
    logw = torch.tensor([0.2, 0.8]).log()

    def forward(self, x, sigma, level):
        v = (1 + sigma**2)[:, None]                                  # (B, 1)
        d = x[:, None, :] - self.mu                                  # (B, K, 2)
        r = torch.softmax(self.logw - 0.5 * d.pow(2).sum(-1) / v, -1)  # (B, K) responsibilities
        return -(r[..., None] * d).sum(1) / v


# --- Proposition 3 -----------------------------------------------------------------------------

@pytest.mark.parametrize("eps_scale", [1.0, 0.3, 3.0])
def test_prop3_one_level_variance(eps_scale):
    """x_0 ~ N(0, sigma_{i-1}^2 I), T steps at level i with the exact score of N(0, sigma_i^2 I):
    x_T ~ N(0, s_T^2 I) with s_T^2/sigma_i^2 = prop3_ratio. 20k x 8 coordinates: the pooled
    second moment has relative standard error sqrt(2/160k) = 0.35%."""
    n, D, T, i = 20_000, 8, 5, 10
    sched = GeometricSchedule(4.81, 0.01, 21)  # the digits schedule, gamma ~ 1.36
    s = sched.sigmas.double()
    sigma_L, gamma = s[-1].item(), (s[i - 1] / s[i]).item()
    eps = th.solve_eps(T, sigma_L, gamma)[0] * eps_scale
    ratio = th.prop3_ratio(eps, T, sigma_L, gamma)
    g = torch.Generator().manual_seed(int(eps_scale * 10))
    x0 = torch.randn(n, D, generator=g) * sched.sigmas[i - 1]
    smp = build(steps_per_level=T, eps=eps)
    x = smp.run_levels(GaussScore(), x0, sched.sigmas[i:i + 1], BatchNoise(n, g), eps=eps,
                       sigma_min=sigma_L, first_level=i)
    emp = (x.double().pow(2).mean() / s[i] ** 2).item()
    se = ratio * math.sqrt(2 / (n * D))
    print(f"eps={eps:.3g} Prop3 ratio={ratio:.4f} empirical={emp:.4f} se={se:.4f}")
    assert abs(emp - ratio) < 4 * se
    assert abs(ratio - 1) > 10 * se  # the check can tell the formula from "variance = sigma_i^2"


def test_auto_eps_is_prop3():
    sched = GeometricSchedule(50, 0.01, 232)
    smp = build(steps_per_level=5)
    eps, ratio = smp.resolve_eps(sched)
    assert f"{eps:.1e}" == "6.2e-06" and ratio == pytest.approx(1.055, abs=5e-4)
    st = smp.settings(sched)
    json.dumps(st)
    assert st["eps"] == eps and st["prop3_ratio"] == ratio and st["eps_rule"] == "prop3"
    assert st["num_levels"] == 232 and st["evaluations_per_sample"] == 232 * 5 + 1
    assert st["sigma_max"] == 50 and st["sigma_min"] == pytest.approx(0.01)
    given = build(steps_per_level=5, eps=6.2e-6).settings(sched)
    assert given["eps_rule"] == "given" and given["prop3_ratio"] == pytest.approx(1.0555, abs=1e-3)


# --- the NCSN toy: mixture weights -------------------------------------------------------------

def test_annealing_recovers_mixture_weights():
    """NCSN paper, Fig. 3: with exact scores, annealed Langevin recovers the 0.2 / 0.8 weights;
    Langevin at the smallest level alone keeps the split of its start. Choice: sigma 20 -> 0.7
    geometric, L = 10, T = 200, eps = 0.05 (u = eps/sigma_L^2 ~ 0.1, so each level relaxes fully,
    uT ~ 20). The residual bias is ~ +0.005-0.01 (mass that freezes in the wrong half while the
    modes separate; it shrinks with more steps), the standard error 0.004 at 10k samples."""
    n, L, T, eps = 10_000, 10, 200, 0.05
    sched = GeometricSchedule(20.0, 0.7, L)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 2, generator=g) * 16 - 8  # uniform over [-8, 8]^2
    smp = build(steps_per_level=T, eps=eps, denoise=False)
    net = MixtureScore()
    annealed = smp.run_levels(net, x0, sched.sigmas, BatchNoise(n, g), eps=eps, sigma_min=0.7)
    plain = smp.run_levels(net, x0, sched.sigmas[-1:].expand(L), BatchNoise(n, g), eps=eps,
                           sigma_min=0.7, first_level=0)  # same L*T steps, all at sigma_L
    frac = lambda x: (x.sum(1) < 0).float().mean().item()  # noqa: E731
    print(f"init {frac(x0):.4f}  annealed {frac(annealed):.4f}  plain {frac(plain):.4f}")
    assert abs(frac(annealed) - 0.2) < 0.03
    assert abs(frac(plain) - 0.2) > 0.2 and abs(frac(plain) - frac(x0)) < 0.05
    # and the modes themselves are right: per-mode means near (+-5, +-5)
    left = annealed[annealed.sum(1) < 0]
    assert (left.mean(0) + 5).abs().max() < 0.1


# --- the full sample() path --------------------------------------------------------------------

def test_sample_matches_exact_gaussian_recurrence():
    """Data N(0, I): the score is linear, so each step maps the mean m -> c m and the variance
    v -> c^2 v + 2a (c = 1 - a/(1 + sigma^2)) exactly; the uniform[0,1] init (mean 1/2,
    variance 1/12) and the final denoising x/(1 + sigma_L^2) make the whole run a closed form."""
    n, D, T = 20_000, 2, 4
    sched = GeometricSchedule(5.0, 0.1, 8)
    smp = build(steps_per_level=T)  # auto eps, denoise, uniform init
    eps, _ = smp.resolve_eps(sched)
    m, v = 0.5, 1 / 12
    for sigma in sched.sigmas.double().tolist():
        a = eps * (sigma / sched.sigmas[-1].item()) ** 2
        c = 1 - a / (1 + sigma**2)
        for _ in range(T):
            m, v = c * m, c * c * v + 2 * a
    k = 1 / (1 + sched.sigmas[-1].item() ** 2)
    m, v = k * m, k * k * v
    x = smp.sample(GaussScore(1.0), sched, (D,), noise(n)).double()
    emp_m, emp_v = x.mean().item(), x.var().item()
    print(f"mean {emp_m:.4f} vs {m:.4f}; var {emp_v:.4f} vs {v:.4f}")
    assert abs(emp_m - m) < 4 * math.sqrt(v / (n * D))
    assert abs(emp_v - v) < 4 * v * math.sqrt(2 / (n * D))


def test_evaluations_progress_and_no_host_sync(monkeypatch):
    sched = GeometricSchedule(3.0, 0.1, 6)
    smp = build(steps_per_level=3, eps=1e-3)
    net, calls = GaussScore(1.0), []
    total = smp.evaluations_per_sample(sched)
    assert total == 6 * 3 + 1 and build(steps_per_level=3, denoise=False).evaluations_per_sample(sched) == 18

    def forbid(*a, **k):
        raise AssertionError("host-device sync inside the sampling loop")
    x = smp.sample(net, sched, (2, 3, 3), noise(4), progress=lambda d, t: calls.append((d, t)))
    assert x.shape == (4, 2, 3, 3) and net.calls == total
    assert calls == [(3 * (k + 1), total) for k in range(6)] + [(total, total)]
    for name in ("item", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    smp.run_levels(net, torch.zeros(4, 2), sched.sigmas, noise(4), eps=1e-3, sigma_min=0.1)


def test_diagnostics_log():
    sched = GeometricSchedule(3.0, 0.1, 4)
    smp = build(steps_per_level=2, diagnostics=True)
    smp.sample(GaussScore(1.0), sched, (5,), noise(8))
    log = smp.diagnostics_log
    assert [r["level"] for r in log] == [0, 1, 2, 3]
    assert all(r["snr"] > 0 and math.isfinite(r["x_norm"]) for r in log)


def test_randomness_comes_only_from_noise():
    """Per-sample noise: sample j is the same whatever batch it is drawn in."""
    sched = GeometricSchedule(3.0, 0.1, 3)
    smp = build(steps_per_level=2, init="gaussian")
    torch.manual_seed(123)
    a = smp.sample(GaussScore(1.0), sched, (3,), PerSampleNoise(7, range(4)))
    torch.manual_seed(456)
    b = smp.sample(GaussScore(1.0), sched, (3,), PerSampleNoise(7, [2, 3]))
    torch.testing.assert_close(a[2:], b)


def test_init_modes(monkeypatch):
    sched = GeometricSchedule(3.0, 0.1, 3)
    monkeypatch.setattr(samplers.AnnealedLangevin, "run_levels", lambda self, net, x, *a, **k: x)
    net, n = GaussScore(1.0), 20_000
    x = build(denoise=False).sample(net, sched, (2,), noise(n))
    assert x.min() >= 0 and x.max() < 1 and x.mean().item() == pytest.approx(0.5, abs=0.01)
    x = build(denoise=False, init="gaussian").sample(net, sched, (2,), noise(n))
    assert x.std().item() == pytest.approx(3.0, rel=0.02)
    x = build(denoise=False, init="gaussian", clamp=True).sample(net, sched, (2,), noise(n))
    assert x.min() >= 0 and x.max() <= 1
    init = torch.full((n, 2), 7.0)
    x = build(denoise=False, init="data").sample(net, sched, (2,), noise(n), init=init)
    assert (x - init).mean().item() == pytest.approx(0, abs=0.05)
    assert (x - init).std().item() == pytest.approx(3.0, rel=0.02)
    with pytest.raises(ValueError, match="init"):
        build(init="data").sample(net, sched, (2,), noise(4))
    with pytest.raises(ValueError, match="init"):
        build().sample(net, sched, (2,), noise(4), init=init[:4])


def test_eps_too_large_raises():
    sched = GeometricSchedule(3.0, 0.1, 3)
    with pytest.raises(ValueError, match="2 sigma_L"):
        build(eps=0.03).settings(sched)


@pytest.mark.parametrize("bad", [{"steps_per_level": -1}, {"steps_per_level": 0},
                                 {"eps": -1e-5}, {"eps": "fast"}, {"init": "zeros"},
                                 {"step_size": 1e-5}])
def test_params_validation(bad):
    with pytest.raises(ValidationError):
        build(**bad)
