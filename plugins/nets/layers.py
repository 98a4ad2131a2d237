"""Building blocks of the NCSN / NCSNv2 RefineNets (their fast ELU and InstanceNorm++ math
lives in `ops`).

Every block has the same call signature `block(x, level)`: the normalisation layer decides
whether `level` matters (conditional InstanceNorm++ in v1) or not (InstanceNorm++ in v2, or no
norm at all inside v2's RefineNet blocks). So one set of blocks builds both nets.
"""
from __future__ import annotations

import warnings
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import dilated_conv3x3, elu, instance_norm_pp, pool5x5, upsample_bilinear

NormFn = Callable[[int], nn.Module]
"""norm(num_channels) -> module called as norm(x, level)."""


def conv3x3(dim_in: int, dim_out: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 conv that keeps the spatial size (padding = dilation)."""
    kind = DilatedConv3x3 if dilation > 1 else nn.Conv2d
    return kind(dim_in, dim_out, 3, padding=dilation, dilation=dilation, bias=bias)


class DilatedConv3x3(nn.Conv2d):
    """nn.Conv2d (3x3, padding = dilation > 1; the same parameters and state dict) whose CPU
    weight gradient is computed tap by tap: see `ops.dilated_conv3x3`."""

    def forward(self, x: Tensor) -> Tensor:
        return dilated_conv3x3(x, self.weight, self.bias, self.dilation[0])


# ---------------------------------------------------------------------------- activation

class ELU(nn.ELU):
    """nn.ELU computed by `ops.elu`: the backward reads the saved output (no exp), and on CPU
    the forward uses exp instead of expm1. In-place ELU keeps PyTorch's own kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return elu(x, self.alpha)

    @property
    def fusable_alpha(self) -> float | None:
        """The alpha a norm that `fuses_elu` may apply itself (see `norm_act`)."""
        return None if self.inplace else self.alpha


# ---------------------------------------------------------------------------- normalisation

def _check_norm_channels(dim: int) -> None:
    """InstanceNorm++ normalises the channel means by their unbiased variance over channels,
    which one channel does not have."""
    if dim < 2:
        raise ValueError(f"InstanceNorm++ needs at least 2 channels, got {dim} (the unbiased "
                         "variance of the channel means is undefined for one)")


class _ReleasedFormula(nn.Module):
    """The state-dict version of the InstanceNorm++ modules: 2 since they compute the released
    code's formula (docs/theory.md#instancenorm). scoretk 0.1 saved version 1, the paper's
    formula: the same parameters, another function, so loading such weights warns."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        if local_metadata.get("version") == 1:
            warnings.warn(f"{prefix.rstrip('.') or 'net'}: InstanceNorm++ weights saved by "
                          "scoretk 0.1, which computed the paper's formula; this version "
                          "computes the released code's, so the loaded net is not the function "
                          "it was trained as: retrain it", stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


class InstanceNormPP(_ReleasedFormula):
    """Unconditional InstanceNorm++ (NCSNv2): one (gamma, alpha, beta); ignores `level`."""

    fuses_elu = True  # forward(..., elu_alpha=a) returns ELU(norm(x)) in one op

    def __init__(self, dim: int):
        super().__init__()
        _check_norm_channels(dim)
        self.gamma = nn.Parameter(torch.empty(dim).normal_(1., 0.02))
        self.alpha = nn.Parameter(torch.empty(dim).normal_(1., 0.02))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, level: Tensor | None = None,
                elu_alpha: float | None = None) -> Tensor:
        return instance_norm_pp(x, self.gamma[None], self.alpha[None], self.beta[None],
                                elu_alpha=elu_alpha)


class CondInstanceNormPP(_ReleasedFormula):
    """Conditional InstanceNorm++ (NCSN v1): a row of (gamma, alpha, beta) per noise level,
    stored as one L x 3C embedding, so the parameter count grows linearly in L."""

    fuses_elu = True

    def __init__(self, dim: int, num_levels: int):
        super().__init__()
        _check_norm_channels(dim)
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
    other (benchmarks/README.md, layer ablation). The same values either way."""
    alpha = getattr(act, "fusable_alpha", None)
    if alpha is not None and getattr(norm, "fuses_elu", False):
        return norm(x, level, elu_alpha=alpha)
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
                h = upsample_bilinear(h, size)
            out = h if out is None else out.add_(h)  # out: a fresh conv/upsample output
        return out


class CRP(nn.Module):
    """Chained residual pooling: a chain of (norm -> pool 5x5 -> conv), each output added to
    the input, to gather context from large regions at full resolution."""

    def __init__(self, dim: int, norm: NormFn, pool: Literal['max', 'avg'], stages: int = 2,
                 act: nn.Module | None = None):
        super().__init__()
        self.act = act or ELU()
        self.pool = Pool5x5(pool)
        self.norms = nn.ModuleList(norm(dim) for _ in range(stages))
        self.convs = nn.ModuleList(conv3x3(dim, dim, bias=False) for _ in range(stages))

    def forward(self, x: Tensor, level: Tensor | None = None) -> Tensor:
        x = path = self.act(x)
        for norm, conv in zip(self.norms, self.convs):
            path = conv(self.pool(norm(path, level)))
            x = x + path
        return x


class Pool5x5(nn.Module):
    """5x5 stride-1 max or average pooling that keeps the size (see `ops.pool5x5`)."""

    def __init__(self, kind: Literal['max', 'avg']):
        super().__init__()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return pool5x5(x, self.kind)

    def extra_repr(self) -> str:
        return self.kind


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
