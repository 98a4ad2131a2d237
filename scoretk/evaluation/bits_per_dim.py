"""`scoretk likelihood`: bits per dimension of a model on its recipe's data, by the
probability-flow ODE (scoretk.evaluation.likelihood; docs/theory.md#likelihood).

The items are a fixed random subset (by the seed) of the data the model never saw where the
dataset has a held-out split; images are dequantised uniformly (8 bits: the figure is a bound
on the discrete likelihood). Item i's dequantisation and Hutchinson vector come from
(seed, i) alone, so the batch size changes the figure only through an adaptive solver's step
choice (which follows the whole batch's error).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from scoretk.evaluation.likelihood import dequantise, log_likelihood
from scoretk.execution.policy import ExecutionPolicy
from scoretk.generation.control import heldout_data
from scoretk.generation.job import NO_CHECKPOINT, ModelSource, load_source
from scoretk.generation.request import check_counts, check_model_choice
from scoretk.recipe import Override, RecipeError
from scoretk.registry import Registry
from scoretk.rng import PerSampleNoise
from scoretk.score import accepts_any_sigma
from scoretk.store import StoreError

Solver = Literal["auto", "adaptive", "heun"]


@dataclass(frozen=True)
class LikelihoodRequest:
    """`scoretk likelihood`'s options (the model as for `scoretk sample`)."""

    num_samples: int
    batch_size: int = 100
    seed: int = 0
    checkpoint: Path | None = None
    run_dir: Path | None = None
    recipe: Path | None = None
    raw_weights: bool = False
    best: bool = False
    device: str = "auto"
    solver: Solver = "auto"
    tolerance: float = 1e-5
    overrides: tuple[Override, ...] = ()

    def check(self) -> None:
        check_counts(**{"-n/--num-samples": self.num_samples, "--batch-size": self.batch_size})
        check_model_choice(self)
        if not self.tolerance > 0:
            raise StoreError(f"--tolerance must be positive (got {self.tolerance})")


def choose_solver(asked: Solver, src: ModelSource) -> str:
    """auto: the adaptive solver where torchdiffeq is installed and the net accepts any
    sigma, else Heun steps through the schedule's sigmas; adaptive asked for where it
    cannot run is one line."""
    installed = importlib.util.find_spec("torchdiffeq") is not None
    if asked == "auto":
        return "adaptive" if installed and accepts_any_sigma(src.model.net) else "heun"
    if asked == "adaptive" and not installed:
        raise StoreError("--solver adaptive needs torchdiffeq: pip install 'scoretk[ode]', "
                         "or --solver heun")
    if asked == "adaptive" and not accepts_any_sigma(src.model.net):
        raise RecipeError(src.name, "net", f"{src.recipe.net.kind!r} knows only its noise "
                          "levels; --solver adaptive evaluates others: use --solver heun")
    return asked


def measure(request: LikelihoodRequest, registry: Registry,
            progress: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Bits per dimension of the chosen model on `num_samples` items (fewer if the data hold
    fewer), with its spread and network evaluations; `progress(items done, items, evaluations
    per item of the last batch)` after each batch."""
    request.check()
    device = ExecutionPolicy.for_sampling(request.device).device
    src = load_source(request, registry, device)
    data, described = heldout_data(src.recipe, registry)
    n = min(request.num_samples, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(request.seed))[:n]
    solver = choose_solver(request.solver, src)
    bits, evaluations, t0 = [], 0, time.perf_counter()
    with _weights(src):
        for a in range(0, n, request.batch_size):
            rows = range(a, min(a + request.batch_size, n))
            batch_bits, evals = _batch(src, data, order[a:rows.stop], rows, request, solver)
            bits.append(batch_bits)
            evaluations += evals * len(rows)
            if progress is not None:
                progress(rows.stop, n, evals)
    bits = torch.cat(bits).double()
    return {"bits_per_dim": float(bits.mean()),
            "standard_error": float(bits.std() / math.sqrt(n)) if n > 1 else None,
            "items": n, "asked": request.num_samples, "data": described,
            "dequantised": data.is_image, "evaluations_per_item": evaluations / n,
            "solver": solver, "tolerance": request.tolerance if solver == "adaptive" else None,
            "model": src.name, "weights": _weights_name(src),
            "checkpoint_step": src.attrs.get("checkpoint_step"),
            "seconds": time.perf_counter() - t0}


def _batch(src: ModelSource, data, picks: torch.Tensor, rows: range,
           request: LikelihoodRequest, solver: str) -> tuple[torch.Tensor, int]:
    """(bits per dimension of each item, evaluations per item) for one batch."""
    device = src.model.schedule.sigmas.device
    x = data.batch(picks).float().to(device)
    noise = PerSampleNoise(request.seed, rows, device)
    if data.is_image:
        x = dequantise(x, noise)
    result = log_likelihood(src.model.net, src.model.schedule, x, noise, solver=solver,
                            rtol=request.tolerance, atol=request.tolerance)
    return result.bits_per_dim(256 if data.is_image else None).cpu(), result.evaluations


def _weights(src: ModelSource) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if src.averager is None else src.averager.averaged(
        src.model.net)


def _weights_name(src: ModelSource) -> str:
    if src.attrs.get("checkpoint") == NO_CHECKPOINT:
        return "no"
    return "raw" if src.raw_weights else "averaged"


def format_table(res: dict[str, Any]) -> str:
    """The small table `scoretk likelihood` prints."""
    step = f", step {res['checkpoint_step']}" if res["checkpoint_step"] is not None else ""
    solver = res["solver"] + (f" (dopri5, rtol = atol = {res['tolerance']:g})"
                              if res["tolerance"] is not None else " (the schedule's sigmas)")
    deq = "uniform dequantisation of 8-bit values; " if res["dequantised"] else ""
    err = res["standard_error"]
    lines = [f"model: {res['model']}{step}, {res['weights']} weights",
             f"data: {res['items']} items of {res['data']}",
             f"probability-flow ODE, {solver}; {deq}Hutchinson trace estimator",
             f"{'metric':<30}{'value':>12}",
             f"{'bits per dimension':<30}{res['bits_per_dim']:>12.4f}",
             f"{'standard error':<30}{'n/a' if err is None else f'{err:.4f}':>12}",
             f"{'network evaluations per item':<30}{res['evaluations_per_item']:>12.1f}"]
    return "\n".join(lines)
