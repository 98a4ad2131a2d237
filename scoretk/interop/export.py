"""`scoretk export (--run DIR | --checkpoint FILE) --out MODEL.safetensors [--raw-weights]`."""
from __future__ import annotations

from pathlib import Path

import torch

from scoretk.checkpoint import load_checkpoint
from scoretk.interop.weights import SUFFIX, chosen_weights, export_weights
from scoretk.recipe import Recipe
from scoretk.registry import Registry
from scoretk.generation.job import find_checkpoint, load_model
from scoretk.generation.request import SampleRequest
from scoretk.store import StoreError


def export_run(registry: Registry, out: str | Path, run_dir: str | None = None,
               checkpoint: str | None = None, raw_weights: bool = False,
               force: bool = False) -> tuple[Path, int]:
    """Write the checkpoint's averaged (or raw) weights to `out`; returns (checkpoint, step)."""
    out = Path(out)
    if not (run_dir or checkpoint):
        raise StoreError("give --run DIR or --checkpoint FILE")
    if out.suffix != SUFFIX:
        raise StoreError(f"--out {out}: the name must end in {SUFFIX}")
    if out.exists() and not force:
        raise StoreError(f"--out {out}: already exists; --force overwrites it")
    if not out.parent.is_dir():
        raise StoreError(f"--out {out}: directory {out.parent} does not exist")
    if run_dir and checkpoint:
        raise StoreError("give either --checkpoint or --run, not both")
    ckpt = find_checkpoint(SampleRequest(out, run_dir=Path(run_dir) if run_dir else None,
                                         checkpoint=Path(checkpoint) if checkpoint else None))
    state = load_checkpoint(ckpt)
    recipe = Recipe.from_dict(state["recipe"], registry, source=str(ckpt))
    model, averager = load_model(ckpt, state, recipe, registry, torch.device("cpu"), raw_weights)
    export_weights(state, chosen_weights(model.net, averager, raw_weights), out,
                   weights="raw" if raw_weights else "averaged")
    return ckpt, int(state.get("step", 0))
