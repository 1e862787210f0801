"""Execute the tutorials (tutorials/*.md, MyST Markdown notebooks) so they cannot rot.

The code cells of each notebook are run in order in one namespace, in a temporary directory,
with matplotlib's Agg backend; then a few facts the text states are checked. No Jupyter
kernel is needed: the cells are plain Python (no magics).
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.S | re.M)
HEADER = "jupytext:\n  text_representation:\n    extension: .md\n    format_name: myst"


def code_cells(path: Path) -> list[str]:
    """The code cells of a MyST notebook, without cell options (``:tags:`` or a ``---`` block)."""
    cells = []
    for body in CELL.findall(path.read_text(encoding="utf-8")):
        lines = body.splitlines()
        if lines and lines[0].strip() == "---":
            end = lines.index("---", 1)
            lines = lines[end + 1 :]
        lines = [line for line in lines if not line.startswith(":")]
        cells.append("\n".join(lines))
    return cells


def run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    path = TUTORIALS / f"{name}.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n") and HEADER in text, "not a jupytext MyST notebook"
    cells = code_cells(path)
    assert len(cells) >= 8
    for i, cell in enumerate(cells):
        assert not re.search(r"^\s*[%!]", cell, re.M), f"cell {i} uses IPython magics"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"tutorial_{name}"}
    try:
        for i, cell in enumerate(cells):
            exec(compile(cell, f"{path.name}, code cell {i + 1}", "exec"), namespace)
    finally:
        plt.close("all")
    return namespace


def test_tutorials_are_all_tested():
    assert {p.stem for p in TUTORIALS.glob("*.md")} == {"workflow", "large_data"}


def test_workflow(tmp_path, monkeypatch):
    ns = run("workflow", tmp_path, monkeypatch)
    comparison = ns["comparison"].set_index(["cell type", "method"])
    fp = comparison["false positives"].unstack("method")
    tp = comparison["true positives"].unstack("method")
    # what the text says: the test over cells calls about half of the non-DE genes DE, the
    # LMM a handful; both find most DE genes
    non_de = comparison["non-DE genes"].unstack("method").iloc[:, 0]
    assert (fp["Wilcoxon over cells"] > 0.3 * non_de).all()
    assert (fp["LMM, n - p df"] <= 5).all()
    assert (fp["LMM, moderated (default)"] <= fp["LMM, n - p df"]).all()
    de = comparison["DE genes"].unstack("method").iloc[:, 0]
    assert (tp["LMM, n - p df"] >= 0.7 * de).all()
    assert set(ns["adata"].uns) >= {"flashmm", "flashmm_satt"}


def test_large_data(tmp_path, monkeypatch):
    ns = run("large_data", tmp_path, monkeypatch)
    assert ns["same"]  # dask == backed
    assert ns["backed"].uns["flashmm"]["n_cells"] == 20000
    np.testing.assert_allclose(
        ns["reml"].coef, ns["backed"].varm["flashmm_coef"].to_numpy(), rtol=1e-7, atol=1e-9
    )
    total, stats, stats_dask = ns["total"], ns["stats"], ns["stats_dask"]
    assert stats.covariate_names == tuple(ns["X"].columns)  # loaded with its names
    assert stats.d == (16,)
    assert total.n == stats.n
    for name in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm"):
        np.testing.assert_allclose(getattr(total, name), getattr(stats, name), rtol=1e-12)
        np.testing.assert_allclose(getattr(stats_dask, name), getattr(stats, name), rtol=1e-12)
    assert not list(tmp_path.iterdir())  # the tutorial cleans up after itself
