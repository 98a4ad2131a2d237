"""`scoretk import`: a released NCSN/NCSNv2 checkpoint -> a scoretk run directory.

The run holds the resolved recipe and one checkpoint at the file's step, with the raw weights,
the EMA weights as the averager's state and the Adam state under scoretk's parameters, so
`scoretk sample --run DIR` samples with the averaged weights and `scoretk train RECIPE
--run-dir DIR` resumes training where the released run stopped. Everything is checked before
anything is written, and the run is built in a temporary directory beside the target and
renamed into place: a refused or interrupted import leaves nothing behind.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import scoretk
from scoretk import assemble
from scoretk.checkpoint import CheckpointError, RunDir, sha256_file
from scoretk.interop.reference import (CLASS_NAMES, ReleasedCheckpoint, adam_step,
                                       convert_adam_state, convert_weights, ema_weights,
                                       read_released)
from scoretk.recipe import Recipe, RecipeError
from scoretk.registry import Registry
from scoretk.training.step import make_optimiser


@dataclass
class Imported:
    """What `import_released` wrote, for the command's summary line."""

    run_dir: Path
    checkpoint: Path
    step: int
    net: str
    layout: str
    parameters: int
    ema: bool


def import_released(path: str | Path, recipe: Recipe, registry: Registry,
                    run_dir: str | Path) -> Imported:
    """Convert the released checkpoint at `path` into a new run directory `run_dir`."""
    path, run_dir = Path(path), Path(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise CheckpointError(f"{run_dir}: already exists; import into a new run directory")
    resolved, shape = _resolved_recipe(recipe)
    ckpt = read_released(path)
    state = _checkpoint_state(ckpt, resolved, registry, shape)
    state["imported_from"] = {"file": str(path.resolve()), "sha256": sha256_file(path),
                              "layout": ckpt.layout, "net": CLASS_NAMES[ckpt.kind]}
    written = _write_run(run_dir, resolved, state)
    return Imported(run_dir, written, state["step"], CLASS_NAMES[ckpt.kind], ckpt.layout,
                    sum(t.numel() for t in state["model"].values()), ckpt.ema is not None)


def _resolved_recipe(recipe: Recipe) -> tuple[Recipe, tuple[int, ...]]:
    """The recipe as training would store it, without touching the data: what would come from
    the data must be given, and the item shape must follow from the data section."""
    try:
        resolved = assemble.resolve(recipe, None)
    except ValueError as exc:
        raise RecipeError(recipe.name, None, f"{exc}; an imported checkpoint needs the "
                          "released value (-o KEY=VALUE)") from None
    shape = assemble.data_shape(recipe)
    if shape is None:
        raise RecipeError(recipe.name, "data", f"dataset {recipe.data.kind!r} cannot tell its "
                          "item shape without the data; give a dataset that can (image_size)")
    return resolved, shape


def _checkpoint_state(ckpt: ReleasedCheckpoint, recipe: Recipe, registry: Registry,
                      shape: tuple[int, ...]) -> dict:
    """The scoretk checkpoint (as `scoretk train` writes it) for the released file."""
    model = assemble.build_model(recipe, registry, shape)
    net, kind = model.net, recipe.net.kind
    raw = convert_weights(ckpt, net, kind, model.schedule.sigmas)
    adam = convert_adam_state(ckpt, net, kind)
    ema = ema_weights(ckpt, net, kind)
    if ema is not None and recipe.averager.kind == "none":
        raise RecipeError(recipe.name, "averager", "is 'none' but the file holds EMA weights "
                          "(the released samples use them); use averager.kind ema")
    net.load_state_dict(raw)
    optimiser = make_optimiser(net, recipe.optim)
    adam_state = optimiser.state_dict()
    adam_state["state"] = adam
    optimiser.load_state_dict(adam_state)
    step = ckpt.step if ckpt.step is not None else adam_step(ckpt)
    return {"model": net.state_dict(), "optimizer": optimiser.state_dict(),
            "averager": _averager_state(recipe, registry, net, ema, step), "step": step,
            "recipe": recipe.dump(), "shape": list(shape),
            "scoretk_version": scoretk.__version__, "torch_version": str(torch.__version__)}


def _averager_state(recipe: Recipe, registry: Registry, net: nn.Module,
                    ema: dict[str, torch.Tensor] | None, step: int) -> dict:
    """The recipe's averager, built on a copy of the net holding the file's EMA weights (or
    the raw ones, where the file has none), as if it had averaged `step` updates."""
    averaged = copy.deepcopy(net)
    if ema is not None:
        averaged.load_state_dict(ema)
    state = assemble.build_averager(recipe, registry, averaged).state_dict()
    if "n" in state:  # updates seen: the EMA's warm-up schedule reads it
        state["n"] = step
    return state


def _write_run(run_dir: Path, recipe: Recipe, state: dict) -> Path:
    """recipe.yaml, checkpoints/ckpt-<step>.pt and `latest`, written in a temporary directory
    beside `run_dir` and renamed into place. Missing parent directories are created (as
    `scoretk train` does for its runs), once every check has passed."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.import-", dir=run_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the run from other users
        run = RunDir(tmp).create()
        run.write_text(run.recipe, recipe.to_yaml(), "resolved recipe")  # listed as scoretk's
        written = run.save(state, state["step"], keep=1)
        if run_dir.exists():
            run_dir.rmdir()  # empty (checked above); rename needs the name free
        os.rename(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / written.relative_to(tmp)
