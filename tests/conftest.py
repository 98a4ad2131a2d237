"""Shared fixtures and helpers: a small valid recipe, one-plugin registries, a one-thread
fixture, and the example third-party plugins pip-installed into a private site directory
(entry points are found on sys.path, as for any install)."""
from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scoretk.plugins import PluginRegistrar
from scoretk.registry import Registry

TESTS = Path(__file__).parent
PLUGIN_PACKAGES = [TESTS / "plugins" / "scoretk_hello", TESTS / "plugins" / "scoretk_broken",
                   TESTS / "plugins" / "scoretk_faults"]

TOY_RECIPE = {
    "name": "toy",
    "data": {"kind": "toy2d", "name": "mixture", "n": 2000, "seed": 0},
    "schedule": {"kind": "geometric", "sigma_max": 10.0, "sigma_min": 0.1, "num_levels": 8},
    "net": {"kind": "mlp", "hidden": 32, "depth": 2},
    "loss": {"kind": "dsm"},
    "sampler": {"kind": "annealed_langevin", "steps_per_level": 3, "eps": 1e-3},
    "averager": {"kind": "ema", "rate": 0.9},
    "optim": {"lr": 1e-3},
    "train": {"iterations": 20, "batch_size": 64, "device": "cpu", "checkpoint_every": 10,
              "log_every": 5},
    "sample": {"num_samples": 16, "batch_size": 8},
}


def registry_of(plugin_module, name: str = "test") -> Registry:
    """A registry holding only what one plugin module registers (no entry points)."""
    registry = Registry()
    plugin_module.scoretk_register(registry=PluginRegistrar(registry, name))
    return registry


@pytest.fixture(scope="module")
def one_thread():
    """For in-process loops of many tiny kernels: a second intra-op thread only adds
    spin-wait, and on a shared 2-core machine it made them 5-10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy_recipe() -> dict:
    return copy.deepcopy(TOY_RECIPE)


@pytest.fixture
def write_recipe(tmp_path):
    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
        return path
    return write


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """pip-install the example plugin packages into their own directory."""
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site),
                    *map(str, PLUGIN_PACKAGES)], check=True)
    return site


@pytest.fixture
def with_plugin_site(plugin_site, monkeypatch):
    """Make the installed example plugins visible to this process."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.delenv("SCORETK_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    importlib.invalidate_caches()
    return plugin_site


def run_cli(*args: str, env: dict | None = None, cwd=None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m scoretk ...` in a fresh process (what a user's shell does)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "scoretk", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)


def assert_one_line_error(result, *needles: str) -> None:
    """A CLI run (click's CliRunner) that failed with exit status 2 and exactly one
    `error:` line, no traceback, containing each needle."""
    assert result.exit_code == 2, result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def interrupt_sampling_at(monkeypatch, batch: int):
    """Make `scoretk sample` in this process stop with Ctrl-C as its `batch`-th batch (1 the
    first) starts; returns a function that puts the real batch back."""
    import scoretk.generation.sample as sampling

    real, calls = sampling._sample_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == batch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "_sample_batch", interrupted)
    return lambda: monkeypatch.setattr(sampling, "_sample_batch", real)
