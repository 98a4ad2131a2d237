"""pluggy hook specifications: the one hook a plugin implements.

A plugin module defines::

    from scoretk import hookimpl

    @hookimpl
    def scoretk_register(registry):
        registry.add("net", "mynet", build_mynet, MyNetParams, "one-line description")

This module depends on nothing in scoretk: the registrar a hook receives is described by the
`Registrar` protocol below.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import pluggy

PROJECT = "scoretk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Registrar(Protocol):
    """What `scoretk_register` receives."""

    def add(self, kind: str, name: str, factory: Callable[..., Any], params: Any = None,
            description: str = "") -> Any:
        """Register `factory(params, **context)` as component `name` of `kind`."""


@hookspec
def scoretk_register(registry: Registrar) -> None:
    """Add this plugin's components with `registry.add(kind, name, factory, params, description)`."""
