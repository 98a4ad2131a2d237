"""The RefineNets' operations written for speed, each with a hand-written backward: ELU and
InstanceNorm++ (optionally fused with the ELU that follows it), the two elementwise-heavy
ones, and the dilated 3x3 convolution, whose weight gradient oneDNN computes slowly on CPUs.

The modules in `layers` call these; under torch.compile they fall back to the plain formulas,
which the compiler can fuse by itself. `tests/test_speed_paths.py` checks them against those
formulas (values, gradients, double backward).
"""
from __future__ import annotations

import functools

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

    gamma, alpha, beta: (B, C) or (1, C). With h_k = (x_k - mu_k)/s_k (instance norm) and
    mu_hat_k = (mu_k - m)/v, m and v^2 the mean and the unbiased variance of the channel
    means mu_k over the C channels (so C >= 2):
    z_k = gamma_k (h_k + alpha_k mu_hat_k) + beta_k,
    the function of the released NCSN/NCSNv2 code and checkpoints (docs/theory.md,
    "InstanceNorm++"; the NCSN paper's appendix writes alpha's term outside gamma, with a
    biased variance: other weights, other function).
    With `elu_alpha`, returns ELU(z) instead (see `layers.norm_act`).

    Eager mode runs a fused version (`_InstanceNormPP`: 3 passes over x forward, a hand-written
    backward); under torch.compile the plain formula (`instance_norm_pp_reference`) is traced
    instead, so the compiler can fuse it with its neighbours.
    """
    if x.shape[1] < 2:
        raise ValueError(f"InstanceNorm++ needs at least 2 channels (the channel means' "
                         f"unbiased variance), got {x.shape[1]}")
    if torch.compiler.is_compiling():
        return _plain_norm(x, gamma, alpha, beta, elu_alpha)
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
    v = mu.var(dim=1, keepdim=True, unbiased=True).add(EPS).sqrt()
    gamma, alpha, beta = (t[:, :, None, None] for t in (gamma, alpha, beta))
    return gamma * ((x - mu) / s + alpha * (mu - m) / v) + beta


def _norm_stats(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor):
    """(x - mu, mu, 1/s, normalised channel means, 1/v, scale, shift); all but the first are
    (B, C, 1, 1). z = (x - mu)*scale + shift, scale = gamma/s, shift = beta + gamma*alpha*nm."""
    mu = x.mean(dim=(2, 3), keepdim=True)
    d = x - mu
    var = torch.mul(d, d).mean(dim=(2, 3), keepdim=True)  # two-pass: no cancellation
    invstd = var.add_(EPS).rsqrt_()
    mvar, m = torch.var_mean(mu, dim=1, keepdim=True, unbiased=True)
    inv_v = mvar.add_(EPS).rsqrt_()
    nm = (mu - m).mul_(inv_v)
    g4, a4, b4 = (t[:, :, None, None] for t in (gamma, alpha, beta))
    scale = g4 * invstd
    shift = torch.addcmul(b4, g4 * a4, nm)
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
            plain = functools.partial(_plain_norm, elu_alpha=ctx.elu_alpha)
            return (*_grads_of_plain(plain, (x, gamma, alpha, beta), ctx.needs_input_grad[:4],
                                     grad), None)
        if ctx.elu_alpha is not None:
            grad = _elu_grad_from_output(grad, out, ctx.elu_alpha)
        return (*_instance_norm_pp_backward(grad, x, gamma, alpha, mu, invstd, nm, inv_v,
                                            ctx.needs_input_grad), None)


def _plain_norm(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor,
                elu_alpha: float | None = None) -> Tensor:
    """instance_norm_pp in plain differentiable ops, the ELU included."""
    out = instance_norm_pp_reference(x, gamma, alpha, beta)
    return out if elu_alpha is None else F.elu(out, elu_alpha)


def _grads_of_plain(fn, tensors, needs, grad):
    """The gradients of fn(*tensors) for the tensors in `needs`, through fn's plain autograd
    graph with create_graph=True: the double-backward path of the hand-written Functions."""
    inputs = [t for t, n in zip(tensors, needs) if n]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(fn(*tensors), inputs, grad, create_graph=True))
    return tuple(next(grads) if n else None for n in needs)


def _instance_norm_pp_backward(grad, x, gamma, alpha, mu, invstd, nm, inv_v, needs):
    """z = gamma*(xhat + alpha*nm) + beta, xhat = (x - mu)*invstd, nm = (mu - m)*inv_v over
    channels (inv_v from the unbiased variance: C - 1 divides the sum of squares).

    With sg = sum_hw grad, sgx = sum_hw grad*xhat, n = H*W:
    dbeta = sg, dgamma = sgx + alpha*nm*sg, dalpha = gamma*nm*sg, and
    dx = gamma*invstd*(grad - sg/n - xhat*sgx/n) + dmu/n, where dmu is the gradient reaching mu
    through nm: with dnm = gamma*alpha*sg,
    dmu = inv_v*(dnm - mean_c dnm - nm*sum_c(dnm*nm)/(C - 1)).
    """
    n = x.shape[2] * x.shape[3]
    g4, a4 = gamma[:, :, None, None], alpha[:, :, None, None]
    d = x - mu
    sg = grad.sum(dim=(2, 3), keepdim=True)
    sgx = torch.mul(grad, d).sum(dim=(2, 3), keepdim=True).mul_(invstd)
    dgamma = dalpha = dbeta = dx = None
    if needs[1]:
        dgamma = _reduce_like(torch.addcmul(sgx, a4 * nm, sg), gamma)
    if needs[2]:
        dalpha = _reduce_like(g4 * nm * sg, alpha)
    if needs[3]:
        dbeta = _reduce_like(sg, gamma)
    if needs[0]:
        dnm = sg * g4 * a4
        dmu = (dnm - dnm.mean(dim=1, keepdim=True)
               - nm * (dnm * nm).sum(dim=1, keepdim=True) / (x.shape[1] - 1)).mul_(inv_v)
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


# ---------------------------------------------------------------------------- dilated 3x3 conv

def dilated_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """3x3 convolution with dilation d and padding d (the size is kept), as F.conv2d computes
    it, but with its CPU weight gradient computed as 9 matrix products, one per kernel tap.

    oneDNN has no direct kernel for a dilated weight gradient on AVX2 CPUs and falls back to
    im2col + GEMM: at NCSNv2's 64 channels, 16x16, batch 16 on one thread, 7.2 to 10 ms
    against 4.6 to 5.7 ms for the 9 products (4.4 to 5.2 ms for an undilated one). The values
    are the same up to float summation order. Used where it was measured: float32/64
    channels_last inputs on the CPU, in eager mode without autocast; elsewhere plain F.conv2d.
    """
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or not torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
            or not weight.requires_grad or weight.shape[2:] != (3, 3) or x.dim() != 4
            or x.dtype not in (torch.float32, torch.float64)
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)
    return _DilatedConv3x3.apply(x, weight, bias, dilation)


class _DilatedConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
        ctx.dilation = dilation
        ctx.save_for_backward(x, weight, bias)
        return F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        d, needs = ctx.dilation, ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiate the plain convolution
            conv = functools.partial(F.conv2d, padding=d, dilation=d)
            return (*_grads_of_plain(conv, (x, weight, bias), needs[:3], grad), None)
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if needs[0]:
            dx = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [d, d], [d, d], False, [0, 0], 1,
                [True, False, False])[0]
        if needs[1]:
            dw = _dilated_weight_grad(grad, x, d)
        if needs[2]:
            db = grad.sum(dim=(0, 2, 3))
        return dx, dw, db, None


def _dilated_weight_grad(grad: Tensor, x: Tensor, d: int) -> Tensor:
    """dW[o, i, kh, kw] = sum over (b, y, x) of grad[b, o, y, x] * xpad[b, i, y + d kh, x + d kw]:
    with both tensors in channels_last, each tap is one (C_out x BHW) @ (BHW x C_in) product
    over a shifted window of the padded input."""
    _, _, h, w = x.shape
    g = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])  # (BHW, C_out), a view
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, d, d, d, d))  # (B, H + 2d, W + 2d, C_in)
    out = x.new_empty(grad.shape[1], 3, 3, x.shape[1])  # (C_out, kh, kw, C_in)
    for kh in range(3):
        for kw in range(3):
            window = xp[:, d * kh:d * kh + h, d * kw:d * kw + w].reshape(-1, x.shape[1])
            torch.mm(g.t(), window, out=out[:, kh, kw])
    return out.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------- pooling, upsampling

def pool5x5(x: Tensor, kind: str) -> Tensor:
    """5x5 stride-1 pooling with padding 2 (`pool5x5_plain`), computed where it runs fastest.

    PyTorch's CPU kernels for it are far faster in channels_last than in NCHW (vectorised over
    channels), which pays for converting there and back. Max pooling is separable (the same
    values from a 5x1 then a 1x5 pass, 10 instead of 25 comparisons per output): used without
    gradient, and on CUDA in channels_last also with gradient, where its backward is faster
    too (on the CPU it is not). Timings: benchmarks/README.md (layer ablation).
    """
    if x.dim() != 4 or torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
        return pool5x5_plain(x, kind)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    grad = torch.is_grad_enabled() and x.requires_grad
    if x.device.type == "cuda" and kind == "avg" and channels_last and grad:
        # PyTorch's channels_last CUDA kernel for avg-pool backward with padding returned wrong
        # input gradients before its fix (pytorch/pytorch#188344, torch 2.11); torch>=2.6 is
        # allowed, so NCHW here
        return pool5x5_plain(x.contiguous(), kind).contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu" and not x.is_contiguous(memory_format=torch.channels_last):
        return pool5x5_plain(x.contiguous(memory_format=torch.channels_last), kind).contiguous()
    if kind == "max" and (not grad or x.device.type == "cuda" and channels_last):
        return F.max_pool2d(F.max_pool2d(x, (5, 1), 1, (2, 0)), (1, 5), 1, (0, 2))
    return pool5x5_plain(x, kind)


def pool5x5_plain(x: Tensor, kind: str) -> Tensor:
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    return pool(x, 5, stride=1, padding=2)


def upsample_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling with align_corners (as the reference code). PyTorch's CUDA kernel
    for NCHW gives each thread one output pixel and loops it over batch x channels; its
    channels_last kernel spreads over every element, so NCHW tensors go there and back."""
    if x.device.type == "cuda" and x.dim() == 4 and not torch.compiler.is_compiling() \
            and not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
        return upsample_bilinear_plain(x, size).contiguous()
    return upsample_bilinear_plain(x, size)


def upsample_bilinear_plain(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
