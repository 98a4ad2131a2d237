"""Image conversions and PNG writers shared by training (sample grids) and `scoretk sample`.

One conversion from the [0, 1] float convention to uint8 lives here, so the grids a run logs
and the HDF5 files FID tools read quantise identically.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8: clamp, *255, round (NHWC is what
    image and FID tools expect)."""
    if x.dim() != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def grid_array(images: np.ndarray, nrow: int | None = None, padding: int = 2,
               pad_value: int = 255) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (H', W', C) uint8 mosaic, `nrow` images per row."""
    b, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    out = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                  pad_value, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        out[y:y + h, x:x + w] = images[i]
    return out


def save_uint8_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> None:
    """Write (B, H, W, C) uint8 images (C = 1 or 3) as one PNG mosaic."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (B, H, W, C) image batch, got {images.shape}")
    grid = grid_array(images, nrow)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Write float images (B, C, H, W) in [0, 1] as one PNG mosaic (training and sampling)."""
    save_uint8_grid(to_uint8(x), path, nrow)
