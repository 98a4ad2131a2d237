"""The samplers beyond annealed Langevin, against exact scores and closed forms (no training):
the NCSN toy mixture, Gaussians, the single-point model behind consistent annealed sampling,
conditions (inpainting, colourisation, interpolation), and the plumbing every sampler shares.
"""
import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from scoretk.conditions import Colourisation, Inpainting
from scoretk.execution.batch_threads import BatchThreads
from scoretk.rng import BatchNoise, InterpolationNoise, PerSampleNoise
from scoretk.score import ScoreFn
from scoretk_plugins import samplers
from scoretk_plugins.samplers.common import rho_sigmas
from scoretk_plugins.samplers.consistent import consistent_annealed
from scoretk_plugins.schedules import GeometricSchedule

from conftest import registry_of

pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny kernels (conftest)

NEW = ["consistent_annealed", "pc", "heun", "probability_flow"]
KINDS = ["annealed_langevin", *NEW]
MU = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
WEIGHTS = torch.tensor([0.2, 0.8])


def build(kind, **params):
    return registry_of(samplers).build("sampler", {"kind": kind, **params})


def noise(n, seed=0):
    return BatchNoise(n, torch.Generator().manual_seed(seed))


class MixtureScore(nn.Module):
    """Exact score of 0.2 N((-5,-5), I) + 0.8 N((5,5), I) noised at sigma."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, sigma, level):
        self.calls += 1
        v = (1 + sigma**2)[:, None]
        d = x[:, None, :] - MU
        r = torch.softmax(WEIGHTS.log() - 0.5 * d.pow(2).sum(-1) / v, -1)
        return -(r[..., None] * d).sum(1) / v


class GaussianScore(nn.Module):
    """Exact score of N(mu, cov + sigma^2 I) for vectors (D,) or C x 1 x 1 'images'."""

    def __init__(self, mu, cov, accepts_any_sigma=True):
        super().__init__()
        self.mu, self.cov, self.accepts_any_sigma = mu, cov, accepts_any_sigma
        self.sigmas_seen = []

    def forward(self, x, sigma, level):
        self.sigmas_seen.append(float(sigma[0]))
        flat = x.flatten(1)
        prec = torch.linalg.inv(self.cov + sigma[0] ** 2 * torch.eye(len(self.mu)))
        return (-(flat - self.mu) @ prec).view_as(x)


def mixture_data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    comp = (torch.rand(n, generator=g) < WEIGHTS[1]).long()
    return MU[comp] + torch.randn(n, 2, generator=g)


# --- the NCSN toy mixture ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", NEW)
def test_each_sampler_recovers_the_mixture(kind):
    """Defaults on sigma 20 -> 0.01 (L = 200), started from an exact draw of p_sigma_1 (init:
    data). The default start N(0, sigma_1^2 I) is not p_20 here (the mixture's mean is (3, 3)),
    and the deterministic samplers carry that into the weights (0.26 for the exact ODE), so the
    start is exact to test the samplers' own error. 6k samples: the weight's standard error is
    0.005; measured errors 0.003 to 0.01. Annealed Langevin at its defaults (T = 5, Prop. 3's
    small eps) lags behind the levels and reads 0.22 to 0.23 here; test_sampler.py tests it
    fully relaxed."""
    n, sched = 6000, GeometricSchedule(20.0, 0.01, 200)
    smp = build(kind, init="data")
    x = smp.sample(MixtureScore(), sched, (2,), noise(n), init=mixture_data(n))
    left = x.sum(1) < 0
    weight = left.float().mean().item()
    print(f"{kind}: weight {weight:.4f}, evaluations {smp.last_evaluations}")
    assert abs(weight - 0.2) < 0.03
    assert (x[left].mean(0) - MU[0]).abs().max() < 0.2
    assert (x[~left].mean(0) - MU[1]).abs().max() < 0.2
    assert smp.last_evaluations == smp.evaluations_per_sample(sched)


def test_plain_langevin_at_the_smallest_level_does_not():
    """The contrast: the same budget of Langevin steps at sigma_L alone keeps the split of its
    start (N(0, 20^2 I): half on each side of x + y = 0)."""
    n, T, sched = 3000, 5, GeometricSchedule(20.0, 0.01, 200)
    smp = build("annealed_langevin", steps_per_level=T)
    eps, _ = smp.resolve_eps(sched)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)) * 20
    x = smp.run_levels(MixtureScore(), x0, sched.sigmas[-1:].expand(200), noise(n), eps=eps,
                       sigma_min=0.01)
    weight = (x.sum(1) < 0).float().mean().item()
    assert abs(weight - 0.2) > 0.2 and abs(weight - 0.5) < 0.03


# --- consistent annealed sampling: its defining property ---------------------------------------

@pytest.mark.parametrize("eta", [None, 0.5, 1.0, 1.6])
def test_consistent_annealed_keeps_the_noise_at_the_schedule(eta):
    """Data a single point at 0 (score -x/sigma^2), x ~ N(0, sigma_1^2 I): after level i the
    sample carries noise exactly sigma_{i+1}, whatever eta in its range (None: the ancestral
    default). 20k x 4 coordinates: the pooled variance's relative standard error is 0.5%."""
    n, D = 20_000, 4
    sched = GeometricSchedule(10.0, 0.1, 12)
    sigmas = sched.sigmas.tolist()
    smp = build("consistent_annealed", **({} if eta is None else {"eps": eta * sigmas[-1] ** 2}))
    eta = smp.resolve_eta(sched)
    x0 = noise(n, 1).randn((D,)) * sigmas[0]
    ratios = []
    consistent_annealed(ScoreFn(GaussianScore(torch.zeros(D), torch.zeros(D, D)), sigmas), x0,
                        sigmas, noise(n, 2), eta=eta, denoise=False,
                        callback=lambda i, x: ratios.append(
                            x.double().pow(2).mean().item() / sigmas[min(i + 1, 11)] ** 2))
    se = 4 * math.sqrt(2 / (n * D))
    assert all(abs(r - 1) < se for r in ratios[:-1]), ratios
    assert abs(ratios[-1] - (1 - eta) ** 2) < se  # last level: a step, no noise


def test_consistent_annealed_step_range():
    sched = GeometricSchedule(10.0, 0.1, 12)
    eta = build("consistent_annealed").resolve_eta(sched)
    gamma = 10 ** (1 / 11) * 10 ** (1 / 11)  # (sigma_1/sigma_L)^(1/(L-1)) = 100^(1/11)
    assert eta == pytest.approx(1 - 1 / gamma**2, rel=1e-5)  # the ancestral step
    with pytest.raises(ValueError, match="sampler.eps"):
        build("consistent_annealed", eps=0.1 * 0.01).settings(sched)


# --- probability flow on Gaussian data ---------------------------------------------------------

MU3 = torch.tensor([1.0, -1.0, 0.5])
COV3 = 1.5 * torch.tensor([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 1.0]])


@pytest.mark.parametrize("params", [{}, {"solver": "adaptive"}, {"spacing": "rho", "steps": 30}])
def test_probability_flow_gives_the_data_moments(params):
    """Start N(mu, cov + sigma_1^2 I) (init: data with Gaussian data): the ODE is exact, so the
    samples are N(mu, cov) up to the final denoising, which maps cov to
    cov (cov + sigma_L^2 I)^-1 cov. 20k samples; 4 standard errors."""
    n, sched = 20_000, GeometricSchedule(20.0, 0.01, 60)
    data = MU3 + torch.randn(n, 3, generator=torch.Generator().manual_seed(3)) @ torch.linalg.cholesky(COV3).T
    smp = build("probability_flow", init="data", **params)
    x = smp.sample(GaussianScore(MU3, COV3), sched, (3,), noise(n), init=data).double()
    cov = torch.cov(x.T)
    se_mean = (torch.diag(COV3).double() / n).sqrt()
    se_cov = (COV3.double().pow(2) + torch.outer(torch.diag(COV3), torch.diag(COV3))).div(n).sqrt()
    print(params, smp.last_evaluations, x.mean(0).tolist(), (cov - COV3).abs().max().item())
    assert ((x.mean(0) - MU3).abs() < 4 * se_mean).all()
    assert ((cov - COV3.double()).abs() < 4 * se_cov + 1e-3).all()


# --- conditions ----------------------------------------------------------------------------------

def gaussian_conditional(mu, cov, A, b):
    """Moments of N(mu, cov) given A x = b."""
    k = cov @ A.T @ torch.linalg.inv(A @ cov @ A.T)
    return mu + k @ (b - A @ mu), cov - k @ A @ cov


@pytest.mark.parametrize("what", ["inpainting", "colourisation"])
def test_langevin_conditions_give_the_exact_conditional(what):
    """Langevin with the condition imposed before every step, run long at a small sigma,
    targets the conditional of p_sigma, which tends to that of the data as sigma -> 0: here
    sigma_L = 0.05 (an O(sigma^2) = 0.003 difference) and eps T = 5.4, several times the
    conditional variances (at most 1.12). The data are 3 correlated coordinates, as a
    3 x 1 x 1 image for colourisation (known: the channel mean). 6k samples; 4 standard
    errors plus the O(sigma^2) bound."""
    n = 6000
    if what == "inpainting":
        mask, known = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 0.5, -1.0])
        cond, shape = Inpainting(known, mask), (3,)
        A, b = torch.eye(3)[1:], known[1:]
    else:
        grey = torch.tensor([0.9, 0.3, 0.3]).view(1, 3, 1, 1)  # channel mean 0.5
        cond, shape = Colourisation(grey), (3, 1, 1)
        A, b = torch.full((1, 3), 1 / 3), torch.tensor([0.5])
    mean, cov = gaussian_conditional(MU3, COV3, A, b)
    sched = GeometricSchedule(1.0, 0.05, 2)
    smp = build("annealed_langevin", steps_per_level=1200, eps=4.5e-3, denoise=False,
                init="gaussian")
    x = smp.sample(GaussianScore(MU3, COV3), sched, shape, noise(n), condition=cond)
    x = x.flatten(1).double()
    torch.testing.assert_close((A @ x.T.float()).T, b.expand(n, -1), atol=1e-6, rtol=0)
    emp_cov = torch.cov(x.T)
    sd = torch.diag(cov).clamp_min(0).sqrt().double()
    print(what, x.mean(0).tolist(), mean.tolist(), (emp_cov - cov).abs().max().item())
    assert ((x.mean(0) - mean).abs() <= 4 * sd / math.sqrt(n) + 0.01).all()
    assert ((emp_cov - cov.double()).abs() <= 4 * torch.outer(sd, sd) * math.sqrt(2 / n) + 0.01).all()


@pytest.mark.parametrize("kind", KINDS)
def test_every_sampler_holds_the_known_part(kind):
    """Through every sampler: the known coordinates end exactly at their values, and with
    independent coordinates the unknown one is distributed as without the condition (each
    sampler with its own discretisation error on this coarse schedule). 4k samples each;
    4 standard errors of the differences."""
    n, sched = 4000, GeometricSchedule(20.0, 0.01, 40)
    net = GaussianScore(MU3, torch.diag(torch.tensor([1.5, 1.0, 2.0])))
    known = torch.tensor([0.0, 0.5, -1.0])
    cond = Inpainting(known, torch.tensor([0.0, 1.0, 1.0]))
    x = build(kind).sample(net, sched, (3,), noise(n), condition=cond)
    free = build(kind).sample(net, sched, (3,), noise(n, 1))[:, 0]
    assert torch.equal(x[:, 1:], known[1:].expand(n, 2))
    v = free.var().item()
    assert abs(x[:, 0].mean().item() - free.mean().item()) < 4 * math.sqrt(2 * v / n)
    assert abs(x[:, 0].var().item() - v) < 4 * v * math.sqrt(4 / n)


def test_condition_projections():
    x = torch.randn(2, 3, 4, 4)
    c = Colourisation(torch.rand(2, 3, 4, 4))
    torch.testing.assert_close(c.project(c.project(x)), c.project(x))  # idempotent
    torch.testing.assert_close((c.project(x) * (x - c.project(x))).sum(), torch.tensor(0.0),
                               atol=1e-5, rtol=0)  # orthogonal
    z = torch.randn(2, 3, 4, 4)
    y = c.impose(x, 0.5, z)
    torch.testing.assert_close(c.project(y), c.target.expand_as(x) + 0.5 * c.project(z))
    torch.testing.assert_close(y - c.project(y), x - c.project(x))
    with pytest.raises(ValueError, match="mask"):
        Inpainting(torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]))


def test_interpolation_noise():
    """Rows of a group move from the group's p (first) to its q (last) on the quarter circle,
    are standard normal, and do not depend on how batches split the groups."""
    whole = InterpolationNoise(3, range(10), per_group=5)
    a, u = whole.randn((2000,)), whole.rand((7,))
    parts = [InterpolationNoise(3, idx, per_group=5) for idx in (range(0, 3), range(3, 10))]
    torch.testing.assert_close(torch.cat([p.randn((2000,)) for p in parts]), a)
    p, q = a[0], a[4]
    t = math.pi / 8  # row 1 of 5
    torch.testing.assert_close(a[1], math.cos(t) * p + math.sin(t) * q)
    assert a.std(1).sub(1).abs().max() < 0.1
    assert torch.equal(u[0], u[4]) and not torch.equal(u[0], u[5])  # uniform draws shared by a group
    x = build("heun").sample(MixtureScore(), GeometricSchedule(20.0, 0.01, 10), (2,), whole)
    assert x.shape == (10, 2)


# --- plumbing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_defaults_settings_and_evaluation_count(kind):
    sched = GeometricSchedule(3.0, 0.1, 6)
    smp, net, calls = build(kind), MixtureScore(), []
    x = smp.sample(net, sched, (2,), noise(4), progress=lambda d, t: calls.append((d, t)))
    st = smp.settings(sched)
    json.dumps(st)
    assert x.shape == (4, 2) and st["kind"] == kind
    assert net.calls == smp.last_evaluations == st["evaluations_per_sample"]
    assert calls[-1] == (net.calls, net.calls)


@pytest.mark.parametrize("kind", ["consistent_annealed", "pc", "heun"])
def test_samples_do_not_depend_on_the_batch(kind):
    params = {"s_churn": 5.0} if kind == "heun" else {}
    sched = GeometricSchedule(3.0, 0.1, 5)
    a = build(kind, **params).sample(MixtureScore(), sched, (2,), PerSampleNoise(7, range(6)))
    b = build(kind, **params).sample(MixtureScore(), sched, (2,), PerSampleNoise(7, [4, 5]))
    torch.testing.assert_close(a[4:], b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, params", [("heun", {"spacing": "rho"}),
                                          ("heun", {"s_churn": 1.0}),
                                          ("probability_flow", {"solver": "adaptive"}),
                                          ("probability_flow", {"spacing": "rho", "steps": 8})])
def test_level_only_nets_refused_where_sigmas_leave_the_schedule(kind, params):
    sched = GeometricSchedule(3.0, 0.1, 6)
    net = GaussianScore(torch.zeros(2), torch.eye(2), accepts_any_sigma=False)
    smp = build(kind, **params)
    for candidate in (net, BatchThreads(net, threads=2)):
        with pytest.raises(ValueError, match="accepts_any_sigma"):
            smp.check_net(candidate)
        with pytest.raises(ValueError, match="accepts_any_sigma"):
            smp.sample(candidate, sched, (2,), noise(2))
    for kind in KINDS:  # every default keeps to the schedule
        build(kind).sample(net, sched, (2,), noise(2))
    levels = sched.sigmas.tolist()
    assert all(min(abs(s - l) for l in levels) < 1e-6 for s in net.sigmas_seen)


def test_score_fn_levels_and_rho_grid():
    sched = GeometricSchedule(10.0, 0.1, 5)  # 10, 3.16, 1, 0.316, 0.1
    score = ScoreFn(MixtureScore(), sched.sigmas)
    assert [score.level(s) for s in (50.0, 10.0, 5.0, 1.2, 0.9, 0.1, 0.01, 0.0)] == \
        [0, 0, 1, 2, 2, 4, 4, 4]
    grid = rho_sigmas(80.0, 0.002, 18, 7.0)
    assert grid[0] == pytest.approx(80.0) and grid[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(grid, grid[1:]))


def test_adaptive_solver_stops_past_its_budget():
    smp = build("probability_flow", solver="adaptive", max_evaluations=10, rtol=1e-9, atol=1e-9)
    with pytest.raises(RuntimeError, match="more than 10"):
        smp.sample(MixtureScore(), GeometricSchedule(20.0, 0.01, 10), (2,), noise(4))


def test_adaptive_solver_failure_is_one_clear_error():
    class NotFinite(nn.Module):
        def forward(self, x, sigma, level):
            return x * float("nan")

    smp = build("probability_flow", solver="adaptive")
    with pytest.raises(RuntimeError, match="adaptive ODE solver failed"):
        smp.sample(NotFinite(), GeometricSchedule(20.0, 0.01, 10), (2,), noise(4))


@pytest.mark.parametrize("kind, bad", [("heun", {"steps": 10}), ("heun", {"s_churn": -1}),
                                       ("pc", {"snr": 0}), ("pc", {"norms": "sample"}),
                                       ("consistent_annealed", {"eps": "big"}),
                                       ("probability_flow", {"solver": "rk4"})])
def test_params_validation(kind, bad):
    with pytest.raises(ValidationError):
        build(kind, **bad)


def test_every_param_is_described():
    for comp in registry_of(samplers).all():
        for name, field in comp.params.model_fields.items():
            assert field.description, f"{comp.name}.{name}"


def test_the_adaptive_solver_carries_a_gaussian_exactly_and_only_through_noise_levels():
    """For data N(mu, s^2 I) the flow is x(sigma) - mu = (x0 - mu) sqrt((s^2 + sigma^2) /
    (s^2 + sigma0^2)). The solver steps past its end point and interpolates back: it must do
    so in log sigma, never evaluating the net at sigma <= 0 (where it used to fail)."""
    from scoretk.flow import flow_derivative, integrate_adaptive
    from scoretk.score import ScoreFn

    pytest.importorskip("torchdiffeq")
    s, mu = 0.5, torch.tensor([1.0, -2.0], dtype=torch.float64)
    net = GaussianScore(mu, s**2 * torch.eye(2, dtype=torch.float64))
    x0 = mu + 40.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)
    score = ScoreFn(net, [40.0, 1e-3])
    x1 = integrate_adaptive(flow_derivative(score), x0, 40.0, 1e-3, rtol=1e-7, atol=1e-7)
    expected = mu + (x0 - mu) * math.sqrt((s**2 + 1e-6) / (s**2 + 40.0**2))
    torch.testing.assert_close(x1, expected, rtol=1e-5, atol=1e-5)
    assert min(net.sigmas_seen) > 0
