"""The data convention every dataset plugin follows, and the batch-level augmentations.

Items are float tensors in [0, 1]: images (C, H, W), vectors (D,). Augmentations run on whole
batches with the training step's generator, so they are cheap and replay exactly on resume.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from scoretk.registry import Params


class DataParams(Params):
    """Base params for a dataset component: the options the training loop applies per batch."""

    flip: bool = Field(False, description="random horizontal flip (images)")
    dequantize: bool = Field(False, description="uniform dequantisation: (255 x + U[0,1)) / 256")

    def item_shape(self) -> tuple[int, ...] | None:
        """Shape of one item from the params alone (lets `recipe show` size the net without
        the data on disk); None when only the data can tell."""
        return None

    def heldout_split(self) -> tuple["DataParams", "DataParams"] | None:
        """(training part, held-out part) of this data as two params, for evaluation against
        data the model never saw; None when the dataset has no fixed split (evaluation then
        holds out a random half)."""
        return None

    def plain(self) -> "DataParams":
        """A copy without the training augmentations (real data as it is, for evaluation)."""
        return self.model_copy(update={"flip": False, "dequantize": False})


def augment(x: Tensor, params: DataParams, generator: torch.Generator | None = None) -> Tensor:
    """Apply the dataset's flip / dequantisation options to a batch (B, C, H, W)."""
    if x.dim() != 4:
        return x
    if params.flip:
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if params.dequantize:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = (x * 255.0 + u) / 256.0
    return x


class DataError(Exception):
    """Data that cannot be found or read; the message says what was expected where."""
