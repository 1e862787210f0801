"""Sphinx configuration of the scflashmm documentation (myst-nb, numpydoc docstrings)."""

from __future__ import annotations

from datetime import date
from importlib.metadata import version as _version

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
    "sphinx.ext.mathjax",
]

# tutorials/ (at the repository root, executed by tests/test_tutorials.py) is linked in as
# docs/tutorials; the docs show them without running them, so the build stays fast.
nb_execution_mode = "off"
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
