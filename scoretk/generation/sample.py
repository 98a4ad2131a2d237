"""`scoretk sample`: generate from a checkpoint into an HDF5 file, batch by batch.

Sample i's random numbers come from (seed, i) alone (`PerSampleNoise`), so the file does not
depend on the batch size, on interruptions or on the number of processes. Under torchrun the
batches go round-robin to the ranks, which append them in turn: the same single file results.
Every check that can fail runs before the output file is touched.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scoretk import assemble
from scoretk.execution.distributed import Dist
from scoretk.execution.policy import ExecutionPolicy
from scoretk.files import Stopped, raise_if_stopped
from scoretk.generation.job import SampleJob, resolve_job
from scoretk.generation.preflight import check_resources
from scoretk.generation.request import SampleRequest
from scoretk.registry import Registry
from scoretk.rng import PerSampleNoise, derive_seed
from scoretk.store import SampleStore


def run_sampling(request: SampleRequest, registry: Registry,
                 policy: ExecutionPolicy | None = None) -> Path:
    """Fill `request.out` with samples (see the module docstring); returns its path. Without
    a `policy`, this process on the request's device (the command line sets up torchrun)."""
    request.check()
    policy = policy or ExecutionPolicy.for_sampling(request.device)
    dist, out = policy.dist, request.out
    existing = SampleStore(out) if request.resume and out.exists() else None
    job = resolve_job(request, registry, policy, existing)
    if existing:
        existing.check_matches(job.attrs, job.model.shape, job.keep_float)
        if existing.complete:
            if dist.is_main:
                print(f"{out}: already complete ({existing.num_written} samples)")
                _write_grid(out, request.grid, registry)
            return out
    check_resources(job, out, existing.num_written if existing else 0)
    store = _open_store(out, job, existing, dist)
    start, t0 = store.num_written, time.perf_counter()
    try:
        _generate(job, store, dist, registry)
    except KeyboardInterrupt as exc:
        if not dist.is_main:
            raise
        raise Stopped(getattr(exc, "signum", signal.SIGINT),
                      f"interrupted: {out} is valid and holds {SampleStore(out).num_written} "
                      f"samples; `scoretk sample --out {out} --resume` continues it") from None
    finally:
        store.close()  # rank 0 lets go of the file
    if dist.is_main:
        _report(job, out, start, time.perf_counter() - t0)
        _write_grid(out, request.grid, registry)
    return out


def _open_store(out: Path, job: SampleJob, existing: SampleStore | None,
                dist: Dist) -> SampleStore:
    """A new file, or the resumed one with any unrecorded rows dropped (rank 0 writes, after
    every rank has checked it). Rank 0's store holds the file's run lock until `close`: a
    second run on it is refused; the other ranks append under that lock."""
    dist.barrier()
    held = None
    if dist.is_main:
        if existing:
            existing.trim()
            held = existing
        else:
            held = SampleStore.create(out, job.model.shape, job.attrs,
                                      keep_float=job.keep_float)
    dist.barrier()
    return held or SampleStore(out)


def _report(job: SampleJob, out: Path, start: int, elapsed: float) -> None:
    made = job.num_samples - start
    rate = made / elapsed if elapsed > 0 else float("inf")
    print(f"wrote {out}: {job.num_samples} samples ({made} new) in {elapsed:.1f} s, "
          f"{rate:.1f} samples/s, {rate * job.evals:.0f} evaluations/s")


def init_rows(data: Any, seed: int, indices: range) -> Tensor:
    """Starting data for a data+noise init: item for sample i chosen by (seed, i) alone."""
    idx = torch.tensor([derive_seed(seed, "init", i) % len(data) for i in indices])
    return data.batch(idx)


def _generate(job: SampleJob, store: SampleStore, dist: Dist, registry: Registry) -> None:
    """Sample the missing rows: batch k of the rest goes to rank k % world; ranks append in
    batch order, one at a time, so the file is the single-process one."""
    data = assemble.build_data(job.recipe, registry) if job.model.sampler.starts_from_data \
        else None
    n, b, start = job.num_samples, job.batch_size, store.num_written
    net = job.model.net
    weights = contextlib.nullcontext() if job.raw_weights else job.averager.averaged(net)
    with torch.no_grad(), weights, _Progress(dist.is_main, n, start, job.evals) as bar:
        num_batches = math.ceil((n - start) / b)
        for first in range(0, num_batches, dist.world):
            mine, x = first + dist.rank, None
            if mine < num_batches:
                i0, i1 = start + mine * b, min(start + (mine + 1) * b, n)
                x = _sample_batch(job, range(i0, i1), data, bar)
            for turn in range(dist.world):
                if turn == dist.rank and x is not None:
                    store.append(x, start=i0)
                dist.barrier()
            bar.advance(min(start + (first + dist.world) * b, n))
            raise_if_stopped()


def _sample_batch(job: SampleJob, indices: range, data: Any, bar: "_Progress") -> Tensor:
    noise = PerSampleNoise(job.seed, indices, job.device)
    init = init_rows(data, job.seed, indices).to(job.device) if data is not None else None
    x = job.model.sampler.sample(job.sample_net, job.model.schedule, job.model.shape, noise,
                                 device=job.device, init=init, progress=bar.within_batch)
    return x.float().cpu()


def _write_grid(out: Path, grid: Path | None, registry: Registry) -> None:
    """The --grid picture: images beside real ones, or 2-D points over the data."""
    if grid:
        from scoretk.pictures import sample_picture

        for note in sample_picture(out, grid, None, registry):
            print(note, file=sys.stderr)
        print(f"grid: {grid}")


class _Progress:
    """tqdm bar in samples, with samples/s and evaluations/s; inert on ranks other than 0."""

    def __init__(self, enabled: bool, total: int, initial: int, evals_per_sample: int):
        self.enabled, self.evals, self.initial = enabled, evals_per_sample, initial
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="sample", dynamic_ncols=True,
                            disable=None)
        self.t0, self.last = time.perf_counter(), 0.0

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def within_batch(self, done: int, total: int) -> None:
        """Sampler callback: show how far the current batch is (batches can take minutes)."""
        now = time.perf_counter()
        if self.bar is not None and now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"batch {100 * done / max(total, 1):.0f}%, "
                                     f"{self._evals_per_s():.0f} evals/s", refresh=True)

    def advance(self, written: int) -> None:
        if self.bar is not None:
            n = self.bar.n
            self.bar.n = written  # so the rate below counts this batch
            self.bar.set_postfix_str(f"{self._evals_per_s():.0f} evals/s", refresh=False)
            self.bar.n = n
            self.bar.update(written - n)

    def _evals_per_s(self) -> float:
        elapsed = time.perf_counter() - self.t0
        done = (self.bar.n - self.initial) if self.bar is not None else 0
        return done * self.evals / elapsed if elapsed > 0 else 0.0
