"""One resolution step: request + the file being resumed + the checkpoint's recipe -> a job.

Precedence is decided here and only here: the command line, then the attributes of the file
being resumed, then the recipe's `sample` section. The model comes from a checkpoint, or, for
a net with no trainable parameters (an exact score from a plugin), from a recipe alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scoretk import assemble
from scoretk.checkpoint import (BEST, CheckpointError, RunDir, load_checkpoint, most_recent_run,
                                sha256_file)
from scoretk.components import Averager
from scoretk.execution.policy import ExecutionPolicy
from scoretk.generation.control import Control, resolve_control
from scoretk.generation.request import ModelChoice, SampleRequest
from scoretk.interop.weights import SUFFIX, exported_weights_are_raw, load_exported
from scoretk.recipe import (SAMPLING_SECTIONS, Override, Recipe, RecipeError, read_yaml,
                            with_overrides)
from scoretk.registry import Registry
from scoretk.store import SampleStore, StoreError


NO_CHECKPOINT = "none"
"""The `checkpoint` attribute of a file sampled from a recipe alone."""


@dataclass
class ModelSource:
    """A model with its weights in place on the device, and where it came from."""

    recipe: Recipe
    model: assemble.Model  # schedule, net, sampler, item shape
    averager: Averager | None  # None: the net is used as it is (raw or exported weights, none)
    raw_weights: bool  # as recorded: --raw-weights, or an export of the raw weights
    attrs: dict[str, Any]  # checkpoint path, sha256 and step; or no checkpoint and the recipe file
    name: str  # the file the recipe came from, for error messages


@dataclass
class SampleJob:
    """Everything resolved before the output file is touched."""

    recipe: Recipe
    model: assemble.Model  # schedule, net (weights loaded, on the device), sampler, item shape
    averager: Averager | None  # None: sample the net as it is
    sample_net: nn.Module  # what the sampler calls: the net, or the net split across threads
    attrs: dict[str, Any]  # provenance stored with the samples
    num_samples: int
    batch_size: int
    seed: int
    keep_float: bool
    evals: int  # network evaluations per sample (the budget; adaptive solvers may use fewer)
    device: torch.device
    control: Control  # the condition and noise of each batch


def find_checkpoint(request: ModelChoice, recorded: str | None = None) -> Path:
    """--checkpoint, else --run's latest (or its best.pt), else the file's own checkpoint
    (resume), else the
    most recent run under runs/."""
    if request.checkpoint:
        return request.checkpoint
    if request.run_dir:
        run = RunDir(request.run_dir)
        if not run.path.is_dir():
            raise CheckpointError(f"{run.path}: run directory not found")
        if request.best:
            best = run.kept(BEST)
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
    """Checkpoint (or recipe) -> recipe (+ the file's and the command line's sampler
    settings) -> model with weights; a resume defaults to the file's model, settings, N,
    seed, flags and control options."""
    fa = existing.attrs if existing else {}
    src = load_source(request, registry, policy.device, fa)
    if existing:
        _check_same_source(existing, src)
    recipe, model = src.recipe, src.model
    keep_float = request.keep_float or bool(fa.get("keep_float"))
    n = request.num_samples or fa.get("num_samples") or recipe.sample.num_samples
    b = request.batch_size or fa.get("batch_size") or recipe.sample.batch_size
    seed = request.seed if request.seed is not None else fa.get("seed", recipe.sample.seed)
    control = resolve_control(request.control, fa, recipe, model, registry, int(n),
                              request.out)
    attrs = {"recipe": recipe.dump(), **src.attrs,
             "sampler_settings": sampler_provenance(src.name, recipe, model),
             "seed": int(seed), "num_samples": int(n), "batch_size": int(b),
             "raw_weights": src.raw_weights, "world_size": policy.dist.world,
             "control": control.provenance}
    sample_net = policy.replace(batch_threads=recipe.sample.batch_threads).for_sampling_net(
        model.net)
    try:
        model.sampler.check_net(sample_net)
    except ValueError as exc:
        raise RecipeError(src.name, "sampler", str(exc)) from None
    return SampleJob(recipe, model, src.averager, sample_net, attrs, int(n), int(b), int(seed),
                     keep_float, attrs["sampler_settings"]["evaluations_per_sample"],
                     policy.device, control)


def load_source(choice: ModelChoice, registry: Registry, device: torch.device,
                file_attrs: dict[str, Any] | None = None) -> ModelSource:
    """The model `choice` names, on `device`: a checkpoint's (its averaged weights unless
    raw_weights), or a recipe's net that has nothing to train. `file_attrs`: the resumed
    file's, which supply what the choice leaves open."""
    fa = file_attrs or {}
    from_file = fa.get("checkpoint") == NO_CHECKPOINT and not (choice.checkpoint or choice.run_dir)
    if choice.recipe or from_file:
        return _from_recipe(choice, registry, device, fa)
    return _from_checkpoint(choice, registry, device, fa)


def _from_checkpoint(choice: ModelChoice, registry: Registry, device: torch.device,
                     fa: dict[str, Any]) -> ModelSource:
    ckpt = find_checkpoint(choice, fa.get("checkpoint"))
    exported = ckpt.suffix == SUFFIX  # `scoretk export`: one set of weights, no averager
    state = load_exported(ckpt) if exported else load_checkpoint(ckpt)
    missing = [k for k in ("model", "recipe", "shape") if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt}: checkpoint lacks {', '.join(map(repr, missing))}")
    recipe = _recipe(dict(state["recipe"]), str(ckpt), fa, choice.overrides, registry)
    raw_weights = choice.raw_weights or bool(fa.get("raw_weights"))
    if exported:
        raw_weights = exported_weights_are_raw(ckpt, state, raw_weights)
    model, averager = load_model(ckpt, state, recipe, registry, device, raw_weights or exported)
    attrs = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": sha256_file(ckpt),
             "checkpoint_step": state.get("step")}
    averaged = not (raw_weights or exported)
    return ModelSource(recipe, model, averager if averaged else None, bool(raw_weights), attrs,
                       str(ckpt))


def _from_recipe(choice: ModelChoice, registry: Registry, device: torch.device,
                 fa: dict[str, Any]) -> ModelSource:
    """The recipe file (or the resumed file's recipe), its `auto` values resolved from the
    data, and its net, which must have no trainable parameters: there are no weights."""
    if choice.recipe:
        name, raw = str(choice.recipe), read_yaml(choice.recipe)
        if not isinstance(raw, dict):
            raise RecipeError(name, None, "a recipe must be a mapping of sections")
    else:
        name, raw = "the resumed file's recipe", json.loads(fa["recipe"])
    recipe, shape = _resolved(_recipe(raw, name, fa, choice.overrides, registry), registry, name)
    model = assemble.build_model(recipe, registry, shape)
    trainable = sum(p.numel() for p in model.net.parameters() if p.requires_grad)
    if trainable:
        raise RecipeError(name, "net", f"{recipe.net.kind!r} has {trainable:,} trainable "
                          "parameters: sample its trained weights (--checkpoint FILE or --run "
                          "DIR); --recipe alone samples nets with none (exact scores)")
    model.net.to(device).eval()
    model.schedule.sigmas = model.schedule.sigmas.to(device)
    recipe_file = str(choice.recipe.resolve()) if choice.recipe else fa.get("recipe_file")
    return ModelSource(recipe, model, None, False,
                       {"checkpoint": NO_CHECKPOINT, "recipe_file": recipe_file}, name)


def _resolved(recipe: Recipe, registry: Registry, name: str) -> tuple[Recipe, tuple[int, ...]]:
    """The recipe with its data-driven (`auto`) values filled in, and the item shape: from
    the data params where they tell, else from the data (built once, only if needed)."""
    data = None
    if assemble.needs_data(recipe):
        data = assemble.build_data(recipe, registry)
        try:
            recipe = assemble.resolve(recipe, data)
        except ValueError as exc:
            raise RecipeError(name, None, str(exc)) from None
    shape = assemble.data_shape(recipe)
    if shape is None:
        data = data if data is not None else assemble.build_data(recipe, registry)
        shape = tuple(data.shape)
    return recipe, shape


def _check_same_source(existing: SampleStore, src: ModelSource) -> None:
    """A resume samples the model the file was started with (the rest of its settings are
    compared by `SampleStore.check_matches`)."""
    fa = existing.attrs
    if fa.get("checkpoint_sha256") == src.attrs.get("checkpoint_sha256"):
        return
    if fa.get("checkpoint") == NO_CHECKPOINT:
        was = "sampled from its recipe alone (no checkpoint); resume it without --checkpoint/--run"
    elif src.attrs["checkpoint"] == NO_CHECKPOINT:
        was = f"started from checkpoint {fa.get('checkpoint')}; resume it without --recipe"
    else:
        was = (f"started from another checkpoint ({fa.get('checkpoint')}, checkpoint_sha256 "
               "differs); pass that one with --checkpoint")
    raise StoreError(f"{existing.path}: cannot resume, it was {was}, or --force to start over")


def _recipe(raw: dict[str, Any], source: str, file_attrs: dict[str, Any],
            overrides: tuple[Override, ...], registry: Registry) -> Recipe:
    """The checkpoint's (or recipe file's) recipe, with the resumed file's sampler/sample
    sections, then the command line's overrides."""
    raw = dict(raw)
    if file_attrs:
        stored = json.loads(file_attrs["recipe"])
        raw.update({s: v for s, v in stored.items() if s in SAMPLING_SECTIONS})
    return with_overrides(raw, overrides, registry, source=source)


def sampler_provenance(source: str, recipe: Recipe, model: assemble.Model) -> dict[str, Any]:
    """The sampler's resolved settings with the schedule facts and cost beside them."""
    schedule, sampler = model.schedule, model.sampler
    try:
        own = sampler.settings(schedule)
    except ValueError as exc:
        raise RecipeError(source, "sampler", str(exc)) from None
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

