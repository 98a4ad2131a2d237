"""One resolution step: request + the file being resumed + the checkpoint's recipe -> a job.

Precedence is decided here and only here: the command line, then the attributes of the file
being resumed, then the recipe's `sample` section.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scoretk import assemble
from scoretk.checkpoint import (CheckpointError, RunDir, load_checkpoint, most_recent_run,
                                sha256_file)
from scoretk.components import Averager
from scoretk.execution.policy import ExecutionPolicy
from scoretk.generation.request import SampleRequest
from scoretk.interop.weights import SUFFIX, exported_weights_are_raw, load_exported
from scoretk.recipe import SAMPLING_SECTIONS, Recipe, RecipeError, with_overrides
from scoretk.registry import Registry
from scoretk.store import SampleStore, StoreError


@dataclass
class SampleJob:
    """Everything resolved before the output file is touched."""

    recipe: Recipe
    model: assemble.Model  # schedule, net (weights loaded, on the device), sampler, item shape
    averager: Averager
    sample_net: nn.Module  # what the sampler calls: the net, or the net split across threads
    attrs: dict[str, Any]  # provenance stored with the samples
    num_samples: int
    batch_size: int
    seed: int
    raw_weights: bool
    keep_float: bool
    evals: int  # network evaluations per sample
    device: torch.device


def find_checkpoint(request: SampleRequest, recorded: str | None = None) -> Path:
    """--checkpoint, else --run's latest (or its best.pt), else the file's own checkpoint (resume), else the
    most recent run under runs/."""
    if request.checkpoint:
        return request.checkpoint
    if request.run_dir:
        run = RunDir(request.run_dir)
        if not run.path.is_dir():
            raise CheckpointError(f"{run.path}: run directory not found")
        if request.best:
            best = run.checkpoints / "best.pt"
            if not best.is_file():
                raise CheckpointError(f"{run.path}: no {best.name} in {run.checkpoints} "
                                      "(training keeps it when train.eval_every is set)")
            return best
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


def resolve_job(request: SampleRequest, registry: Registry, policy: ExecutionPolicy,
                existing: SampleStore | None) -> SampleJob:
    """Checkpoint -> recipe (+ the file's and the command line's sampler settings) -> model
    with weights; a resume defaults to the file's checkpoint, settings, N, seed and flags."""
    fa = existing.attrs if existing else {}
    ckpt = find_checkpoint(request, fa.get("checkpoint"))
    exported = ckpt.suffix == SUFFIX  # `scoretk export`: one set of weights, no averager
    state = load_exported(ckpt) if exported else load_checkpoint(ckpt)
    sha = sha256_file(ckpt)
    if existing and fa.get("checkpoint_sha256") != sha:
        raise StoreError(f"{existing.path}: cannot resume, it was started from another "
                         f"checkpoint ({fa.get('checkpoint')}, checkpoint_sha256 differs); "
                         "pass that one with --checkpoint, or --force to start over")
    recipe = _recipe(ckpt, state, fa, request, registry)
    raw_weights = request.raw_weights or bool(fa.get("raw_weights"))
    if exported:
        raw_weights = exported_weights_are_raw(ckpt, state, raw_weights)
    keep_float = request.keep_float or bool(fa.get("keep_float"))
    model, averager = load_model(ckpt, state, recipe, registry, policy.device,
                                 raw_weights or exported)
    n = request.num_samples or fa.get("num_samples") or recipe.sample.num_samples
    b = request.batch_size or fa.get("batch_size") or recipe.sample.batch_size
    seed = request.seed if request.seed is not None else fa.get("seed", recipe.sample.seed)
    attrs = {"recipe": recipe.dump(), "checkpoint": str(ckpt.resolve()),
             "checkpoint_sha256": sha, "checkpoint_step": state.get("step"),
             "sampler_settings": sampler_provenance(ckpt, recipe, model),
             "seed": int(seed), "num_samples": int(n), "batch_size": int(b),
             "raw_weights": bool(raw_weights), "world_size": policy.dist.world}
    sample_net = policy.replace(batch_threads=recipe.sample.batch_threads).for_sampling_net(
        model.net)
    try:
        model.sampler.check_net(sample_net)
    except ValueError as exc:
        raise RecipeError(str(ckpt), "sampler", str(exc)) from None
    return SampleJob(recipe, model, averager, sample_net, attrs, int(n), int(b), int(seed),
                     raw_weights or exported, keep_float,
                     attrs["sampler_settings"]["evaluations_per_sample"], policy.device)


def _recipe(ckpt: Path, state: dict[str, Any], file_attrs: dict[str, Any],
            request: SampleRequest, registry: Registry) -> Recipe:
    """The checkpoint's recipe, with the resumed file's sampler/sample sections, then the
    command line's overrides."""
    missing = [k for k in ("model", "recipe", "shape") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint lacks {', '.join(map(repr, missing))}")
    raw = dict(state["recipe"])
    if file_attrs:
        stored = json.loads(file_attrs["recipe"])
        raw.update({s: v for s, v in stored.items() if s in SAMPLING_SECTIONS})
    return with_overrides(raw, request.overrides, registry, source=str(ckpt))


def sampler_provenance(ckpt: Path, recipe: Recipe, model: assemble.Model) -> dict[str, Any]:
    """The sampler's resolved settings with the schedule facts and cost beside them."""
    schedule, sampler = model.schedule, model.sampler
    try:
        own = sampler.settings(schedule)
    except ValueError as exc:
        raise RecipeError(str(ckpt), "sampler", str(exc)) from None
    sig = schedule.sigmas
    return {**own, "kind": recipe.sampler.kind, "num_levels": schedule.num_levels,
            "sigma_max": float(sig[0]), "sigma_min": float(sig[-1]),
            "evaluations_per_sample": sampler.evaluations_per_sample(schedule)}


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept weights saved from a DDP or torch.compile wrapper."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def load_model(ckpt: Path, state: dict[str, Any], recipe: Recipe, registry: Registry,
               device: torch.device, raw_weights: bool) -> tuple[assemble.Model, Averager]:
    """Rebuild schedule, net, sampler and averager from the checkpoint (weights loaded)."""
    model = assemble.build_model(recipe, registry, tuple(int(n) for n in state["shape"]))
    try:
        model.net.load_state_dict(_strip_prefixes(state["model"]))
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{ckpt}: the weights do not fit the recipe's net "
                              f"({_first_line(exc)})") from None
    model.net.to(device).eval()
    model.schedule.sigmas = model.schedule.sigmas.to(device)
    averager = assemble.build_averager(recipe, registry, model.net)
    if not raw_weights:
        try:
            averager.load_state_dict(state["averager"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{ckpt}: averager state does not fit ({_first_line(exc)}); "
                                  "--raw-weights samples without it") from None
    return model, averager

