"""What gets scored, read batch by batch: sample files, in-memory tensors, a recipe's real data.

Every source yields the same thing: float batches in the [0, 1] convention, images (B, C, H, W)
quantised to the 256 levels a sample file stores. Real images go through the same uint8
conversion as samples, so a feature space never tells them apart by rounding alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from scoretk.components import Dataset
from scoretk.data import DataParams
from scoretk.images import to_uint8
from scoretk.registry import Registry
from scoretk.store import StoreError, reading


class EvaluationError(Exception):
    """Inputs that cannot be scored together; the message is one line naming what is wrong."""


@dataclass(frozen=True)
class Source:
    """`length` items, read as rows [start, stop) by `read`; `key` identifies real data for
    the feature cache (None: never cached)."""

    name: str
    length: int
    item_shape: tuple[int, ...]
    read: Callable[[int, int], Tensor]
    labels: Tensor | None = None
    key: dict[str, Any] | None = None

    @property
    def is_image(self) -> bool:
        return len(self.item_shape) == 3


def quantise(x: Tensor) -> Tensor:
    """Images as a sample file would store them: uint8 levels, back in [0, 1]."""
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float().div_(255.0)


def _rows_as_items(rows: np.ndarray) -> Tensor:
    if rows.dtype == np.uint8 and rows.ndim == 4:  # (N, H, W, C) -> (N, C, H, W) in [0, 1]
        return torch.from_numpy(rows).permute(0, 3, 1, 2).float().div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def file_source(path: str | Path, limit: int | None = None) -> Source:
    """An HDF5 file with a `samples` dataset (uint8 (N, H, W, C) images or (N, D) vectors);
    its first `num_written` rows (all rows when the attribute is absent). The file is opened
    per batch, so a sampler may keep appending to it meanwhile."""
    path = Path(path)
    with reading(path) as f:
        if "samples" not in f:
            raise StoreError(f"{path}: no 'samples' dataset")
        ds = f["samples"]
        n = int(f.attrs.get("num_written", ds.shape[0]))
        shape = tuple(ds.shape[1:])
    if n == 0:
        raise StoreError(f"{path}: no samples written yet (num_written is 0)")
    if len(shape) == 3:
        shape = (shape[2], shape[0], shape[1])

    def read(start: int, stop: int) -> Tensor:
        with reading(path) as f:
            return _rows_as_items(f["samples"][start:stop])

    return Source(str(path), n if limit is None else min(n, limit), shape, read)


def stored_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe a scoretk sample file records (None for other HDF5 files)."""
    with reading(path) as f:
        recipe = f.attrs.get("recipe")
    if isinstance(recipe, bytes):
        recipe = recipe.decode()
    return json.loads(recipe) if recipe is not None else None


def tensor_source(x: Tensor, name: str = "samples") -> Source:
    """Items already in memory (e.g. samples drawn during training), quantised like a file's."""
    x = quantise(x) if x.dim() == 4 else x.reshape(len(x), -1).float()
    return Source(name, len(x), tuple(x.shape[1:]), lambda a, b: x[a:b])


def dataset_source(ds: Dataset, indices: Tensor, name: str, key: dict[str, Any]) -> Source:
    """The dataset's items at `indices`, read in that order."""
    labels = getattr(ds, "labels", None)

    def read(start: int, stop: int) -> Tensor:
        x = ds.batch(indices[start:stop])
        return quantise(x) if x.dim() == 4 else x.float()

    return Source(name, len(indices), tuple(ds.shape), read,
                  labels[indices] if labels is not None else None, key)


def real_sources(data_block: dict[str, Any], registry: Registry, num_reference: int,
                 num_heldout: int, seed: int = 0) -> tuple[Source, Source]:
    """(reference, held-out) from a recipe's data block, without training augmentations.

    The reference is the training split (a fixed random `num_reference` of it when larger); the
    held-out set is the dataset's own held-out split, or, for data without one, the other half
    of a fixed random split; `num_heldout` of it, to match the number of samples.
    """
    spec = dict(data_block)
    kind = spec.pop("kind")
    comp = registry.get("dataset", kind)
    params = comp.params.model_validate(spec)
    params = params.plain() if isinstance(params, DataParams) else params
    split = params.heldout_split() if isinstance(params, DataParams) else None
    if split is not None:
        train, held = (comp.build(p) for p in split)
        parts = [(train, fixed_subset(len(train), num_reference, seed), "training split"),
                 (held, fixed_subset(len(held), num_heldout, seed), "held-out split")]
    else:
        ds = comp.build(params)
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
        half = len(ds) // 2
        parts = [(ds, perm[:half][:num_reference].sort().values, "random half A"),
                 (ds, perm[half:][:num_heldout].sort().values, "random half B")]
    return tuple(
        dataset_source(ds, idx, f"{kind} {what}",
                       {"data": {"kind": kind, **params.model_dump(mode="json")},
                        "part": what, "n": len(idx), "seed": seed})
        for ds, idx, what in parts)


def fixed_subset(length: int, n: int, seed: int) -> Tensor:
    """All indices when n covers them, else a fixed random n of them, in order."""
    if n >= length:
        return torch.arange(length)
    perm = torch.randperm(length, generator=torch.Generator().manual_seed(seed))
    return perm[:n].sort().values
