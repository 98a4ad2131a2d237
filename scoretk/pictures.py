"""Pictures for people: samples beside (or over) the data they imitate, and loss curves.

2-D samples become a scatter plot with axes over the training points; images a mosaic beside
a mosaic of real items, both taken from the dataset the sample file's recipe names (when it can
be built here; otherwise the samples alone, with a note saying why). Loss curves come from a
run's metrics.jsonl. Plots with axes need matplotlib, the optional `plot` extra, imported only
when one is drawn; image mosaics need only Pillow.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from scoretk.files import atomic_write
from scoretk.images import grid_array, to_uint8
from scoretk.registry import Registry
from scoretk.store import SampleStore, StoreError

IMAGES_SHOWN = 64
"""Default number of images in a mosaic (and of real items beside them)."""
POINTS_SHOWN = 2000
"""Default number of 2-D samples in a scatter plot; as many training points are drawn behind.
More only blacken the plot and slow it down."""
MIN_CELL = 32
"""Small images (8x8 digits) are enlarged, pixel for pixel, to at least this many pixels."""
SAMPLE_COLOUR, DATA_COLOUR = "#1f77b4", "#ffbb78"  # blue over light orange


class PictureError(Exception):
    """A picture that cannot be drawn (matplotlib missing, no metrics); one line."""


def new_figure(**kwargs: Any):
    """A matplotlib Figure, drawn off-screen (no pyplot state, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PictureError("plots need matplotlib, the optional 'plot' extra: "
                           "pip install 'scoretk[plot]'") from None
    return Figure(**kwargs)


def check_png_path(path: str | Path, option: str) -> Path:
    """Fail before any work if the picture could not be written there."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PictureError(f"{option} {path}: pictures are written as PNG; give a file name "
                           "ending in .png")
    if path.is_dir():
        raise PictureError(f"{option} {path}: is a directory, expected a file name")
    if not path.parent.is_dir():
        raise PictureError(f"{option} {path}: directory {path.parent} does not exist")
    return path


# --- samples ---------------------------------------------------------------------------------

def sample_picture(path: str | Path, png: str | Path, count: int | None = None,
                   registry: Registry | None = None) -> list[str]:
    """Draw the first `count` samples of a sample file into `png`, with real data when the
    recipe's dataset can be built; returns notes for the user (what was left out and why)."""
    png = check_png_path(png, "--grid")
    if count is not None and count <= 0:
        raise StoreError(f"-k must be positive (got {count})")
    store = SampleStore(path)
    if not store.is_image and store.item_shape != (2,):
        raise StoreError(f"{store.path}: a picture needs images or 2-D points, the samples "
                         f"are {math.prod(store.item_shape)}-D vectors")
    count = count or (IMAGES_SHOWN if store.is_image else POINTS_SHOWN)
    rows = store.read(count)
    if len(rows) == 0:
        raise StoreError(f"{store.path}: no samples written yet")
    real, notes = real_data(store, registry, len(rows) if store.is_image else POINTS_SHOWN)
    if store.is_image:
        panels = [(f"samples ({len(rows)})", rows)]
        if real:
            panels.append((f"data: {real[1]}", real[0]))
        write_image_panels(png, panels)
    else:
        write_scatter(png, rows, real[0] if real else None,
                      title=f"{len(rows)} samples" + (f" over {real[1]}" if real else ""))
    return notes


def real_data(store: SampleStore, registry: Registry | None,
              count: int) -> tuple[tuple[np.ndarray, str] | None, list[str]]:
    """((up to `count` real items in the file's layout, dataset name), notes): a fixed random
    subset of the dataset the file's recipe names, without training augmentations."""
    from scoretk import assemble
    from scoretk.assemble import ComponentError
    from scoretk.data import DataError
    from scoretk.recipe import Recipe, RecipeError
    from scoretk.registry import RegistryError

    if registry is None or "recipe" not in store.attrs:
        return None, []
    try:
        recipe = Recipe.from_dict(json.loads(store.attrs["recipe"]), registry,
                                  source=f"{store.path} (recipe)")
        plain = getattr(recipe.data.params, "plain", None)
        if callable(plain):
            recipe = recipe.with_params("data", plain())
        data = assemble.build_data(recipe, registry)
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
        items = data.batch(pick.sort().values).float()
    except (RecipeError, RegistryError, ComponentError, DataError, ValueError) as exc:
        return None, [f"note: real data not drawn ({exc})"]
    if tuple(items.shape[1:]) != store.item_shape:
        return None, [f"note: real data not drawn (its items are {tuple(items.shape[1:])}, "
                      f"the samples {store.item_shape})"]
    rows = to_uint8(items) if store.is_image else items.reshape(len(items), -1).numpy()
    return (rows, recipe.data.kind), []


def write_image_panels(png: str | Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """Mosaics of (B, H, W, C) uint8 images side by side, each under its label; small images
    are enlarged so a digit is visible."""
    h, w = panels[0][1].shape[1:3]
    scale = max(1, math.ceil(MIN_CELL / max(h, w)))
    nrow = max(1, math.ceil(math.sqrt(len(panels[0][1]))))
    mosaics = [_rgb(grid_array(images, nrow)).repeat(scale, 0).repeat(scale, 1)
               for _, images in panels]
    gap, header = 16, 18
    width = sum(m.shape[1] for m in mosaics) + gap * (len(mosaics) + 1)
    height = header + max(m.shape[0] for m in mosaics) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw, x = ImageDraw.Draw(canvas), gap
    for (label, _), mosaic in zip(panels, mosaics):
        draw.text((x, 3), label, fill="black")
        canvas.paste(Image.fromarray(mosaic), (x, header))
        x += mosaic.shape[1] + gap
    atomic_write(png, lambda f: canvas.save(f, format="PNG"))


def _rgb(mosaic: np.ndarray) -> np.ndarray:
    return np.repeat(mosaic, 3, axis=2) if mosaic.shape[2] == 1 else mosaic[..., :3]


def write_scatter(png: str | Path, points: np.ndarray, data: np.ndarray | None,
                  title: str = "") -> None:
    """Samples over the training points (light orange), with axes; non-finite samples are counted in
    the legend, not drawn."""
    fig = new_figure(figsize=(6, 6), dpi=100)
    ax = fig.add_subplot()
    finite = np.isfinite(points).all(1)
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], s=4, c=DATA_COLOUR, linewidths=0,
                   label=f"data ({len(data)})")
    lost = f", {int((~finite).sum())} not finite" if not finite.all() else ""
    ax.scatter(points[finite, 0], points[finite, 1], s=6, c=SAMPLE_COLOUR, linewidths=0,
               label=f"samples ({int(finite.sum())}{lost})")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_title(title)
    ax.legend(loc="upper left", markerscale=3)
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))


# --- training runs ---------------------------------------------------------------------------

def read_metrics(run: str | Path) -> tuple[list[dict], Path]:
    """The records of RUN/metrics.jsonl (or of that file given directly), one per step, in
    step order; a line cut short by a crash is skipped."""
    run = Path(run)
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        where = "run directory not found" if not run.exists() else f"no {path.name} there"
        raise PictureError(f"{run}: {where} (training writes <run>/metrics.jsonl every "
                           "train.log_every steps)")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if "loss" in record:  # training records; evaluations (train.eval_every) aside
                by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    if not by_step:
        raise PictureError(f"{path}: no metrics records yet")
    return [by_step[s] for s in sorted(by_step)], path


def plot_metrics(run: str | Path, png: str | Path | None = None,
                 registry: Registry | None = None) -> Path:
    """Two panels: the loss over steps, and the mean loss of each band of noise levels
    (largest sigmas first) over steps, labelled with their sigmas when the run's recipe can
    be read through `registry`. Returns the PNG's path (default RUN/loss.png)."""
    records, path = read_metrics(run)
    sigmas = _run_sigmas(path.parent, registry) if registry is not None else None
    png = check_png_path(png or path.parent / "loss.png", "--out")
    fig = new_figure(figsize=(12, 4.5), dpi=100)
    overall, bands = fig.subplots(1, 2)
    steps = [r["step"] for r in records]
    overall.plot(steps, [r["loss"] for r in records], color=SAMPLE_COLOUR)
    overall.set_title("loss")
    for name in _band_names(records):
        pts = [(r["step"], r["level_loss"][name]) for r in records
               if name in r.get("level_loss", {})]
        bands.plot(*zip(*pts), label=_band_label(name, sigmas))
    bands.set_title("loss by noise level (level 0: largest sigma)")
    if bands.lines:
        bands.legend()
    for ax in (overall, bands):
        ax.set_xlabel("step")
        if all(y > 0 for line in ax.lines for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(str(path.parent))
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    return png


def _run_sigmas(run: Path, registry: Registry) -> list[float] | None:
    """The run's noise levels from its resolved recipe.yaml; None when it cannot be read
    (the plot then names levels by number only)."""
    from scoretk.assemble import build_schedule
    from scoretk.recipe import Recipe, read_yaml

    try:
        recipe = Recipe.from_dict(read_yaml(run / "recipe.yaml"), registry)
        return [float(s) for s in build_schedule(recipe, registry).sigmas]
    except Exception:  # a plot must not fail for want of labels
        return None


def _band_label(name: str, sigmas: list[float] | None) -> str:
    """'levels_0-4' -> 'levels 0-4 (sigma 80 to 12)' when the sigmas are known."""
    label = name.replace("_", " ")
    first, _, last = name.removeprefix("levels_").partition("-")
    if sigmas is None or not (first.isdigit() and last.isdigit()) or int(last) >= len(sigmas):
        return label
    return f"{label} (sigma {sigmas[int(first)]:.3g} to {sigmas[int(last)]:.3g})"


def _band_names(records: list[dict]) -> list[str]:
    """Band names ('levels_0-2', ...) over every record, in order of their first level."""
    names = dict.fromkeys(n for r in records for n in r.get("level_loss", {}))

    def first_level(name: str) -> float:
        found = re.search(r"\d+", name)
        return int(found.group()) if found else math.inf

    return sorted(names, key=first_level)
