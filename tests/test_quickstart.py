"""The quick start (`make demo`): its recipe trains a few steps, samples and draws its pictures,
and the demo's exit status is its quality check's.

The full run, and its quality check on a trained model, is `make demo` itself; here only that
every stage works with the recipe as shipped, and that the Makefile wires the check's verdict
into make's exit status.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from scoretk.plugins import default_registry
from scoretk.recipe import load_recipe
from scoretk.store import SampleStore
from scoretk.training import train

from conftest import run_cli

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "quickstart_digits.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shipped recipe, 3 steps of 16 digits, then 8 samples from its sampler with the
    demo's grid of samples beside real digits."""
    registry = default_registry()
    recipe = load_recipe(RECIPE, registry, ["train.iterations=3", "train.batch_size=16",
                                            "train.log_every=1", "train.checkpoint_every=3"])
    run = tmp_path_factory.mktemp("quickstart") / "run"
    train(recipe, registry, run_dir=run)
    samples = run.parent / "samples.h5"
    result = run_cli("sample", "--run", str(run), "--out", str(samples), "-n", "8",
                     "--batch-size", "8", "--grid", str(run / "samples_vs_real.png"))
    assert result.returncode == 0, result.stderr
    return recipe, run, samples


def test_bounded_by_steps_not_by_the_clock():
    recipe = load_recipe(RECIPE, default_registry())
    assert recipe.train.time_limit_minutes is None


def test_trains_logs_levels_and_samples(trained):
    recipe, run, samples = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["level_loss"] for r in records)  # the bands the loss picture draws
    store = SampleStore(samples)
    assert store.read(100).shape[0] == 8 and store.item_shape == (1, 8, 8)
    assert json.loads(store.attrs["recipe"])["name"] == recipe.name


def test_pictures_are_pngs_in_the_run(trained):
    pytest.importorskip("matplotlib")
    _, run, _ = trained
    result = run_cli("plot", str(run), "--out", str(run / "loss_per_level.png"))
    assert result.returncode == 0, result.stderr
    for name in ("samples_vs_real.png", "loss_per_level.png"):
        assert (run / name).read_bytes()[:8] == PNG


FAKE_SCORETK = """#!/bin/sh
echo "$@" >> "{log}"
[ "$1" = evaluate ] && exit {evaluate_status}
exit 0
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("evaluate_status", [0, 1])
def test_demo_exits_with_its_quality_checks_status(tmp_path, evaluate_status):
    """`make demo` with a stand-in scoretk that logs its commands: the check runs last with
    the demo's gates, the pictures are named either way, and make fails when the check does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "commands.log"
    fake = bin_dir / "scoretk"
    fake.write_text(FAKE_SCORETK.format(log=log, evaluate_status=evaluate_status))
    fake.chmod(0o755)
    # -o: treat the venv as made, so the test never installs anything
    result = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "demo",
                             f"BIN={bin_dir}"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "MAKEFLAGS": ""}, timeout=60)
    assert (result.returncode != 0) == bool(evaluate_status), result.stdout + result.stderr
    commands = log.read_text().splitlines()
    assert [c.split()[0] for c in commands] == ["train", "sample", "plot", "evaluate"]
    assert all(f"--require {gate}" in commands[-1] for gate in (
        "precision>=heldout-0.1", "recall>=heldout-0.1", "classes_present>=10"))
    named = [line for line in result.stdout.splitlines() if line.startswith("pictures: ")]
    assert named == ["pictures: runs/quickstart_digits/samples_vs_real.png "
                     "runs/quickstart_digits/loss_per_level.png"]
