"""Split a score net's batch across CPU threads, one intra-op thread each.

Why: on a few CPU cores, PyTorch parallelises every op across its threads and joins them at
the end of each op. A RefineNet step runs thousands of ops, many too small to share well, and
oneDNN's weight gradients reduce across threads once per convolution. Running half the batch
on each core, each op single-threaded, keeps both cores busy from the first op to the last
and reduces each weight gradient once. At NCSNv2 ngf 32, batch 32 on 2 cores, a training
step ran 1.00 to 1.07x faster (about 1.03x typical), and about 1.05x once `cpu_memory` kept
freed memory (benchmarks/README.md). Small chunks lose: see AUTO_MIN_CHUNK_VALUES.

It is exact only for nets whose output for a sample depends on that sample alone (instance or
group norm, no batch norm): such nets say so with `batch_independent = True`. The values are
the same; parameter gradients differ only by float summation order.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def in_threads(fns: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run each of `fns` on its own thread with one intra-op thread, the first on the caller's
    thread; return their results in order. The caller's thread count is restored, and the
    first exception is re-raised once every thread has finished (nothing keeps running)."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []
    grad = torch.is_grad_enabled()  # thread-local: new threads start with grad enabled

    def work(i: int) -> None:
        try:
            torch.set_num_threads(1)
            with torch.set_grad_enabled(grad):
                results[i] = fns[i]()
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(1, len(fns))]
    n = torch.get_num_threads()
    try:
        for t in threads:
            t.start()
        work(0)
    finally:
        for t in threads:
            t.join()
        torch.set_num_threads(n)
    if errors:
        raise errors[0]
    return results


def _split(chunks: int, *batch: Tensor) -> list[tuple[Tensor, ...]]:
    """(x, sigma, level) -> one (x_i, sigma_i, level_i) per chunk, along the batch."""
    return list(zip(*(t.tensor_split(chunks) for t in batch)))


class _SplitBatch(torch.autograd.Function):
    """Forward and backward of `net` on batch chunks, one thread per chunk. Parameters are
    inputs, so their summed gradients flow into `.grad` as for the plain net (and DDP hooks
    and clipping see the usual AccumulateGrad)."""

    @staticmethod
    def forward(ctx, net: nn.Module, chunks: int, x: Tensor, sigma: Tensor, level: Tensor,
                *params: Tensor) -> Tensor:
        pieces = _split(chunks, x, sigma, level)

        def run(i: int) -> tuple[list[Tensor], Tensor]:
            xi, si, li = (t.detach() for t in pieces[i])
            xi.requires_grad_(x.requires_grad)
            si.requires_grad_(sigma.requires_grad)
            with torch.enable_grad():
                return [t for t in (xi, si) if t.requires_grad], net(xi, si, li)

        ctx.graphs = in_threads([functools.partial(run, i) for i in range(len(pieces))])
        ctx.needs = (x.requires_grad, sigma.requires_grad)
        ctx.params = params
        return torch.cat([out.detach() for _, out in ctx.graphs])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        graphs, params = ctx.graphs, ctx.params
        del ctx.graphs  # free the chunk graphs as soon as they are used
        grads = grad_out.split([out.shape[0] for _, out in graphs])

        def run(i: int) -> tuple[Tensor | None, ...]:
            inputs, out = graphs[i]
            return torch.autograd.grad(out, [*inputs, *params], grads[i], allow_unused=True)

        per_chunk = in_threads([functools.partial(run, i) for i in range(len(graphs))])
        n_in = sum(ctx.needs)
        input_grads = iter([torch.cat([g[j] for g in per_chunk]) for j in range(n_in)])
        x_grad = next(input_grads) if ctx.needs[0] else None
        sigma_grad = next(input_grads) if ctx.needs[1] else None
        param_grads = []
        for j in range(n_in, n_in + len(params)):
            parts = [g[j] for g in per_chunk if g[j] is not None]
            param_grads.append(functools.reduce(torch.add, parts) if parts else None)
        return (None, None, x_grad, sigma_grad, None, *param_grads)


AUTO_MIN_CHUNK_VALUES = 16384
"""`auto` splits only where each chunk gets at least this many input values. Measured on 2
cores, training speed-up of the split by input values per chunk: the toy MLP 0.5x (256) and
0.93x (4096); the quick-start convnet 0.85 to 0.94x (4096), 1.05x (16384), and 1.26x at
32 px (49152); NCSNv2 ngf 32 1.00x (12288, 24576) and 1.03x (49152). Below ~8k values per
chunk, per-op overhead and the GIL cost more than the split saves."""


class BatchThreads(nn.Module):
    """`net(x, sigma, level)` with the batch split across up to `threads` CPU threads, into
    chunks of at least `min_values` input values (smaller batches run unsplit).

    Like DDP, it is a wrapper for the step to call: checkpoints and averagers keep using the
    plain net.
    """

    def __init__(self, net: nn.Module, threads: int, min_values: int = 1):
        super().__init__()
        if threads < 2:
            raise ValueError(f"BatchThreads needs at least 2 threads, got {threads}")
        self.net, self.threads, self.min_values = net, threads, max(1, min_values)
        self.accepts_any_sigma = getattr(net, "accepts_any_sigma", True)  # samplers read it

    def chunks(self, batch: int, item_values: int) -> int:
        """How many chunks a batch of `batch` items of `item_values` values each is split
        into (1: not split)."""
        return max(1, min(self.threads, batch, batch * item_values // self.min_values))

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        chunks = self.chunks(x.shape[0], x[0].numel()) if x.shape[0] else 1
        if chunks < 2 or sigma.shape[:1] != x.shape[:1] or level.shape[:1] != x.shape[:1]:
            return self.net(x, sigma, level)
        params = [p for p in self.net.parameters() if p.requires_grad]
        if torch.is_grad_enabled() and (params or x.requires_grad or sigma.requires_grad):
            return _SplitBatch.apply(self.net, chunks, x, sigma, level, *params)
        pieces = _split(chunks, x, sigma, level)
        return torch.cat(in_threads([functools.partial(self.net, *p) for p in pieces]))


def split_batches(net: nn.Module, setting: Literal["auto"] | int,
                  device: torch.device) -> nn.Module:
    """The net as the recipe's `batch_threads` asks: `net` itself off the CPU or for 1, else
    a BatchThreads wrapper. `auto`: torch's intra-op thread count, for nets that declare
    `batch_independent`, in chunks of at least AUTO_MIN_CHUNK_VALUES input values. A number:
    that many threads, whatever the net or the batch (the user's call)."""
    if device.type != "cpu":
        return net
    if setting == "auto":
        if not getattr(net, "batch_independent", False):
            return net
        threads, min_values = torch.get_num_threads(), AUTO_MIN_CHUNK_VALUES
    else:
        threads, min_values = int(setting), 1
    return BatchThreads(net, threads, min_values) if threads > 1 else net
