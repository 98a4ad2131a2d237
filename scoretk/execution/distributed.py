"""torchrun support: the same command trains or samples on N processes.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; we then join a process group (gloo on CPU, nccl on
CUDA). In a plain process everything here is a no-op, so the loops never branch on it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def max_int(self, value: int) -> int:
        """The largest `value` over all ranks (agreeing on stop/NaN decisions)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self._device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if tdist.get_backend() == "nccl" \
            else torch.device("cpu")

    def shutdown(self) -> None:
        if self.world > 1 and tdist.is_initialized():
            tdist.destroy_process_group()


BARRIER_TIMEOUT = timedelta(hours=6)
"""Ranks wait for each other at barriers for up to a whole batch or checkpoint: allow long ones."""


class DeviceError(ValueError):
    """A requested device that this machine does not have."""


def setup_distributed(device: str = "auto") -> Dist:
    """Join torchrun's process group: nccl when the job runs on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        tdist.init_process_group("nccl" if cuda else "gloo", store=_attempt_store(rank, world),
                                 rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    return Dist(rank, world, local)


def _attempt_store(rank: int, world: int) -> tdist.Store:
    """torchrun's store, seen under a prefix of its own for each restart of the job. The agent
    keeps one store across restarts, and without the prefix the restarted processes read the
    addresses the killed ones published, and fail or hang connecting to them."""
    store, _, _ = next(tdist.rendezvous("env://", rank, world, timeout=BARRIER_TIMEOUT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return tdist.PrefixStore(f"scoretk/attempt-{attempt}", store)


def pick_device(name: str, dist: Dist) -> torch.device:
    """'auto' = cuda, else mps, else cpu; under torchrun each rank takes its local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device cuda: no CUDA device is available")
        return torch.device("cuda", dist.local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device mps: MPS is not available")
    return torch.device(name)
