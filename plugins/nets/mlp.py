"""A small score MLP for vector data (2-D toys), sigma-normalised like NCSNv2.

The output is divided by sigma, so the net only has to learn sigma * score, which is O(1) at
every level. Optionally log(sigma) is also an input: in two dimensions the shape of the
perturbed density changes with sigma far more than in high-dimensional image space, so a
purely unconditional s'(x)/sigma is too weak there.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from scoretk.components import ScoreNet
from scoretk.registry import Params

ACTIVATIONS: dict[str, type[nn.Module]] = {
    'silu': nn.SiLU, 'elu': nn.ELU, 'relu': nn.ReLU, 'gelu': nn.GELU,
    'softplus': nn.Softplus, 'tanh': nn.Tanh,
}


class MLPParams(Params):
    hidden: PositiveInt = Field(128, description="width of every hidden layer")
    depth: PositiveInt = Field(3, description="number of hidden layers")
    activation: Literal['silu', 'elu', 'relu', 'gelu', 'softplus', 'tanh'] = Field(
        'silu', description="nonlinearity after every hidden layer")
    sigma_input: bool = Field(True, description="feed log(sigma) as an extra input; false: the "
                              "output is exactly s'(x)/sigma (NCSNv2's unconditional form)")


class ScoreMLP(ScoreNet):
    """x (B, *shape) -> score (B, *shape); items are flattened, so any shape works."""

    batch_independent = True

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3,
                 activation: str = 'silu', sigma_input: bool = True):
        super().__init__()
        self.sigma_input = sigma_input
        act = ACTIVATIONS[activation]
        dims = [dim + sigma_input, *(hidden,) * depth]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), act()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], dim))

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        h = x.flatten(1)
        sigma = sigma.to(h.dtype).view(-1, 1)
        if self.sigma_input:
            h = torch.cat([h, sigma.log().expand(h.shape[0], 1)], dim=1)
        return (self.net(h) / sigma).view_as(x)


def build_mlp(params: MLPParams, *, shape: tuple[int, ...], num_levels: int) -> ScoreMLP:
    """Factory for the 'mlp' net; `num_levels` is unused (the net reads sigma)."""
    dim = math.prod(shape)
    if dim < 1:
        raise ValueError(f"net 'mlp' needs a non-empty item shape, got {tuple(shape)}")
    return ScoreMLP(dim, params.hidden, params.depth, params.activation, params.sigma_input)
