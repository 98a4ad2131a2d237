"""Claims a name a built-in plugin already owns."""
from scoretk import hookimpl
from scoretk.registry import Params


@hookimpl
def scoretk_register(registry):
    registry.add("schedule", "geometric", lambda p: None, Params, "an impostor")
