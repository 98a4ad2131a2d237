"""`scoretk import` (checkpoints in the released NCSN/NCSNv2 layout) and `scoretk export`
(safetensors). The released files are made here from scoretk nets, renamed through the import's
name map, in the released list layout, with `module.` prefixes, an Adam state and an EMA dict:
no reference code is needed. Tiny nets and 8 px images, so each test takes seconds."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from scoretk import assemble
from scoretk.checkpoint import CheckpointError, load_checkpoint
from scoretk.cli import main
from scoretk.interop.reference import (ReleasedCheckpoint, check_sigmas, name_map,
                                       reference_state_dict)
from scoretk.interop.weights import export_weights, load_exported
from scoretk.plugins import default_registry
from scoretk.recipe import Recipe, load_recipe

from conftest import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {
    "name": "tiny_v2",
    "data": {"kind": "digits", "size": 8},
    "schedule": {"kind": "geometric", "sigma_max": 1.0, "sigma_min": 0.01, "num_levels": 4},
    "net": {"kind": "ncsnv2", "ngf": 4},
    "loss": {"kind": "dsm"},
    "sampler": {"kind": "annealed_langevin", "steps_per_level": 1, "eps": 5e-5},
    "averager": {"kind": "ema", "rate": 0.9},
    "optim": {"lr": 1e-3},
    "train": {"iterations": 7, "batch_size": 8, "device": "cpu", "checkpoint_every": 100,
              "log_every": 1},
    "sample": {"num_samples": 4, "batch_size": 4, "seed": 1},
}
V1 = {**RECIPE, "name": "tiny_v1", "net": {"kind": "ncsn", "ngf": 4},
      "averager": {"kind": "none"}}
FILE_STEP = 7  # the released run's step in the v2 files
ADAM_STEPS = 2  # optimiser steps behind the files' Adam state


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Released:
    """A scoretk net and what the released code would have saved for it."""

    def __init__(self, raw: dict, seed: int = 0):
        registry = default_registry()
        self.recipe = Recipe.from_dict(raw, registry)
        self.kind = self.recipe.net.kind
        torch.manual_seed(seed)
        model = assemble.build_model(self.recipe, registry, (1, 8, 8))
        self.net, self.sigmas = model.net, model.schedule.sigmas
        with torch.no_grad():
            for p in self.net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        names = name_map(self.net, self.kind)
        ours = dict(self.net.named_parameters())
        # Adam over the parameters in the released order, so its ids are the released ones
        self.adam = torch.optim.Adam([ours[n] for n in names.values()], lr=1e-3)
        for _ in range(ADAM_STEPS):
            self.adam.zero_grad()
            sum((p * p).sum() * (i + 1) for i, p in enumerate(ours.values())).backward()
            self.adam.step()
        self.ema = {k: 0.5 * v.detach() + 0.1 for k, v in self.net.state_dict().items()}

    def entries(self, prefix: str = "module.") -> list:
        v2 = self.kind != "ncsn"
        state = reference_state_dict(self.net, self.kind, self.sigmas if v2 else None)
        model = {prefix + k: v.detach().clone() for k, v in state.items()}
        if not v2:
            return [model, self.adam.state_dict()]
        names = name_map(self.net, self.kind)
        ema = {ref: self.ema[ours].clone() for ref, ours in names.items()}
        return [model, self.adam.state_dict(), 3, FILE_STEP, ema]

    def save(self, path: Path, entries: list | None = None) -> Path:
        torch.save(entries if entries is not None else self.entries(), path)
        return path


@pytest.fixture(scope="module")
def v2() -> Released:
    return Released(RECIPE)


@pytest.fixture
def recipe_file(tmp_path):
    def write(raw: dict = RECIPE) -> Path:
        path = tmp_path / f"{raw['name']}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path
    return write


def import_file(ckpt: Path, recipe: Path, run: Path, *args):
    return cli("import", ckpt, "--recipe", recipe, "--run-dir", run, *args)


def samples(result_path: Path) -> np.ndarray:
    with h5py.File(result_path, "r") as f:
        return f["samples"][:]


# ------------------------------------------------------------------ the name map

RELEASED_KEY_LISTS = {  # kind, image size, L: (keys, sha256 of the "<key> <shape>" lines)
    ("ncsnv2", 32, 232): (154, "1671c4ac329e61c9f4a30216ff6e7b2aacafe0f8b8144e43d2c550a9c461794a"),
    ("ncsnv2_deeper", 128, 1086):
        (192, "7fbef257f4b4f407b6c8a425e9568a5c44b53b215dd7695c31015632c8f9f2da"),
    ("ncsnv2_deepest", 256, 2311):
        (230, "c059baba926acd4e0f27b77bd04c1a69a2b4a6de0c79400311f2eb4258f5fcbb"),
    ("ncsn", 32, 10): (173, "0ac25e580fa34962e33317184d03f2a7559bc5e596dfcb80fe1ceea8e48f1d5b"),
}


@pytest.mark.parametrize("kind, size, levels", list(RELEASED_KEY_LISTS))
def test_names_shapes_and_order_are_the_released_ones(kind, size, levels):
    """At ngf 128 and 3 channels the renamed state dict lists exactly the keys and shapes of
    the released checkpoints, in their order (the digests are those of the released files'
    key lists, one '<key> <shape>' line per entry)."""
    with torch.device("meta"):
        net = default_registry().build("net", {"kind": kind, "ngf": 128},
                                       shape=(3, size, size), num_levels=levels)
    sigmas = torch.empty(levels, device="meta") if kind != "ncsn" else None
    lines = [f"{k} {tuple(v.shape)}" for k, v in reference_state_dict(net, kind, sigmas).items()]
    count, digest = RELEASED_KEY_LISTS[(kind, size, levels)]
    assert len(lines) == count
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("name, kind, sigma_max, levels", [
    ("ncsnv2_cifar10", "ncsnv2", 50, 232), ("ncsnv2_celeba", "ncsnv2", 90, 500),
    ("ncsnv2_church", "ncsnv2_deeper", 140, 788), ("ncsnv2_bedroom", "ncsnv2_deeper", 190, 1086),
    ("ncsnv2_ffhq", "ncsnv2_deepest", 348, 2311), ("ncsn_cifar10", "ncsn", 1, 10),
])
def test_shipped_recipes_take_the_released_files(name, kind, sigma_max, levels):
    """The net the released code picks for the dataset, at ngf 128, and the noise levels its
    files store: exp(linspace(log sigma_1, log 0.01, L)) in float64, saved as float32."""
    registry = default_registry()
    recipe = load_recipe(RECIPES / f"{name}.yaml", registry)
    assert (recipe.net.kind, recipe.net.params.ngf) == (kind, 128)
    released = torch.tensor(np.exp(np.linspace(np.log(sigma_max), np.log(0.01), levels))).float()
    file = ReleasedCheckpoint(Path(name), {"sigmas": released}, {})
    check_sigmas(file, assemble.build_schedule(recipe, registry).sigmas)
    assert recipe.averager.kind == ("none" if kind == "ncsn" else "ema")


# ------------------------------------------------------------------ import

def test_import_holds_raw_ema_and_adam_state_under_scoretk_names(v2, tmp_path, recipe_file):
    ckpt, run = v2.save(tmp_path / "checkpoint_7.pth"), tmp_path / "runs" / "new"  # parent too
    result = import_file(ckpt, recipe_file(), run)
    assert result.exit_code == 0, result.output + result.stderr
    assert "NCSNv2, [model, optimizer, epoch, step, ema], step 7" in result.output
    state = load_checkpoint(run / "checkpoints" / f"ckpt-{FILE_STEP:08d}.pt")
    assert state["step"] == FILE_STEP and state["shape"] == [1, 8, 8]
    assert (run / "latest").read_text().strip() == f"ckpt-{FILE_STEP:08d}.pt"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["net"] == RECIPE["net"]
    for name, tensor in v2.net.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name
    names = [n for n, _ in v2.net.named_parameters()]
    for name, shadow in zip(names, state["averager"]["shadow"]):
        assert torch.equal(shadow, v2.ema[name]), name
    assert state["averager"]["n"] == FILE_STEP
    params = dict(v2.net.named_parameters())
    for i, name in enumerate(names):
        theirs, ours = v2.adam.state[params[name]], state["optimizer"]["state"][i]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours[key], theirs[key]), (name, key)
        assert float(ours["step"]) == ADAM_STEPS
    assert state["optimizer"]["param_groups"][0]["lr"] == RECIPE["optim"]["lr"]


def test_imported_run_samples_with_the_ema_weights_and_resumes_training(v2, tmp_path,
                                                                        recipe_file):
    ckpt, run, recipe = v2.save(tmp_path / "c.pth", v2.entries(prefix="")), tmp_path / "run", \
        recipe_file()
    assert import_file(ckpt, recipe, run).exit_code == 0  # no `module.` prefix: also fine
    out = tmp_path / "run.h5"
    result = cli("sample", "--run", run, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output + result.stderr
    exported = tmp_path / "ema.safetensors"
    assert cli("export", "--run", run, "--out", exported).exit_code == 0
    weights = load_exported(exported)["model"]
    for name, tensor in v2.ema.items():  # what sampling used: the file's EMA weights
        assert torch.equal(weights[name], tensor), name

    result = cli("train", recipe, "--run-dir", run, "-o", f"train.iterations={FILE_STEP + 2}")
    assert result.exit_code == 0, result.output + result.stderr
    assert f"resuming at step {FILE_STEP}" in result.stderr
    state = load_checkpoint(run / "checkpoints" / f"ckpt-{FILE_STEP + 2:08d}.pt")
    assert state["step"] == FILE_STEP + 2
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {ADAM_STEPS + 2}


def test_v1_layout_imports_with_the_step_adam_counted(tmp_path, recipe_file):
    released = Released(V1, seed=1)
    ckpt, run = released.save(tmp_path / "checkpoint.pth"), tmp_path / "run"
    result = import_file(ckpt, recipe_file(V1), run)
    assert result.exit_code == 0, result.output + result.stderr
    assert "NCSN v1 CondRefineNetDilated, [model, optimizer], step 2" in result.output
    state = load_checkpoint(run / "checkpoints" / f"ckpt-{ADAM_STEPS:08d}.pt")
    for name, tensor in released.net.state_dict().items():
        assert torch.equal(state["model"][name], tensor), name
    result = cli("sample", "--run", run, "--out", tmp_path / "s.h5", "--device", "cpu")
    assert result.exit_code == 0, result.output + result.stderr


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper(entries: list, case: str, tmp_path: Path) -> tuple[list | object, str]:
    """The released entries with one thing wrong, and what the refusal must name."""
    model = entries[0]
    if case == "missing key":
        del model["module.res2.0.conv1.weight"]
        return entries, "missing key 'res2.0.conv1.weight'"
    if case == "unexpected key":
        model["module.res9.0.conv1.weight"] = torch.zeros(1)
        return entries, "unexpected key 'res9.0.conv1.weight'"
    if case == "shape":
        model["module.begin_conv.weight"] = torch.zeros(5, 1, 3, 3)
        return entries, "'begin_conv.weight' has shape (5, 1, 3, 3)"
    if case == "sigmas":
        model["module.sigmas"] = model["module.sigmas"].clone()
        model["module.sigmas"][2] *= 1.01
        return entries, "noise level 2 differs"
    if case == "levels":
        model["module.sigmas"] = model["module.sigmas"][:3].clone()
        return entries, "3 noise levels"
    if case == "ema":
        del entries[4]["res1.0.conv1.weight"]
        return entries, "EMA state: missing key 'res1.0.conv1.weight'"
    if case == "net kind":
        model["module.res5.0.conv1.weight"] = torch.zeros(1)
        return entries, "NCSNv2Deeper net"
    if case == "not a list":
        return {"model": model}, "not a released NCSN/NCSNv2 checkpoint"
    if case == "code":
        return [Evil(tmp_path / "PWNED"), *entries[1:]], "refused"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing key", "unexpected key", "shape", "sigmas", "levels",
                                  "ema", "net kind", "not a list", "code"])
def test_tampered_files_are_refused_in_one_line_leaving_nothing(v2, tmp_path, recipe_file,
                                                                 case):
    entries, needle = _tamper(v2.entries(), case, tmp_path)
    ckpt = v2.save(tmp_path / "bad.pth", entries)
    runs = tmp_path / "runs"
    runs.mkdir()
    result = import_file(ckpt, recipe_file(), runs / "imported")
    assert_one_line_error(result, needle)
    assert list(runs.iterdir()) == []  # no run directory, no temporary one
    assert not (tmp_path / "PWNED").exists()


def test_a_recipe_for_another_net_or_without_numbers_is_refused(v2, tmp_path, recipe_file):
    ckpt = v2.save(tmp_path / "c.pth")
    result = import_file(ckpt, recipe_file(V1), tmp_path / "r1")
    assert_one_line_error(result, "NCSNv2 net", "'ncsn'")
    result = import_file(ckpt, recipe_file(), tmp_path / "r2", "-o", "net.ngf=8")
    assert_one_line_error(result, "'begin_conv.weight' has shape (4, 1, 3, 3)", "net.ngf")
    result = import_file(ckpt, recipe_file(), tmp_path / "r3", "-o", "schedule.sigma_max=auto")
    assert_one_line_error(result, "schedule.sigma_max", "'auto'")
    no_average = {**RECIPE, "name": "no_average", "averager": {"kind": "none"}}
    result = import_file(ckpt, recipe_file(no_average), tmp_path / "r4")
    assert_one_line_error(result, "averager", "EMA weights")
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_an_existing_run_directory_is_left_alone(v2, tmp_path, recipe_file):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep").write_text("x")
    result = import_file(v2.save(tmp_path / "c.pth"), recipe_file(), run)
    assert_one_line_error(result, "already exists")
    assert [p.name for p in run.iterdir()] == ["keep"]


def test_sampling_a_released_file_directly_points_to_import(v2, tmp_path):
    result = cli("sample", "--checkpoint", v2.save(tmp_path / "c.pth"), "--out",
                 tmp_path / "s.h5")
    assert_one_line_error(result, "scoretk import")


# ------------------------------------------------------------------ export

@pytest.fixture(scope="module")
def imported_run(v2, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imported")
    recipe = d / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert import_file(v2.save(d / "c.pth"), recipe, d / "run").exit_code == 0
    return d / "run"


@pytest.mark.parametrize("raw", [False, True])
def test_exported_weights_sample_exactly_as_the_run(imported_run, tmp_path, raw):
    flag = ["--raw-weights"] if raw else []
    model = tmp_path / "model.safetensors"
    result = cli("export", "--run", imported_run, "--out", model, *flag)
    assert result.exit_code == 0, result.output + result.stderr
    from_run, from_file = tmp_path / "run.h5", tmp_path / "file.h5"
    for source, out in ((["--run", imported_run], from_run), (["--checkpoint", model], from_file)):
        result = cli("sample", *source, "--out", out, "--device", "cpu", *flag)
        assert result.exit_code == 0, result.output + result.stderr
    assert np.array_equal(samples(from_run), samples(from_file))
    with h5py.File(from_file, "r") as f:
        assert bool(f.attrs["raw_weights"]) is raw
    exported = load_exported(model)
    assert exported["step"] == FILE_STEP and exported["shape"] == [1, 8, 8]
    assert exported["weights"] == ("raw" if raw else "averaged")
    assert exported["recipe"]["net"] == RECIPE["net"]


def test_export_refusals(imported_run, tmp_path):
    model = tmp_path / "m.safetensors"
    assert cli("export", "--run", imported_run, "--out", model).exit_code == 0
    assert_one_line_error(cli("export", "--run", imported_run, "--out", model),
                          "already exists")
    assert_one_line_error(cli("export", "--run", imported_run, "--out", tmp_path / "m.pt"),
                          "must end in .safetensors")
    assert_one_line_error(cli("export", "--out", tmp_path / "x.safetensors"), "--run")
    result = cli("sample", "--checkpoint", model, "--out", tmp_path / "s.h5", "--raw-weights")
    assert_one_line_error(result, "averaged weights only")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    result = cli("sample", "--checkpoint", tmp_path / "junk.safetensors", "--out",
                 tmp_path / "s.h5")
    assert_one_line_error(result, "not a readable safetensors file")


def test_without_safetensors_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"scoretk\[safetensors\]"):
        export_weights({"recipe": {}, "shape": [1]}, {"w": torch.zeros(1)},
                       tmp_path / "m.safetensors", weights="raw")
    assert not (tmp_path / "m.safetensors").exists()
