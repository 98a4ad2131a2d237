"""Built-in feature extractors: `inception_v3` (the FID network) and `pixels` (raw values).

Sample-quality figures are only as meaningful as the space they are measured in: Inception
pool3 is the space published FIDs use for natural images; raw values are the honest space for
vectors and tiny images, where an ImageNet network sees mostly interpolation blur.
"""
from __future__ import annotations

import torch
from torch import Tensor

from scoretk import hookimpl
from scoretk.components import FeatureExtractor
from scoretk.registry import Params

from .inception import InceptionParams, build_inception


class PixelFeatures(FeatureExtractor):
    """The values themselves, flattened: images in [0, 1], vectors as they are."""

    @property
    def fingerprint(self) -> str:
        return "pixels (values flattened, images in [0, 1])"

    def describe(self) -> str:
        return "pixels: the raw values, flattened"

    def __call__(self, x: Tensor) -> Tensor:
        return x.detach().reshape(len(x), -1).float().cpu()


def build_pixels(params: Params, *, device: torch.device | str = "cpu") -> PixelFeatures:
    return PixelFeatures()


@hookimpl
def scoretk_register(registry) -> None:
    registry.add("features", "inception_v3", build_inception, InceptionParams,
                 "2048-d pool3 of the FID Inception (TF 2015-12-05), pytorch-fid protocol")
    registry.add("features", "pixels", build_pixels, Params,
                 "raw values, flattened (vectors, tiny images)")
