"""The NCSN (v1) and NCSNv2 score networks: dilated RefineNets.

Encoder: stages of two pre-activation residual blocks; decoder: one RefineBlock per stage,
from the coarsest up, each fusing that stage's output with the decoder's previous output.
v1 conditions every norm on the noise level; v2 uses unconditional norms and divides the
output by sigma (NCSNv2 technique 3), so its size does not depend on the number of levels.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

from pydantic import Field, PositiveInt
from torch import Tensor, nn

from scoretk.components import ScoreNet
from scoretk.registry import Params

from .layers import (ELU, CondInstanceNormPP, InstanceNormPP, NoNorm, RefineBlock,
                     ResidualBlock, norm_act)


class Stage(NamedTuple):
    mult: int  # output channels = mult * ngf
    down: bool  # first block down-samples (or, dilated, stands in for a down-sampling)
    dilation: int = 1


# The first down-sampling is real; later ones are either real (the deeper nets, for large
# images) or replaced by dilation (the resolution then stays put).
STAGES: dict[str, tuple[Stage, ...]] = {
    'ncsnv2': (Stage(1, False), Stage(2, True), Stage(2, True, 2), Stage(2, True, 4)),
    'ncsnv2_deeper': (Stage(1, False), Stage(2, True), Stage(2, True),
                      Stage(4, True, 2), Stage(4, True, 4)),
    'ncsnv2_deepest': (Stage(1, False), Stage(2, True), Stage(2, True), Stage(2, True),
                       Stage(4, True, 2), Stage(4, True, 4)),
}
STAGES['ncsn'] = STAGES['ncsnv2']


def downsampling(stages: tuple[Stage, ...]) -> int:
    """Total factor by which the encoder shrinks H and W."""
    return 2 ** sum(s.down and s.dilation == 1 for s in stages)


class RefineNet(ScoreNet):
    """Dilated RefineNet score model.

    conditional=True (v1): conditional InstanceNorm++ everywhere (also inside the RefineBlocks),
    average pooling in CRP, reads `level`. conditional=False (v2): InstanceNorm++ in the
    residual blocks only, max pooling, returns s'(x) / sigma.
    """

    batch_independent = True  # instance norms only
    prefers_channels_last = True
    """Its convolutions, pooling and upsampling run faster on channels_last activations on
    CPU and CUDA (cuDNN's convolutions are NHWC inside); the execution policy runs it so."""

    def __init__(self, channels: int, ngf: int, stages: tuple[Stage, ...], *,
                 conditional: bool, num_levels: int = 1):
        super().__init__()
        self.conditional = conditional
        self.accepts_any_sigma = not conditional  # v1 reads the level index alone
        norm = partial(CondInstanceNormPP, num_levels=num_levels) if conditional else InstanceNormPP
        inner_norm = norm if conditional else NoNorm
        pool = 'avg' if conditional else 'max'

        dims = [s.mult * ngf for s in stages]
        self.begin = nn.Conv2d(channels, ngf, 3, padding=1)
        self.encoder = nn.ModuleList()
        for dim_in, dim, s in zip([ngf, *dims], dims, stages):
            self.encoder.append(nn.ModuleList([
                ResidualBlock(dim_in, dim, norm, down=s.down, dilation=s.dilation),
                ResidualBlock(dim, dim, norm, dilation=s.dilation)]))
        # decoder[i] serves stage i; listed coarsest first, in the order it runs
        self.decoder = nn.ModuleList(
            RefineBlock([dims[i]] if i == len(dims) - 1 else [dims[i], dims[i]],
                        dims[max(i - 1, 0)], inner_norm, pool, end=i == 0)
            for i in reversed(range(len(dims))))
        self.norm, self.act = norm(ngf), ELU()
        self.end = nn.Conv2d(ngf, channels, 3, padding=1)

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        cond = level if self.conditional else None
        h = self.begin(2 * x - 1)
        skips = []
        for blocks in self.encoder:
            for block in blocks:
                h = block(h, cond)
            skips.append(h)
        h = None
        for skip, refine in zip(reversed(skips), self.decoder):
            h = refine([skip] if h is None else [skip, h], skip.shape[-2:], cond)
        out = self.end(norm_act(self.norm, self.act, h, cond))
        if not self.conditional:
            out = out / sigma.to(out.dtype).view(-1, *(1,) * (out.ndim - 1))
        return out


class NCSNParams(Params):
    ngf: PositiveInt = Field(128, description="base width (channels of the first stage); the "
                             "reference uses 128, 64 for 28 px one-channel data")


def _check_image(name: str, shape: tuple[int, ...], stages: tuple[Stage, ...]) -> int:
    if len(shape) != 3:
        raise ValueError(f"net {name!r} needs image data (C, H, W), got item shape {tuple(shape)}")
    c, h, w = shape
    f = downsampling(stages)
    if h % f or w % f:
        raise ValueError(f"net {name!r} needs H and W divisible by {f} (its down-sampling "
                         f"factor), got {h}x{w}")
    return c


def build(kind: str, params: NCSNParams, *, shape: tuple[int, ...],
          num_levels: int) -> RefineNet:
    """Build the RefineNet registered as `kind` ('ncsn', 'ncsnv2', ...)."""
    stages = STAGES[kind]
    channels = _check_image(kind, shape, stages)
    conditional = kind == 'ncsn'
    if conditional and num_levels < 1:
        raise ValueError(f"net 'ncsn' needs num_levels >= 1, got {num_levels}")
    return RefineNet(channels, params.ngf, stages, conditional=conditional,
                     num_levels=num_levels)


def build_ncsn(params: NCSNParams, *, shape: tuple[int, ...], num_levels: int) -> RefineNet:
    return build('ncsn', params, shape=shape, num_levels=num_levels)


def build_ncsnv2(params: NCSNParams, *, shape: tuple[int, ...], num_levels: int) -> RefineNet:
    return build('ncsnv2', params, shape=shape, num_levels=num_levels)


def build_ncsnv2_deeper(params: NCSNParams, *, shape: tuple[int, ...],
                        num_levels: int) -> RefineNet:
    return build('ncsnv2_deeper', params, shape=shape, num_levels=num_levels)


def build_ncsnv2_deepest(params: NCSNParams, *, shape: tuple[int, ...],
                         num_levels: int) -> RefineNet:
    return build('ncsnv2_deepest', params, shape=shape, num_levels=num_levels)
