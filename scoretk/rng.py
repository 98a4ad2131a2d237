"""Seeding that does not depend on batching.

Every random number that shapes sample i comes from a generator seeded by (seed, i), so the same
seed gives the same samples whatever the batch size, interruptions or number of processes.
Training draws per step from a generator seeded by (seed, step, rank), so a resumed run replays
exactly the random numbers the uninterrupted one would have used.
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and versions)."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class PerSampleNoise:
    """Noise source for a batch whose rows are the global sample indices `indices`.

    Row j of every draw comes from its own generator seeded by (seed, indices[j]).
    """

    def __init__(self, seed: int, indices: range | list[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        self._gens = [generator(derive_seed(seed, "sample", int(i)), gen_device) for i in indices]

    @property
    def batch_size(self) -> int:
        return len(self._gens)

    def _draw(self, fn, shape: tuple[int, ...]) -> Tensor:
        rows = [fn(shape, generator=g, device=g.device, dtype=self.dtype) for g in self._gens]
        return torch.stack(rows).to(self.device, non_blocking=True)

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        return self._draw(torch.randn, tuple(shape))

    def rand(self, shape: tuple[int, ...]) -> Tensor:
        return self._draw(torch.rand, tuple(shape))


class BatchNoise:
    """Noise source backed by one generator: fast, but tied to the batch layout."""

    def __init__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.batch_size, self.generator = batch_size, generator
        self.device, self.dtype = torch.device(device), dtype

    def _device(self):
        return self.generator.device if self.generator is not None else self.device

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn((self.batch_size, *shape), generator=self.generator,
                           device=self._device(), dtype=self.dtype).to(self.device)

    def rand(self, shape: tuple[int, ...]) -> Tensor:
        return torch.rand((self.batch_size, *shape), generator=self.generator,
                          device=self._device(), dtype=self.dtype).to(self.device)


def global_rng_state() -> dict:
    """The global RNG states, for checkpoints: scoretk draws from per-step generators, but a
    plugin's net may use the global RNG (dropout), and a resumed run must see the same numbers."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
