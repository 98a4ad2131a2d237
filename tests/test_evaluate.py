"""Sample-quality evaluation on the digits: real data scores well, noise and one class do not."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import scoretk_plugins.datasets as mod
from scoretk.evaluation import evaluate, frechet_distance, main, precision_recall


@pytest.fixture(scope="module")
def digits():
    train = mod.build_digits(mod.DigitsParams(split="train"))
    test = mod.build_digits(mod.DigitsParams(split="test"))
    return train.data, train.labels, test.data, test.labels


def noise_like(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))


def test_heldout_digits_score_like_real(digits):
    xtr, ytr, xte, yte = digits
    res = evaluate(xte, xtr, xte, ytr, yte)
    s = res["samples"]
    assert s["precision"] > 0.85 and s["recall"] > 0.85
    assert s["classes_present"] == 10 == res["num_classes"]
    assert res["classifier_accuracy"] > 0.95
    assert res["pass"] and res["verdict"].startswith("PASS")
    r = res["real"]  # same data (in another order): the same figures
    assert (s["precision"], s["recall"]) == (r["precision"], r["recall"])
    assert s["fd"] == pytest.approx(r["fd"], rel=1e-6)


def test_noise_scores_zero_precision(digits):
    xtr, ytr, xte, yte = digits
    res = evaluate(noise_like(xte), xtr, xte, ytr, yte)
    assert res["samples"]["precision"] < 0.02 and res["samples"]["recall"] < 0.02
    assert not res["pass"] and "precision" in res["verdict"]


def test_single_class_is_one_class_present(digits):
    xtr, ytr, xte, yte = digits
    res = evaluate(xte[yte == 0], xtr, xte, ytr, yte)
    assert res["samples"]["classes_present"] == 1
    assert res["samples"]["class_fraction"][0] == 1.0
    assert res["n"] == int((yte == 0).sum())
    assert not res["pass"] and "classes" in res["verdict"]


def test_frechet_real_vs_real_much_smaller_than_noise(digits):
    xtr, _, xte, _ = digits
    real = frechet_distance(xte, xtr)
    assert real < 0.05 * frechet_distance(noise_like(xte), xtr)
    assert abs(frechet_distance(xtr, xtr)) < 1e-6


def test_precision_recall_detect_mode_dropping():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 10])
    half = torch.randn(300, 2, generator=g)  # only the first mode
    p, r = precision_recall(half, real)
    assert p > 0.9 and 0.4 < r < 0.6


def write_h5(path, images: torch.Tensor, recipe: dict | None) -> None:
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("samples", data=arr)
        if recipe is not None:
            f.attrs["recipe"] = json.dumps(recipe)
        f.attrs["num_written"] = len(arr)
        f.attrs["complete"] = True


def test_cli_report(digits, tmp_path, capsys):
    _, _, xte, _ = digits
    path = tmp_path / "samples.h5"
    write_h5(path, xte[:100], {"name": "t", "data": {"kind": "digits", "size": 8, "flip": False}})
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "precision (k=3)" in out and "Frechet distance" in out and "(pixels)" in out
    assert "held-out" in out and out.strip().splitlines()[-1].startswith("PASS")


def test_cli_reference_recipe_and_errors(digits, tmp_path, capsys):
    _, _, xte, _ = digits
    path = tmp_path / "samples.h5"
    write_h5(path, noise_like(xte[:50]), None)
    assert main([str(path)]) == 2  # no recipe stored, none given
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {kind: digits}\n")
    assert main([str(path), "--reference-recipe", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pass"] is False  # a report: exit 0 on FAIL
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read") and "\n" not in err


def test_a_sample_file_without_samples_is_one_line(tmp_path, capsys):
    path = tmp_path / "empty.h5"
    write_h5(path, torch.zeros(0, 1, 8, 8), {"name": "t", "data": {"kind": "digits"}})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no samples written yet" in err, err
