"""scoretk: a plugin-based toolkit for score-based generative modelling.

Kept free of heavy imports so `scoretk --help` starts fast; torch loads with the plugins.
"""
from scoretk.hooks import hookimpl

__version__ = "0.2.0"
__all__ = ["hookimpl", "__version__"]
