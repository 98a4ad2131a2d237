"""What a recipe costs and what the data says it should be (`recipe show`, `plan`)."""
from __future__ import annotations

from typing import Any

import torch

from scoretk import assemble
from scoretk.recipe import Recipe
from scoretk.registry import Registry


def summarise(recipe: Recipe, registry: Registry) -> dict[str, Any]:
    """Parameter count, noise levels and network evaluations per sample, where knowable
    without the data (a schedule left on 'auto' needs `scoretk plan` or a training run)."""
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
    settings = sampler.settings(schedule)
    if "eps" in settings:
        out["sampler eps"] = f"{settings['eps']:.4g}"
    return out


def plan_recipe(recipe: Recipe, registry: Registry) -> tuple[Recipe, list[str]]:
    """Resolve data-driven settings (NCSNv2 techniques 1, 2 and 4) and say what they are."""
    data = assemble.build_data(recipe, registry)
    planned = assemble.resolve(recipe, data)
    schedule = assemble.build_schedule(planned, registry)
    sampler = assemble.build_sampler(planned, registry)
    settings = sampler.settings(schedule)
    sig = schedule.sigmas
    auto = set(assemble.needs_data(recipe))

    def how(field: str, technique: str) -> str:
        return f" ({technique})" if field in auto else " (as given)"

    lines = [
        f"data: {len(data)} items of shape {'x'.join(map(str, data.shape))}",
        f"sigma_max{how('schedule.sigma_max', 'technique 1')}: {sig[0].item():.6g}",
        f"sigma_min: {sig[-1].item():.6g}",
        f"noise levels{how('schedule.num_levels', 'technique 2')}: {schedule.num_levels}",
    ]
    if "eps" in settings:
        ratio = settings.get("prop3_ratio")
        extra = f" (Proposition 3 variance ratio {ratio:.4f})" if ratio is not None else ""
        lines.append(f"eps for T={settings.get('steps_per_level', '?')}: {settings['eps']:.4g}{extra}")
        if "eps" in type(planned.sampler.params).model_fields:
            params = planned.sampler.params.model_copy(update={"eps": float(settings["eps"])})
            planned = planned.with_params("sampler", params)
    lines.append(f"network evaluations per sample: {sampler.evaluations_per_sample(schedule)}")
    return planned, lines
