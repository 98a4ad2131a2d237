"""Cheap checks of a sampling job against the machine, before the output file is touched: one
batch must fit in memory, and the file on the disk. They are there to refuse requests that
are far off (a batch or -n in the tens of millions) in a second, with one line, instead of an
allocation failure minutes later; they do not predict the peak exactly.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from scoretk.execution.cpu_memory import available_bytes
from scoretk.generation.job import SampleJob
from scoretk.store import StoreError

SAMPLER_COPIES = 6
"""Batch-sized float tensors a sampler holds at once: x, noise, score, step, a float copy,
the rows for the file."""
ACTIVATION_COPIES = 4
"""The net's largest activation counted this many times (input, output, a skip connection)."""
NOISE_BYTES_PER_SAMPLE = 4096
"""Each sample of a batch draws from its own generator (rng.PerSampleNoise: a Mersenne Twister
state, and a small tensor per draw); on CPU, for small items, this is most of a batch's
memory."""


def check_resources(job: SampleJob, out: Path, start: int) -> None:
    """Refuse (StoreError, one line) a batch beyond the free memory of the device, or rows
    [start, N) beyond the free disk where `out` goes."""
    item_values = math.prod(job.model.shape)
    batch = min(job.batch_size, job.num_samples - start)
    if batch > 0:
        per_item = NOISE_BYTES_PER_SAMPLE + 4 * SAMPLER_COPIES * item_values + \
            ACTIVATION_COPIES * largest_activation(job.model.net, job.model.schedule.sigmas[:1],
                                                   job.model.shape, job.device)
        have = _free_memory(job.device)
        if have is not None and batch * per_item > have:
            raise StoreError(f"batch size {job.batch_size:,}: one batch needs about "
                             f"{_gib(batch * per_item)} of memory and {_gib(have)} is free on "
                             f"{job.device}; give a smaller --batch-size")
    per_row = item_values * (1 if len(job.model.shape) == 3 else 4) \
        + (4 * item_values if job.keep_float else 0)
    need, free = (job.num_samples - start) * per_row, shutil.disk_usage(out.parent).free
    if need > free:
        raise StoreError(f"-n {job.num_samples:,}: {out} needs up to {_gib(need)} and "
                         f"{out.parent} has {_gib(free)} free; give a smaller -n")


def largest_activation(net: nn.Module, sigma: Tensor, shape: tuple[int, ...],
                       device: torch.device) -> int:
    """Bytes of the largest tensor a module of `net` returns for one item: one forward pass
    of one item, without gradients."""
    sizes = [0]

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor):
            sizes.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in net.modules()]
    try:
        with torch.no_grad():
            net(torch.zeros(1, *shape, device=device), sigma.reshape(1).to(device),
                torch.zeros(1, dtype=torch.long, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return max(sizes)


def _free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_bytes() if device.type == "cpu" else None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
