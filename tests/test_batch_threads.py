"""Batches split across CPU threads (scoretk.execution.batch_threads) compute the plain net's function:
the same outputs, the same input and parameter gradients (to float summation order), on
threads that really run one intra-op thread each; and errors come back to the caller."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from scoretk.components import Schedule
from scoretk.execution.batch_threads import (AUTO_MIN_CHUNK_VALUES, BatchThreads, in_threads,
                                   split_batches)
from scoretk.recipe import TrainConfig
from scoretk_plugins.losses import DSMLoss
from scoretk_plugins.nets.convnet import ConvNetParams, ConvScoreNet
from scoretk_plugins.nets.mlp import ScoreMLP
from scoretk_plugins.nets.refinenet import STAGES, RefineNet

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def refinenet(kind: str) -> RefineNet:
    torch.manual_seed(0)
    net = RefineNet(3, 8, STAGES[kind], conditional=kind == "ncsn", num_levels=5)
    with torch.no_grad():  # move the norms off their init so every term matters
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "alpha", "beta")) or "embed" in name:
                p.add_(0.3 * torch.randn_like(p))
    return net


def inputs(batch: int, shape=(3, 16, 16)):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(batch, *shape, generator=g),
            torch.rand(batch, generator=g) * 5 + 0.1,
            torch.randint(0, 5, (batch,), generator=g))


def output_and_grads(net: nn.Module, params: nn.Module, x, sigma, level):
    """Output, input gradient and parameter gradients of a loss that weights every output."""
    x = x.clone().requires_grad_()
    params.zero_grad(set_to_none=True)
    out = net(x, sigma, level)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in params.named_parameters()}


@pytest.mark.parametrize("kind", ["ncsnv2", "ncsn"])
@pytest.mark.parametrize("threads, batch", [(2, 4), (3, 5)])  # (3, 5): uneven chunks
def test_split_net_matches_plain_net(kind, threads, batch):
    net = refinenet(kind)
    x, sigma, level = inputs(batch)
    plain = output_and_grads(net, net, x, sigma, level)
    split = output_and_grads(BatchThreads(net, threads), net, x, sigma, level)
    assert rel_err(split[0], plain[0]) < RTOL
    assert rel_err(split[1], plain[1]) < RTOL
    assert plain[2].keys() == split[2].keys()
    for name, g in plain[2].items():
        assert rel_err(split[2][name], g) < RTOL, name


def test_split_dsm_loss_and_parameter_gradients_match():
    """What a training step computes: the DSM loss and every parameter gradient, with the same
    random draws (the loss draws them before calling the net)."""
    net = refinenet("ncsnv2")

    class Sched(Schedule):
        sigmas = torch.tensor([5.0, 2.0, 0.8, 0.3, 0.1])

        def sample_levels(self, n, generator, device):
            return torch.randint(0, 5, (n,), generator=generator)

    losses, grads = [], []
    for model in (net, BatchThreads(net, 2)):
        net.zero_grad(set_to_none=True)
        loss, _ = DSMLoss()(model, inputs(6)[0], Sched(), torch.Generator().manual_seed(3))
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert rel_err(losses[1], losses[0]) < RTOL
    assert rel_err(grads[1], grads[0]) < RTOL


def test_no_grad_forward_matches_and_keeps_grad_mode_off():
    net = refinenet("ncsnv2")
    x, sigma, level = inputs(4)
    with torch.no_grad():
        plain = net(x, sigma, level)
        split = BatchThreads(net, 2)(x, sigma, level)
    assert split.shape == plain.shape and not split.requires_grad
    assert rel_err(split, plain) < 1e-6


class Recorder(nn.Module):
    """Records, per call, the thread it ran on and torch's intra-op thread count there."""

    batch_independent = True

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))
        # the Thread object, not get_ident(): a finished thread's ident can be reused at once
        self.calls: list[tuple[threading.Thread, int, int, bool]] = []

    def forward(self, x, sigma, level):
        self.calls.append((threading.current_thread(), torch.get_num_threads(), x.shape[0],
                           torch.is_grad_enabled()))
        return self.w * x / sigma.view(-1, 1)


def test_chunks_run_on_separate_threads_with_one_intra_op_thread_each():
    rec = Recorder()
    before = torch.get_num_threads()
    out = BatchThreads(rec, 3)(torch.ones(7, 2), torch.full((7,), 2.0), torch.zeros(7))
    out.sum().backward()
    assert len({c[0] for c in rec.calls}) == 3
    assert sorted(c[2] for c in rec.calls) == [2, 2, 3]
    assert {c[1] for c in rec.calls} == {1}
    assert all(c[3] for c in rec.calls)  # the chunks build graphs: grad mode on in each thread
    assert torch.get_num_threads() == before
    assert rec.w.grad.item() == pytest.approx(7.0)  # d/dw sum(w * 1 / 2) over 7x2 entries


def test_an_error_in_a_worker_reaches_the_caller_after_all_threads_finish():
    finished = []

    def ok():
        finished.append(torch.get_num_threads())
        return 1

    def bad():
        raise ValueError("chunk 1 failed")

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="chunk 1 failed"):
        in_threads([ok, bad, ok])
    assert finished == [1, 1]
    assert torch.get_num_threads() == before


def test_second_order_gradients_are_refused_not_wrong():
    rec = Recorder()
    x = torch.ones(4, 2, requires_grad=True)
    (g,) = torch.autograd.grad(BatchThreads(rec, 2)(x, torch.ones(4), torch.zeros(4)).sum(), x,
                               create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_small_or_mismatched_batches_call_the_net_directly():
    rec = Recorder()
    BatchThreads(rec, 2)(torch.ones(1, 2), torch.ones(1), torch.zeros(1))
    BatchThreads(rec, 2)(torch.ones(4, 2), torch.ones(1), torch.zeros(4))
    assert [c[2] for c in rec.calls] == [1, 4]


def test_builtin_nets_are_honest_about_batch_independence():
    """A sample's output must not change when the rest of the batch does."""
    nets = [refinenet("ncsnv2"), refinenet("ncsn"),
            ConvScoreNet(3, ConvNetParams(channels=16, blocks=1, film=True)),
            ScoreMLP(3 * 16 * 16, hidden=16, depth=1)]
    x, sigma, level = inputs(3)
    other = x.clone()
    other[1:] = torch.rand_like(other[1:]) * 3
    for net in nets:
        assert net.batch_independent
        with torch.no_grad():
            a, b = net(x, sigma, level)[0], net(other, sigma, level)[0]
        assert rel_err(a, b) < 1e-6, type(net).__name__
    bn = nn.BatchNorm1d(3)  # what the flag guards against: this one fails the same check
    y = torch.randn(3, 3)
    y2 = y.clone()
    y2[1:] *= 3
    with torch.no_grad():
        assert rel_err(bn(y)[0], bn(y2)[0]) > 1e-2


def test_split_batches_follows_the_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    rec = Recorder()
    auto = split_batches(rec, "auto", cpu)
    if torch.get_num_threads() > 1:
        assert isinstance(auto, BatchThreads) and auto.threads == torch.get_num_threads()
    else:
        assert auto is rec
    assert split_batches(nn.Linear(2, 2), "auto", cpu).__class__ is nn.Linear  # not declared
    forced = split_batches(nn.Linear(2, 2), 3, cpu)  # the user's explicit choice
    assert isinstance(forced, BatchThreads) and forced.threads == 3
    assert split_batches(rec, 1, cpu) is rec
    assert split_batches(rec, 3, cuda) is rec


def test_auto_leaves_small_chunks_whole():
    """Under AUTO_MIN_CHUNK_VALUES input values per chunk the split costs more than it saves,
    so `auto` runs such batches unsplit, and uses fewer chunks where only some fit."""
    rec = Recorder()
    net = BatchThreads(rec, 4, min_values=AUTO_MIN_CHUNK_VALUES)
    per_item = 64
    small = AUTO_MIN_CHUNK_VALUES // per_item  # one chunk's worth in all
    for batch, chunks in ((small, 1), (2 * small, 2), (3 * small + 1, 3), (16 * small, 4)):
        rec.calls.clear()
        with torch.no_grad():
            net(torch.ones(batch, per_item), torch.ones(batch), torch.zeros(batch))
        assert len(rec.calls) == chunks == net.chunks(batch, per_item), batch
    assert BatchThreads(rec, 2).chunks(3, 1) == 2  # explicit settings split any batch


def test_recipe_field_is_validated():
    assert TrainConfig(iterations=1).batch_threads == "auto"
    assert TrainConfig(iterations=1, batch_threads=2).batch_threads == 2
    with pytest.raises(ValueError, match="whole number >= 1"):
        TrainConfig(iterations=1, batch_threads=0)
