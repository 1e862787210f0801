"""The tutorials (tutorials/*.md, MyST Markdown notebooks) are well-formed and all published.

They are executed once, by the documentation build (myst-nb, ``nb_execution_mode = "cache"``
in docs/conf.py, with an error in a cell failing the build): tests/test_docs.py builds the
docs with ``sphinx-build -W`` and checks that the executed pages show their figures and
tables. The facts the text of a tutorial states are asserted in hidden cells of the tutorial
itself (``:tags: [remove-cell]``), so that one execution checks them. Running the cells a
second time here would double the cost of the suite for nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.S | re.M)
HEADER = "jupytext:\n  text_representation:\n    extension: .md\n    format_name: myst"


def code_cells(path: Path) -> list[str]:
    """The code cells of a MyST notebook, cell options (``:tags:``) included."""
    return CELL.findall(path.read_text(encoding="utf-8"))


def test_tutorials_are_all_published():
    names = {p.stem for p in TUTORIALS.glob("*.md")}
    assert names == {"workflow", "large_data"}
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for name in names:
        assert f"tutorials/{name}\n" in index


@pytest.mark.parametrize("name", ["workflow", "large_data"])
def test_tutorial_is_a_plain_python_notebook_that_checks_itself(name):
    path = TUTORIALS / f"{name}.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n") and HEADER in text, "not a jupytext MyST notebook"
    assert "name: python3" in text  # the kernel myst-nb executes it with
    cells = code_cells(path)
    assert len(cells) >= 8
    for i, cell in enumerate(cells):
        assert not re.search(r"^\s*[%!]", cell, re.M), f"cell {i} uses IPython magics"
    checks = [c for c in cells if c.startswith(":tags: [remove-cell]") and "assert" in c]
    assert checks, "the tutorial asserts what its text states in a hidden cell"
