"""`scoretk describe`: parameters read from the params models, for built-in and third-party
components alike; the README's component reference is its Markdown output."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import pytest
from click.testing import CliRunner
from pydantic import Field

from scoretk import describe
from scoretk.cli import main
from scoretk.registry import Params


ROOT = Path(__file__).parent.parent
AWAITING_DESCRIPTIONS: set[tuple[str, str]] = set()
"""Components whose parameters are not described yet (none today; keep the check)."""


@pytest.fixture(scope="module")
def builtins():
    return describe.builtin_registry()


def test_every_builtin_parameter_is_described(builtins):
    undescribed = {(c.kind, c.name): [p.name for p in describe.param_docs(c.params)
                                      if not p.description] for c in builtins.all()}
    undescribed = {k: v for k, v in undescribed.items() if v}
    assert set(undescribed) <= AWAITING_DESCRIPTIONS, undescribed
    # an exemption that is no longer needed must go
    assert set(undescribed) == AWAITING_DESCRIPTIONS & {(c.kind, c.name) for c in builtins.all()}
    for section in ["recipe", *describe.plain_sections()]:
        entry = describe.section_entry(section)
        assert entry.params and all(p.description for p in entry.params), section


class Example(Params):
    level: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(description="a level")
    rate: float = Field(0.5, gt=0, lt=1)
    channels: Literal[1, 3] = 3
    mode: Literal["a", "b"] = "a"
    pair: tuple[float, float] = (0.9, 0.999)
    points: tuple[tuple[float, float], ...] = ((1.0, 2.0),)
    limit: float | None = Field(None, ge=0)
    tag: str = Field("x", pattern=r"^[a-z]+$")
    names: list[str] = Field(default_factory=lambda: ["p", "q"])


def test_type_default_and_constraint_come_from_the_model():
    docs = {p.name: (p.type, p.default, p.constraint) for p in describe.param_docs(Example)}
    assert docs == {
        "level": ("float or auto", "required", "> 0"),
        "rate": ("float", "0.5", "> 0; < 1"),
        "channels": ("int", "3", "one of 1, 3"),
        "mode": ("str", "a", "one of a, b"),
        "pair": ("[float, float]", "[0.9, 0.999]", ""),
        "points": ("list of [float, float]", "[[1.0, 2.0]]", ""),
        "limit": ("float or null", "null", ">= 0"),
        "tag": ("str", "x", "matches ^[a-z]+$"),
        "names": ("list of str", '["p", "q"]', ""),
    }


def test_builtin_component_and_section_as_text():
    out = CliRunner().invoke(main, ["describe", "schedule", "geometric"])
    assert out.exit_code == 0, out.output
    assert "schedule: {kind: geometric}  (schedule from plugin schedules)" in out.output
    assert "  sigma_max: float or auto, > 0; required\n" in out.output
    assert "  overlap: float, > 0; < 1; default 0.5\n" in out.output
    out = CliRunner().invoke(main, ["describe", "train"])  # a section that is not a component
    assert "  iterations: int, > 0; required\n" in out.output
    assert "  device: str, one of auto, cpu, cuda, mps; default auto\n" in out.output
    data = CliRunner().invoke(main, ["describe", "data"])  # section name for kind `dataset`
    assert data.output == CliRunner().invoke(main, ["describe", "dataset"]).output
    assert "data: {kind: toy2d}" in data.output and "data: {kind: digits}" in data.output


def test_overview_lists_kinds_sections_and_components(builtins):
    out = CliRunner().invoke(main, ["describe"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line.split() for line in out.output.splitlines()[1:10]}
    assert rows["data"][:3] == ["data", "dataset", "Dataset"]
    assert "digits," in rows["data"] and "ncsnv2," in rows["net"]
    assert rows["train"][1] == "-"


@pytest.mark.parametrize("args, message", [
    (["nett"], "unknown kind or section 'nett' (did you mean 'net'?)"),
    (["digits"], "(did you mean `scoretk describe dataset digits`?)"),
    (["net", "ncsnv3"], "unknown net 'ncsnv3' (did you mean 'ncsnv2'?)"),
    (["train", "x"], "section 'train' has no components"),
])
def test_unknown_kind_or_name_is_one_line_exit_2(args, message):
    out = CliRunner().invoke(main, ["describe", *args])
    assert out.exit_code == 2
    assert out.output.count("\n") == 1 and message in out.output


def test_third_party_components_are_described(with_plugin_site):
    out = CliRunner().invoke(main, ["describe", "net", "tiny"])
    assert out.exit_code == 0, out.output
    assert "net: {kind: tiny}  (net from plugin hello)" in out.output
    assert "  hidden: int, > 0; default 64\n      width of the hidden layer" in out.output
    out = CliRunner().invoke(main, ["describe", "schedule", "--markdown"])
    assert "| `sigma_max` | float | required | > 0 | the largest noise level, sigma_1 |" \
        in out.output


def test_readme_reference_is_describe_markdown(builtins):
    readme = (ROOT / "README.md").read_text()
    block = re.search(re.escape(describe.README_BEGIN) + r"\n(.*)" + re.escape(describe.README_END),
                      readme, re.S)
    assert block, "README.md lacks the component reference markers"
    assert block.group(1).strip() == describe.markdown(builtins).strip(), (
        "README.md's component reference differs from `scoretk describe --markdown`: run "
        "`make readme` (python -m scoretk.describe README.md) to regenerate it")


def test_markdown_shares_common_and_identical_parameters(builtins):
    text = describe.markdown(builtins)
    assert text.count("| `flip` |") == 1  # every dataset's, in one table
    assert "`ncsnv2`: NCSNv2 RefineNet (32-64 px); output divided by sigma (parameters as " \
           "`ncsn`)" in text
    assert text.count("| `ngf` |") == 1


def test_regeneration_rewrites_only_the_block(tmp_path, capsys):
    doc = tmp_path / "README.md"
    doc.write_text(f"intro\n{describe.README_BEGIN}\nstale\n{describe.README_END}\nafter\n")
    assert describe.main([str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(f"intro\n{describe.README_BEGIN}\n\n#### `data`")
    assert text.endswith(f"{describe.README_END}\nafter\n") and "stale" not in text
    assert describe.main([str(doc)]) == 0 and doc.read_text() == text
    assert "already current" in capsys.readouterr().out
