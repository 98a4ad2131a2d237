"""Recipe -> live components, shared by training, sampling and `recipe show`.

Data-driven settings ("auto" in a schedule) are resolved here once, with the data, and the
resolved recipe is what gets stored: a checkpoint never needs the training data to sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from scoretk.components import Dataset, Loss, Sampler, Schedule
from scoretk.recipe import COMPONENT_SECTIONS, Recipe
from scoretk.registry import Registry


@dataclass
class Model:
    """What sampling needs: the schedule, the net and the sampler (no data, no optimiser)."""

    schedule: Schedule
    net: nn.Module
    sampler: Sampler
    shape: tuple[int, ...]


def build_data(recipe: Recipe, registry: Registry) -> Dataset:
    return _build(recipe, registry, "data")


def data_shape(recipe: Recipe) -> tuple[int, ...] | None:
    """Item shape from the data params alone, if the dataset plugin can tell."""
    fn = getattr(recipe.data.params, "item_shape", None)
    shape = fn() if callable(fn) else None
    return tuple(shape) if shape is not None else None


def resolve(recipe: Recipe, data: Dataset | None) -> Recipe:
    """Fill data-driven ('auto') params of every component whose params model has `resolve`."""
    for section in COMPONENT_SECTIONS:
        params = getattr(recipe, section).params
        fn = getattr(params, "resolve", None)
        if callable(fn):
            recipe = recipe.with_params(section, fn(data))
    return recipe


def needs_data(recipe: Recipe) -> list[str]:
    """Dotted names of params still 'auto' in components that resolve them from the data
    (params with `resolve`); other components settle their own autos (a sampler's eps)."""
    out = []
    for section in COMPONENT_SECTIONS:
        params = getattr(recipe, section).params
        if not callable(getattr(params, "resolve", None)):
            continue
        out += [f"{section}.{key}" for key, value in params
                if isinstance(value, str) and value == "auto"]
    return out


def build_schedule(recipe: Recipe, registry: Registry) -> Schedule:
    return _build(recipe, registry, "schedule")


def build_sampler(recipe: Recipe, registry: Registry) -> Sampler:
    return _build(recipe, registry, "sampler")


def build_model(recipe: Recipe, registry: Registry, shape: tuple[int, ...]) -> Model:
    schedule = build_schedule(recipe, registry)
    net = _build(recipe, registry, "net", shape=tuple(shape), num_levels=schedule.num_levels)
    return Model(schedule, net, build_sampler(recipe, registry), tuple(shape))


def build_loss(recipe: Recipe, registry: Registry) -> Loss:
    return _build(recipe, registry, "loss")


def build_averager(recipe: Recipe, registry: Registry, model: nn.Module) -> Any:
    return _build(recipe, registry, "averager", model=model)


def _build(recipe: Recipe, registry: Registry, section: str, **context: Any) -> Any:
    spec = getattr(recipe, section)
    comp = registry.get(COMPONENT_SECTIONS[section], spec.kind)
    try:
        return comp.build(spec.params, **context)
    except (ValueError, TypeError) as exc:
        raise ComponentError(section, spec.kind, comp.plugin, exc) from exc


class ComponentError(Exception):
    """A component that rejected its (valid-looking) params at build time."""

    def __init__(self, section: str, kind: str, plugin: str, exc: BaseException):
        self.section = section
        super().__init__(f"{section} ({kind!r} from plugin {plugin!r}): {exc}")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
