"""Sphinx configuration of the scflashmm documentation (myst-nb, numpydoc docstrings)."""

from __future__ import annotations

import os
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

project = "scflashmm"
author = "scflashmm developers"
copyright = f"{date.today():%Y}, {author}"
release = _version("scflashmm")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    # MathJax 3 served from the build's _static (the package ships it): no CDN, works offline
    "sphinx-mathjax-offline",
]

# tutorials/ (at the repository root) is linked in as docs/tutorials. The tutorials are
# executed at build time, so the pages show their tables and figures; "cache" keeps the
# outputs under the build directory and re-runs a tutorial only when its code changed. They
# run in a temporary directory (they write files), and an error in a cell fails the build.
nb_execution_mode = os.environ.get("SCFLASHMM_DOCS_EXECUTE", "cache")
nb_execution_in_temp = True
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_scripts", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# API reference: numpydoc docstrings with types only in the signatures
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "exclude-members": "__init__"}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
# "Returns" sections here are free text (no type line, scverse style): render them as written
napoleon_custom_sections = [("Returns", "free_text_returns")]
# types come from the signatures (numpydoc docstrings here give none) and are shown with
# the parameters they belong to
autodoc_typehints = "description"
autodoc_typehints_description_target = "all"
autodoc_typehints_format = "short"

# scverse look
html_theme = "sphinx_book_theme"
html_title = "scflashmm"
html_static_path = ["_static"]
html_theme_options = {
    "use_repository_button": False,
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
pygments_style = "default"

# Intersphinx: links to the projects' own API pages. Their inventories come from the web, and a
# build must not reach out to the network unasked (CI here has none; -W would fail on "failed to
# reach any of the inventories"), so the downloaded mapping is opt-in:
# SCFLASHMM_DOCS_INTERSPHINX=1 (e.g. on a docs host). An inventory saved as
# docs/_inventories/NAME.inv is used offline.
_INTERSPHINX = {
    "python": "https://docs.python.org/3/",
    "anndata": "https://anndata.readthedocs.io/en/stable/",
    "scanpy": "https://scanpy.readthedocs.io/en/stable/",
    "numpy": "https://numpy.org/doc/stable/",
    "scipy": "https://docs.scipy.org/doc/scipy/",
    "pandas": "https://pandas.pydata.org/docs/",
    "matplotlib": "https://matplotlib.org/stable/",
}
_INVENTORIES = Path(__file__).parent / "_inventories"


_ONLINE = os.environ.get("SCFLASHMM_DOCS_INTERSPHINX") == "1"
intersphinx_mapping = {
    name: (url, str(_INVENTORIES / f"{name}.inv"))
    for name, url in _INTERSPHINX.items()
    if (_INVENTORIES / f"{name}.inv").exists()
}
if _ONLINE:
    intersphinx_mapping |= {
        name: (url, None) for name, url in _INTERSPHINX.items() if name not in intersphinx_mapping
    }
intersphinx_timeout = 10
