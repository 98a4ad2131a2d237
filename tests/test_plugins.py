"""Plugin loading: built-ins, a real third-party package, and broken ones that must not harm it."""
from __future__ import annotations

import pytest
import yaml

from scoretk.plugins import load_plugins
from scoretk.recipe import load_recipe
from scoretk.registry import Params, Registry, RegistryError

from conftest import run_cli

BUILTINS = {("schedule", "geometric"), ("net", "ncsnv2"), ("net", "ncsn"), ("net", "mlp"),
            ("loss", "dsm"), ("sampler", "annealed_langevin"), ("averager", "ema"),
            ("averager", "none"), ("dataset", "digits"), ("dataset", "toy2d")}


def test_builtins_register_through_entry_points(monkeypatch):
    monkeypatch.setenv("SCORETK_DISABLE_PLUGIN_AUTOLOAD", "1")
    loaded = load_plugins()
    assert not loaded.errors, [p.error for p in loaded.errors]
    registered = {(c.kind, c.name) for c in loaded.registry.all()}
    assert BUILTINS <= registered
    assert {p.distribution for p in loaded.plugins} == {"scoretk"}


def test_third_party_plugin_is_found_and_usable(with_plugin_site, toy_recipe, write_recipe):
    loaded = load_plugins()
    hello = next(p for p in loaded.plugins if p.name == "hello")
    assert hello.ok and hello.distribution == "scoretk-hello" and hello.version == "1.2.3"
    comp = loaded.registry.get("schedule", "linear")
    assert comp.plugin == "hello"
    toy_recipe["schedule"] = {"kind": "linear", "sigma_max": 3.0, "sigma_min": 1.0, "num_levels": 3}
    recipe = load_recipe(write_recipe(toy_recipe), loaded.registry)
    schedule = loaded.registry.get("schedule", "linear").build(recipe.schedule.params)
    assert schedule.sigmas.tolist() == [3.0, 2.0, 1.0]


def test_broken_plugins_are_reported_and_the_rest_work(with_plugin_site):
    loaded = load_plugins()
    errors = {p.name: p for p in loaded.errors}
    assert set(errors) == {"broken_import", "broken_hook", "clash"}
    assert all(p.distribution == "scoretk-broken" for p in errors.values())
    assert "scoretk_dependency_that_does_not_exist" in errors["broken_import"].error
    assert "boom in scoretk_register" in errors["broken_hook"].error
    assert "geometric" in errors["clash"].error and "schedules" in errors["clash"].error
    # the failed hook's half-registration was rolled back; the built-in kept its name
    assert "half_registered" not in loaded.registry.names("loss")
    assert loaded.registry.get("schedule", "geometric").plugin == "schedules"
    assert loaded.registry.get("schedule", "linear").plugin == "hello"


def test_disable_autoload_skips_third_party(with_plugin_site, monkeypatch):
    monkeypatch.setenv("SCORETK_DISABLE_PLUGIN_AUTOLOAD", "1")
    loaded = load_plugins()
    assert not loaded.errors
    assert "linear" not in loaded.registry.names("schedule")


def test_cli_plugins_lists_third_party_and_errors(plugin_site, toy_recipe, tmp_path):
    env = {"PYTHONPATH": str(plugin_site)}
    out = run_cli("plugins", env=env)
    assert out.returncode == 0, out.stderr
    assert "hello (scoretk-hello 1.2.3) [ok]" in out.stdout
    assert "linear" in out.stdout
    assert "broken_import (scoretk-broken 0.0.1) [ERROR]" in out.stdout
    assert "3 plugin(s) failed to load" in out.stdout
    toy_recipe["schedule"] = {"kind": "linear", "sigma_max": 3.0, "sigma_min": 1.0, "num_levels": 3}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(toy_recipe))
    out = run_cli("recipe", "show", str(path), env=env)
    assert out.returncode == 0, out.stderr
    assert "noise levels: 3" in out.stdout
    # the plugins are loaded once per command: each broken one is reported once
    assert out.stderr.count("warning: plugin 'broken_import'") == 1


def test_registry_errors_name_kind_and_suggest():
    reg = Registry()
    reg.add("net", "ncsnv2", lambda p, **_: None, Params, plugin="a")
    with pytest.raises(RegistryError, match=r"unknown net 'ncsnv3' \(did you mean 'ncsnv2'\?\); registered: ncsnv2"):
        reg.get("net", "ncsnv3")
    with pytest.raises(RegistryError, match="plugin 'b' clashes with .* plugin 'a'"):
        reg.add("net", "ncsnv2", lambda p, **_: None, Params, plugin="b")
    with pytest.raises(RegistryError, match="unknown component kind"):
        reg.add("nett", "x", lambda p: None)
