"""`scoretk sample`: generate from a checkpoint (or an exact score's recipe) into an HDF5
file, batch by batch, optionally under a condition or in interpolation groups (`control`).

Sample i's random numbers come from (seed, i) alone (`PerSampleNoise`; with --interpolate,
from (seed, its group)), so the file does not depend on the batch size, on interruptions or
on the number of processes. Under torchrun the
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
from typing import Any, Sequence

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
from scoretk.rng import derive_seed
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
    evaluations_before = store.evaluations
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
        made = SampleStore(out).evaluations - evaluations_before
        _report(job, out, start, time.perf_counter() - t0, made)
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


def _report(job: SampleJob, out: Path, start: int, elapsed: float, evaluations: int) -> None:
    """The summary line; `evaluations`: network evaluations the new samples cost (per sample,
    summed over samples), as the file recorded them."""
    made = job.num_samples - start
    per_second = lambda count: count / elapsed if elapsed > 0 else float("inf")  # noqa: E731
    per_sample = f"{evaluations / made:.1f}" if made else "0"
    print(f"wrote {out}: {job.num_samples} samples ({made} new) in {elapsed:.1f} s, "
          f"{per_second(made):.1f} samples/s, {per_sample} evaluations per sample, "
          f"{per_second(evaluations):.0f} evaluations/s")


def init_rows(data: Any, seed: int, keys: Sequence[int]) -> Tensor:
    """Starting data for a data+noise init: the item for key i (a sample's index, or its
    interpolation group's) chosen by (seed, i) alone."""
    idx = torch.tensor([derive_seed(seed, "init", i) % len(data) for i in keys])
    return data.batch(idx)


def _generate(job: SampleJob, store: SampleStore, dist: Dist, registry: Registry) -> None:
    """Sample the missing rows: batch k of the rest goes to rank k % world; ranks append in
    batch order, one at a time, so the file is the single-process one."""
    data = assemble.build_data(job.recipe, registry) if job.model.sampler.starts_from_data \
        else None
    n, b, start = job.num_samples, job.batch_size, store.num_written
    net = job.model.net
    weights = contextlib.nullcontext() if job.averager is None else job.averager.averaged(net)
    with torch.no_grad(), weights, _Progress(dist.is_main, n, start, job.evals) as bar:
        num_batches = math.ceil((n - start) / b)
        for first in range(0, num_batches, dist.world):
            mine, x = first + dist.rank, None
            if mine < num_batches:
                i0, i1 = start + mine * b, min(start + (mine + 1) * b, n)
                x, evals = _sample_batch(job, range(i0, i1), data, bar)
            for turn in range(dist.world):
                if turn == dist.rank and x is not None:
                    store.append(x, start=i0, evaluations=evals * len(x))
                dist.barrier()
            bar.advance(min(start + (first + dist.world) * b, n),
                        (len(x), evals) if x is not None else None)
            raise_if_stopped()


def _sample_batch(job: SampleJob, indices: range, data: Any,
                  bar: "_Progress") -> tuple[Tensor, int]:
    """(the batch's samples, network evaluations each cost: the sampler's count where it
    keeps one, which an adaptive solver does, else its budget)."""
    control, sampler = job.control, job.model.sampler
    init = None
    if data is not None:
        init = init_rows(data, job.seed, control.keys(indices)).to(job.device)
    bar.start_batch(len(indices))
    x = sampler.sample(job.sample_net, job.model.schedule, job.model.shape,
                       control.noise(job.seed, indices, job.device), device=job.device,
                       init=init, progress=bar.within_batch,
                       **control.sampler_arguments(indices, job.device))
    evals = sampler.last_evaluations if sampler.last_evaluations is not None else job.evals
    return x.float().cpu(), int(evals)


def _write_grid(out: Path, grid: Path | None, registry: Registry) -> None:
    """The --grid picture: images beside real ones, or 2-D points over the data."""
    if grid:
        from scoretk.pictures import sample_picture

        for note in sample_picture(out, grid, None, registry):
            print(note, file=sys.stderr)
        print(f"grid: {grid}")


class _Progress:
    """tqdm bar in samples, with samples/s and evaluations/s; inert on ranks other than 0.

    Evaluations are counted as the batches report them (an adaptive solver makes fewer than
    its budget): the samples written times the mean per sample of this process's finished
    batches (the budget until one has finished), plus the current batch's so far."""

    def __init__(self, enabled: bool, total: int, initial: int, evals_per_sample: int):
        self.per_sample, self.initial, self.written = float(evals_per_sample), initial, initial
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="sample", dynamic_ncols=True,
                            disable=None)
        self.t0, self.last = time.perf_counter(), 0.0
        self.own_samples = self.own_evaluations = 0
        self.batch_rows = self.batch_done = 0

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def start_batch(self, rows: int) -> None:
        self.batch_rows, self.batch_done = rows, 0

    def within_batch(self, done: int, total: int) -> None:
        """Sampler callback: show how far the current batch is (batches can take minutes)."""
        self.batch_done = done
        now = time.perf_counter()
        if self.bar is not None and now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"batch {100 * done / max(total, 1):.0f}%, "
                                     f"{self.evaluations_per_second():.0f} evals/s",
                                     refresh=True)

    def advance(self, written: int, batch: tuple[int, int] | None) -> None:
        """`written` samples in the file; `batch`: (rows, evaluations per sample) of the batch
        this process just finished, None if it had none."""
        if batch is not None:
            rows, evals = batch
            self.own_samples += rows
            self.own_evaluations += rows * evals
            self.per_sample = self.own_evaluations / self.own_samples
            self.batch_rows = self.batch_done = 0
        self.written = written
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.evaluations_per_second():.0f} evals/s",
                                     refresh=False)
            self.bar.update(written - self.bar.n)

    def evaluations(self) -> float:
        """Network evaluations made since the start (estimated as the docstring says)."""
        return ((self.written - self.initial) * self.per_sample
                + self.batch_done * self.batch_rows)

    def evaluations_per_second(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return self.evaluations() / elapsed if elapsed > 0 else 0.0
