"""Building blocks of the NCSN / NCSNv2 RefineNets.

Every block has the same call signature `block(x, level)`: the normalisation layer decides
whether `level` matters (conditional InstanceNorm++ in v1) or not (InstanceNorm++ in v2, or no
norm at all inside v2's RefineNet blocks). So one set of blocks builds both nets.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

NormFn = Callable[[int], nn.Module]
"""norm(num_channels) -> module called as norm(x, level)."""

EPS = 1e-5


def conv3x3(dim_in: int, dim_out: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 conv that keeps the spatial size (padding = dilation)."""
    return nn.Conv2d(dim_in, dim_out, 3, padding=dilation, dilation=dilation, bias=bias)


# ---------------------------------------------------------------------------- normalisation

def instance_norm_pp(x: Tensor, gamma: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """InstanceNorm++: instance norm, plus the (normalised) channel means added back through
    alpha, because plain instance norm throws away colour / brightness shifts between channels.

    gamma, alpha, beta: (B, C) or (1, C).
    z_k = gamma_k (x_k - mu_k)/s_k + beta_k + alpha_k (mu_k - m)/v
    """
    mu = x.mean(dim=(2, 3), keepdim=True)
    s = x.var(dim=(2, 3), keepdim=True, unbiased=False).add(EPS).sqrt()
    m = mu.mean(dim=1, keepdim=True)
    v = mu.var(dim=1, keepdim=True, unbiased=False).add(EPS).sqrt()
    gamma, alpha, beta = (rearrange(t, 'b c -> b c 1 1') for t in (gamma, alpha, beta))
    return gamma * (x - mu) / s + beta + alpha * (mu - m) / v


class InstanceNormPP(nn.Module):
    """Unconditional InstanceNorm++ (NCSNv2): one (gamma, alpha, beta); ignores `level`."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim).normal_(1., 0.02))
        self.alpha = nn.Parameter(torch.empty(dim).normal_(1., 0.02))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        return instance_norm_pp(x, self.gamma[None], self.alpha[None], self.beta[None])


class CondInstanceNormPP(nn.Module):
    """Conditional InstanceNorm++ (NCSN v1): a row of (gamma, alpha, beta) per noise level,
    stored as one L x 3C embedding, so the parameter count grows linearly in L."""

    def __init__(self, dim: int, num_levels: int):
        super().__init__()
        self.embed = nn.Embedding(num_levels, 3 * dim)
        with torch.no_grad():
            self.embed.weight[:, :2 * dim].normal_(1., 0.02)  # gamma, alpha
            self.embed.weight[:, 2 * dim:].zero_()  # beta

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        gamma, alpha, beta = self.embed(level).chunk(3, dim=-1)
        return instance_norm_pp(x, gamma, alpha, beta)


class NoNorm(nn.Module):
    """Identity with the norm call signature (v2's RefineNet blocks have no normalisation)."""

    def __init__(self, dim: int = 0):
        super().__init__()

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        return x


# ---------------------------------------------------------------------------- encoder

class ConvMeanPool(nn.Module):
    """Conv, then 2x2 mean pooling (halves H and W)."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return reduce(self.conv(x), 'b c (h h2) (w w2) -> b c h w', 'mean', h2=2, w2=2)


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
        self.act = act or nn.ELU()
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
        h = self.conv1(self.act(self.norm1(x, level)))
        h = self.conv2(self.act(self.norm2(h, level)))
        return self.shortcut(x) + h


# ---------------------------------------------------------------------------- RefineNet decoder

class RCU(nn.Module):
    """Residual conv units: `blocks` residual units of `stages` (norm -> act -> conv) each."""

    def __init__(self, dim: int, blocks: int, norm: NormFn, stages: int = 2,
                 act: nn.Module | None = None):
        super().__init__()
        self.act = act or nn.ELU()
        self.units = nn.ModuleList(
            nn.ModuleList(nn.ModuleList([norm(dim), conv3x3(dim, dim, bias=False)])
                          for _ in range(stages))
            for _ in range(blocks))

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        for unit in self.units:
            h = x
            for norm, conv in unit:
                h = conv(self.act(norm(h, level)))
            x = x + h
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
        return sum(F.interpolate(conv(norm(x, level)), size=size, mode='bilinear',
                                 align_corners=True)
                   for x, norm, conv in zip(xs, self.norms, self.convs))


class CRP(nn.Module):
    """Chained residual pooling: a chain of (norm -> pool 5x5 -> conv), each output added to
    the input, to gather context from large regions at full resolution."""

    def __init__(self, dim: int, norm: NormFn, pool: Literal['max', 'avg'], stages: int = 2,
                 act: nn.Module | None = None):
        super().__init__()
        self.act = act or nn.ELU()
        self.pool = (nn.MaxPool2d if pool == 'max' else nn.AvgPool2d)(5, stride=1, padding=2)
        self.norms = nn.ModuleList(norm(dim) for _ in range(stages))
        self.convs = nn.ModuleList(conv3x3(dim, dim, bias=False) for _ in range(stages))

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        x = path = self.act(x)
        for norm, conv in zip(self.norms, self.convs):
            path = conv(self.pool(norm(path, level)))
            x = x + path
        return x


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
