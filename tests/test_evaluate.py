"""`scoretk evaluate` in pixel space on the digits: real data scores like real data, noise and
one class do not, thresholds decide the exit status, reference features are cached."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import scoretk_plugins.datasets as datasets
import scoretk_plugins.features as features
from scoretk.cli import main
from scoretk.evaluation import Settings, evaluate, tensor_source
from scoretk.evaluation.requirements import parse_requirement
from scoretk.evaluation.sources import EvaluationError, real_sources

from conftest import registry_of

DIGITS = {"kind": "digits", "size": 8}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORETK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def heldout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    test = datasets.build_digits(datasets.DigitsParams(split="test"))
    return test.data, test.labels


def score(samples: torch.Tensor, requirements=()) -> dict:
    registry = registry_of(datasets)
    reference, heldout = real_sources(DIGITS, registry, 50_000, len(samples))
    return evaluate(tensor_source(samples), reference, heldout,
                    {"pixels": features.PixelFeatures()},
                    [parse_requirement(r) for r in requirements], settings=Settings(kid_subsets=10))


def noise_like(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))


def test_heldout_digits_score_like_real(heldout_digits):
    x, _ = heldout_digits
    res = score(x, ["precision>=heldout-0.2", "recall>=heldout-0.2", "classes_present>=10"])
    assert res["precision"] > 0.85 and res["recall"] > 0.85
    assert res["classes_present"] == 10 == res["num_classes"]
    assert res["num_samples"] == res["heldout"]["num_samples"] == len(x)
    assert res["num_reference"] == 1438 and res["features"] == "pixels"
    # the same images (in another order): the same figures
    for key in ("precision", "recall", "density", "coverage", "classes_present"):
        assert res[key] == res["heldout"][key], key
    assert res["fid"] == pytest.approx(res["heldout"]["fid"], rel=1e-9)
    assert res["is_mean"] is None  # raw values have no classifier
    assert res["pass"] and all(c["pass"] for c in res["requirements"])


def test_noise_and_one_class_fail_their_requirements(heldout_digits):
    x, y = heldout_digits
    noise = score(noise_like(x), ["precision>=heldout-0.2"])
    assert noise["precision"] < 0.02 and noise["recall"] < 0.02
    assert noise["fid"] > 20 * noise["heldout"]["fid"]
    assert not noise["pass"] and noise["requirements"][0]["bound"] == pytest.approx(
        noise["heldout"]["precision"] - 0.2)
    zeros = score(x[y == 0], ["classes_present>=10"])
    assert zeros["classes_present"] == 1 and zeros["class_fraction"][0] == 1.0
    assert not zeros["pass"]


@pytest.mark.parametrize("text, message", [
    ("precision>0.5", "expected [SPACE.]METRIC"),
    ("sharpness>=0.5", "unknown metric 'sharpness'"),
    ("fid<=heldout*x", "not a number"),
])
def test_malformed_requirements_are_one_line_errors(text, message):
    with pytest.raises(EvaluationError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_requirement(text)


def test_relative_bounds():
    assert parse_requirement("fid<=heldout*1.5").bound(2.0) == 3.0
    assert parse_requirement("pixels.recall >= heldout - 0.25").bound(0.75) == 0.5
    assert parse_requirement("pixels.recall>=0.7").space == "pixels"


def write_h5(path, images: torch.Tensor, recipe: dict | None = None) -> None:
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("samples", data=arr)
        if recipe is not None:
            f.attrs["recipe"] = json.dumps(recipe)
        f.attrs["num_written"] = len(arr)


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_cli_json_report_and_exit_status(heldout_digits, tmp_path):
    x, _ = heldout_digits
    path = tmp_path / "samples.h5"
    write_h5(path, x[:100], {"name": "t", "data": DIGITS})
    code, out, err = run(path, "--features", "pixels", "--json",
                         "--require", "pixels.precision>=heldout-0.2")
    assert code == 0, err
    res = json.loads(out)
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "num_samples",
                "num_reference", "features"):
        assert key in res
    assert (res["num_samples"], res["num_reference"], res["features"]) == (100, 1438, "pixels")
    assert "below 10,000" in err  # the FID warning
    code, out, _ = run(path, "--features", "pixels", "--require", "fid<=0")
    assert code == 1 and "FAIL  fid<=0" in out and out.rstrip().endswith(
        "FAIL: 0 of 1 requirements met")


def test_cli_against_an_hdf5_reference(heldout_digits, tmp_path):
    x, _ = heldout_digits
    write_h5(tmp_path / "a.h5", x[:60])
    write_h5(tmp_path / "b.h5", x[60:200])
    code, out, err = run(tmp_path / "a.h5", "--against", tmp_path / "b.h5", "--features",
                         "pixels", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert "heldout" not in res and res["heldout_source"] is None
    assert res["num_reference"] == 140 and res["num_samples"] == 60
    code, _, err = run(tmp_path / "a.h5", "--against", tmp_path / "b.h5", "--features",
                       "pixels", "--require", "precision>=heldout")
    assert code == 2 and "no held-out data" in err


def test_cli_bad_inputs_are_one_line_errors(heldout_digits, tmp_path):
    x, _ = heldout_digits
    bare = tmp_path / "bare.h5"
    write_h5(bare, x[:20])
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    odd = tmp_path / "odd.h5"
    write_h5(odd, torch.rand(20, 1, 4, 4))
    for args, message in [((bare,), "stores no recipe"),
                          ((bad,), "not an HDF5 file"),
                          ((odd, "--against", "recipes/quickstart_digits.yaml"), "shape"),
                          ((bare, "--against", "recipes/quickstart_digits.yaml", "--features",
                            "pixls"), "did you mean 'pixels'"),
                          ((bare, "--against", bare, "--features", "pixels", "--require",
                            "x>=1"), "unknown metric")]:
        code, out, err = run(*args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
        assert out == ""



def test_a_sample_file_without_samples_is_one_line(tmp_path):
    path = tmp_path / "empty.h5"
    write_h5(path, torch.zeros(0, 1, 8, 8), {"name": "t", "data": DIGITS})
    code, out, err = run(path, "--features", "pixels")
    assert code == 2 and err.count("\n") == 1 and "no samples written yet" in err, err


class Counting(features.PixelFeatures):
    calls = 0

    def __call__(self, x):
        Counting.calls += len(x)
        return super().__call__(x)


def test_reference_features_are_cached_by_data_and_extractor(heldout_digits, private_cache):
    x, _ = heldout_digits
    registry = registry_of(datasets)
    for _ in range(2):
        reference, heldout = real_sources(DIGITS, registry, 1000, 50)
        evaluate(tensor_source(x[:50]), reference, heldout, {"pixels": Counting()},
                 settings=Settings(kid_subsets=2))
    assert Counting.calls == (1000 + 50) + 2 * 50  # real data once, samples each time
    assert len(list(private_cache.rglob("*.npz"))) == 2  # reference and held-out
    reference, heldout = real_sources(DIGITS, registry, 900, 50)  # another N: another entry
    evaluate(tensor_source(x[:50]), reference, heldout, {"pixels": Counting()},
             settings=Settings(kid_subsets=2))
    assert len(list(private_cache.rglob("*.npz"))) == 3
