"""`scoretk sample`: generate from a checkpoint into an HDF5 file, batch by batch.

Sample i's random numbers come from (seed, i) alone (`PerSampleNoise`), so the file does not
depend on the batch size, on interruptions or on the number of processes. Under torchrun the
batches go round-robin to the ranks, which append them in turn: the same single file results.
Every check that can fail runs before the output file is touched.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from scoretk import assemble
from scoretk.execution.batch_threads import split_batches
from scoretk.checkpoint import (CheckpointError, RunDir, load_checkpoint, most_recent_run,
                                sha256_file)
from scoretk.execution.cpu_memory import keep_freed_memory
from scoretk.execution.distributed import Dist, pick_device, setup_distributed
from scoretk.recipe import Recipe, RecipeError, apply_overrides, parse_override
from scoretk.registry import Registry
from scoretk.rng import PerSampleNoise, derive_seed
from scoretk.store import SampleStore, StoreError, write_grid_from_file

OVERRIDABLE = ("sampler", "sample")
"""Recipe sections `-o` may change when sampling; the rest is fixed by the trained weights."""


def find_checkpoint(run_dir: str | None, checkpoint: str | None,
                    recorded: str | None = None) -> Path:
    """--checkpoint, else --run's latest, else the file's own checkpoint (resume), else the
    most recent run under runs/."""
    if checkpoint and run_dir:
        raise StoreError("give either --checkpoint or --run, not both")
    if checkpoint:
        return Path(checkpoint)
    if run_dir:
        run = RunDir(run_dir)
        if not run.path.is_dir():
            raise CheckpointError(f"{run.path}: run directory not found")
        latest = run.latest()
        if latest is None:
            raise CheckpointError(f"{run.path}: no checkpoint in {run.checkpoints}")
        return latest
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    run = most_recent_run()
    if run is None:
        raise CheckpointError("no checkpoint: pass --checkpoint FILE or --run DIR (no run with "
                              "a checkpoint under runs/)")
    return run.latest()


def _check_overrides(overrides: Sequence[str]) -> None:
    for text in overrides:
        keys, _ = parse_override(text)
        if keys[0] not in OVERRIDABLE:
            raise RecipeError("-o", ".".join(keys), "only sampler.* and sample.* can be "
                              "overridden when sampling; the rest is fixed by the checkpoint")


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept weights saved from a DDP or torch.compile wrapper."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def load_model(ckpt: Path, state: dict[str, Any], recipe: Recipe, registry: Registry,
               device: torch.device, raw_weights: bool) -> tuple[assemble.Model, nn.Module, Any]:
    """Rebuild schedule, net, sampler and averager from the checkpoint (weights loaded)."""
    shape = tuple(int(n) for n in state["shape"])
    model = assemble.build_model(recipe, registry, shape)
    net = model.net
    try:
        net.load_state_dict(_strip_prefixes(state["model"]))
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{ckpt}: the weights do not fit the recipe's net "
                              f"({_first_line(exc)})") from None
    net.to(device).eval()
    model.schedule.sigmas = model.schedule.sigmas.to(device)
    averager = assemble.build_averager(recipe, registry, net)
    if not raw_weights:
        try:
            averager.load_state_dict(state["averager"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{ckpt}: averager state does not fit ({_first_line(exc)}); "
                                  "--raw-weights samples without it") from None
    return model, net, averager


def init_rows(data: Any, seed: int, indices: range) -> Tensor:
    """Starting data for a data+noise init: item for sample i chosen by (seed, i) alone."""
    idx = torch.tensor([derive_seed(seed, "init", i) % len(data) for i in indices])
    return data.batch(idx)


@dataclass
class _Job:
    """Everything resolved before the output file is touched."""

    recipe: Recipe
    model: assemble.Model
    net: nn.Module
    sample_net: nn.Module  # what the sampler calls: `net`, or `net` split across CPU threads
    averager: Any
    attrs: dict[str, Any]
    num_samples: int
    batch_size: int
    seed: int
    raw_weights: bool
    keep_float: bool
    evals: int
    device: torch.device


def run_sampling(*, registry: Registry, out: str, run_dir: str | None = None,
                 checkpoint: str | None = None, num_samples: int | None = None,
                 batch_size: int | None = None, seed: int | None = None, resume: bool = False,
                 force: bool = False, raw_weights: bool = False, keep_float: bool = False,
                 device: str = "auto", grid: str | None = None,
                 overrides: Sequence[str] = ()) -> Path:
    """Fill `out` with samples (see the module docstring); returns the output path."""
    out_path = Path(out)
    _check_arguments(out_path, num_samples, batch_size, resume, force, grid)
    _check_overrides(overrides)
    dist = setup_distributed(device)
    writer: SampleStore | None = None  # rank 0's hold on the file: a second run is refused
    try:
        existing = SampleStore(out_path) if resume and out_path.exists() else None
        job = _prepare(dist, registry, existing, run_dir, checkpoint, num_samples, batch_size,
                       seed, raw_weights, keep_float, device, list(overrides))
        if existing:
            existing.check_matches(job.attrs, job.model.shape, job.keep_float)
            if existing.complete:
                if dist.is_main:
                    print(f"{out_path}: already complete ({existing.num_written} samples)")
                    if grid:
                        _write_grid(out_path, grid, existing.is_image)
                return out_path
        dist.barrier()  # every rank has checked the file before rank 0 touches it
        if dist.is_main:
            if existing:
                existing.trim()
                writer = existing
            else:
                writer = SampleStore.create(out_path, job.model.shape, job.attrs,
                                            keep_float=job.keep_float)
        dist.barrier()
        store = SampleStore(out_path)
        start, t0 = store.num_written, time.perf_counter()
        try:
            _generate(job, store, dist, registry)
        except KeyboardInterrupt:
            if dist.is_main:
                print(f"\ninterrupted: {out_path} is valid and holds "
                      f"{SampleStore(out_path).num_written} samples; `scoretk sample --out "
                      f"{out_path} --resume` continues it", file=sys.stderr)
            raise
        elapsed = time.perf_counter() - t0
        if dist.is_main:
            made = job.num_samples - start
            rate = made / elapsed if elapsed > 0 else float("inf")
            print(f"wrote {out_path}: {job.num_samples} samples ({made} new) in {elapsed:.1f} s, "
                  f"{rate:.1f} samples/s, {rate * job.evals:.0f} evaluations/s")
            if grid:
                _write_grid(out_path, grid, store.is_image)
        return out_path
    finally:
        if writer is not None:
            writer.close()
        dist.shutdown()


def _check_arguments(out: Path, num_samples: int | None, batch_size: int | None, resume: bool,
                     force: bool, grid: str | None) -> None:
    if num_samples is not None and num_samples <= 0:
        raise StoreError(f"-n/--num-samples must be positive (got {num_samples})")
    if batch_size is not None and batch_size <= 0:
        raise StoreError(f"--batch-size must be positive (got {batch_size})")
    if resume and force:
        raise StoreError("--resume continues a file and --force overwrites it: give one")
    for opt, path in (("--out", out), ("--grid", Path(grid) if grid else None)):
        if path is None:
            continue
        if path.is_dir():
            raise StoreError(f"{opt} {path}: is a directory, expected a file name")
        if not path.parent.is_dir():
            raise StoreError(f"{opt} {path}: directory {path.parent} does not exist")
    if out.exists() and not (resume or force):
        raise StoreError(f"{out} already exists; --resume continues it, --force overwrites it")


def _prepare(dist: Dist, registry: Registry, existing: SampleStore | None, run_dir: str | None,
             checkpoint: str | None, num_samples: int | None, batch_size: int | None,
             seed: int | None, raw_weights: bool, keep_float: bool, device_name: str,
             overrides: list[str]) -> _Job:
    """Checkpoint -> recipe (+ overrides) -> model with weights; a resume defaults to the
    file's checkpoint, sampler settings, N, seed and flags."""
    fa = existing.attrs if existing else {}
    ckpt = find_checkpoint(run_dir, checkpoint, fa.get("checkpoint"))
    state = load_checkpoint(ckpt)
    sha = sha256_file(ckpt)
    if existing and fa.get("checkpoint_sha256") != sha:
        raise StoreError(f"{existing.path}: cannot resume, it was started from another "
                         f"checkpoint ({fa.get('checkpoint')}, checkpoint_sha256 differs); "
                         "pass that one with --checkpoint, or --force to start over")
    missing = [k for k in ("model", "recipe", "shape") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint lacks {', '.join(map(repr, missing))}")
    raw = dict(state["recipe"])
    if existing:
        file_recipe = json.loads(fa["recipe"])
        raw.update({s: file_recipe[s] for s in OVERRIDABLE if s in file_recipe})
    recipe = Recipe.from_dict(apply_overrides(raw, overrides), registry, source=str(ckpt))
    raw_weights = raw_weights or bool(fa.get("raw_weights"))
    keep_float = keep_float or bool(fa.get("keep_float"))
    device = pick_device(device_name, dist)
    if device.type == "cpu":
        keep_freed_memory()
    model, net, averager = load_model(ckpt, state, recipe, registry, device, raw_weights)

    n = num_samples or fa.get("num_samples") or recipe.sample.num_samples
    b = batch_size or fa.get("batch_size") or recipe.sample.batch_size
    seed = seed if seed is not None else fa.get("seed", recipe.sample.seed)
    evals = model.sampler.evaluations_per_sample(model.schedule)
    try:
        settings = model.sampler.settings(model.schedule)
    except ValueError as exc:
        raise RecipeError(str(ckpt), None, str(exc)) from None
    sig = model.schedule.sigmas
    settings = {"kind": recipe.sampler.kind, "num_levels": model.schedule.num_levels,
                "sigma_max": float(sig[0]), "sigma_min": float(sig[-1]),
                "evaluations_per_sample": evals, **settings}
    attrs = {"recipe": recipe.dump(), "checkpoint": str(ckpt.resolve()),
             "checkpoint_sha256": sha, "checkpoint_step": state.get("step"),
             "sampler_settings": settings, "seed": int(seed), "num_samples": int(n),
             "batch_size": int(b), "raw_weights": bool(raw_weights), "world_size": dist.world}
    sample_net = split_batches(net, recipe.sample.batch_threads, device)
    return _Job(recipe, model, net, sample_net, averager, attrs, int(n), int(b), int(seed),
                raw_weights, keep_float, evals, device)


def _generate(job: _Job, store: SampleStore, dist: Dist, registry: Registry) -> None:
    """Sample the missing rows: batch k of the rest goes to rank k % world; ranks append in
    batch order, one at a time, so the file is the single-process one."""
    data = None
    if job.model.sampler.starts_from_data:
        data = assemble.build_data(job.recipe, registry)
    n, b, start = job.num_samples, job.batch_size, store.num_written
    weights = contextlib.nullcontext() if job.raw_weights else job.averager.averaged(job.net)
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


def _sample_batch(job: _Job, indices: range, data: Any, bar: "_Progress") -> Tensor:
    noise = PerSampleNoise(job.seed, indices, job.device)
    init = init_rows(data, job.seed, indices).to(job.device) if data is not None else None
    x = job.model.sampler.sample(job.sample_net, job.model.schedule, job.model.shape, noise,
                                 device=job.device, init=init, progress=bar.within_batch)
    return x.float().cpu()


def _write_grid(out: Path, grid: str, is_image: bool) -> None:
    write_grid_from_file(out, grid, 64 if is_image else 5000)
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
