"""Seeding that does not depend on batching.

Every random number that shapes sample i comes from a generator seeded by (seed, i), so the same
seed gives the same samples whatever the batch size, interruptions or number of processes.
Training draws per step from a generator seeded by (seed, step, rank), so a resumed run replays
exactly the random numbers the uninterrupted one would have used.
"""
from __future__ import annotations

import hashlib
import math

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


class InterpolationNoise:
    """Noise for NCSNv2-style interpolation: samples come in groups of `per_group`; sample k
    of group g draws cos(t_k) p + sin(t_k) q, t_k = k/(per_group - 1) * pi/2, from two normal
    draws p, q shared by the group, and the uniform draws of p (so a uniform start is shared).

    Every draw is still standard normal, so any sampler runs unchanged and its outputs move
    smoothly from one sample to another along the group. Each row re-derives its group's
    generators from (seed, g): batches may split a group anywhere.
    """

    def __init__(self, seed: int, indices: range | list[int], per_group: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if per_group < 2:
            raise ValueError(f"interpolation needs at least 2 samples per group, got {per_group}")
        self.device, self.dtype = torch.device(device), dtype
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        groups = [int(i) // per_group for i in indices]
        angles = torch.tensor([(int(i) % per_group) / (per_group - 1) * math.pi / 2
                               for i in indices], dtype=torch.float64)
        self._cos, self._sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self._p = [generator(derive_seed(seed, "interpolation", g, "p"), gen_device) for g in groups]
        self._q = [generator(derive_seed(seed, "interpolation", g, "q"), gen_device) for g in groups]

    @property
    def batch_size(self) -> int:
        return len(self._p)

    def _rows(self, fn, gens, shape: tuple[int, ...]) -> Tensor:
        return torch.stack([fn(shape, generator=g, device=g.device, dtype=self.dtype)
                            for g in gens]).to(self.device)

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        shape = tuple(shape)
        p, q = self._rows(torch.randn, self._p, shape), self._rows(torch.randn, self._q, shape)
        view = (-1,) + (1,) * len(shape)
        return (self._cos.view(view).to(self.device) * p + self._sin.view(view).to(self.device) * q)

    def rand(self, shape: tuple[int, ...]) -> Tensor:
        return self._rows(torch.rand, self._p, tuple(shape))
