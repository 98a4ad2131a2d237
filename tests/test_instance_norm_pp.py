"""InstanceNorm++ and conditional InstanceNorm++ compute the function of the released
NCSN/NCSNv2 code and checkpoints in every path the nets take: eager with the hand-written
backward, no-grad sampling, the plain formula torch.compile traces, channels_last input, and
double backward; alone and fused with the ELU that follows them. Outputs and gradients are
checked against the formula transcribed below (docs/theory.md, "InstanceNorm++"), in float64.

The inputs make every detail of the formula matter: channel spreads from 0.01 to 3 (the 1e-5
inside the instance norm's square root moves outputs by up to 5%), channel means within ~0.01
of each other (the same for the variance of the means, where C - 1 against C changes the
variance by 25% at C = 5), and random gamma, alpha, beta far from their initial values.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from scoretk_plugins.nets import layers, ops
from scoretk_plugins.nets.layers import CondInstanceNormPP, InstanceNormPP

RTOL = 1e-6
C, L = 5, 3


def formula(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor,
            beta: torch.Tensor) -> torch.Tensor:
    """The released code's InstanceNorm++, written out: x (B, C, H, W); gamma, alpha, beta
    (B or 1, C). h_k: instance norm (biased spatial variance); mu_hat_k: the channel means
    standardised by their mean and UNBIASED variance over channels; alpha's term inside gamma.
    """
    _, c, h, w = x.shape
    mu = x.sum(dim=(2, 3)) / (h * w)  # spatial mean of each channel
    var = ((x - mu[:, :, None, None]) ** 2).sum(dim=(2, 3)) / (h * w)  # biased
    hk = (x - mu[:, :, None, None]) / torch.sqrt(var + 1e-5)[:, :, None, None]
    m = mu.sum(dim=1, keepdim=True) / c  # mean over channels of the means
    v2 = ((mu - m) ** 2).sum(dim=1, keepdim=True) / (c - 1)  # unbiased
    mu_hat = (mu - m) / torch.sqrt(v2 + 1e-5)
    g, a, b = (t[:, :, None, None] for t in (gamma, alpha, beta))
    return g * (hk + a * mu_hat[:, :, None, None]) + b


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b|, or |a| where b is exactly zero (beta's second derivatives)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def make_input(B=4, H=6, W=7, dtype=torch.float64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-2, 0.5, C, dtype=dtype).view(1, C, 1, 1)
    offset = 0.3 + 0.01 * torch.randn(1, C, 1, 1, generator=g, dtype=dtype)
    return torch.randn(B, C, H, W, generator=g, dtype=dtype) * spread + offset


def make_norm(conditional: bool, seed=1):
    torch.manual_seed(seed)
    norm = (CondInstanceNormPP(C, L) if conditional else InstanceNormPP(C)).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(0.5, 1.0)
    return norm


LEVEL = torch.tensor([0, 2, 1, 2])


def formula_params(norm) -> list[torch.Tensor]:
    """The norm's (gamma, alpha, beta) rows, as differentiable functions of its parameters."""
    if isinstance(norm, CondInstanceNormPP):
        return list(norm.embed.weight[LEVEL].chunk(3, dim=1))  # columns gamma, alpha, beta
    return [norm.gamma[None], norm.alpha[None], norm.beta[None]]


def expected(norm, x: torch.Tensor, elu: float | None) -> torch.Tensor:
    out = formula(x, *formula_params(norm))
    return out if elu is None else F.elu(out, elu)


def actual(norm, x: torch.Tensor, elu: float | None) -> torch.Tensor:
    """The modules' own call, as the nets make it (norm_act fuses the ELU)."""
    level = LEVEL if isinstance(norm, CondInstanceNormPP) else None
    return layers.norm_act(norm, layers.ELU(elu), x, level) if elu is not None \
        else norm(x, level)


def grads(fn, norm, x: torch.Tensor, elu: float | None, upstream: torch.Tensor):
    """(output, d/dx, d/dparameters) of fn with the given upstream gradient."""
    norm.zero_grad()
    xs = x.detach().clone().requires_grad_()
    out = fn(norm, xs, elu)
    out.backward(upstream)
    return out.detach(), xs.grad, [p.grad.clone() for p in norm.parameters()]


def assert_all_close(got, want, what: str) -> None:
    (o1, gx1, gp1), (o2, gx2, gp2) = got, want
    assert rel_err(o1, o2) < RTOL, f"{what}: output {rel_err(o1, o2):.2e}"
    assert rel_err(gx1, gx2) < RTOL, f"{what}: grad x {rel_err(gx1, gx2):.2e}"
    for a, b in zip(gp1, gp2):
        assert a.shape == b.shape
        assert rel_err(a, b) < RTOL, f"{what}: grad of parameters {rel_err(a, b):.2e}"


CASES = [(cond, elu) for cond in (False, True) for elu in (None, 1.0, 0.7)]
IDS = [f"{'cond' if c else 'plain'}-elu{e}" for c, e in CASES]


@pytest.mark.parametrize("conditional, elu", CASES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_path_matches_the_formula(conditional, elu, channels_last):
    norm, x = make_norm(conditional), make_input()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(2))
    out = actual(norm, x.detach().clone().requires_grad_(), elu)
    assert type(out.grad_fn).__name__ == "_InstanceNormPPBackward"  # the fused op, ELU included
    got = grads(actual, norm, x, elu, upstream)
    assert_all_close(got, grads(expected, norm, x, elu, upstream), "eager")
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("conditional, elu", CASES, ids=IDS)
def test_no_grad_path_matches_the_formula(conditional, elu):
    norm, x = make_norm(conditional), make_input()
    with torch.no_grad():
        out = actual(norm, x, elu)
        want = expected(norm, x, elu)
    assert rel_err(out, want) < RTOL


@pytest.mark.parametrize("conditional, elu", CASES, ids=IDS)
def test_compiled_path_matches_the_formula(conditional, elu, monkeypatch):
    """Under torch.compile the modules trace the plain formula (`ops._plain_norm`); here the
    tracer's flag is set by hand so the branch runs eagerly."""
    norm, x = make_norm(conditional), make_input()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    got = grads(actual, norm, x, elu, upstream)
    assert_all_close(got, grads(expected, norm, x, elu, upstream), "plain (compiled) path")


@pytest.mark.parametrize("conditional, elu", CASES, ids=IDS)
def test_double_backward_matches_the_formula(conditional, elu):
    """Second derivatives (a gradient penalty, say): the gradient of <d out/d inputs, w>."""
    gen = torch.Generator().manual_seed(4)
    results = []
    for fn in (actual, expected):
        norm, x = make_norm(conditional), make_input()
        x.requires_grad_()
        inputs = [x, *norm.parameters()]
        out = fn(norm, x, elu)
        v = torch.randn(out.shape, dtype=out.dtype, generator=gen.manual_seed(5))
        first = torch.autograd.grad(out, inputs, v, create_graph=True)
        w = [torch.randn(g.shape, dtype=g.dtype, generator=gen.manual_seed(6 + i))
             for i, g in enumerate(first)]
        penalty = sum((g * wi).sum() for g, wi in zip(first, w))
        results.append((first, torch.autograd.grad(penalty, inputs, allow_unused=True,
                                                   materialize_grads=True)))
    (first1, second1), (first2, second2) = results
    for a, b in zip(first1 + second1, first2 + second2):
        assert rel_err(a, b) < RTOL


@pytest.mark.parametrize("conditional, elu", CASES, ids=IDS)
def test_float32_eager_path_matches_the_float64_formula(conditional, elu):
    """The path training runs. float32 rounds each operation to u = 6e-8; the norm's sums run
    over H*W = 42 and C = 5 values, so on inputs without cancellation (spreads of order 1,
    means well apart) the error stays within a few hundred u: 1e-5 bounds it."""
    norm64 = make_norm(conditional)
    norm32 = copy.deepcopy(norm64).float()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, C, 6, 7, dtype=torch.float64, generator=g) \
        + torch.randn(1, C, 1, 1, dtype=torch.float64, generator=g)
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=g)
    (o1, gx1, gp1) = grads(actual, norm32, x.float(), elu, upstream.float())
    (o2, gx2, gp2) = grads(expected, norm64, x, elu, upstream)
    for a, b in zip([o1, gx1, *gp1], [o2, gx2, *gp2]):
        assert rel_err(a, b) < 1e-5


def test_the_channel_means_use_the_unbiased_variance_and_sit_inside_gamma():
    """A check on the transcription itself: with H = W = 1 the instance-norm part is 0, so
    z = gamma*alpha*(mu - m)/sqrt(v2 + 1e-5) + beta with v2 = sum (mu - m)^2 / (C - 1)."""
    mu = torch.tensor([0., 1., 2., 3., 4.], dtype=torch.float64)
    gamma, alpha, beta = (torch.full((1, C), v, dtype=torch.float64) for v in (2., 3., 0.5))
    z = formula(mu.view(1, C, 1, 1), gamma, alpha, beta).flatten()
    want = 2 * 3 * (mu - 2) / (10 / 4 + 1e-5) ** 0.5 + 0.5
    torch.testing.assert_close(z, want, rtol=1e-12, atol=0)
    got = ops.instance_norm_pp(mu.view(1, C, 1, 1), gamma, alpha, beta).flatten()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [lambda: InstanceNormPP(1), lambda: CondInstanceNormPP(1, 4)])
def test_one_channel_is_refused_at_construction(make):
    with pytest.raises(ValueError, match="at least 2 channels"):
        make()


def test_one_channel_is_refused_by_the_function():
    x, p = torch.randn(2, 1, 4, 4), torch.ones(1, 1)
    with pytest.raises(ValueError, match="at least 2 channels"):
        ops.instance_norm_pp(x, p, p, p)


def test_weights_saved_for_the_papers_formula_warn_when_loaded(tmp_path):
    """scoretk 0.1's norms computed the paper's formula and saved state-dict version 1: such
    weights still load, with a warning that the net is now another function. Weights saved
    now (version 2) and weights without a version (imports, safetensors) load silently."""
    import warnings

    from scoretk.checkpoint import load_checkpoint, save_checkpoint
    from scoretk_plugins.nets.layers import CondInstanceNormPP, InstanceNormPP

    for norm in (InstanceNormPP(4), CondInstanceNormPP(4, num_levels=3)):
        path = tmp_path / "ckpt.pt"
        save_checkpoint({"model": norm.state_dict()}, path)
        saved = load_checkpoint(path)["model"]  # weights-only loading keeps the versions
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            norm.load_state_dict(saved)
            norm.load_state_dict(dict(saved))  # no metadata at all
        saved._metadata[""]["version"] = 1
        with pytest.warns(UserWarning, match="saved by scoretk 0.1"):
            norm.load_state_dict(saved)
