"""One execution policy per command: where and how the work runs, decided in one place.

Device, rank and world size, bf16 autocast, torch.compile, memory layout, the CPU batch split
and the malloc setting are all read here, from the recipe and the command line, and nowhere
else. The process-wide parts (joining torchrun's process group, glibc's malloc thresholds)
happen once, in `setup_process`, which the command line calls at its entry; library functions
(`train`, `run_sampling`) take a policy and never change the process behind a caller's back.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import ContextManager, Literal

import torch
from torch import Tensor, nn

from scoretk.execution.batch_threads import BatchThreads, split_batches
from scoretk.execution.cpu_memory import keep_freed_memory
from scoretk.execution.distributed import Dist, pick_device, setup_distributed
from scoretk.execution.layout import in_preferred_layout

BatchThreadsSetting = Literal["auto"] | int


@dataclass(frozen=True)
class ExecutionPolicy:
    """How a command runs. Build it with `for_training`/`for_sampling`, or directly."""

    device_name: str = "auto"
    bf16: bool = False
    compile: bool = False
    channels_last: bool = False
    batch_threads: BatchThreadsSetting = "auto"
    layout: Literal["auto", "input"] = "auto"
    """auto: nets that prefer channels_last run so on CPU and CUDA; input: every net runs in
    its input's memory layout (the benchmarks' NCHW rows)."""
    keep_freed_memory: bool = True
    dist: Dist = field(default_factory=Dist)

    @classmethod
    def for_training(cls, train_cfg, *, dist: Dist | None = None) -> "ExecutionPolicy":
        """From a recipe's `train` section."""
        return cls(train_cfg.device, train_cfg.bf16, train_cfg.compile, train_cfg.channels_last,
                   train_cfg.batch_threads, dist=dist or Dist())

    @classmethod
    def for_sampling(cls, device_name: str, batch_threads: BatchThreadsSetting = "auto", *,
                     dist: Dist | None = None) -> "ExecutionPolicy":
        return cls(device_name, batch_threads=batch_threads, dist=dist or Dist())

    def setup_process(self) -> "ExecutionPolicy":
        """The process-wide part, once per command: join torchrun's process group (a policy
        with the resulting rank and world), and keep freed memory on CPU runs."""
        dist = setup_distributed(self.device_name)
        policy = self if dist == self.dist else self.replace(dist=dist)
        if policy.device.type == "cpu" and self.keep_freed_memory:
            keep_freed_memory()
        return policy

    def replace(self, **changes) -> "ExecutionPolicy":
        """A copy with some settings changed (e.g. sampling's batch split, which the
        checkpoint's recipe gives)."""
        return dataclasses.replace(self, **changes)

    @cached_property
    def device(self) -> torch.device:
        return pick_device(self.device_name, self.dist)

    @property
    def uses_bf16(self) -> bool:
        return self.bf16 and self.device.type == "cuda"

    def autocast(self) -> ContextManager:
        if self.uses_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, net: nn.Module, item_shape: tuple[int, ...]) -> nn.Module:
        """The net on the device, its weights channels_last when asked (images only)."""
        net = net.to(self.device)
        if self.channels_last and len(item_shape) == 3:
            net = net.to(memory_format=torch.channels_last)
        return net

    def as_input(self, x: Tensor) -> Tensor:
        """A batch in the layout the net was placed in."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def in_layout(self, net: nn.Module) -> nn.Module:
        """The net run in its preferred memory layout (see `layout`)."""
        return in_preferred_layout(net, self.device) if self.layout == "auto" else net

    def for_sampling_net(self, net: nn.Module) -> nn.Module:
        """What a sampler calls: in its layout, on CPU the batch split across threads."""
        return split_batches(self.in_layout(net), self.batch_threads, self.device)

    def for_training_net(self, net: nn.Module) -> nn.Module:
        """What the training step calls: the batch split (not for compiled nets), DDP across
        processes, then torch.compile."""
        wrapped = self.in_layout(net)
        if not self.compile:
            wrapped = split_batches(wrapped, self.batch_threads, self.device)
        if self.dist.world > 1:
            device = self.device
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[device.index] if device.type == "cuda" else None)
        if self.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def split_chunks(self, net: nn.Module, batch: int, item_values: int) -> int:
        """How many CPU threads a batch of `batch` items is split across (1: not split)."""
        if self.compile:
            return 1
        split = split_batches(self.in_layout(net), self.batch_threads, self.device)
        return split.chunks(batch, item_values) if isinstance(split, BatchThreads) else 1

    def notes(self) -> list[str]:
        """Settings that do not apply here, said once at the start of a run."""
        out = []
        if self.bf16 and not self.uses_bf16:
            out.append(f"train.bf16 applies on CUDA only; training in float32 on {self.device}")
        if self.compile and self.batch_threads not in ("auto", 1):
            out.append("train.batch_threads does not apply to compiled nets; the batch is not "
                       "split")
        return out

