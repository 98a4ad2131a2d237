"""Named components, by kind, with the plugin each came from.

A plugin adds entries through `Registry.add`; recipes name them as `{kind: <name>, ...}`.
Lookups that miss say what exists and what was probably meant, because a typo in a recipe
should cost seconds, not a debugging session.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, PrivateAttr

KINDS: dict[str, str] = {
    "dataset": "Dataset",
    "schedule": "Schedule",
    "net": "ScoreNet",
    "loss": "Loss",
    "sampler": "Sampler",
    "averager": "Averager",
    "features": "FeatureExtractor",
}
"""Component kinds and the interface (in `scoretk.components`) each implements."""


class Params(BaseModel):
    """Base for component parameter models: unknown keys are errors, not silently ignored.

    A params model may define `resolve(data)` returning a copy with data-driven values
    (`auto`) filled in; `noted(...)` attaches to that copy, in the plugin's own words, what
    was chosen and why, which `scoretk plan` and `recipe show` print.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    _notes: tuple[str, ...] = PrivateAttr(default=())

    def noted(self, *notes: str) -> "Params":
        """A copy carrying `notes` (lines such as 'sigma_max = 4.8: the largest distance ...')."""
        copy = self.model_copy()
        copy._notes = self._notes + tuple(notes)
        return copy

    @property
    def notes(self) -> tuple[str, ...]:
        return self._notes


class RegistryError(Exception):
    """A lookup or registration that cannot be satisfied."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type[BaseModel]
    description: str
    plugin: str

    def build(self, params: BaseModel | dict | None = None, **context: Any) -> Any:
        """Instantiate with validated params; `context` carries what the kind needs
        (net: shape, num_levels; averager: model)."""
        if not isinstance(params, BaseModel):
            params = self.params.model_validate(params or {})
        return self.factory(params, **context)


@dataclass
class Registry:
    _entries: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {k: {} for k in KINDS})

    def add(self, kind: str, name: str, factory: Callable[..., Any],
            params: type[BaseModel] = Params, description: str = "",
            *, plugin: str = "?") -> Component:
        """Register `factory(params, **context)` under (kind, name).

        A name taken by another plugin is an error naming both, never a silent override.
        """
        _check_kind(kind)
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise RegistryError(f"invalid {kind} name {name!r}: use letters, digits, '_' or '-'")
        taken = self._entries[kind].get(name)
        if taken is not None:
            raise RegistryError(f"{kind} {name!r} from plugin {plugin!r} clashes with the one "
                                f"already registered by plugin {taken.plugin!r}")
        comp = Component(kind, name, factory, params, description, plugin)
        self._entries[kind][name] = comp
        return comp

    def get(self, kind: str, name: str) -> Component:
        _check_kind(kind)
        try:
            return self._entries[kind][name]
        except KeyError:
            raise RegistryError(unknown_name_message(kind, name, self.names(kind))) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def all(self) -> list[Component]:
        return [c for kind in KINDS for _, c in sorted(self._entries[kind].items())]

    def remove_plugin(self, plugin: str) -> None:
        """Drop everything one plugin added (used when its hook fails halfway)."""
        for entries in self._entries.values():
            for name in [n for n, c in entries.items() if c.plugin == plugin]:
                del entries[name]

    def build(self, kind: str, spec: dict[str, Any], **context: Any) -> Any:
        """Build from a recipe-style block: {'kind': name, **params}."""
        spec = dict(spec)
        return self.get(kind, spec.pop("kind")).build(spec, **context)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RegistryError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    if close:
        msg += f" (did you mean {close[0]!r}?)"
    return msg + f"; registered: {', '.join(known) if known else 'none'}"
