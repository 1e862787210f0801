"""The documentation: it builds with ``sphinx-build -W``, its quick start runs, and the AnnData
contract page names every key that ``flashmm_de`` writes."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

import scflashmm as sfm

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC_PACKAGES = ("sphinx", "myst_nb", "sphinx_book_theme")


def test_sphinx_build_without_warnings(tmp_path):
    missing = [m for m in DOC_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"documentation tools not installed ({', '.join(missing)}): pip install '.[doc]'"
        )
    # build a copy (tutorials/ is linked in as docs/tutorials; copytree follows the link), so
    # that autosummary's generated pages do not land in the work tree
    src = tmp_path / "docs"
    shutil.copytree(
        DOCS, src, ignore=shutil.ignore_patterns("_build", "generated", "jupyter_execute")
    )
    shutil.copy(DOCS.parent / "CONTRIBUTING.md", tmp_path)  # included by docs/contributing.md
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), str(src), str(tmp_path / "html")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    html = tmp_path / "html"
    for page in ("index", "installation", "quickstart", "model", "anndata", "api", "parity",
                 "benchmarks", "contributing", "tutorials/workflow",
                 "tutorials/large_data"):  # fmt: skip
        assert (html / f"{page}.html").exists(), page
    api = (html / "generated" / "scflashmm.tl.flashmm_de.html").read_text(encoding="utf-8")
    assert "key_added" in api and "Returns" in api  # docstrings rendered, not raw directives
    for name in ("volcano", "qq", "variance_components"):
        assert (html / "generated" / f"scflashmm.pl.{name}.html").exists()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


@pytest.mark.parametrize("page", ["quickstart.md", "index.md"])
def test_code_on_the_pages_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(DOCS / page)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, page, "exec"), namespace)
    finally:
        plt.close("all")


def test_anndata_contract_names_every_key_written():
    adata = sfm.datasets.simulate_rnaseq(n_genes=30, n_cells=600, n_clusters=2, seed=3)
    sfm.tl.flashmm_de(
        adata,
        "~0+log(libsize)+cls+cls:trt",
        "sam",
        is_counts=True,
        df="satterthwaite",
        contrasts={"diff": "cls[2]:trt[T.B] - cls[1]:trt[T.B]"},
        key_added="k",
    )
    page = (DOCS / "anndata.md").read_text(encoding="utf-8")
    for key in adata.varm:
        assert f"`{{key}}{key[1:]}`" in page, f"varm key {key} is not documented"
    for key in adata.uns["k"]:
        assert f"`{key}`" in page, f"uns key {key} is not documented"
    for key in adata.uns["k"]["params"]:
        assert f"`{key}`" in page, f"params key {key} is not documented"
    for column in sfm.get.flashmm_df(adata, key="k").columns:
        assert f"`{column}`" in page, f"flashmm_df column {column} is not documented"
