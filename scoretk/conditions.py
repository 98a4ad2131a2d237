"""Conditions for controllable generation (docs/theory.md#conditions): what is known about
each sample, as an orthogonal projection P and the known part P y.

Noise N(0, sigma^2 I) projects to N(0, sigma^2 P), so "the known part noised to sigma" is
P y + sigma P z for every such P: inpainting (P keeps the pixels under a mask) and
colourisation (P keeps each pixel's channel mean, i.e. the grey image) are the same operation
to a sampler.
"""
from __future__ import annotations

from torch import Tensor

from scoretk.components import Condition


class Inpainting(Condition):
    """Pixels (or coordinates) where `mask` is 1 are known to equal `known` there.

    `mask` broadcasts against the batch (one mask for all, or one per sample), `known` is
    (B, *shape) or broadcastable; values outside the mask are ignored.
    """

    def __init__(self, known: Tensor, mask: Tensor):
        mask = mask.to(dtype=known.dtype, device=known.device)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("an inpainting mask holds 0 (generate) and 1 (known) only")
        self.mask = mask
        self.target = mask * known

    def project(self, x: Tensor) -> Tensor:
        return self.mask * x


class Colourisation(Condition):
    """Each pixel's mean over the channels is known: the grey image (B, 1, H, W), or a colour
    reference (B, C, H, W) whose grey image is taken.

    The mean over C channels is the orthogonal projection onto (1, ..., 1)/sqrt(C) per pixel,
    so colourisation is inpainting in a rotated basis (Song et al. 2021, appendix on
    imputation and colourisation)."""

    def __init__(self, grey: Tensor):
        if grey.dim() != 4:
            raise ValueError(f"colourisation needs images (B, C, H, W), got shape {tuple(grey.shape)}")
        self.target = grey.mean(1, keepdim=True)

    def project(self, x: Tensor) -> Tensor:
        return x.mean(1, keepdim=True).expand_as(x)
