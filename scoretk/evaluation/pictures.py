"""The pictures `make demo` ends with: samples beside held-out real items, and the loss of each
band of noise levels over training, as PNGs in the run directory.

`python -m scoretk.evaluation.pictures RUN SAMPLES.h5` writes both and prints their paths.
Plots need matplotlib (the optional `plot` extra), imported only here; without it the
pictures are skipped with one line saying so, and nothing else fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from scoretk.files import atomic_write
from scoretk.images import grid_array, to_uint8
from scoretk.registry import Registry

SHOWN = 100
"""Samples (and as many real items) in the side-by-side picture."""


def demo_pictures(run: str | Path, samples: str | Path, registry: Registry) -> list[Path]:
    """Write RUN/samples_vs_real.png and RUN/loss_per_level.png; returns their paths.
    Raises ModuleNotFoundError when matplotlib is missing."""
    from matplotlib.figure import Figure  # the optional 'plot' extra

    run = Path(run)
    pictures = [run / "samples_vs_real.png", run / "loss_per_level.png"]
    _samples_beside_real(Figure(figsize=(10, 5.4), dpi=100), samples, registry, pictures[0])
    _loss_per_level(Figure(figsize=(8, 5), dpi=100), run, registry, pictures[1])
    return pictures


def _mosaic(x: np.ndarray) -> np.ndarray:
    grid = grid_array(to_uint8(torch.as_tensor(x)))
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def _samples_beside_real(fig, samples: str | Path, registry: Registry, png: Path) -> None:
    from scoretk.evaluation.evaluate import read_samples, reference_data

    fake, recipe, _ = read_samples(str(samples))
    _, _, real, _ = reference_data(recipe["data"], registry)
    n = min(SHOWN, len(fake), len(real))
    for ax, images, title in zip(fig.subplots(1, 2), (fake[:n], real[:n].numpy()),
                                 (f"samples ({n})", f"held-out real data ({n})")):
        ax.imshow(_mosaic(images), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{recipe.get('name', '')}: {samples}")
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))


def _loss_per_level(fig, run: Path, registry: Registry, png: Path) -> None:
    """One line per band of levels (metrics.jsonl's level_loss), labelled with its sigmas."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    sigmas = _sigmas(run, registry)
    ax = fig.subplots()
    for band in dict.fromkeys(b for r in records for b in r.get("level_loss", {})):
        pts = [(r["step"], r["level_loss"][band]) for r in records if band in r["level_loss"]]
        first, last = (int(i) for i in band.split("_")[1].split("-"))
        label = f"levels {first}-{last}: sigma {sigmas[first]:.3g} to {sigmas[last]:.3g}"
        ax.plot(*zip(*pts), label=label)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], "k--", label="all")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.set_title(f"{run}: loss per noise level")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png, lambda f: fig.savefig(f, format="png"))


def _sigmas(run: Path, registry: Registry) -> list[float]:
    from scoretk import assemble
    from scoretk.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml", registry)
    return assemble.build_schedule(recipe, registry).sigmas.tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scoretk.evaluation.pictures",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("run", help="training run directory (metrics.jsonl, recipe.yaml)")
    ap.add_argument("samples", help="HDF5 sample file written from that run")
    args = ap.parse_args(argv)
    from scoretk.plugins import load_plugins

    try:
        paths = demo_pictures(args.run, args.samples, load_plugins().registry)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        print("pictures skipped: they need matplotlib (pip install 'scoretk[plot]')",
              file=sys.stderr)
        return 0
    except Exception as exc:  # noqa: BLE001 - one line, exit 2, like the other commands
        print(f"error: cannot draw the pictures of {args.run}: {exc}", file=sys.stderr)
        return 2
    print("pictures: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
