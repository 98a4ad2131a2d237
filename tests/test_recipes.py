"""Recipes: valid ones load and override; each malformed one fails in one line naming the field."""
from __future__ import annotations

import copy
import os

import pytest
import yaml
from click.testing import CliRunner

from scoretk.cli import main
from scoretk.plugins import default_registry
from scoretk.recipe import RecipeError, Recipe, load_recipe
from conftest import TOY_RECIPE, run_cli


def mutate(fn):
    recipe = copy.deepcopy(TOY_RECIPE)
    fn(recipe)
    return yaml.safe_dump(recipe)


def _set(path, value):
    def fn(r):
        node = r
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return fn


def _drop(path):
    def fn(r):
        node = r
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return fn


def _rename(old, new):
    def fn(r):
        r[new] = r.pop(old)
    return fn


BAD = [  # (id, file text or None for a missing file, extra CLI args, text the message must hold)
    ("typo-top-level-key", mutate(_rename("train", "trian")), [], "trian: unknown field"),
    ("typo-component-param", mutate(_set(["net", "hiddn"], 3)), [], "net.hiddn: unknown field"),
    ("typo-optim-key", mutate(_set(["optim", "learning_rate"], 0.1)), [], "optim.learning_rate"),
    ("wrong-type-int", mutate(_set(["train", "iterations"], "lots")), [], "train.iterations"),
    ("wrong-type-float", mutate(_set(["schedule", "sigma_min"], "small")), [], "schedule.sigma_min"),
    ("unknown-kind", mutate(_set(["net", "kind"], "mpl")), [], "did you mean 'mlp'"),
    ("unknown-sampler", mutate(_set(["sampler", "kind"], "langevin")), [], "sampler.kind"),
    ("missing-section", mutate(_drop(["net"])), [], "net: Field required"),
    ("missing-train", mutate(_drop(["train"])), [], "train: Field required"),
    ("missing-several", mutate(lambda r: [r.pop(s) for s in ("net", "sampler", "train")]), [],
     "net, sampler, train: Field required (net, sampler: {kind: ...} blocks"),
    ("only-a-name", "name: x\n", [], "data, schedule, net, loss, sampler, averager, train: "
     "Field required"),
    ("missing-kind", mutate(_drop(["net", "kind"])), [], "net.kind: Field required"),
    ("section-not-mapping", mutate(_set(["net"], "mlp")), [], "net: expected a mapping"),
    ("negative-batch", mutate(_set(["train", "batch_size"], -4)), [], "train.batch_size"),
    ("negative-net-size", mutate(_set(["net", "hidden"], -1)), [], "net.hidden"),
    ("zero-steps", mutate(_set(["sampler", "steps_per_level"], 0)), [], "sampler.steps_per_level"),
    ("bad-device", mutate(_set(["train", "device"], "tpu")), [], "train.device"),
    ("bad-betas", mutate(_set(["optim", "betas"], [0.9])), [], "optim.betas"),
    ("bad-name", mutate(_set(["name"], "../evil")), [], "name:"),
    ("yaml-syntax", "name: toy\ndata: {kind: toy2d\n", [], "invalid YAML at line"),
    ("python-tag", "name: !!python/object/apply:os.system ['echo pwned']\n", [],
     "unsupported YAML tag"),
    ("not-a-mapping", "- just\n- a list\n", [], "must be a mapping"),
    ("empty-file", "", [], "empty recipe"),
    ("file-not-found", None, [], "file not found"),
    ("bad-override-value", mutate(lambda r: None), ["-o", "train.iterations=abc"], "train.iterations"),
    ("bad-override-syntax", mutate(lambda r: None), ["-o", "train.iterations"], "dotted.key=value"),
    ("unknown-override", mutate(lambda r: None), ["-o", "net.widht=3"],
     "error: -o net.widht=3: unknown field"),
    ("override-blamed", mutate(lambda r: None), ["-o", "sampler.eps=-1"],
     "error: -o sampler.eps=-1: Input should be greater than 0, or 'auto'"),
    ("override-inside-a-section", mutate(lambda r: None), ["-o", "net={kind: mlp, hiden: 3}"],
     'error: -o net={"kind": "mlp", "hiden": 3}: net.hiden: unknown field'),
    ("override-deep-value", mutate(lambda r: None),
     ["-o", "net.hidden=" + "[" * 50000 + "]" * 50000], "error: -o net.hidden=[[[[[[[["),
    ("deep-nesting", "name: " + "[" * 100000 + "]" * 100000, [],
     "invalid YAML: nested more than 64 levels deep (line 1)"),
    ("deep-mapping", "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 200)), [],
     "nested more than 64 levels deep"),
    ("too-large", mutate(_set(["description"], "x" * (1 << 20))), [], "larger than 1 MiB"),
    ("not-utf8", b"name: \xff\xfe\n", [], "not UTF-8"),
]


@pytest.mark.parametrize("text,args,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_recipe_exits_2_with_one_line(tmp_path, text, args, expected):
    path = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    result = CliRunner().invoke(main, ["recipe", "validate", str(path), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Traceback" not in result.output and len(lines[0]) < 300


@pytest.mark.parametrize("field,value", [("sampler.eps", "-1"), ("sampler.eps", "abc"),
                                         ("optim.betas", "[1, a]"), ("train.batch_threads", "0"),
                                         ("optim.grad_clip", "-1"), ("train.time_limit_minutes", "x")])
def test_pydantic_internals_never_reach_the_message(write_recipe, toy_recipe, field, value):
    result = CliRunner().invoke(main, ["recipe", "validate", str(write_recipe(toy_recipe)),
                                       "-o", f"{field}={value}"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith(f"error: -o {field}=") and "Value error" not in line, line
    for tag in ("constrained", "literal[", "function-", "float]", "union", "json-or-python"):
        assert tag not in line, line


def _special_file(kind: str, tmp_path):
    if kind == "fifo":
        path = tmp_path / "recipe.yaml"
        os.mkfifo(path)
        return str(path)
    return "/dev/zero"


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_recipe_must_be_a_regular_file(tmp_path, kind):
    """A FIFO would block the read for ever, /dev/zero fill memory: both are refused at once."""
    path = _special_file(kind, tmp_path)
    out = run_cli("recipe", "validate", path, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"error: {path}: not a regular file (a pipe or a device?); " \
                                 "expected a YAML file"


def test_debug_flag_shows_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(mutate(_set(["train", "iterations"], "lots")))
    result = CliRunner().invoke(main, ["--debug", "recipe", "validate", str(path)])
    assert result.exit_code != 0 and isinstance(result.exception, RecipeError)


def test_python_tag_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    result = CliRunner().invoke(main, ["recipe", "validate", str(path)])
    assert result.exit_code == 2 and not marker.exists()


def test_valid_recipe_round_trips_and_overrides(write_recipe, toy_recipe):
    reg = default_registry()
    recipe = load_recipe(write_recipe(toy_recipe), reg,
                         ["train.iterations=7", "net.hidden=16", "sampler.eps=2e-3"])
    assert recipe.train.iterations == 7
    assert recipe.net.params.hidden == 16 and recipe.net.params.depth == 2
    assert recipe.sampler.params.eps == pytest.approx(2e-3)
    again = Recipe.from_dict(recipe.dump(), reg)
    assert again.dump() == recipe.dump()
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml()), reg).dump() == recipe.dump()


def test_shipped_recipes_validate():
    from pathlib import Path
    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert len(recipes) >= 7
    for path in recipes:
        result = CliRunner().invoke(main, ["recipe", "validate", str(path)])
        assert result.exit_code == 0, (path, result.output)


def test_an_override_of_kind_starts_the_block_afresh():
    from scoretk.recipe import apply_overrides

    raw = {"sampler": {"kind": "heun", "s_churn": 5.0, "steps": 20}}
    assert apply_overrides(raw, ["sampler.kind=pc", "sampler.snr=0.2"]) == \
        {"sampler": {"kind": "pc", "snr": 0.2}}  # heun's parameters would be unknown to pc
    assert apply_overrides(raw, ["sampler.kind=heun", "sampler.steps=9"]) == \
        {"sampler": {"kind": "heun", "s_churn": 5.0, "steps": 9}}  # the same kind keeps them
    assert raw["sampler"]["s_churn"] == 5.0  # the input is not changed
