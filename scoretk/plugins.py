"""Plugin loading: built-ins and third-party packages through one entry-point group.

Every plugin is loaded and registered in isolation: one that fails to import, raises in its
hook or claims a name another plugin owns is recorded with its error, and the rest keep working
(like pytest's plugin loading, a broken plugin must never take the tool down).
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any, Callable

import pluggy

from scoretk import hooks
from scoretk.registry import Component, Registry

ENTRY_POINT_GROUP = "scoretk"
DISABLE_AUTOLOAD_ENV = "SCORETK_DISABLE_PLUGIN_AUTOLOAD"
"""Set to a non-empty value to load only scoretk's own built-in plugins."""
BUILTIN_DISTRIBUTION = "scoretk"


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    components: list[Component] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class PluginRegistrar:
    """What a plugin's hook receives: `add` stamps each component with the plugin's name."""

    def __init__(self, registry: Registry, plugin: str):
        self._registry, self._plugin, self.added = registry, plugin, []

    def add(self, kind: str, name: str, factory: Callable[..., Any], params=None,
            description: str = "") -> Component:
        kwargs = {} if params is None else {"params": params}
        comp = self._registry.add(kind, name, factory, description=description,
                                  plugin=self._plugin, **kwargs)
        self.added.append(comp)
        return comp


@dataclass
class PluginSet:
    registry: Registry
    plugins: list[PluginInfo]

    @property
    def errors(self) -> list[PluginInfo]:
        return [p for p in self.plugins if not p.ok]


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load_plugins(extra: list[ModuleType] | None = None, autoload: bool | None = None) -> PluginSet:
    """Load every plugin of the `scoretk` entry-point group (plus `extra` modules).

    Built-ins are the entry points of the scoretk distribution itself; with
    SCORETK_DISABLE_PLUGIN_AUTOLOAD set, the others are skipped.
    """
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    pm = pluggy.PluginManager(hooks.PROJECT)
    pm.add_hookspecs(hooks)
    registry = Registry()
    infos: list[PluginInfo] = []

    candidates: list[tuple[PluginInfo, Callable[[], ModuleType]]] = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if dist != BUILTIN_DISTRIBUTION and not autoload:
            continue
        candidates.append((PluginInfo(ep.name, dist, version), ep.load))
    for mod in extra or []:
        candidates.append((PluginInfo(mod.__name__, "(in-process)", "-"), lambda m=mod: m))
    # Built-ins first, so a third-party clash is reported against the third party.
    candidates.sort(key=lambda c: c[0].distribution != BUILTIN_DISTRIBUTION)

    for info, load in candidates:
        infos.append(info)
        try:
            module = load()
            pm.register(module, name=info.name)
        except Exception as exc:  # noqa: BLE001 - a plugin may raise anything; we report it
            info.error = f"failed to load: {_short_error(exc)}"
            info.traceback = traceback.format_exc()
            continue
        _register(pm, module, info, registry)
    return PluginSet(registry, infos)


def _register(pm: pluggy.PluginManager, module: ModuleType, info: PluginInfo,
              registry: Registry) -> None:
    """Call one plugin's hook through pluggy, alone: a subset caller without the other
    plugins, so a failure is that plugin's, and its components carry its name."""
    others = [p for p in pm.get_plugins() if p is not module]
    call = pm.subset_hook_caller("scoretk_register", remove_plugins=others)
    registrar = PluginRegistrar(registry, info.name)
    try:
        call(registry=registrar)
        info.components = registrar.added
    except Exception as exc:  # noqa: BLE001
        registry.remove_plugin(info.name)
        info.error = f"failed to register: {_short_error(exc)}"
        info.traceback = traceback.format_exc()


_DEFAULT: PluginSet | None = None


def default_plugins() -> PluginSet:
    """A process-wide plugin set, loaded on first use, for notebooks and tests. Commands load
    their own once and pass the registry down."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_plugins()
    return _DEFAULT


def default_registry() -> Registry:
    return default_plugins().registry
