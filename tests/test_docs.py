"""The documentation: it builds with ``sphinx-build -W``, its quick start runs, and the AnnData
contract page names every key that ``flashmm_de`` writes."""

from __future__ import annotations

import importlib.util
import os
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


PAGES = ("index", "installation", "quickstart", "model", "anndata", "api", "parity",
         "benchmarks", "pseudobulk", "calibration", "contributing", "changelog", "citation",
         "tutorials/workflow", "tutorials/large_data")  # fmt: skip


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> Path:
    """Build the docs once with ``sphinx-build -W``, executing the tutorials; the HTML folder."""
    missing = [m for m in DOC_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"documentation tools not installed ({', '.join(missing)}): pip install '.[doc]'"
        )
    tmp_path = tmp_path_factory.mktemp("docs")
    # build a copy (tutorials/ is linked in as docs/tutorials; copytree follows the link), so
    # that autosummary's generated pages and the execution cache do not land in the work tree
    src = tmp_path / "docs"
    shutil.copytree(
        DOCS, src, ignore=shutil.ignore_patterns("_build", "generated", "jupyter_execute")
    )
    for name in ("CONTRIBUTING.md", "CHANGELOG.md"):  # included by docs/contributing.md, ...
        shutil.copy(DOCS.parent / name, tmp_path)
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), str(src), str(tmp_path / "html")]  # fmt: skip
    # offline, as in CI: no intersphinx download is attempted
    env = os.environ | {"SCFLASHMM_DOCS_INTERSPHINX": "0", "SCFLASHMM_DOCS_EXECUTE": "cache"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "html"


def test_sphinx_build_without_warnings(built_docs):
    html = built_docs
    for page in PAGES:
        assert (html / f"{page}.html").exists(), page
    api = (html / "generated" / "scflashmm.tl.flashmm_de.html").read_text(encoding="utf-8")
    assert "key_added" in api and "Returns" in api  # docstrings rendered, not raw directives
    for name in ("volcano", "qq", "variance_components"):
        assert (html / "generated" / f"scflashmm.pl.{name}.html").exists()


def test_tutorials_are_executed_and_show_their_output(built_docs):
    for name, min_figures in (("workflow", 4), ("large_data", 0)):
        page = (built_docs / "tutorials" / f"{name}.html").read_text(encoding="utf-8")
        assert "cell_output" in page, name
        figures = re.findall(r'<img[^>]+src="[^"]*\.png"', page)
        assert len(figures) >= min_figures, (name, len(figures))
        assert "<table" in page, name  # DataFrames rendered as tables
        assert "Traceback" not in page, name
    assert (built_docs / "_static" / "scaling.png").exists()  # the benchmark figure


def test_math_without_a_cdn(built_docs):
    model = (built_docs / "model.html").read_text(encoding="utf-8")
    assert "math notranslate" in model  # there is math to render
    for page in built_docs.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", text)
        remote = [s for s in scripts if "://" in s or s.startswith("//") or "cdn" in s.lower()]
        assert not remote, (page.name, remote)
    assert (built_docs / "_static" / "mathjax" / "tex-chtml.js").exists()


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
