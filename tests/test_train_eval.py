"""Sample quality during training (train.eval_every): figures logged, checkpoints/best.pt
kept by them through pruning and resumes, and `scoretk sample --run DIR --best`."""
from __future__ import annotations

import json

import h5py
import pytest
from click.testing import CliRunner

from scoretk.cli import main
from scoretk.checkpoint import load_checkpoint
from scoretk.plugins import default_registry
from scoretk.recipe import Recipe
from scoretk.training import train
from scoretk.training.quality import features_for, improves

from conftest import assert_one_line_error


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORETK_CACHE_DIR", str(tmp_path / "cache"))


def evaluating(toy: dict, iterations: int = 20) -> dict:
    toy["train"].update(iterations=iterations, eval_every=10, eval_samples=32,
                        checkpoint_every=5, keep_checkpoints=1)
    return toy


def eval_records(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval" in r]


def test_eval_every_logs_figures_and_keeps_the_best_through_pruning(toy_recipe, tmp_path,
                                                                    one_thread):
    registry, run = default_registry(), tmp_path / "run"
    train(Recipe.from_dict(evaluating(toy_recipe), registry), registry, run_dir=run)
    records = eval_records(run)
    assert [r["step"] for r in records] == [10, 20]
    first = records[0]["eval"]
    assert first["features"] == "pixels" and first["num_samples"] == 32
    assert {"fid", "kid_mean", "precision", "recall"} <= set(first)
    fids = [r["eval"]["fid"] for r in records]
    assert [r["eval"]["best"] for r in records] == [True, fids[1] < fids[0]]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == records[fids.index(min(fids))]["step"]
    assert best["eval_best"] == {"metric": "fid", "value": min(fids), "step": best["step"],
                                 "features": "pixels"}
    numbered = sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt"))
    assert numbered == ["ckpt-00000020.pt"]  # keep_checkpoints 1 pruned the rest, not best.pt

    # A resume knows the best so far: step 30 is "best" only if it beats both earlier figures.
    train(Recipe.from_dict(evaluating(toy_recipe, 30), registry), registry, run_dir=run)
    records = eval_records(run)
    assert [r["step"] for r in records] == [10, 20, 30]
    fid30 = records[2]["eval"]["fid"]
    assert records[2]["eval"]["best"] == (fid30 < min(fids))
    stored = load_checkpoint(run / "checkpoints" / "best.pt")["eval_best"]
    assert stored["value"] == min(fids + [fid30])

    out = tmp_path / "best.h5"
    result = CliRunner().invoke(
        main, ["sample", "--run", str(run), "--best", "--out", str(out), "-n", "4"])
    assert result.exit_code == 0, result.output + result.stderr
    with h5py.File(out) as f:
        assert f.attrs["num_written"] == 4
        assert str(f.attrs["checkpoint"]).endswith("best.pt")


def test_best_is_one_line_when_missing_or_without_a_run(toy_recipe, tmp_path, one_thread):
    registry, run = default_registry(), tmp_path / "run"
    toy_recipe["train"]["iterations"] = 5
    train(Recipe.from_dict(toy_recipe, registry), registry, run_dir=run)
    runner = CliRunner()
    result = runner.invoke(main, ["sample", "--run", str(run), "--best", "--out",
                                  str(tmp_path / "a.h5")])
    assert_one_line_error(result, "no best.pt", "train.eval_every")
    result = runner.invoke(main, ["sample", "--best", "--out", str(tmp_path / "b.h5")])
    assert_one_line_error(result, "--best", "--run")


def test_an_unknown_extractor_fails_before_the_run_directory_exists(toy_recipe, tmp_path):
    registry, run = default_registry(), tmp_path / "run"
    toy_recipe["train"].update(eval_every=5, eval_features="inceptoin")
    with pytest.raises(Exception, match="inceptoin"):
        train(Recipe.from_dict(toy_recipe, registry), registry, run_dir=run)
    assert not run.exists()


@pytest.mark.parametrize("metric, best_value, value, expected", [
    ("fid", 10.0, 9.0, True), ("fid", 10.0, 11.0, False), ("kid_mean", 0.1, 0.2, False),
    ("precision", 0.5, 0.9, True), ("precision", 0.5, 0.1, False), ("coverage", 0.5, 0.5, False)])
def test_improves_knows_which_way_is_better(metric, best_value, value, expected):
    best = {"metric": metric, "value": best_value, "step": 1}
    assert improves(metric, value, best) is expected
    assert improves(metric, value, None)  # the first evaluation
    assert improves(metric, value, {**best, "metric": "recall"})  # another figure: afresh


@pytest.mark.parametrize("shape, expected", [((3, 32, 32), "inception_v3"),
                                             ((1, 28, 28), "pixels"), ((2,), "pixels")])
def test_auto_features_are_inception_for_colour_images_only(toy_recipe, shape, expected):
    recipe = Recipe.from_dict(toy_recipe, default_registry())
    assert features_for(recipe.train, shape) == expected
