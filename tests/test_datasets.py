"""Dataset plugins: shapes, ranges, splits, determinism, and DataErrors that say where to look.

Everything runs on data the tests make in tmp_path (or sklearn's bundled digits): no network.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import scoretk_plugins.datasets as mod
from scoretk.data import DataError
from scoretk.registry import Registry

from conftest import registry_of


@pytest.fixture(scope="module")
def registry() -> Registry:
    return registry_of(mod, "datasets")


def build(registry: Registry, **spec):
    return registry.build("dataset", spec)


def test_all_registered(registry):
    assert registry.names("dataset") == sorted(
        ["digits", "toy2d", "mnist", "cifar10", "celeba", "image_folder"])


# --- digits ---------------------------------------------------------------------------------

def test_digits_splits_partition_the_1797_images(registry):
    all_, train, test = (build(registry, kind="digits", split=s) for s in ("all", "train", "test"))
    assert len(all_) == 1797 and len(train) + len(test) == 1797
    assert len(test) == 1797 // 5
    # disjoint and covering: every image of `all` is in exactly one split
    keys = lambda d: {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(d.data, d.labels)}
    assert keys(train) | keys(test) == keys(all_)
    assert len(keys(train) & keys(test)) == 0
    assert set(test.labels.tolist()) == set(range(10))
    assert test.labels.dtype == torch.long


def test_digits_split_is_fixed(registry):
    a = build(registry, kind="digits", split="test")
    b = build(registry, kind="digits", split="test", flip=True)
    assert torch.equal(a.data, b.data)


@pytest.mark.parametrize("size,resize", [(8, "bilinear"), (16, "bilinear"), (32, "pad"),
                                         (4, "bilinear")])
def test_digits_shape_and_range(registry, size, resize):
    ds = build(registry, kind="digits", size=size, resize=resize, split="all")
    assert ds.shape == (1, size, size) == mod.DigitsParams(size=size, resize=resize).item_shape()
    x = ds.batch(torch.tensor([0, 5, 1796]))
    assert x.shape == (3, 1, size, size) and x.dtype == torch.float32
    assert ds.data.min() >= 0 and ds.data.max() <= 1 and ds.data.max() > 0.9
    assert torch.equal(ds[5], x[1])


def test_digits_pad_keeps_the_digit(registry):
    small = build(registry, kind="digits", split="all")
    big = build(registry, kind="digits", size=12, resize="pad", split="all")
    assert torch.equal(big.data[:, :, 2:10, 2:10], small.data)
    assert big.data[:, :, :2].abs().sum() == 0


# --- toy2d ----------------------------------------------------------------------------------

def test_toy2d_deterministic_by_seed(registry):
    a, b = build(registry, kind="toy2d", seed=3), build(registry, kind="toy2d", seed=3)
    c = build(registry, kind="toy2d", seed=4)
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    assert a.shape == (2,) and len(a) == 10000 and a.batch(torch.arange(4)).shape == (4, 2)


def test_toy2d_mixture_weights_and_means(registry):
    ds = build(registry, kind="toy2d", n=20000)
    right = ds.data[:, 0] > 0
    assert abs(right.float().mean().item() - 0.8) < 0.02
    assert torch.allclose(ds.data[right].mean(0), torch.tensor([5.0, 5.0]), atol=0.1)
    assert torch.allclose(ds.data[~right].mean(0), torch.tensor([-5.0, -5.0]), atol=0.1)
    custom = build(registry, kind="toy2d", n=5000, weights=[1, 1, 2],
                   means=[[0, 10], [10, 0], [0, 0]])
    frac = torch.bincount(custom.labels).float() / 5000
    assert torch.allclose(frac, torch.tensor([0.25, 0.25, 0.5]), atol=0.03)


@pytest.mark.parametrize("name", ["rings", "swiss_roll"])
def test_toy2d_other_shapes(registry, name):
    ds = build(registry, kind="toy2d", name=name, n=500)
    assert ds.data.shape == (500, 2) and torch.isfinite(ds.data).all()


# --- image folders --------------------------------------------------------------------------

def write_images(folder, sizes, mode="RGB", ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"{i:06d}.{ext}")


def test_image_folder_recursive_crop_resize(registry, tmp_path):
    write_images(tmp_path / "a", [(20, 10), (10, 30)])
    write_images(tmp_path / "b" / "c", [(16, 16)], ext="jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build(registry, kind="image_folder", root=str(tmp_path), image_size=8)
    assert len(ds) == 3 and ds.shape == (3, 8, 8)
    x = ds.batch(torch.arange(3))
    assert x.shape == (3, 3, 8, 8) and x.min() >= 0 and x.max() <= 1
    gray = build(registry, kind="image_folder", root=str(tmp_path), image_size=5, channels=1)
    assert gray[0].shape == (1, 5, 5)


def test_image_folder_missing_or_empty(registry, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build(registry, kind="image_folder", root=str(tmp_path / "nope"), image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images found under .*empty.*\.png"):
        build(registry, kind="image_folder", root=str(tmp_path / "empty"), image_size=8)


def test_celeba_from_folder_and_partition(registry, tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    write_images(folder, [(178, 218)] * 3, ext="jpg")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "000000.jpg 0\n000001.jpg 0\n000002.jpg 2\n")
    train = build(registry, kind="celeba", root=str(tmp_path), image_size=16)
    assert len(train) == 2 and train[0].shape == (3, 16, 16)
    assert len(build(registry, kind="celeba", root=str(tmp_path), split="test")) == 1
    assert len(build(registry, kind="celeba", root=str(tmp_path), split="all")) == 3


def test_celeba_missing(registry, tmp_path):
    with pytest.raises(DataError, match=r"celeba/img_align_celeba"):
        build(registry, kind="celeba", root=str(tmp_path))
    write_images(tmp_path / "celeba" / "img_align_celeba", [(8, 8)], ext="jpg")
    with pytest.raises(DataError, match=r"list_eval_partition\.txt"):
        build(registry, kind="celeba", root=str(tmp_path), split="train")


# --- torchvision datasets -------------------------------------------------------------------

def test_mnist_missing_names_expected_files(registry, tmp_path):
    with pytest.raises(DataError) as info:
        build(registry, kind="mnist", root=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    assert "data.root" in msg


def test_cifar10_missing_names_expected_files(registry, tmp_path):
    with pytest.raises(DataError) as info:
        build(registry, kind="cifar10", root=str(tmp_path), train=False)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1..5" in msg
    assert "test_batch" in msg and "data.root" in msg


def test_mnist_reads_idx_files(registry, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">4i", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">2i", 0x801, n) + bytes(range(n)))
    ds = build(registry, kind="mnist", root=str(tmp_path))
    assert len(ds) == 5 and ds.shape == (1, 28, 28) == mod.MnistParams(root="x").item_shape()
    x = ds.batch(torch.tensor([0, 4]))
    assert x.shape == (2, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]
    assert len(build(registry, kind="mnist", root=str(tmp_path), train=False)) == 3


# --- params validation ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    {"kind": "digits", "colour": True},
    {"kind": "digits", "size": -8},
    {"kind": "digits", "size": 4, "resize": "pad"},
    {"kind": "digits", "split": "valid"},
    {"kind": "toy2d", "n": 0},
    {"kind": "toy2d", "weights": [0.5, 0.5, 0.0], "means": [[0, 0], [1, 1], [2, 2]]},
    {"kind": "toy2d", "weights": [1.0], "means": [[0, 0], [1, 1]]},
    {"kind": "image_folder", "root": "x"},
    {"kind": "image_folder", "root": "x", "image_size": 0},
    {"kind": "image_folder", "root": "x", "image_size": 8, "channels": 2},
    {"kind": "celeba", "root": "x", "image_size": -64},
    {"kind": "cifar10"},
    {"kind": "mnist", "root": "x", "download": True},
])
def test_params_validation(registry, spec):
    with pytest.raises(ValidationError):
        build(registry, **spec)


def test_item_shape_from_params_alone():
    assert mod.Cifar10Params(root="x").item_shape() == (3, 32, 32)
    assert mod.CelebAParams(root="x").item_shape() == (3, 64, 64)
    assert mod.ImageFolderParams(root="x", image_size=24, channels=1).item_shape() == (1, 24, 24)
    assert mod.Toy2dParams().item_shape() == (2,)
