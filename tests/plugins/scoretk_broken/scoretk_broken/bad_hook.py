"""Registers one component, then raises: the half-registration must be rolled back."""
from scoretk import hookimpl
from scoretk.registry import Params


@hookimpl
def scoretk_register(registry):
    registry.add("loss", "half_registered", lambda p: None, Params, "must not survive")
    raise RuntimeError("boom in scoretk_register")
