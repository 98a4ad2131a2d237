"""The speed paths compute the same function as the plain one.

Fused InstanceNorm++ and ELU (hand-written backward), the stride-2 ConvMeanPool, the dilated
convolution's tap-by-tap weight gradient, the channels_last layout and torch.compile must
agree with the plain formulas / eager NCHW to 1e-4 relative error, in values and in
gradients. Small nets, so this file takes seconds (the inductor test is marked slow: it
compiles C++).
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scoretk.execution.layout import ChannelsLast, in_preferred_layout
from scoretk_plugins.nets import layers, ops, refinenet
from scoretk_plugins.nets.layers import (CRP, ELU, ConvMeanPool, CondInstanceNormPP,
                                         InstanceNormPP, NoNorm, ResidualBlock)
from scoretk_plugins.nets.ops import instance_norm_pp, instance_norm_pp_reference
from scoretk_plugins.nets.refinenet import STAGES, RefineNet

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close(a, b, rtol=RTOL, what=""):
    err = rel_err(a, b)
    assert err < rtol, f"{what}: relative error {err:.2e} >= {rtol:g}"


def _norm_inputs(B=3, C=5, H=6, W=7, per_sample=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype) * 3 \
        + torch.randn(1, C, 1, 1, generator=g, dtype=dtype) * 2
    rows = B if per_sample else 1
    params = [torch.randn(rows, C, generator=g, dtype=dtype) for _ in range(3)]
    return x, params


# ------------------------------------------------------------------ InstanceNorm++

@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_instance_norm_pp_matches_formula(per_sample, channels_last):
    x, params = _norm_inputs(per_sample=per_sample, dtype=torch.float32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    outs = []
    for fn in (instance_norm_pp, instance_norm_pp_reference):
        xs = x.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in params]
        out = fn(xs, *ps)
        out.backward(grad)
        outs.append((out.detach(), xs.grad, [p.grad for p in ps]))
    (o1, gx1, gp1), (o2, gx2, gp2) = outs
    assert_close(o1, o2, what="output")
    assert_close(gx1, gx2, what="grad x")
    for name, a, b in zip(("gamma", "alpha", "beta"), gp1, gp2):
        assert a.shape == b.shape
        assert_close(a, b, what=f"grad {name}")
    if channels_last:
        assert o1.is_contiguous(memory_format=torch.channels_last)


def test_fused_instance_norm_pp_gradcheck_and_double_backward():
    x, params = _norm_inputs(B=2, C=3, H=4, W=3, dtype=torch.float64)
    inputs = (x.requires_grad_(), *(p.requires_grad_() for p in params))
    assert torch.autograd.gradcheck(instance_norm_pp, inputs)
    assert torch.autograd.gradgradcheck(instance_norm_pp, inputs)


def test_fused_instance_norm_pp_partial_grads():
    """Only some inputs need gradients (frozen norm parameters, or no input gradient)."""
    x, (g, a, b) = _norm_inputs(dtype=torch.float32)
    out = instance_norm_pp(x.requires_grad_(), g, a, b)
    out.square().sum().backward()
    ref = x.detach().clone().requires_grad_()
    instance_norm_pp_reference(ref, g, a, b).square().sum().backward()
    assert_close(x.grad, ref.grad)
    g2 = g.clone().requires_grad_()
    instance_norm_pp(x.detach(), g2, a, b).square().sum().backward()
    g3 = g.clone().requires_grad_()
    instance_norm_pp_reference(x.detach(), g3, a, b).square().sum().backward()
    assert_close(g2.grad, g3.grad)


@pytest.mark.parametrize("elu", [None, 1.0])
def test_fused_instance_norm_pp_mixed_precision(elu):
    """bf16 activations with float32 parameters (autocast keeps norms out of its lists): the
    output stays bf16, as the next convolution wants it, and matches the float32 formula to
    bf16 precision; so do the gradients."""
    x, params = _norm_inputs(dtype=torch.float32)
    xb = x.bfloat16().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    out = instance_norm_pp(xb, *ps, elu_alpha=elu)
    x32 = x.bfloat16().float().requires_grad_()
    p32 = [p.clone().requires_grad_() for p in params]
    ref = instance_norm_pp_reference(x32, *p32)
    ref = ref if elu is None else F.elu(ref, elu)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), ref, rtol=1e-2)
    grad = torch.randn_like(ref)
    out.backward(grad.bfloat16())
    ref.backward(grad)
    assert xb.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in ps)
    assert_close(xb.grad.float(), x32.grad, rtol=3e-2, what="grad x")
    for p, q in zip(ps, p32):
        assert_close(p.grad, q.grad, rtol=3e-2, what="grad param")


def test_norm_modules_use_the_fused_path_and_match():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    norm = InstanceNormPP(6)
    with torch.no_grad():
        norm.beta.normal_()
    assert_close(norm(x), instance_norm_pp_reference(x, norm.gamma[None], norm.alpha[None],
                                                     norm.beta[None]))
    cond = CondInstanceNormPP(6, 3)
    level = torch.tensor([0, 2, 1, 2])
    gamma, alpha, beta = cond.embed(level).chunk(3, dim=-1)
    assert_close(cond(x, level), instance_norm_pp_reference(x, gamma, alpha, beta))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_norm_and_elu_match_the_two_ops(channels_last):
    """norm_act: InstanceNorm++ with the ELU computed in place on its output is the same
    function as the two modules one after the other: values, and gradients to x and the
    norm's parameters, with and without autograd."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 6, 5) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for norm, level in ((InstanceNormPP(8), None),
                        (CondInstanceNormPP(8, 4), torch.tensor([0, 3, 1]))):
        act = ELU()
        results = []
        for fused in (True, False):
            norm.zero_grad()
            xs = x.clone().requires_grad_()
            out = layers.norm_act(norm, act, xs, level) if fused else act(norm(xs, level))
            # one autograd node for the pair when fused, the ELU's own node otherwise
            assert type(out.grad_fn).__name__ == ("_InstanceNormPPBackward" if fused
                                                  else "_ELUFromOutputBackward")
            out.backward(torch.cos(out.detach()))  # a non-trivial upstream gradient
            results.append((out.detach(), xs.grad, [p.grad.clone() for p in norm.parameters()]))
            with torch.no_grad():
                no_grad = layers.norm_act(norm, act, x, level)
            torch.testing.assert_close(no_grad, out.detach(), rtol=0, atol=1e-6)
        (o1, gx1, gp1), (o2, gx2, gp2) = results
        assert (o1 < 0).any() and (o1 > 0).any()  # both branches of the ELU are exercised
        assert_close(o1, o2, what="output")
        assert_close(gx1, gx2, what="grad x")
        for a, b in zip(gp1, gp2):
            assert_close(a, b, what="grad of the norm's parameters")
        if channels_last:
            assert o1.is_contiguous(memory_format=torch.channels_last)


def test_fused_norm_and_elu_gradcheck_and_double_backward():
    x, params = _norm_inputs(B=2, C=3, H=4, W=3, dtype=torch.float64)
    inputs = (x.requires_grad_(), *(p.requires_grad_() for p in params))
    fn = lambda *t: instance_norm_pp(*t, elu_alpha=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_norm_act_leaves_other_pairs_alone():
    """NoNorm returns its input, which other layers still read: no in-place ELU there."""
    x = torch.randn(2, 3, 4, 4)
    kept = x.clone()
    out = layers.norm_act(NoNorm(), ELU(), x, None)
    assert torch.equal(x, kept)
    torch.testing.assert_close(out, F.elu(kept))


# ------------------------------------------------------------------ ELU

@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_elu_matches_torch(alpha):
    x = torch.randn(2, 3, 8, 8) * 4
    x[0, 0, 0, :3] = torch.tensor([0.0, float("inf"), -float("inf")])
    grad = torch.randn_like(x)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = ELU(alpha)(a), F.elu(b, alpha)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=2e-7)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=2e-7)
    nan = ELU(alpha)(torch.tensor([float("nan")]))
    assert torch.isnan(nan).all()


def test_elu_double_backward():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ELU(), (x,))
    assert torch.autograd.gradgradcheck(ELU(), (x,))


# ------------------------------------------------------------------ ConvMeanPool

@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_conv_mean_pool_is_conv_then_mean_pool(kernel, size):
    torch.manual_seed(0)
    m = ConvMeanPool(4, 6, kernel)
    x = torch.randn(2, 4, *size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out = m(x)
    ref = F.avg_pool2d(m.conv(x2), 2)
    assert out.shape == ref.shape
    assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    w_fast = m.conv.weight.grad.clone()
    m.zero_grad()
    ref.backward(grad)
    assert_close(x.grad, x2.grad, what="grad x")
    assert_close(w_fast, m.conv.weight.grad, what="grad weight")


# ------------------------------------------------------------------ whole nets

def _net(kind: str, shape=(3, 16, 16), ngf=8, num_levels=4, seed=0) -> RefineNet:
    torch.manual_seed(seed)
    net = RefineNet(shape[0], ngf, STAGES[kind], conditional=kind == "ncsn",
                    num_levels=num_levels)
    with torch.no_grad():  # move the norms off their init so every term matters
        for name, p in net.named_parameters():
            if name.endswith(("gamma", "alpha", "beta")) or "embed" in name:
                p.add_(0.3 * torch.randn_like(p))
    return net


def _run(net, x, sigma, level):
    """Output and all gradients (parameters and input) of a scalar loss."""
    x = x.clone().requires_grad_()
    net.zero_grad(set_to_none=True)
    out = net(x, sigma, level)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    grads = {n.removeprefix("_orig_mod.").removeprefix("net."): p.grad.clone()
             for n, p in net.named_parameters()}
    return out.detach(), x.grad, grads


def _inputs(shape=(3, 16, 16), batch=3):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(batch, *shape, generator=g), torch.tensor([0.5, 2.0, 9.0][:batch]),
            torch.tensor([0, 3, 1][:batch]))


def _compare(a, b, what):
    (oa, xa, ga), (ob, xb, gb) = a, b
    assert_close(oa, ob, what=f"{what}: output")
    assert_close(xa, xb, what=f"{what}: input grad")
    for name in ga:
        assert_close(ga[name], gb[name], what=f"{what}: grad {name}")


@pytest.mark.parametrize("kind", ["ncsnv2", "ncsn"])
def test_layouts_agree_with_nchw(kind):
    """The layout the execution policy gives on CPU (channels_last inside, NCHW in and out) and
    channels_last weights and inputs agree with the net run in plain NCHW, and hand back the
    input's layout."""
    net = _net(kind)
    x, sigma, level = _inputs()
    assert isinstance(in_preferred_layout(net, torch.device("cpu")), ChannelsLast)
    base = _run(copy.deepcopy(net), x, sigma, level)
    auto = _run(ChannelsLast(net), x, sigma, level)
    _compare(auto, base, "auto layout")
    assert auto[0].is_contiguous()
    cl_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    cl = _run(cl_net, x_cl, sigma, level)
    _compare(cl, base, "channels_last")
    assert cl[0].is_contiguous(memory_format=torch.channels_last)


def test_fast_layers_agree_with_plain_formulas(monkeypatch):
    """Swap every fast path for its plain form (formula norm, torch's ELU, separate norm and
    ELU, conv + mean pool, NCHW) and compare the whole net, outputs and gradients."""
    net = _net("ncsnv2")
    x, sigma, level = _inputs()
    fast = _run(ChannelsLast(net), x, sigma, level)
    plain_net = copy.deepcopy(net)
    monkeypatch.setattr(layers, "instance_norm_pp",
                        lambda *t, elu_alpha=None: instance_norm_pp_reference(*t))
    unfused = lambda norm, act, t, level: act(norm(t, level))  # noqa: E731
    monkeypatch.setattr(layers, "norm_act", unfused)
    monkeypatch.setattr(refinenet, "norm_act", unfused)
    monkeypatch.setattr(ELU, "forward", lambda self, t: F.elu(t, self.alpha))
    monkeypatch.setattr(ConvMeanPool, "forward", lambda self, t: F.avg_pool2d(self.conv(t), 2))
    monkeypatch.setattr(layers, "pool5x5", ops.pool5x5_plain)
    plain = _run(plain_net, x, sigma, level)
    _compare(fast, plain, "plain formulas")


def test_compiled_graph_path_agrees_with_eager():
    """torch.compile traces the plain formulas (is_compiling branches); aot_eager runs that
    traced graph without code generation, so this checks our side in seconds."""
    net = _net("ncsnv2", ngf=4)
    x, sigma, level = _inputs()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(net), backend="aot_eager")
    _compare(_run(compiled, x, sigma, level), _run(net, x, sigma, level), "compiled (aot_eager)")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler on CPU")
def test_inductor_agrees_with_eager():
    """Inductor-generated code for the layers (InstanceNorm++, ELU, residual block, chained
    pooling); the whole net's compiled graph is checked above, without code generation."""
    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"res": ResidualBlock(4, 4, InstanceNormPP, dilation=2),
                                 "crp": CRP(4, NoNorm, "max")})
    fn = lambda x: block["crp"](block["res"](x))  # noqa: E731
    x = torch.randn(2, 4, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        assert_close(torch.compile(fn)(x), fn(x), what="inductor")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_crp_pooling_paths_agree(kind, channels_last):
    """CRP's pooling (channels_last detour, separable max without gradient) returns exactly
    what the plain pooling layer does, with and without gradient."""
    pool = (torch.nn.MaxPool2d if kind == "max" else torch.nn.AvgPool2d)(5, stride=1, padding=2)
    fast = layers.Pool5x5(kind)
    x = torch.randn(2, 6, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), pool(x), rtol=0, atol=1e-6)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fast(a)
    torch.testing.assert_close(out, pool(b), rtol=0, atol=1e-6)
    out.backward(torch.ones_like(out))
    pool(b).backward(torch.ones_like(out))
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kind", ["ncsnv2", "ncsn"])
def test_no_grad_path_matches_grad_path(kind):
    """Sampling (no autograd) skips the custom autograd ops; the values are the same."""
    net = _net(kind)
    x, sigma, level = _inputs()
    with torch.no_grad():
        fast = net(x, sigma, level)
    torch.testing.assert_close(fast, net(x, sigma, level).detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dilation", [2, 4])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_dilated_conv_matches_conv2d(dilation, channels_last, bias):
    """ops.dilated_conv3x3 (weight gradient tap by tap on CPU channels_last) against
    F.conv2d: values and the gradients of input, weight and bias, on a non-square input."""
    g = torch.Generator().manual_seed(dilation)
    x = torch.randn(3, 5, 9, 7, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(6, 5, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(3, 6, 9, 7, generator=g)
    inputs = [t for t in (x, w, b) if t is not None]
    ours = ops.dilated_conv3x3(x, w, b, dilation)
    plain = F.conv2d(x, w, b, padding=dilation, dilation=dilation)
    assert (type(ours.grad_fn).__name__ == "_DilatedConv3x3Backward") == channels_last
    assert_close(ours, plain, what="values")
    for a, r, name in zip(torch.autograd.grad(ours, inputs, grad),
                          torch.autograd.grad(plain, inputs, grad), ("x", "weight", "bias")):
        assert_close(a, r, what=f"d/d{name}")


def test_dilated_conv_gradcheck_partial_grads_and_double_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.dilated_conv3x3(*t, 2), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda *t: ops.dilated_conv3x3(*t, 2), (x, w, b))
    # the weight alone (an input that needs no gradient, as the first layer's)
    (dw,) = torch.autograd.grad(ops.dilated_conv3x3(x.detach(), w, b, 2).square().sum(), w)
    (ref,) = torch.autograd.grad(F.conv2d(x.detach(), w, b, padding=2, dilation=2)
                                 .square().sum(), w)
    assert_close(dw, ref, rtol=1e-12, what="d/dweight")


def test_dilated_conv_module_loads_plain_conv_weights():
    """Checkpoints written before DilatedConv3x3 existed (plain nn.Conv2d) load unchanged."""
    plain = nn.Conv2d(4, 5, 3, padding=2, dilation=2)
    ours = layers.conv3x3(4, 5, dilation=2)
    assert isinstance(ours, layers.DilatedConv3x3)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    assert_close(ours(x), plain(x), what="outputs")
    assert type(layers.conv3x3(4, 5)) is nn.Conv2d
