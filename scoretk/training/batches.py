"""Training batches as a pure function of the step, so a resumed run sees the same data."""
from __future__ import annotations

from typing import Iterator

import torch

from scoretk.components import Dataset
from scoretk.recipe import RecipeError
from scoretk.rng import derive_seed, generator


class StepBatches:
    """Batch indices as a pure function of the step: epoch permutations seeded by (seed, epoch).

    With W processes, the global batch is split into W equal slices, one per rank.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise RecipeError("recipe", "train.batch_size",
                              f"{global_batch} is not divisible by the {world} processes")
        if size < global_batch:
            raise RecipeError("recipe", "train.batch_size",
                              f"{global_batch} is larger than the dataset ({size} items)")
        self.size, self.batch, self.seed = size, global_batch, seed
        self.local = global_batch // world
        self.rank = rank
        self.steps_per_epoch = size // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.size, generator=generator(
                derive_seed(self.seed, "epoch", epoch)))
            self._epoch = epoch
        start = k * self.batch + self.rank * self.local
        return self._perm[start:start + self.local]


class _StepDataset(torch.utils.data.Dataset):
    """Lets a DataLoader's workers fetch whole batches (index lists) of a scoretk Dataset."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


def batches(data: Dataset, order: StepBatches, start: int, end: int,
            workers: int) -> Iterator[torch.Tensor]:
    """The batches of steps start..end-1, loaded in `workers` processes when > 0."""
    if workers == 0:
        for step in range(start, end):
            yield data.batch(order(step))
        return
    sampler = [order(step).tolist() for step in range(start, end)]
    loader = torch.utils.data.DataLoader(_StepDataset(data), batch_sampler=sampler,
                                         num_workers=workers, pin_memory=torch.cuda.is_available())
    yield from loader
