"""Built-in score networks: NCSN v1 and NCSNv2 RefineNets for images, a small conv net, an MLP
for vectors, and EDM's preconditioning around any of them.

Registered through the same hook a third-party plugin uses.
"""
from __future__ import annotations

from scoretk import hookimpl

from .convnet import ConvNetParams, ConvScoreNet, build_convnet
from .edm import EDMNet, EDMParams, build_edm
from .mlp import MLPParams, ScoreMLP, build_mlp
from .refinenet import (NCSNParams, RefineNet, build_ncsn, build_ncsnv2, build_ncsnv2_deeper,
                        build_ncsnv2_deepest)

__all__ = ["ConvNetParams", "ConvScoreNet", "build_convnet", "EDMNet", "EDMParams", "build_edm",
           "MLPParams", "NCSNParams", "RefineNet", "ScoreMLP", "build_mlp", "build_ncsn",
           "build_ncsnv2", "build_ncsnv2_deeper", "build_ncsnv2_deepest", "scoretk_register"]


@hookimpl
def scoretk_register(registry) -> None:
    add = registry.add
    add("net", "ncsn", build_ncsn, NCSNParams,
        "NCSN v1 dilated RefineNet; conditional InstanceNorm++ per noise level")
    add("net", "ncsnv2", build_ncsnv2, NCSNParams,
        "NCSNv2 RefineNet (32-64 px); output divided by sigma")
    add("net", "ncsnv2_deeper", build_ncsnv2_deeper, NCSNParams,
        "NCSNv2Deeper RefineNet (96-128 px); output divided by sigma")
    add("net", "ncsnv2_deepest", build_ncsnv2_deepest, NCSNParams,
        "NCSNv2Deepest RefineNet (256 px); output divided by sigma")
    add("net", "convnet", build_convnet, ConvNetParams,
        "small full-resolution residual conv net for tiny images (quick start); divided by sigma")
    add("net", "mlp", build_mlp, MLPParams, "sigma-normalised MLP for vector data (2-D toys)")
    add("net", "edm", build_edm, EDMParams,
        "EDM's preconditioning (c_skip, c_out, c_in, c_noise) around an inner net of any kind")
