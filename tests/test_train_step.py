"""scoretk.training.step.TrainStep and make_optimiser: the per-batch work `scoretk train` runs (and
benchmarks/bench_train.py times)."""
from __future__ import annotations

import math

import torch
from torch import nn

from scoretk.recipe import OptimConfig
from scoretk.training.step import TrainStep, make_optimiser


class Quadratic(nn.Module):
    """s(x) = w * x: its DSM loss has a known gradient, and w = nan poisons it on demand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0]))

    def forward(self, x, sigma, level):
        return self.w * x


class MeanLoss:
    """loss = mean((s(x) - x)^2): gradient 2 * mean((w - 1) x^2) per coordinate."""

    def __call__(self, net, x, schedule, generator):
        return ((net(x, None, None) - x) ** 2).mean(), {}


class NoAverager:
    def __init__(self):
        self.updates = 0

    def update(self, net):
        self.updates += 1


def _step(clip):
    torch.manual_seed(0)
    net = Quadratic()
    opt = make_optimiser(net, OptimConfig(lr=0.1))
    avg = NoAverager()
    return net, opt, avg, TrainStep(net, net, MeanLoss(), None, opt, avg, clip=clip)


def test_gradient_norm_is_the_true_norm_and_clipping_applies():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # loss = mean of the 4 entries ((w_j - 1) x_ij)^2, so dloss/dw_j = (w_j - 1) sum_i x_ij^2 / 2
    expected_grad = (torch.tensor([0.5, -1.0]) - 1) * (x ** 2).sum(0) / 2
    for clip in (None, 0.5):
        net, opt, avg, step = _step(clip)
        loss, grad_norm, _ = step(x, None, 0)
        assert math.isclose(float(grad_norm), float(expected_grad.norm()), rel_tol=1e-6)
        assert avg.updates == 1 and not loss.requires_grad
        if clip is None:
            torch.testing.assert_close(net.w.grad, expected_grad)
        else:  # clipped to the threshold (the reported norm is the one before clipping)
            assert float(net.w.grad.norm()) <= 0.5 + 1e-6
            torch.testing.assert_close(net.w.grad, expected_grad * 0.5 / expected_grad.norm(),
                                       rtol=1e-5, atol=1e-6)


def test_first_non_finite_step_is_recorded_without_stopping_the_steps():
    net, opt, avg, step = _step(None)
    x = torch.ones(3, 2)
    assert step.first_bad() == -1
    step(x, None, 0)
    step(x * float("nan"), None, 1)  # step index 1 goes bad: recorded as 1 + 1
    step(x * float("inf"), None, 2)
    assert step.first_bad() == 2


def test_fused_adam_on_cpu_matches_plain_adam():
    """Given the same gradients, fused and plain Adam make the same updates. The gradients
    are set, not computed from the diverging weights: otherwise last-bit differences in the
    weights feed back through the loss and Adam's normalisation amplifies them on near-zero
    entries (by CPU). The updates (~lr = 1e-2) agree up to a few roundings, and the weights
    (|w| < 1) to one ulp (6e-8) per step: well inside 1e-6, far from a wrong update."""
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    fused = make_optimiser(a, OptimConfig(lr=1e-2, weight_decay=1e-3))
    plain = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-3, foreach=False)
    assert fused.defaults.get("fused") is True
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a.parameters()]
        for net, opt in ((a, fused), (b, plain)):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # a plain optimiser's checkpoint loads into the fused one (runs saved before the change)
    state = plain.state_dict()
    fused.load_state_dict(state)
    assert int(fused.state_dict()["state"][0]["step"]) == 5
