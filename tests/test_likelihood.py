"""Likelihoods by the probability-flow ODE and Hutchinson's trace estimator, against the exact
log-density of Gaussian data (whose noised score is linear, so every term has a closed form)."""
import math

import pytest
import torch

from scoretk.evaluation.likelihood import Likelihood, dequantise, log_likelihood
from scoretk.rng import BatchNoise, PerSampleNoise
from scoretk_plugins.schedules import GeometricSchedule
from test_samplers import COV3, MU3, GaussianScore

pytestmark = pytest.mark.usefixtures("one_thread")


def exact_log_density(x, mu, cov):
    return torch.distributions.MultivariateNormal(mu.double(), cov.double()).log_prob(x.double())


def logm(a):
    w, v = torch.linalg.eigh(a.double())
    return (v * w.log()) @ v.T


@pytest.mark.parametrize("solver", ["adaptive", "heun"])
def test_likelihood_of_gaussian_data_is_exact_up_to_hutchinson(solver):
    """Data N(mu, cov) with mu = 0 (so the N(0, sigma_max^2 I) prior differs from p_sigma_max
    only by cov/sigma_max^2: under 0.01 nats here). With a linear score the divergence term is
    v^T M v, M = 1/2 [log(cov + s_max^2 I) - log(cov + s_min^2 I)], whose Rademacher
    variance is 2 sum_{i != j} M_ij^2: the errors must have that spread, and less the
    Hutchinson term v^T M v - tr M (v replayed from the same noise) they must vanish up to
    the prior (under 0.01 nats on average) and the solver (heun on 60 levels: 0.02)."""
    n, mu = 3000, torch.zeros(3)
    sched = GeometricSchedule(20.0, 0.01, 60)
    data_cov = COV3 + 0.01**2 * torch.eye(3)  # p_sigma_min
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(5)) @ torch.linalg.cholesky(data_cov).T
    res = log_likelihood(GaussianScore(mu, COV3), sched, x, BatchNoise(n, torch.Generator().manual_seed(6)),
                         solver=solver)
    err = res.log_density.double() - exact_log_density(x, mu, data_cov)
    M = 0.5 * (logm(COV3 + 400 * torch.eye(3)) - logm(data_cov))
    spread = math.sqrt(2 * (M.pow(2).sum() - torch.diag(M).pow(2).sum()).item())
    print(f"{solver}: NFE {res.evaluations}, mean error {err.mean():.4f}, spread {err.std():.4f} "
          f"(Hutchinson {spread:.4f})")
    assert err.std().item() == pytest.approx(spread, rel=0.1)
    v = torch.where(BatchNoise(n, torch.Generator().manual_seed(6)).rand((3,)) < 0.5, -1.0, 1.0)
    rest = err - (torch.einsum("bi,ij,bj->b", v.double(), M, v.double()) - torch.trace(M))
    print(f"less Hutchinson: mean {rest.mean():.4f}, spread {rest.std():.4f}")
    assert abs(rest.mean().item()) < (0.01 if solver == "adaptive" else 0.03)
    assert rest.std().item() < 0.02
    assert res.evaluations == (2 * 59 if solver == "heun" else res.evaluations) and res.evaluations > 10


def test_bits_per_dim_and_dequantisation():
    lik = Likelihood(torch.tensor([-3 * math.log(2) * 64.0]), evaluations=1, dim=64)
    assert lik.bits_per_dim(None).item() == pytest.approx(3.0)
    assert lik.bits_per_dim().item() == pytest.approx(11.0)  # + log2(256) on the [0, 1] scale
    x = torch.tensor([[0.0, 1.0, 128 / 255]])
    y = dequantise(x, PerSampleNoise(0, [0]))
    k = torch.tensor([[0.0, 255.0, 128.0]])
    assert ((y * 256 - k) >= 0).all() and ((y * 256 - k) < 1).all()


def test_level_only_nets_need_the_fixed_step_solver():
    net = GaussianScore(MU3, COV3, accepts_any_sigma=False)
    sched = GeometricSchedule(20.0, 0.01, 10)
    with pytest.raises(ValueError, match="accepts_any_sigma"):
        log_likelihood(net, sched, torch.zeros(2, 3), BatchNoise(2))
    log_likelihood(net, sched, torch.zeros(2, 3), BatchNoise(2), solver="heun")
    assert all(min(abs(s - l) for l in sched.sigmas.tolist()) < 1e-6 for s in net.sigmas_seen)
