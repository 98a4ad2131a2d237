"""What a recipe costs and what the data says it should be (`recipe show`, `plan`).

Nothing here knows a built-in component: data-driven values come from each params model's
`resolve(data)` with the plugin's own notes, and a sampler's `auto` settings from its
`settings(schedule)`.
"""
from __future__ import annotations

from typing import Any

import torch

from scoretk import assemble
from scoretk.assemble import ComponentError
from scoretk.data import DataError
from scoretk.recipe import COMPONENT_SECTIONS, Recipe
from scoretk.registry import Registry


def summarise(recipe: Recipe, registry: Registry) -> dict[str, Any]:
    """Parameter count, noise levels and network evaluations per sample, where knowable
    without the data (a recipe with `auto` values needs `scoretk plan` or a training run)."""
    out: dict[str, Any] = {}
    shape = assemble.data_shape(recipe)
    out["data shape"] = "x".join(map(str, shape)) if shape else "known once the data is loaded"
    pending = assemble.needs_data(recipe)
    if pending:
        out["resolved from the data"] = ", ".join(pending) + " (see `scoretk plan`)"
        return out
    schedule = assemble.build_schedule(recipe, registry)
    sampler = assemble.build_sampler(recipe, registry)
    sig = schedule.sigmas
    out["noise levels"] = f"{schedule.num_levels} (sigma {sig[0].item():.4g} -> {sig[-1].item():.4g})"
    if shape:
        with torch.device("meta"):  # count without allocating (the big nets are 90M+ params)
            net = assemble.build_model(recipe, registry, shape).net
        out["parameters"] = f"{assemble.count_parameters(net):,}"
    out["network evaluations per sample"] = f"{sampler.evaluations_per_sample(schedule):,}"
    for key, value in sampler_autos(recipe, sampler.settings(schedule)).items():
        out[f"sampler {key}"] = f"{value:.4g}" if isinstance(value, float) else value
    return out


def resolve_if_possible(recipe: Recipe, registry: Registry) -> tuple[Recipe, list[str]]:
    """The recipe with its data-driven (`auto`) values filled in where the data can be built,
    and lines saying what was chosen, or what could not be and why."""
    pending = assemble.needs_data(recipe)
    if not pending:
        return recipe, []
    try:
        resolved = assemble.resolve(recipe, assemble.build_data(recipe, registry))
    except (DataError, ComponentError, ValueError) as exc:
        return recipe, [f"not resolved: {', '.join(pending)} (the data are not at hand: "
                        f"{str(exc).splitlines()[0]})"]
    notes = [f"resolved {section}: {note}" for section in COMPONENT_SECTIONS
             for note in getattr(resolved, section).params.notes]
    return resolved, notes


def sampler_autos(recipe: Recipe, settings: dict[str, Any]) -> dict[str, Any]:
    """The sampler's params left on `auto`, with the values its settings resolved them to."""
    return {key: settings[key] for key, value in recipe.sampler.params
            if isinstance(value, str) and value == "auto" and key in settings}


def plan_recipe(recipe: Recipe, registry: Registry) -> tuple[Recipe, list[str]]:
    """Resolve the data-driven settings and say what each plugin chose and why."""
    data = assemble.build_data(recipe, registry)
    planned = assemble.resolve(recipe, data)
    lines = [f"data: {len(data)} items of shape {'x'.join(map(str, data.shape))}"]
    for section in COMPONENT_SECTIONS:
        lines += [f"{section}: {note}" for note in getattr(planned, section).params.notes]
    schedule = assemble.build_schedule(planned, registry)
    sampler = assemble.build_sampler(planned, registry)
    settings = sampler.settings(schedule)
    autos = sampler_autos(planned, settings)
    if autos:
        params = planned.sampler.params.model_copy(update=autos)
        planned = planned.with_params("sampler", params)
        lines += [f"sampler: {key} = {value:.4g}" if isinstance(value, float)
                  else f"sampler: {key} = {value}" for key, value in autos.items()]
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in settings.items())
    lines.append(f"sampler settings: {shown}")
    sig = schedule.sigmas
    lines.append(f"noise levels: {schedule.num_levels} (sigma {sig[0].item():.6g} -> "
                 f"{sig[-1].item():.6g})")
    lines.append(f"network evaluations per sample: {sampler.evaluations_per_sample(schedule)}")
    return planned, lines
