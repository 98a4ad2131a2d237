"""Pictures: 2-D samples over the data with axes, image mosaics beside real data, loss curves;
one-line errors for a missing metrics file or a missing matplotlib."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scoretk import pictures
from scoretk.cli import main
from scoretk.plugins import default_registry
from scoretk.store import SampleStore, StoreError

from conftest import TOY_RECIPE

DIGITS_RECIPE = {**TOY_RECIPE, "data": {"kind": "digits", "size": 8},
                 "net": {"kind": "convnet", "channels": 8, "blocks": 1}}


def store_of(path, recipe: dict, x: torch.Tensor) -> SampleStore:
    store = SampleStore.create(path, tuple(x.shape[1:]), {"num_samples": len(x),
                                                         "recipe": recipe})
    store.append(x)
    return store


def rgb(png) -> np.ndarray:
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def has_colour(pixels: np.ndarray, hex_colour: str, tol: int = 12) -> bool:
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(pixels - target).max(-1) <= tol).any())


def test_2d_scatter_has_axes_and_the_data_behind(tmp_path):
    store = store_of(tmp_path / "p.h5", TOY_RECIPE, 5 * torch.randn(300, 2))
    assert pictures.sample_picture(store.path, tmp_path / "a.png", None,
                                   default_registry()) == []
    pixels = rgb(tmp_path / "a.png")
    assert pixels.shape == (600, 600, 3)
    assert has_colour(pixels, pictures.SAMPLE_COLOUR) and has_colour(pixels, pictures.DATA_COLOUR)
    # tick labels and axis titles: dark pixels in the left and bottom margins
    assert (pixels[:, :45] < 80).all(-1).any() and (pixels[-40:, :] < 80).all(-1).any()
    pictures.sample_picture(store.path, tmp_path / "b.png")  # no registry: samples alone
    assert not has_colour(rgb(tmp_path / "b.png"), pictures.DATA_COLOUR)


def test_scatter_is_capped(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(pictures, "write_scatter",
                        lambda png, points, data, title: drawn.update(n=len(points), d=len(data)))
    store = store_of(tmp_path / "p.h5", TOY_RECIPE, torch.randn(pictures.POINTS_SHOWN + 500, 2))
    pictures.sample_picture(store.path, tmp_path / "a.png", None, default_registry())
    assert drawn == {"n": pictures.POINTS_SHOWN, "d": pictures.POINTS_SHOWN}
    pictures.sample_picture(store.path, tmp_path / "a.png", 100, default_registry())
    assert drawn["n"] == 100


def test_images_beside_real_data(tmp_path):
    store = store_of(tmp_path / "d.h5", DIGITS_RECIPE, torch.rand(64, 1, 8, 8))
    assert pictures.sample_picture(store.path, tmp_path / "g.png", None,
                                   default_registry()) == []
    pixels = rgb(tmp_path / "g.png")
    side = 4 * (8 * 10 + 2)  # 8 x 8 images of 8 px, 2 px padding, enlarged 4x
    assert pixels.shape == (18 + side + 16, 2 * side + 3 * 16, 3)
    left = pixels[18:18 + side, 16:16 + side]
    right = pixels[18:18 + side, 32 + side:32 + 2 * side]
    assert left.std() > 20 and right.std() > 20  # both mosaics drawn
    # the right one holds real digits, much black background; uniform noise has little
    black = lambda a: (a.max(-1) < 10).mean()  # noqa: E731
    assert black(right) > 0.2 > 0.05 > black(left)
    assert (pixels[:18] < 128).any()  # labels


def test_images_without_their_data_are_drawn_alone_with_a_note(tmp_path):
    recipe = {**DIGITS_RECIPE, "data": {"kind": "mnist", "root": str(tmp_path / "none")}}
    store = store_of(tmp_path / "m.h5", recipe, torch.rand(4, 1, 28, 28))
    notes = pictures.sample_picture(store.path, tmp_path / "g.png", None, default_registry())
    assert len(notes) == 1 and "real data not drawn (MNIST not found" in notes[0]
    side = 2 * (2 * 30 + 2)  # 2 x 2 images of 28 px, 2 px padding, enlarged 2x
    assert Image.open(tmp_path / "g.png").size == (side + 2 * 16, 18 + side + 16)


def test_other_vectors_and_empty_files_are_refused(tmp_path):
    store = store_of(tmp_path / "v.h5", TOY_RECIPE, torch.randn(4, 10))
    with pytest.raises(StoreError, match="10-D vectors"):
        pictures.sample_picture(store.path, tmp_path / "v.png")
    empty = SampleStore.create(tmp_path / "e.h5", (2,), {"num_samples": 3})
    with pytest.raises(StoreError, match="no samples"):
        pictures.sample_picture(empty.path, tmp_path / "e.png")


def write_metrics(run, steps=range(10, 110, 10)) -> None:
    run.mkdir(exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 2.0 / s, "grad_norm": 1.0, "items_per_s": 1.0,
                         "level_loss": {f"levels_{2 * i}-{2 * i + 1}": (i + 1) / s
                                        for i in range(4)}}) for s in steps]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11')  # cut short


def test_plot_draws_overall_and_per_level_panels(tmp_path):
    write_metrics(tmp_path / "run")
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'run' / 'loss.png'}" in result.output
    pixels = rgb(tmp_path / "run" / "loss.png")
    assert pixels.shape == (450, 1200, 3)
    left, right = pixels[:, :600], pixels[:, 600:]
    tab10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]  # one line per band of levels
    assert all(has_colour(right, c) for c in tab10)
    assert has_colour(left, tab10[0]) and not has_colour(left, tab10[1])


def test_plot_to_a_chosen_file_and_metrics_given_directly(tmp_path):
    write_metrics(tmp_path / "run", steps=[5])
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "run" / "metrics.jsonl"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (1200, 450)


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "run directory not found"),
    (lambda d: d.mkdir(), "no metrics.jsonl there"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "no metrics records yet"),
])
def test_plot_without_metrics_is_one_line_exit_2(tmp_path, make, needle):
    run = tmp_path / "run"
    make(run)
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert needle in result.output


def test_without_matplotlib_one_line_names_the_extra(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "pip install 'scoretk[plot]'" in result.output
    # image mosaics need only Pillow
    store = store_of(tmp_path / "d.h5", DIGITS_RECIPE, torch.rand(4, 1, 8, 8))
    pictures.sample_picture(store.path, tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size[0] > 0


def test_level_bands_are_labelled_with_their_sigmas():
    from scoretk.pictures import _band_label

    sigmas = [40.0, 20.0, 10.0, 5.0]
    assert _band_label("levels_0-1", sigmas) == "levels 0-1 (sigma 40 to 20)"
    assert _band_label("levels_2-3", None) == "levels 2-3"  # the recipe could not be read
    assert _band_label("levels_2-9", sigmas) == "levels 2-9"  # not this run's levels
