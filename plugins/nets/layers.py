"""Building blocks of the NCSN / NCSNv2 RefineNets.

Every block has the same call signature `block(x, level)`: the normalisation layer decides
whether `level` matters (conditional InstanceNorm++ in v1) or not (InstanceNorm++ in v2, or no
norm at all inside v2's RefineNet blocks). So one set of blocks builds both nets.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NormFn = Callable[[int], nn.Module]
"""norm(num_channels) -> module called as norm(x, level)."""

EPS = 1e-5


def conv3x3(dim_in: int, dim_out: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 conv that keeps the spatial size (padding = dilation)."""
    return nn.Conv2d(dim_in, dim_out, 3, padding=dilation, dilation=dilation, bias=bias)


# ---------------------------------------------------------------------------- activation

class ELU(nn.ELU):
    """nn.ELU whose backward reads the saved output instead of the input.

    d elu/dx = 1 for x > 0 and exp(x) = elu(x) + alpha for x <= 0: from the output the
    gradient is a multiply-add, while PyTorch's out-of-place ELU saves the input and evaluates
    exp again in the backward (~4x the cost on CPU); the backward is the formula PyTorch
    itself uses for in-place ELU. On CPU the forward (alpha 1) uses exp instead of expm1 (see
    `_elu_via_exp`), 1.6x faster. Plain F.elu under torch.compile.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace or torch.compiler.is_compiling():
            return super().forward(x)
        if not (torch.is_grad_enabled() and x.requires_grad):  # sampling: skip autograd's ctx
            return _elu_forward(x, self.alpha)
        return _ELUFromOutput.apply(x, self.alpha)


def _elu_forward(x: Tensor, alpha: float) -> Tensor:
    if alpha == 1.0 and x.device.type == "cpu" and x.is_floating_point():
        return _elu_via_exp(x)
    return F.elu(x, alpha)  # one fused kernel on GPUs, where elementwise ops are memory-bound


def _elu_via_exp(x: Tensor) -> Tensor:
    """ELU (alpha 1) as max(exp(min(x, 0)) - 1, x): exp(x) - 1 >= x for every x, with equality
    only at 0. PyTorch's CPU kernel evaluates expm1, which costs ~2x exp; exp(x) - 1 differs
    from expm1(x) by at most one rounding of 1.0 (6e-8 absolute)."""
    y = torch.clamp(x, max=0)
    torch.exp(y, out=y)
    return torch.maximum(y.sub_(1), x, out=y)


def _elu_(x: Tensor, alpha: float) -> Tensor:
    """ELU in place, for a fresh buffer that nothing else reads (see `norm_act`)."""
    if alpha == 1.0 and x.device.type == "cpu" and x.is_floating_point():
        y = torch.clamp(x, max=0)  # a short-lived temporary, unlike an output kept for backward
        torch.exp(y, out=y)
        return torch.maximum(y.sub_(1), x, out=x)
    return F.elu_(x, alpha)


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


# ---------------------------------------------------------------------------- normalisation

def instance_norm_pp(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor,
                     elu_alpha: float | None = None) -> Tensor:
    """InstanceNorm++: instance norm, plus the (normalised) channel means added back through
    alpha, because plain instance norm throws away colour / brightness shifts between channels.

    gamma, alpha, beta: (B, C) or (1, C).
    z_k = gamma_k (x_k - mu_k)/s_k + beta_k + alpha_k (mu_k - m)/v
    With `elu_alpha`, returns ELU(z) instead (see `norm_act`).

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
    """(x - mu, mu, 1/s, normalised channel means, 1/v, scale, shift), all but the first (B, C, 1, 1)."""
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
    """c + t*k, written over the temporary t when the dtypes allow (mixed precision may not)."""
    if torch.result_type(c, t) == t.dtype and torch.result_type(t, k) == t.dtype:
        return torch.addcmul(c, t, k, out=t)
    return torch.addcmul(c, t, k)


def _reduce_like(t: Tensor, like: Tensor) -> Tensor:
    """(B, C, 1, 1) -> like's shape: (B, C), or (1, C) summed over the batch."""
    t = t.flatten(1)
    return t.sum(dim=0, keepdim=True) if like.shape[0] == 1 and t.shape[0] != 1 else t


class InstanceNormPP(nn.Module):
    """Unconditional InstanceNorm++ (NCSNv2): one (gamma, alpha, beta); ignores `level`."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim).normal_(1., 0.02))
        self.alpha = nn.Parameter(torch.empty(dim).normal_(1., 0.02))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, level: Tensor | None = None,
                elu_alpha: float | None = None) -> Tensor:
        return instance_norm_pp(x, self.gamma[None], self.alpha[None], self.beta[None],
                                elu_alpha=elu_alpha)


class CondInstanceNormPP(nn.Module):
    """Conditional InstanceNorm++ (NCSN v1): a row of (gamma, alpha, beta) per noise level,
    stored as one L x 3C embedding, so the parameter count grows linearly in L."""

    def __init__(self, dim: int, num_levels: int):
        super().__init__()
        self.embed = nn.Embedding(num_levels, 3 * dim)
        with torch.no_grad():
            self.embed.weight[:, :2 * dim].normal_(1., 0.02)  # gamma, alpha
            self.embed.weight[:, 2 * dim:].zero_()  # beta

    def forward(self, x: Tensor, level: Tensor, elu_alpha: float | None = None) -> Tensor:
        gamma, alpha, beta = self.embed(level).chunk(3, dim=-1)
        return instance_norm_pp(x, gamma, alpha, beta, elu_alpha=elu_alpha)


class NoNorm(nn.Module):
    """Identity with the norm call signature (v2's RefineNet blocks have no normalisation)."""

    def __init__(self, dim: int = 0):
        super().__init__()

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        return x


def norm_act(norm: nn.Module, act: nn.Module, x: Tensor, level: Tensor | None) -> Tensor:
    """act(norm(x, level)). For InstanceNorm++ followed by our ELU this is one op: the ELU
    runs in place on the norm's fresh output, so a training step allocates (and writes to
    cold memory) one activation fewer per pair and the backward goes straight from one to the
    other (1.04x an NCSNv2 training step on CPU). The same values either way."""
    if isinstance(norm, (InstanceNormPP, CondInstanceNormPP)) and type(act) is ELU \
            and not act.inplace:
        return norm(x, level, elu_alpha=act.alpha)
    return act(norm(x, level))


# ---------------------------------------------------------------------------- encoder

class ConvMeanPool(nn.Module):
    """Conv, then 2x2 mean pooling (halves H and W).

    Computed as one stride-2 convolution whose (k+1)x(k+1) kernel is the k x k kernel averaged
    over the four 2x2 offsets: the same linear map (up to float rounding), without the
    full-resolution intermediate and with 4k^2/(k+1)^2 fewer multiply-adds (2.25x for k = 3).
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:  # odd sizes: pooling drops the last row/column
            return F.avg_pool2d(self.conv(x), 2)
        w = self.conv.weight
        pooled = 0.25 * (F.pad(w, (0, 1, 0, 1)) + F.pad(w, (1, 0, 0, 1))
                         + F.pad(w, (0, 1, 1, 0)) + F.pad(w, (1, 0, 1, 0)))
        return F.conv2d(x, pooled, self.conv.bias, stride=2, padding=self.conv.padding)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm -> act -> conv -> norm -> act -> conv, plus shortcut.

    `down` with dilation 1 halves the resolution (conv + mean pool). With dilation > 1 the
    block keeps the resolution and widens the receptive field instead (the "dilated" RefineNet
    replaces all but the first down-sampling this way); like the reference it still gets a
    learned (dilated 3x3) shortcut.
    """

    def __init__(self, dim_in: int, dim_out: int, norm: NormFn, *, down: bool = False,
                 dilation: int = 1, act: nn.Module | None = None):
        super().__init__()
        self.act = act or ELU()
        mid = dim_in if down else dim_out
        self.norm1, self.conv1 = norm(dim_in), conv3x3(dim_in, mid, dilation)
        self.norm2 = norm(mid)
        if down and dilation == 1:
            self.conv2 = ConvMeanPool(mid, dim_out, 3)
            self.shortcut = ConvMeanPool(dim_in, dim_out, 1)
        else:
            self.conv2 = conv3x3(mid, dim_out, dilation)
            if dilation > 1 and (down or dim_in != dim_out):
                self.shortcut = conv3x3(dim_in, dim_out, dilation)
            elif dim_in != dim_out:
                self.shortcut = nn.Conv2d(dim_in, dim_out, 1)
            else:
                self.shortcut = nn.Identity()

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        h = self.conv1(norm_act(self.norm1, self.act, x, level))
        h = self.conv2(norm_act(self.norm2, self.act, h, level))
        return h.add_(self.shortcut(x))  # h is a fresh conv output no backward needs


# ---------------------------------------------------------------------------- RefineNet decoder

class RCU(nn.Module):
    """Residual conv units: `blocks` residual units of `stages` (norm -> act -> conv) each."""

    def __init__(self, dim: int, blocks: int, norm: NormFn, stages: int = 2,
                 act: nn.Module | None = None):
        super().__init__()
        self.act = act or ELU()
        self.units = nn.ModuleList(
            nn.ModuleList(nn.ModuleList([norm(dim), conv3x3(dim, dim, bias=False)])
                          for _ in range(stages))
            for _ in range(blocks))

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        for unit in self.units:
            h = x
            for norm, conv in unit:
                h = conv(norm_act(norm, self.act, h, level))
            x = h.add_(x)  # h is a fresh conv output no backward needs
        return x


class MSF(nn.Module):
    """Multi-resolution fusion: conv each input to `dim` channels, upsample to the finest
    resolution (bilinear), sum."""

    def __init__(self, dims_in: Sequence[int], dim: int, norm: NormFn):
        super().__init__()
        self.norms = nn.ModuleList(norm(d) for d in dims_in)
        self.convs = nn.ModuleList(conv3x3(d, dim) for d in dims_in)

    def forward(self, xs: Sequence[Tensor], size: tuple[int, int],
                level: Tensor | None = None) -> Tensor:
        out = None
        for x, norm, conv in zip(xs, self.norms, self.convs):
            h = conv(norm(x, level))
            if tuple(h.shape[-2:]) != tuple(size):  # same size would be an exact copy
                h = F.interpolate(h, size=size, mode='bilinear', align_corners=True)
            out = h if out is None else out.add_(h)  # out: a fresh conv/upsample output
        return out


class CRP(nn.Module):
    """Chained residual pooling: a chain of (norm -> pool 5x5 -> conv), each output added to
    the input, to gather context from large regions at full resolution."""

    def __init__(self, dim: int, norm: NormFn, pool: Literal['max', 'avg'], stages: int = 2,
                 act: nn.Module | None = None):
        super().__init__()
        self.act = act or ELU()
        self.pool = (nn.MaxPool2d if pool == 'max' else nn.AvgPool2d)(5, stride=1, padding=2)
        self.norms = nn.ModuleList(norm(dim) for _ in range(stages))
        self.convs = nn.ModuleList(conv3x3(dim, dim, bias=False) for _ in range(stages))

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        x = path = self.act(x)
        for norm, conv in zip(self.norms, self.convs):
            path = conv(_pool(self.pool, norm(path, level)))
            x = x + path
        return x


def _pool(pool: nn.Module, x: Tensor) -> Tensor:
    """5x5 stride-1 pooling. PyTorch's CPU kernels for it are ~10x faster in channels_last
    than in NCHW (vectorised over channels), which pays for converting there and back. Max
    pooling without gradient runs as a 5x1 then a 1x5 pass (max is separable: the same values,
    10 instead of 25 comparisons per output)."""
    if x.device.type != "cpu" or x.dim() != 4 or torch.compiler.is_compiling():
        return pool(x)
    if not x.is_contiguous(memory_format=torch.channels_last):
        return pool(x.contiguous(memory_format=torch.channels_last)).contiguous()
    if isinstance(pool, nn.MaxPool2d) and not (torch.is_grad_enabled() and x.requires_grad):
        k, p = pool.kernel_size, pool.padding
        if (pool.stride, pool.dilation, pool.ceil_mode) == (1, 1, False) and isinstance(k, int) \
                and isinstance(p, int):
            x = F.max_pool2d(x, (k, 1), 1, (p, 0))
            return F.max_pool2d(x, (1, k), 1, (0, p))
    return pool(x)


class RefineBlock(nn.Module):
    """Fuses a skip connection with the coarser decoder output: RCU per input -> MSF (when
    more than one input) -> CRP -> RCU (three units in the last block, one otherwise)."""

    def __init__(self, dims_in: Sequence[int], dim: int, norm: NormFn,
                 pool: Literal['max', 'avg'], *, end: bool = False):
        super().__init__()
        if len(dims_in) == 1 and dims_in[0] != dim:
            raise ValueError("a single-input RefineBlock must keep its channel count")
        self.adapt = nn.ModuleList(RCU(d, 2, norm) for d in dims_in)
        self.msf = MSF(dims_in, dim, norm) if len(dims_in) > 1 else None
        self.crp = CRP(dim, norm, pool)
        self.out = RCU(dim, 3 if end else 1, norm)

    def forward(self, xs: Sequence[Tensor], size: tuple[int, int],
                level: Tensor | None = None) -> Tensor:
        hs = [adapt(x, level) for adapt, x in zip(self.adapt, xs)]
        h = self.msf(hs, size, level) if self.msf is not None else hs[0]
        return self.out(self.crp(h, level), level)
