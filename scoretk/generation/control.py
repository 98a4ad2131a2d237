"""Controllable generation from the command line: inpainting, colourisation, interpolation
(docs/theory.md#conditions).

`--inpaint-mask MASK --known SOURCE`, `--colourise SOURCE` and `--interpolate K` become one
`Control`: the condition each batch is sampled under, the noise its samples draw, and the
provenance the sample file records (a resume must agree with it). Masks and sources are read
and checked here, before the output file is touched; the known rows are read batch by batch.

A mask marks the pixels to generate: white in a PNG, 1 in an HDF5 dataset; black (0) pixels
are known. A source is `data` (the recipe's dataset: its held-out split where it has one) or
a scoretk sample file. Sample i takes source row i (cycling through the rows); with
`--interpolate K` the K samples of a group share row i // K, and so their known part.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from scoretk import assemble
from scoretk.components import Condition, Dataset, Noise
from scoretk.conditions import Colourisation, Inpainting
from scoretk.data import DataParams
from scoretk.generation.request import ControlOptions
from scoretk.images import to_uint8
from scoretk.recipe import Recipe, RecipeError
from scoretk.registry import Registry
from scoretk.rng import InterpolationNoise, PerSampleNoise
from scoretk.store import SAMPLES, SampleStore, StoreError, reading

DATA = "data"
"""The source naming the recipe's own dataset."""
MASK_DATASET = "mask"
"""The dataset an HDF5 mask file is read from unless `FILE.h5:NAME` names another."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HASH_ROWS = 1024


def heldout_data(recipe: Recipe, registry: Registry) -> tuple[Dataset, str]:
    """The recipe's data without training augmentations, its held-out split where the dataset
    has one (data the model never saw), and a description of what was taken."""
    params = recipe.data.params
    split = None
    if isinstance(params, DataParams):
        params = params.plain()
        split = params.heldout_split()
    data = registry.get("dataset", recipe.data.kind).build(split[1] if split else params)
    what = "held-out split" if split else "all of it (no held-out split)"
    return data, f"{recipe.data.kind}, {what}"


class _Rows(Protocol):
    """Source rows read batch by batch: float items in the data convention."""

    def __len__(self) -> int: ...
    def batch(self, indices: Tensor) -> Tensor: ...


class _SampleFileRows:
    """The written rows of a scoretk sample file, as floats (images (C, H, W) in [0, 1])."""

    def __init__(self, path: Path, count: int, item_shape: tuple[int, ...]):
        self.path, self.count, self.item_shape = path, count, item_shape

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: Tensor) -> Tensor:
        wanted = indices.tolist()
        unique = sorted(set(wanted))  # h5py reads increasing indices
        with reading(self.path) as f:
            rows = torch.from_numpy(np.asarray(f[SAMPLES][unique]))
        rows = rows[[unique.index(i) for i in wanted]]
        if len(self.item_shape) == 3:
            return rows.permute(0, 3, 1, 2).float().div_(255.0)
        return rows.float().reshape(len(rows), *self.item_shape)


@dataclass
class RowSource:
    """Where the known values come from, with the provenance of the rows used."""

    rows: _Rows
    item_shape: tuple[int, ...]
    described: str  # `data (...)` or the file's absolute path

    def provenance(self, prefix: str) -> dict[str, Any]:
        return {prefix: self.described, f"{prefix}_rows": len(self.rows),
                f"{prefix}_sha256": _rows_sha256(self.rows, self.item_shape)}


def _rows_sha256(rows: _Rows, item_shape: tuple[int, ...]) -> str:
    """Hash of the rows as the file would store them (images as uint8): the same data give
    the same hash on any CPU."""
    h = hashlib.sha256()
    for a in range(0, len(rows), HASH_ROWS):
        x = rows.batch(torch.arange(a, min(a + HASH_ROWS, len(rows))))
        h.update(to_uint8(x).tobytes() if len(item_shape) == 3 else x.numpy().tobytes())
    return h.hexdigest()


def read_source(spec: str, option: str, recipe: Recipe, registry: Registry,
                needed: int) -> RowSource:
    """`data` or a sample file, limited to the first `needed` rows."""
    if spec == DATA:
        data, what = heldout_data(recipe, registry)
        if len(data) == 0:
            raise StoreError(f"{option} data: the recipe's dataset ({what}) is empty")
        return RowSource(_Limited(data, min(len(data), needed)), tuple(data.shape),
                         f"{DATA} ({what})")
    path = Path(spec)
    try:
        store = SampleStore(path)
    except StoreError as exc:
        raise StoreError(f"{option} {exc}") from None
    count = min(store.num_written, needed)
    if count == 0:
        raise StoreError(f"{option} {path}: holds no samples yet")
    return RowSource(_SampleFileRows(path, count, store.item_shape), store.item_shape,
                     str(path.resolve()))


class _Limited:
    """The first `count` items of a dataset."""

    def __init__(self, data: Dataset, count: int):
        self.data, self.count = data, count

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: Tensor) -> Tensor:
        return self.data.batch(indices).float()


# ------------------------------------------------------------------------------------- masks

def read_mask(spec: str, shape: tuple[int, ...]) -> tuple[Tensor, dict[str, Any]]:
    """The mask (1: generate) as a float tensor that broadcasts against (B, *shape), and its
    provenance: file, hash of its 0/1 values, shape."""
    path, dataset = _mask_location(spec)
    with open(path, "rb") as f:
        is_png = f.read(len(PNG_MAGIC)) == PNG_MAGIC
    values = _png_mask(path, shape) if is_png else _h5_mask(path, dataset, shape)
    if not values.any():
        raise StoreError(f"--inpaint-mask {spec}: marks no pixel to generate (white, or 1, "
                         "marks the pixels to generate; black, or 0, the known ones)")
    if values.all():
        raise StoreError(f"--inpaint-mask {spec}: marks every pixel to generate, so none is "
                         "known; sample without a mask")
    mask = values.astype(np.uint8)
    where = str(path.resolve()) + ("" if is_png or dataset == MASK_DATASET else f":{dataset}")
    digest = hashlib.sha256(mask.tobytes() + repr(mask.shape).encode()).hexdigest()
    return torch.from_numpy(mask).float(), {"mask": where, "mask_sha256": digest,
                                            "mask_shape": list(mask.shape)}


def _mask_location(spec: str) -> tuple[Path, str]:
    """FILE, or FILE.h5:DATASET (split at the last colon when FILE alone does not exist)."""
    path = Path(spec)
    if not path.exists() and ":" in spec:
        head, dataset = spec.rsplit(":", 1)
        if Path(head).is_file():
            return Path(head), dataset
    if not path.is_file():
        raise StoreError(f"--inpaint-mask {spec}: file not found")
    return path, MASK_DATASET


def _png_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool from a black-and-white PNG of the items' size."""
    from PIL import Image

    if len(shape) != 3:
        raise StoreError(f"--inpaint-mask {path}: a PNG mask needs image data; the items are "
                         f"vectors {shape}: give an HDF5 dataset of that shape")
    with Image.open(path) as img:
        if img.size != (shape[2], shape[1]):
            raise StoreError(f"--inpaint-mask {path}: is {img.size[0]}x{img.size[1]} pixels, "
                             f"the images {shape[2]}x{shape[1]}")
        grey = np.asarray(img.convert("L"))
    if not np.isin(grey, (0, 255)).all():
        raise StoreError(f"--inpaint-mask {path}: holds grey or coloured pixels; a mask is "
                         "black (known) and white (generate) only")
    return grey == 255


def _h5_mask(path: Path, dataset: str, shape: tuple[int, ...]) -> np.ndarray:
    """0/1 values of a dataset shaped like one item, or (H, W) for images."""
    import h5py

    with reading(path) as f:
        ds = f.get(dataset)
        if not isinstance(ds, h5py.Dataset):
            names = sorted(k for k, v in f.items() if isinstance(v, h5py.Dataset))
            raise StoreError(f"--inpaint-mask {path}: no dataset {dataset!r} (it has "
                             f"{', '.join(names) or 'none'}); name one as {path}:NAME")
        values = np.asarray(ds[()])
    fits = [shape] + ([s for s in (shape[1:], (1, *shape[1:])) if s != shape]
                      if len(shape) == 3 else [])
    if tuple(values.shape) not in fits:
        raise StoreError(f"--inpaint-mask {path}:{dataset}: has shape {values.shape}; the "
                         f"items need {' or '.join(map(str, fits))}")
    if not np.isin(values, (0, 1)).all():
        raise StoreError(f"--inpaint-mask {path}:{dataset}: holds values other than 0 (known) "
                         "and 1 (generate)")
    return values.astype(bool)


# ------------------------------------------------------------------------------------ control

@dataclass
class Control:
    """What a batch is sampled under: the condition (None: unconditional) and the noise."""

    mode: str | None = None  # "inpaint", "colourise" or None
    source: RowSource | None = None
    known_mask: Tensor | None = None  # 1 where the value is known (inpainting)
    per_group: int | None = None  # --interpolate K
    provenance: dict[str, Any] | None = None  # recorded as the file's `control` attribute

    def keys(self, indices: range) -> list[int]:
        """Which source row (and data init) each sample takes: its index, or its group's."""
        k = self.per_group or 1
        return [i // k for i in indices]

    def noise(self, seed: int, indices: range, device: torch.device) -> Noise:
        if self.per_group:
            return InterpolationNoise(seed, indices, self.per_group, device)
        return PerSampleNoise(seed, indices, device)

    def sampler_arguments(self, indices: range, device: torch.device) -> dict[str, Any]:
        """`condition=...` for a conditioned run; nothing otherwise, so samplers written
        before conditions existed keep working."""
        return {} if self.source is None else {"condition": self.condition(indices, device)}

    def condition(self, indices: range, device: torch.device) -> Condition:
        rows = torch.tensor([key % len(self.source.rows) for key in self.keys(indices)])
        known = self.source.rows.batch(rows).to(device)
        if self.mode == "inpaint":
            return Inpainting(known, self.known_mask.to(device))
        return Colourisation(known)


def resolve_control(options: ControlOptions, file_attrs: dict[str, Any], recipe: Recipe,
                    model: assemble.Model, registry: Registry, num_samples: int,
                    out: Path) -> Control:
    """The command line's control options (a resume without any: the file's), read and
    checked against the items and the sampler."""
    if not options.given and file_attrs.get("control"):
        options = options_from_provenance(json.loads(file_attrs["control"]))
    if not options.given:
        return Control()
    for option, spec in (("--known", options.known), ("--colourise", options.colourise)):
        if spec not in (None, DATA) and Path(spec).resolve() == out.resolve():
            raise StoreError(f"{option} {spec}: is the output file; give another source")
    shape, k = model.shape, options.interpolate
    needed = -(-num_samples // k) if k else num_samples  # distinct source rows used
    control = Control(per_group=k, provenance={"interpolate": k} if k else {})
    if options.inpaint_mask is not None:
        _require_condition(model, recipe, "--inpaint-mask")
        mask, facts = read_mask(options.inpaint_mask, shape)
        control.source = read_source(options.known, "--known", recipe, registry, needed)
        _check_source_shape(control.source, shape, "--known", colour=False)
        control.mode, control.known_mask = "inpaint", 1.0 - mask
        control.provenance.update(mode="inpaint", **facts, **control.source.provenance("known"))
    elif options.colourise is not None:
        _require_condition(model, recipe, "--colourise")
        if len(shape) != 3 or shape[0] < 2:
            raise StoreError(f"--colourise needs colour images; the items are {shape}")
        control.source = read_source(options.colourise, "--colourise", recipe, registry, needed)
        _check_source_shape(control.source, shape, "--colourise", colour=True)
        control.mode = "colourise"
        control.provenance.update(mode="colourise", **control.source.provenance("grey_from"))
    return control


def options_from_provenance(recorded: dict[str, Any]) -> ControlOptions:
    """The control options a file was started with (a resume reads its mask and source again
    from the paths recorded, and their hashes must agree)."""
    source = lambda key: None if recorded.get(key) is None else (  # noqa: E731
        DATA if str(recorded[key]).startswith(DATA + " (") else recorded[key])
    return ControlOptions(recorded.get("mask"), source("known"), source("grey_from"),
                          recorded.get("interpolate"))


def _require_condition(model: assemble.Model, recipe: Recipe, option: str) -> None:
    """A sampler whose `sample` takes no `condition` cannot be conditioned (third-party)."""
    params = inspect.signature(model.sampler.sample).parameters
    if "condition" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise RecipeError(recipe.name, "sampler", f"{recipe.sampler.kind!r} takes no condition "
                          f"(its sample() has no `condition` argument), which {option} needs")


def _check_source_shape(source: RowSource, shape: tuple[int, ...], option: str,
                        colour: bool) -> None:
    """Inpainting needs items of the model's shape; colourisation grey or colour images of
    its size."""
    have = source.item_shape
    ok = have == shape or (colour and have == (1, *shape[1:]))
    if not ok:
        want = f"{shape} or {(1, *shape[1:])}" if colour else str(shape)
        raise StoreError(f"{option} {source.described}: its items are {have}, the model's "
                         f"{shape}; need {want}")
