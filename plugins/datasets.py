"""Built-in datasets: sklearn's 8x8 digits, 2-D toys, CIFAR-10, MNIST, CelebA, image folders.

Everything follows the core's convention (images (C, H, W) float in [0, 1]). Nothing is ever
downloaded: data that is not on disk is a DataError saying which files were expected where.
Small datasets (digits, toys, MNIST, CIFAR-10) live in one tensor, so a batch is one indexing
operation instead of B PIL decodes.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from scoretk import hookimpl
from scoretk.components import Dataset
from scoretk.data import DataError, DataParams
from scoretk.execution.cpu_memory import available_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
DIGITS_SPLIT_SEED = 0
"""The digits train/test split is a fixed permutation, independent of any recipe seed, so the
evaluation always compares against the same held-out images."""


class TensorData(Dataset):
    """Items held in one tensor: uint8 (0..255, converted per batch) or float (as is)."""

    def __init__(self, data: Tensor, labels: Tensor | None = None):
        self.data, self.labels = data, labels

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def _convert(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.clone()

    def __getitem__(self, index: int) -> Tensor:
        return self._convert(self.data[index])

    def batch(self, indices: Tensor) -> Tensor:
        return self._convert(self.data[indices])


# --- digits -------------------------------------------------------------------------------

class DigitsParams(DataParams):
    size: int = Field(8, gt=0, description="image side in pixels (native 8)")
    resize: Literal["bilinear", "pad"] = Field(
        "bilinear", description="how to reach `size`: bilinear resampling or zero-padding "
        "(background) around the 8x8 digit")
    split: Literal["all", "train", "test"] = Field(
        "train", description="fixed 80/20 hold-out (1438/359); 'test' is what evaluation "
        "compares samples against")

    @model_validator(mode="after")
    def _check_pad(self) -> "DigitsParams":
        if self.resize == "pad" and self.size < 8:
            raise ValueError(f"resize 'pad' needs size >= 8, got {self.size}")
        return self

    def item_shape(self) -> tuple[int, ...]:
        return (1, self.size, self.size)

    def heldout_split(self) -> tuple["DigitsParams", "DigitsParams"]:
        return (self.model_copy(update={"split": "train"}),
                self.model_copy(update={"split": "test"}))


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    return images, torch.from_numpy(d.target).long()


def digits_split(n: int, split: str) -> np.ndarray:
    """Indices of a split: a fixed permutation, last fifth held out."""
    if split == "all":
        return np.arange(n)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    n_test = n // 5
    return np.sort(perm[n - n_test:] if split == "test" else perm[:n - n_test])


def build_digits(params: DigitsParams) -> TensorData:
    images, labels = _load_digits()
    idx = torch.from_numpy(digits_split(len(images), params.split))
    x, y = images[idx], labels[idx]
    if params.size != 8:
        if params.resize == "pad":
            lo = (params.size - 8) // 2
            hi = params.size - 8 - lo
            x = F.pad(x, (lo, hi, lo, hi))
        else:
            x = F.interpolate(x, size=(params.size, params.size), mode="bilinear",
                              align_corners=False, antialias=params.size < 8).clamp_(0, 1)
    return TensorData(x.contiguous(), y)


# --- 2-D toys -----------------------------------------------------------------------------

class Toy2dParams(DataParams):
    name: Literal["mixture", "rings", "swiss_roll"] = Field(
        "mixture", description="mixture: Gaussians at `means` with `weights` and `std`; rings: "
        "four concentric circles of radii 1.5 to 6; swiss_roll: a spiral (both with `noise`)")
    n: int = Field(10000, gt=0, description="number of points")
    seed: int = Field(0, description="the points are a function of this seed alone")
    weights: tuple[float, ...] = Field((0.2, 0.8), description="mixture weights (normalised)")
    means: tuple[tuple[float, float], ...] = Field(((-5.0, -5.0), (5.0, 5.0)),
                                                   description="mixture component means")
    std: float = Field(1.0, gt=0, description="mixture component standard deviation")
    noise: float = Field(0.1, ge=0, description="Gaussian jitter for rings / swiss_roll")

    @model_validator(mode="after")
    def _check_mixture(self) -> "Toy2dParams":
        if len(self.weights) != len(self.means):
            raise ValueError(f"{len(self.weights)} weights for {len(self.means)} means")
        if not self.weights or min(self.weights) <= 0:
            raise ValueError("mixture weights must be positive")
        return self

    def item_shape(self) -> tuple[int, ...]:
        return (2,)


TOY2D_BYTES_PER_POINT = 48
"""Peak memory while making one point: the float32 pair, labels and the temporaries."""


def build_toy2d(params: Toy2dParams) -> TensorData:
    """Points in R^2 (not [0, 1]: vectors have no range convention); labels = mode index."""
    g = torch.Generator().manual_seed(params.seed)
    n = params.n
    need, have = TOY2D_BYTES_PER_POINT * n, available_bytes()
    if have is not None and need > have:
        raise ValueError(f"n={n:,} points need about {need / 2**30:,.1f} GiB of memory and "
                         f"{have / 2**30:,.1f} GiB is free")
    labels: Tensor | None = None
    if params.name == "mixture":
        w = torch.tensor(params.weights, dtype=torch.float64)
        labels = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
        means = torch.tensor(params.means, dtype=torch.float32)
        x = means[labels] + params.std * torch.randn(n, 2, generator=g)
    elif params.name == "rings":
        labels = torch.randint(0, 4, (n,), generator=g)
        radius = 1.5 * (labels.float() + 1)
        theta = 2 * math.pi * torch.rand(n, generator=g)
        x = torch.stack([radius * theta.cos(), radius * theta.sin()], 1)
        x = x + params.noise * torch.randn(n, 2, generator=g)
    else:
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        x = torch.stack([t * t.cos(), t * t.sin()], 1) / 2
        x = x + params.noise * torch.randn(n, 2, generator=g)
    return TensorData(x.float().contiguous(), labels)


# --- torchvision's MNIST / CIFAR-10 ---------------------------------------------------------

class TorchvisionParams(DataParams):
    root: str = Field(description="directory holding the dataset files (never downloaded)")
    train: bool = Field(True, description="true: the training split; false: the test split")

    def heldout_split(self) -> tuple["TorchvisionParams", "TorchvisionParams"]:
        return self.model_copy(update={"train": True}), self.model_copy(update={"train": False})


class MnistParams(TorchvisionParams):
    def item_shape(self) -> tuple[int, ...]:
        return (1, 28, 28)


class Cifar10Params(TorchvisionParams):
    def item_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)


def build_mnist(params: MnistParams) -> TensorData:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(params.root, train=params.train, download=False)
    except RuntimeError:
        raw = Path(params.root) / "MNIST" / "raw"
        raise DataError(
            f"MNIST not found in {raw}: expected train-images-idx3-ubyte, "
            "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte there "
            "(uncompressed); point data.root at the directory containing MNIST/") from None
    return TensorData(ds.data.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets).long())


def build_cifar10(params: Cifar10Params) -> TensorData:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(params.root, train=params.train, download=False)
    except RuntimeError:
        folder = Path(params.root) / "cifar-10-batches-py"
        raise DataError(
            f"CIFAR-10 not found or corrupted in {folder}: expected data_batch_1..5, "
            "test_batch and batches.meta there (the python version, unpacked); point data.root "
            "at the directory containing cifar-10-batches-py/") from None
    data = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorData(data, torch.as_tensor(ds.targets).long())


# --- image files: CelebA and any folder -----------------------------------------------------

class ImageFiles(Dataset):
    """Images decoded on access: optional centre crop (a side, or None for the largest
    square), resize to `size`, ToTensor."""

    def __init__(self, paths: list[Path], size: int, channels: int, crop: int | None = None):
        self.paths, self.size, self.channels, self.crop = paths, size, channels, crop
        self.labels = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        import torchvision.transforms.functional as TF
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        crop = self.crop or min(im.size)
        im = TF.center_crop(im, [crop, crop])
        im = TF.resize(im, [self.size, self.size], antialias=True)
        return TF.to_tensor(im)


def _find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                  and p.is_file())


class CelebAParams(DataParams):
    root: str = Field(description="directory containing celeba/img_align_celeba/*.jpg")
    image_size: int = Field(64, gt=0, description="side of the square images after the "
                            "crop and resize")
    crop: int = Field(140, gt=0, description="centre crop side before resizing (NCSNv2: 140)")
    split: Literal["all", "train", "valid", "test"] = Field(
        "train", description="per celeba/list_eval_partition.txt; 'all' needs no split file")

    def item_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def heldout_split(self) -> tuple["CelebAParams", "CelebAParams"]:
        return (self.model_copy(update={"split": "train"}),
                self.model_copy(update={"split": "test"}))


def build_celeba(params: CelebAParams) -> ImageFiles:
    """Reads torchvision's CelebA layout directly (torchvision's class wants every annotation
    file and their checksums; we need the images and, for a split, the partition file)."""
    root = Path(params.root)
    base = next((b for b in (root / "celeba", root) if (b / "img_align_celeba").is_dir()), None)
    expected = (f"expected {root / 'celeba' / 'img_align_celeba'}/*.jpg (and "
                f"{root / 'celeba' / 'list_eval_partition.txt'} for split train/valid/test); "
                "point data.root at the directory containing celeba/")
    if base is None:
        raise DataError(f"CelebA not found: {expected}")
    folder = base / "img_align_celeba"
    if params.split == "all":
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    else:
        part = base / "list_eval_partition.txt"
        if not part.is_file():
            raise DataError(f"CelebA split {params.split!r} needs {part} (lines 'name.jpg "
                            "0|1|2'); use data.split=all to take every image in "
                            f"{folder} instead")
        code = {"train": "0", "valid": "1", "test": "2"}[params.split]
        rows = (line.split() for line in part.read_text().splitlines())
        paths = [folder / r[0] for r in rows if len(r) == 2 and r[1] == code]
    if not paths:
        raise DataError(f"CelebA: no images for split {params.split!r} in {folder}; {expected}")
    return ImageFiles(paths, params.image_size, 3, crop=params.crop)


class ImageFolderParams(DataParams):
    root: str = Field(description="folder searched recursively for image files")
    image_size: int = Field(gt=0, description="side after centre-cropping to a square")
    channels: Literal[1, 3] = Field(3, description="1: greyscale, 3: RGB (images are "
                                    "converted on reading)")

    def item_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)


def build_image_folder(params: ImageFolderParams) -> ImageFiles:
    root = Path(params.root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (data.root)")
    paths = _find_images(root)
    if not paths:
        raise DataError(f"no images found under {root} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(paths, params.image_size, params.channels)


@hookimpl
def scoretk_register(registry) -> None:
    add = registry.add
    add("dataset", "digits", build_digits, DigitsParams,
        "sklearn's 1,797 8x8 handwritten digits (bundled, no download); fixed 80/20 split")
    add("dataset", "toy2d", build_toy2d, Toy2dParams,
        "2-D toys from a seed: Gaussian mixture (NCSN's 0.2/0.8), rings, swiss roll")
    add("dataset", "mnist", build_mnist, MnistParams,
        "MNIST 28x28 from disk via torchvision (root/MNIST/raw)")
    add("dataset", "cifar10", build_cifar10, Cifar10Params,
        "CIFAR-10 32x32 from disk via torchvision (root/cifar-10-batches-py)")
    add("dataset", "celeba", build_celeba, CelebAParams,
        "CelebA aligned faces: centre crop 140, resize 64 (root/celeba/img_align_celeba)")
    add("dataset", "image_folder", build_image_folder, ImageFolderParams,
        "any folder of images, recursively: centre-cropped square, resized")
