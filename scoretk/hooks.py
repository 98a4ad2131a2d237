"""pluggy hook specifications: the one hook a plugin implements.

A plugin module defines::

    from scoretk import hookimpl

    @hookimpl
    def scoretk_register(registry):
        registry.add("net", "mynet", build_mynet, MyNetParams, "one-line description")
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

PROJECT = "scoretk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

if TYPE_CHECKING:  # pragma: no cover
    from scoretk.plugins import PluginRegistrar


@hookspec
def scoretk_register(registry: "PluginRegistrar") -> None:
    """Add this plugin's components with `registry.add(kind, name, factory, params, description)`."""
