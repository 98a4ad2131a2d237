"""Net `edm`: Karras et al.'s preconditioning around any registered net (docs/theory.md#edm).

The denoiser is D(x, sigma) = m + c_skip (x - m) + c_out F(c_in (x - m), c_noise), with the
coefficients below, and the score it gives is (D - x)/sigma^2. F is the inner net, built
through the registry, so any plugin net fits: it is called with sigma' = exp(c_noise) and its
output is multiplied by sigma', which undoes the division by sigma that score nets end with
(its output times its sigma is its estimate of the unit-variance noise) and leaves F an O(1)
output, as EDM intends. m (`data_mean`) centres the data, which EDM's formulas assume: scoretk's
data live in [0, 1], where sigma_data is also measured.
"""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from scoretk.components import Dataset, ScoreNet
from scoretk.execution.layout import FLAGS
from scoretk.recipe import ComponentSpec, Nested
from scoretk.registry import Params

Auto = Literal["auto"]
MAX_ITEMS = 10_000
"""Items `auto` statistics are measured on (a fixed random subset of larger datasets)."""


def edm_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1: the skip weight that makes F's target
    unit-variance, F's output scale, the input scale that makes F's input unit-variance, and
    ln(sigma)/4 as the noise conditioning."""
    total = sigma**2 + sigma_data**2
    return (sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(),
            sigma.log() / 4)


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2 = 1/c_out^2: the loss on
    ||D - x||^2 becomes a unit-weight loss on F's output."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def data_moments(data: Dataset) -> tuple[float, float, int]:
    """(mean, standard deviation, items used) of all values of up to MAX_ITEMS items (a
    subset seeded 0, so a run's resolved recipe is reproducible)."""
    n = len(data)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:MAX_ITEMS].sort().values
    x = data.batch(idx).double()
    return float(x.mean()), float(x.std()), len(idx)


def resolve_sigma_data(params: Params, data: Dataset | None, section: str) -> Params:
    """A copy of `params` with `sigma_data` (and `data_mean`, where it has one) measured on
    the data when they are 'auto', with a note saying so."""
    autos = [k for k in ("sigma_data", "data_mean") if getattr(params, k, None) == "auto"]
    if not autos:
        return params
    if data is None:
        raise ValueError(f"{section}.{autos[0]} is 'auto' but no dataset was given to measure "
                         "it on; give a number or a dataset")
    mean, std, n = data_moments(data)
    measured = {"sigma_data": std, "data_mean": mean}
    update = {k: measured[k] for k in autos}
    notes = [f"{k} = {v:.6g} (the {'standard deviation' if k == 'sigma_data' else 'mean'} of "
             f"all values of {n:,} training items)" for k, v in update.items()]
    return params.model_copy(update=update).noted(*notes)


class EDMParams(Params):
    inner: Annotated[ComponentSpec, Nested("net")] = Field(
        description="the network F: a {kind: ...} block naming any registered net")
    sigma_data: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto", description="the data's standard deviation in scoretk's [0, 1] units (EDM's "
        "0.5 for images in [-1, 1] is 0.25 here); auto: measured on the training data")
    data_mean: float | Auto = Field(
        0.5, description="subtracted before preconditioning and added back (EDM assumes "
        "centred data): 0.5, the middle of [0, 1]; auto: the training data's mean")

    def resolve(self, data: Dataset | None) -> "EDMParams":
        resolved = resolve_sigma_data(self, data, "net")
        inner_resolve = getattr(self.inner.params, "resolve", None)
        if not callable(inner_resolve):
            return resolved
        inner = ComponentSpec(kind=self.inner.kind, params=inner_resolve(data))
        inner._component = self.inner._component
        return resolved.model_copy(update={"inner": inner}).noted(*inner.params.notes)


class EDMNet(ScoreNet):
    """D(x, sigma) by EDM's preconditioning of `inner`; forward gives the score."""

    def __init__(self, inner: nn.Module, sigma_data: float, data_mean: float):
        super().__init__()
        self.inner, self.sigma_data, self.data_mean = inner, float(sigma_data), float(data_mean)
        for flag in FLAGS:  # the inner net's answers are the composite's (layout, batch split)
            if hasattr(inner, flag):
                setattr(self, flag, bool(getattr(inner, flag)))

    def _parts(self, x: Tensor, sigma: Tensor, level: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x - m, F's output, sigma) with sigma shaped to broadcast over x."""
        s = sigma.to(x.dtype).view(-1, *(1,) * (x.dim() - 1))
        _, _, c_in, c_noise = edm_coefficients(s, self.sigma_data)
        centred = x - self.data_mean
        sigma_in = c_noise.exp().flatten()
        f = self.inner(c_in * centred, sigma_in, level) * sigma_in.view_as(s)
        return centred, f, s

    def denoise(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        """D(x, sigma): the estimate of the clean data."""
        centred, f, s = self._parts(x, sigma, level)
        c_skip, c_out, _, _ = edm_coefficients(s, self.sigma_data)
        return self.data_mean + c_skip * centred + c_out * f

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        """(D - x)/sigma^2, written as -(x - m)/(sigma^2 + sigma_data^2) + c_out F/sigma^2 so
        that small sigmas lose no precision to D - x."""
        centred, f, s = self._parts(x, sigma, level)
        total = s**2 + self.sigma_data**2
        return -centred / total + f * (self.sigma_data / (s * total.sqrt()))


def build_edm(params: EDMParams, *, shape: tuple[int, ...], num_levels: int) -> EDMNet:
    for name in ("sigma_data", "data_mean"):
        if getattr(params, name) == "auto":
            raise ValueError(f"net.{name} is 'auto': resolve it from the dataset first "
                             "(params.resolve(dataset)) or give a number")
    inner = params.inner.build(shape=shape, num_levels=num_levels)
    return EDMNet(inner, params.sigma_data, params.data_mean)
