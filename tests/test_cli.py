"""The command surface: --help without torch, recipe show figures, plan, version."""
from __future__ import annotations

import subprocess
import sys

import yaml
from click.testing import CliRunner

from scoretk import __version__
from scoretk.cli import main


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from scoretk.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout + out.stderr
    assert "train" in out.stdout and "sample" in out.stdout
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_recipe_show_reports_the_reference_figures():
    result = CliRunner().invoke(main, ["recipe", "show", "recipes/ncsnv2_cifar10.yaml"])
    assert result.exit_code == 0, result.output
    assert "# parameters: 29,694,083" in result.output
    assert "# noise levels: 232" in result.output
    assert "# network evaluations per sample: 1,161" in result.output
    resolved = yaml.safe_load(result.output.split("---")[0])
    assert resolved["net"] == {"kind": "ncsnv2", "ngf": 128}


def test_recipe_show_resolves_auto_values_when_the_data_are_at_hand():
    result = CliRunner().invoke(main, ["recipe", "show", "recipes/ncsnv2_digits.yaml"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output.split("---")[0])
    assert abs(resolved["schedule"]["sigma_max"] - 4.8) < 0.01  # technique 1 on the digits
    assert isinstance(resolved["schedule"]["num_levels"], int)
    assert "# resolved schedule: sigma_max = 4.8" in result.output
    assert "# parameters: " in result.output and "# noise levels: " in result.output


def test_recipe_show_with_auto_values_and_no_data_says_what_it_could_not_resolve(tmp_path):
    result = CliRunner().invoke(main, ["recipe", "show", "recipes/ncsnv2_cifar10.yaml",
                                       "-o", f"data.root={tmp_path / 'none'}",
                                       "-o", "schedule.sigma_max=auto"])
    assert result.exit_code == 0, result.output
    assert "not resolved: schedule.sigma_max (the data are not at hand" in result.output
    assert "schedule.sigma_max" in result.output and "scoretk plan" in result.output


def test_plan_resolves_and_writes(tmp_path):
    out = tmp_path / "planned.yaml"
    # docs/theory.md#worked-example-digits: the digits down to sigma 0.01 with T = 5
    result = CliRunner().invoke(main, ["plan", "recipes/ncsnv2_digits.yaml", "--write", str(out),
                                       "-o", "schedule.sigma_min=0.01",
                                       "-o", "sampler.steps_per_level=5"])
    assert result.exit_code == 0, result.output
    assert "schedule: sigma_max = 4.8" in result.output and "technique 1" in result.output
    assert "schedule: num_levels = 21 (NCSNv2 technique 2" in result.output
    assert "sampler: eps = 2.4" in result.output
    planned = yaml.safe_load(out.read_text())
    assert planned["schedule"]["num_levels"] == 21
    assert abs(planned["sampler"]["eps"] - 2.4e-5) < 0.05e-5
    shown = CliRunner().invoke(main, ["recipe", "show", str(out)])
    assert "# noise levels: 21" in shown.output and "# network evaluations per sample: 106" in shown.output


def test_a_training_run_that_stops_is_one_line_and_status_1(monkeypatch, write_recipe, toy_recipe):
    import scoretk.training
    from scoretk.training import TrainingError

    def stops(*args, **kwargs):
        raise TrainingError("non-finite loss or gradient at step 4; stopped")

    monkeypatch.setattr(scoretk.training, "train", stops)
    result = CliRunner().invoke(main, ["train", str(write_recipe(toy_recipe))])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: non-finite loss or gradient at step 4; stopped"
