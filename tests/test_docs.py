"""The documentation's examples work: the recipes in README.md and docs/ load, the plugin
package docs/plugins.md shows is the one the tests install, its recipe trains and samples, and
every link between the documents points at a file and anchor that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from scoretk import describe
from scoretk.recipe import Recipe

from conftest import run_cli

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks_after(path: Path, marker: str) -> list[str]:
    """The fenced code blocks directly after each `<!-- marker...` comment."""
    pattern = re.escape(f"<!-- {marker}") + r"[^\n]*-->\n```[a-z]*\n(.*?)```"
    return re.findall(pattern, path.read_text(), re.S)


@pytest.mark.parametrize("path, marker", [(ROOT / "README.md", "recipe skeleton"),
                                          (ROOT / "docs" / "recipes.md", "complete recipe")])
def test_documented_recipes_load(path, marker):
    (text,) = blocks_after(path, marker)
    recipe = Recipe.from_dict(yaml.safe_load(text), describe.builtin_registry(), str(path))
    assert recipe.train.iterations > 0


def test_plugins_doc_shows_the_tested_package():
    shown = re.findall(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```",
                       (ROOT / "docs" / "plugins.md").read_text(), re.S)
    assert [p for p, _ in shown] == ["tests/plugins/scoretk_hello/pyproject.toml",
                                     "tests/plugins/scoretk_hello/scoretk_hello/__init__.py"]
    for path, text in shown:
        assert text == (ROOT / path).read_text(), f"docs/plugins.md: {path} differs"


def test_plugins_doc_recipe_trains_and_samples_with_the_plugin(plugin_site, tmp_path):
    (text,) = blocks_after(ROOT / "docs" / "plugins.md", "complete recipe")
    recipe = tmp_path / "tiny_toy.yaml"
    recipe.write_text(text)
    env = {"PYTHONPATH": str(plugin_site), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    out = run_cli("train", str(recipe), "--run-dir", str(run), "-o", "train.iterations=20",
                  "-o", "train.log_every=10", "-o", "train.batch_size=64", env=env)
    assert out.returncode == 0, out.stderr
    out = run_cli("sample", "--run", str(run), "--out", str(tmp_path / "s.h5"), "-n", "4",
                  "-o", "sampler.steps_per_level=2", env=env)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    return (set(re.findall(r'<a id="([^"]+)"></a>', text))
            | {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)})


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_documents_resolve(doc):
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", doc.read_text()):
        if target.startswith(("http:", "https:")):
            continue
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(path), f"{doc.name}: no anchor #{anchor} in {path.name}"


def test_readme_layout_names_every_module_and_document():
    """The README's layout block lists each module and package of scoretk/ and plugins/ by
    name, and each document in docs/: a new file without a place there fails here."""
    text = ROOT.joinpath("README.md").read_text()
    layout = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", layout))
    missing = []
    for top in ("scoretk", "plugins"):
        for path in (ROOT / top).rglob("*.py"):
            name = path.parent.name if path.name == "__init__.py" else path.stem
            if name not in words and name not in ("__main__", top):
                missing.append(str(path.relative_to(ROOT)))
    missing += [d.name for d in (ROOT / "docs").glob("*.md")
                if d.stem not in words and d.name != "README.md"]
    assert not missing, f"not in README.md's layout section: {missing}"
