"""The two elementwise-heavy operations of the RefineNets, written for speed: ELU and
InstanceNorm++ (optionally fused with the ELU that follows it), each with a hand-written
backward.

The modules in `layers` call these; under torch.compile they fall back to the plain formulas,
which the compiler can fuse by itself. `tests/test_speed_paths.py` checks them against those
formulas (values, gradients, double backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5


# ---------------------------------------------------------------------------- ELU

def elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    """ELU whose backward reads the saved output instead of the input.

    d elu/dx = 1 for x > 0 and exp(x) = elu(x) + alpha for x <= 0: from the output the
    gradient is a multiply-add, while PyTorch's out-of-place ELU saves the input and evaluates
    exp again in the backward (~4x the cost on CPU); the backward is the formula PyTorch
    itself uses for in-place ELU. On CPU the forward (alpha 1) uses exp instead of expm1 (see
    `_elu_via_exp`), 1.6x faster. Plain F.elu under torch.compile.
    """
    if torch.compiler.is_compiling():
        return F.elu(x, alpha)
    if not (torch.is_grad_enabled() and x.requires_grad):  # sampling: skip autograd's ctx
        return _elu_forward(x, alpha)
    return _ELUFromOutput.apply(x, alpha)


def _elu_forward(x: Tensor, alpha: float) -> Tensor:
    if alpha == 1.0 and x.device.type == "cpu" and x.is_floating_point():
        return _elu_via_exp(x)
    return F.elu(x, alpha)  # one fused kernel on GPUs, where elementwise ops are memory-bound


def _elu_via_exp(x: Tensor) -> Tensor:
    """ELU (alpha 1) as max(exp(min(x, 0)) - 1, x): exp(x) - 1 >= x for every x, with equality
    only at 0. PyTorch's CPU kernel evaluates expm1, which costs ~2x exp."""
    y = _exp_nonpositive_minus_one(x)
    return torch.maximum(y, x, out=y)


def _elu_(x: Tensor, alpha: float) -> Tensor:
    """ELU in place, for a fresh buffer that nothing else reads (see `layers.norm_act`)."""
    if alpha == 1.0 and x.device.type == "cpu" and x.is_floating_point():
        return torch.maximum(_exp_nonpositive_minus_one(x), x, out=x)
    return F.elu_(x, alpha)


def _exp_nonpositive_minus_one(x: Tensor) -> Tensor:
    """exp(min(x, 0)) - 1 in a new buffer. It differs from expm1 by at most one rounding of
    1.0 (6e-8 absolute). (2**(x*log2 e) - 1 is 1.3x faster on its own, since PyTorch's CPU
    exp2 costs half its exp, but not in a training step, where the extra pass over memory
    costs as much.)"""
    y = torch.clamp(x, max=0)
    return torch.exp(y, out=y).sub_(1)


def _elu_grad_from_output(grad: Tensor, out: Tensor, alpha: float) -> Tensor:
    return torch.ops.aten.elu_backward(grad, alpha, 1, 1, True, out)


class _ELUFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        out = _elu_forward(x, alpha)
        ctx.alpha = alpha
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable form of the same formula
            return grad * torch.where(out > 0, 1.0, out + ctx.alpha), None
        return _elu_grad_from_output(grad, out, ctx.alpha), None


# ---------------------------------------------------------------------------- InstanceNorm++

def instance_norm_pp(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor,
                     elu_alpha: float | None = None) -> Tensor:
    """InstanceNorm++: instance norm, plus the (normalised) channel means added back through
    alpha, because plain instance norm throws away colour / brightness shifts between channels.

    gamma, alpha, beta: (B, C) or (1, C).
    z_k = gamma_k (x_k - mu_k)/s_k + beta_k + alpha_k (mu_k - m)/v
    With `elu_alpha`, returns ELU(z) instead (see `layers.norm_act`).

    Eager mode runs a fused version (`_InstanceNormPP`: 3 passes over x forward, a hand-written
    backward); under torch.compile the plain formula (`instance_norm_pp_reference`) is traced
    instead, so the compiler can fuse it with its neighbours.
    """
    if torch.compiler.is_compiling():
        out = instance_norm_pp_reference(x, gamma, alpha, beta)
        return out if elu_alpha is None else F.elu(out, elu_alpha)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (x, gamma, alpha, beta)):
        d, _, _, _, _, scale, shift = _norm_stats(x, gamma, alpha, beta)  # sampling: no ctx
        out = _addcmul_into(shift, d, scale)
        return out if elu_alpha is None else _elu_(out, elu_alpha)
    return _InstanceNormPP.apply(x, gamma, alpha, beta, elu_alpha)


def instance_norm_pp_reference(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """The formula written out with plain (autograd-differentiable) torch ops."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    s = x.var(dim=(2, 3), keepdim=True, unbiased=False).add(EPS).sqrt()
    m = mu.mean(dim=1, keepdim=True)
    v = mu.var(dim=1, keepdim=True, unbiased=False).add(EPS).sqrt()
    gamma, alpha, beta = (t[:, :, None, None] for t in (gamma, alpha, beta))
    return gamma * (x - mu) / s + beta + alpha * (mu - m) / v


def _norm_stats(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor):
    """(x - mu, mu, 1/s, normalised channel means, 1/v, scale, shift); all but the first are
    (B, C, 1, 1)."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    d = x - mu
    var = torch.mul(d, d).mean(dim=(2, 3), keepdim=True)  # two-pass: no cancellation
    invstd = var.add_(EPS).rsqrt_()
    mvar, m = torch.var_mean(mu, dim=1, keepdim=True, unbiased=False)
    inv_v = mvar.add_(EPS).rsqrt_()
    nm = (mu - m).mul_(inv_v)
    g4, a4, b4 = (t[:, :, None, None] for t in (gamma, alpha, beta))
    scale = g4 * invstd
    shift = torch.addcmul(b4, a4, nm)
    return d, mu, invstd, nm, inv_v, scale, shift


class _InstanceNormPP(torch.autograd.Function):
    """InstanceNorm++ with a fused forward (mean, x - mu, var, one multiply-add) and a
    hand-written backward (two reductions and one multiply-add pass over x), in any memory
    format; optionally followed by an ELU computed in place on the norm's output, whose
    backward then reads that output. Double backward (create_graph=True) re-derives the
    gradient from the plain formula."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor,
                elu_alpha: float | None) -> Tensor:
        d, mu, invstd, nm, inv_v, scale, shift = _norm_stats(x, gamma, alpha, beta)
        out = _addcmul_into(shift, d, scale)
        ctx.elu_alpha = elu_alpha
        if elu_alpha is not None:
            out = _elu_(out, elu_alpha)
        ctx.save_for_backward(x, gamma, alpha, beta, mu, invstd, nm, inv_v,
                              out if elu_alpha is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, gamma, alpha, beta, mu, invstd, nm, inv_v, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain formula instead
            return (*_double_differentiable_grad(x, gamma, alpha, beta, ctx.elu_alpha, grad,
                                                 ctx.needs_input_grad[:4]), None)
        if ctx.elu_alpha is not None:
            grad = _elu_grad_from_output(grad, out, ctx.elu_alpha)
        return (*_instance_norm_pp_backward(grad, x, gamma, alpha, mu, invstd, nm, inv_v,
                                            ctx.needs_input_grad), None)


def _double_differentiable_grad(x, gamma, alpha, beta, elu_alpha, grad, needs):
    inputs = [t for t, n in zip((x, gamma, alpha, beta), needs) if n]
    with torch.enable_grad():
        out = instance_norm_pp_reference(x, gamma, alpha, beta)
        if elu_alpha is not None:
            out = F.elu(out, elu_alpha)
        grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
    return tuple(next(grads) if n else None for n in needs)


def _instance_norm_pp_backward(grad, x, gamma, alpha, mu, invstd, nm, inv_v, needs):
    """z = gamma*(x - mu)*invstd + beta + alpha*nm, nm = (mu - m)*inv_v over channels.

    With xhat = (x - mu)*invstd, sg = sum_hw grad, sgx = sum_hw grad*xhat, n = H*W:
    dx = gamma*invstd*(grad - sg/n - xhat*sgx/n) + dmu/n, where dmu is the gradient reaching mu
    through the alpha term (a layer-norm backward over channels).
    """
    n = x.shape[2] * x.shape[3]
    g4, a4 = gamma[:, :, None, None], alpha[:, :, None, None]
    d = x - mu
    sg = grad.sum(dim=(2, 3), keepdim=True)
    sgx = torch.mul(grad, d).sum(dim=(2, 3), keepdim=True).mul_(invstd)
    dgamma = dalpha = dbeta = dx = None
    if needs[1]:
        dgamma = _reduce_like(sgx, gamma)
    if needs[2]:
        dalpha = _reduce_like(sg * nm, alpha)
    if needs[3]:
        dbeta = _reduce_like(sg, gamma)
    if needs[0]:
        dnm = sg * a4
        dmu = (dnm - dnm.mean(dim=1, keepdim=True)
               - nm * (dnm * nm).mean(dim=1, keepdim=True)).mul_(inv_v)
        k1 = g4 * invstd  # dx = k1*grad + k2*(x - mu) + k3
        k2 = -k1 * invstd * sgx / n
        k3 = (dmu - k1 * sg) / n
        dx = _addcmul_into(k3, d, k2).addcmul_(grad, k1)
    return dx, dgamma, dalpha, dbeta


def _addcmul_into(c: Tensor, t: Tensor, k: Tensor) -> Tensor:
    """c + t*k, written over the temporary t (shaped and typed like x).

    Under autocast, t is bf16 or fp16 while c and k are float32: the sum is computed in float32
    and stored in t's dtype, the norm's input dtype (as layer_norm and group_norm return).
    Returning float32 instead would cost a full cast copy before the next convolution, and
    another for the gradient on the way back."""
    return torch.addcmul(c, t, k, out=t)


def _reduce_like(t: Tensor, like: Tensor) -> Tensor:
    """(B, C, 1, 1) -> like's shape: (B, C), or (1, C) summed over the batch."""
    t = t.flatten(1)
    return t.sum(dim=0, keepdim=True) if like.shape[0] == 1 and t.shape[0] != 1 else t
