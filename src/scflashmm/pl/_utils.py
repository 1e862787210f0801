"""Shared helpers of the plots: reading results, readable term names, the axes, show and save."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd

from .._lmm_test import contrast_matrix
from .._results import results_uns
from ..get import flashmm_df

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Colours of the plots: genes significantly up, down, and the rest.
COLOR_UP = "#d62728"
COLOR_DOWN = "#1f77b4"
COLOR_NS = "#b0b0b0"

#: -log10 of p-values that underflow to 0 is drawn at -log10 of the smallest positive double.
_P_FLOOR = np.finfo(np.float64).tiny


def neg_log10(p: np.ndarray | pd.Series) -> np.ndarray:
    """``-log10(p)``, with ``p = 0`` drawn at the smallest positive double (~307.7)."""
    return -np.log10(np.maximum(np.asarray(p, dtype=np.float64), _P_FLOOR))


def results_info(adata: AnnData, key: str) -> dict:
    """``adata.uns[key]`` of a flashmm fit, or a KeyError that says how to get one."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        msg = f"adata must be an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    return results_uns(adata, key)


def tests_table(adata: AnnData, term: str, key: str) -> pd.DataFrame:
    """Tidy table (:func:`scflashmm.get.flashmm_df`) of one term or contrast, or several.

    ``term`` is tried, in order, as a stored contrast name, as a design column or a pattern
    matching design columns, and as a new contrast expression over the design columns.
    """
    info = results_info(adata, key)
    x_columns = [str(c) for c in info["x_columns"]]
    stored = [str(c) for c in info.get("contrast_names", [])]
    if not isinstance(term, str):
        msg = f"term must be a string, got {type(term).__name__}."
        raise TypeError(msg)
    if term in stored:
        return flashmm_df(adata, key=key, contrast=term)
    try:
        return flashmm_df(adata, key=key, term=term)
    except ValueError:
        pass
    try:
        return flashmm_df(adata, key=key, contrast=term)
    except ValueError as exc:
        contrast_error = exc
    try:
        contrast_matrix({term: term}, x_columns)
    except ValueError:
        pass
    else:  # a valid expression the getter cannot test (e.g. Satterthwaite df): its reason
        raise contrast_error
    known = f", the stored contrasts {stored}" if stored else ""
    msg = (
        f"Unknown term {term!r}: it is neither a design column (the columns are "
        f"{x_columns}{known}) nor a pattern matching one, nor a contrast expression over the "
        "design columns."
    )
    raise ValueError(msg)


def terms_tables(adata: AnnData, term: str | Sequence[str] | None, key: str) -> pd.DataFrame:
    """Tidy table of several terms; ``None``: every design column, then every stored contrast."""
    info = results_info(adata, key)
    if term is None:
        x_columns = [str(c) for c in info["x_columns"]]
        stored = [str(c) for c in info.get("contrast_names", [])]
        return flashmm_df(adata, key=key, term=x_columns, contrast=stored or None)
    items = [term] if isinstance(term, str) else list(term)
    if not items:
        msg = "term is empty: give a term, a list of terms, or None for all of them."
        raise ValueError(msg)
    tables = [tests_table(adata, t, key) for t in items]
    table = pd.concat(tables, ignore_index=True)
    # a column reached by two patterns is shown once
    return table.drop_duplicates(subset=["contrast", "variable"], ignore_index=True)


#: Columns a tidy table needs to be plotted (those of :func:`scflashmm.get.flashmm_df`).
TIDY_COLUMNS = ("variable", "contrast", "log_fc", "p_value", "adj_p_value")

_ENCODED = re.compile(r"^(?P<var>[^\[\]]+)\[(?P<treatment>T\.)?(?P<level>[^\[\]]*)\]$")


def _split_colon(name: str) -> list[str] | None:
    """Split a column name on ``:`` outside brackets; None if it looks like an expression."""
    parts: list[str] = []
    cur: list[str] = []
    depth, tick = 0, False
    for ch in name:
        if ch == "`":
            tick = not tick
        elif not tick and ch in "([":
            depth += 1
        elif not tick and ch in ")]":
            depth -= 1
        elif not tick and depth == 0 and (ch.isspace() or ch in "+-*/"):
            return None  # an operator at the top level: a contrast expression, not a column
        if ch == ":" and depth == 0 and not tick:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts if all(parts) else None


def readable_term(name: str, levels: Mapping[str, Sequence[str]] | None = None) -> str:
    """Spell a design column in words: ``cls[1]:trt[T.B]`` -> ``trt B vs A in cls 1``.

    Treatment-coded factors (``trt[T.B]``) read "trt B vs A", with the reference level ``A``
    taken from ``levels`` (the factor's levels, reference first), or "vs reference" when it is
    not known; full-dummy factors (``cls[1]``) read "cls 1" and, next to an effect, become
    its condition ("in cls 1"); numeric terms (``age``, ``log(libsize)``) keep their name and
    are joined to the other parts of an interaction by ``×``. Anything else (a contrast name
    or expression) is returned unchanged.
    """
    parts = _split_colon(name)
    if parts is None:
        return name
    levels = levels or {}
    effects: list[str] = []
    conditions: list[str] = []
    n_treatment = 0
    for part in parts:
        m = _ENCODED.match(part)
        if m is None:
            effects.append(part.replace("`", ""))
            continue
        var, level = m["var"].replace("`", ""), m["level"]
        if m["treatment"]:
            ref = [str(v) for v in levels.get(var, ())]
            reference = ref[0] if ref else "reference"
            effects.append(f"{var} {level} vs {reference}")
            n_treatment += 1
        else:
            conditions.append(f"{var} {level}")
    if len(effects) > 1 and n_treatment:
        effects = [f"({e})" if " vs " in e else e for e in effects]
    text = " \N{MULTIPLICATION SIGN} ".join(effects)
    if not effects:
        return ", ".join(conditions)
    return f"{text} in {', '.join(conditions)}" if conditions else text


def factor_levels(adata: AnnData, names: Sequence[str]) -> dict[str, list[str]]:
    """Levels (reference first) of the ``obs`` factors named in the design columns ``names``."""
    variables = {
        m["var"].replace("`", "")
        for name in names
        for part in (_split_colon(name) or [])
        if (m := _ENCODED.match(part)) is not None
    }
    out = {}
    for var in variables:
        if var not in adata.obs:
            continue
        col = adata.obs[var]
        if isinstance(col.dtype, pd.CategoricalDtype):
            out[var] = [str(c) for c in col.cat.remove_unused_categories().cat.categories]
        elif col.dtype == object or pd.api.types.is_string_dtype(col):
            out[var] = sorted(str(v) for v in col.dropna().unique())
    return out


def check_tidy(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` if it has the columns of :func:`scflashmm.get.flashmm_df`, else a ValueError."""
    missing = [c for c in TIDY_COLUMNS if c not in table.columns]
    if missing:
        msg = (
            f"The table lacks the columns {missing}: pass an AnnData fitted by "
            "scflashmm.tl.flashmm_de, or the table of scflashmm.get.flashmm_df."
        )
        raise ValueError(msg)
    return table


def log_fc_label(is_counts: bool | None) -> str:
    """Label the ``log_fc`` axis: what the estimate is, on the scale the model was fit."""
    if is_counts:
        return "log_fc: difference of mean log2(1 + counts)"
    if is_counts is None:
        return "log_fc (estimate on the scale of the fit)"
    return "log_fc (estimate on the scale of the data)"


def get_axes(ax: Axes | None, figsize: tuple[float, float] = (5.0, 4.5)) -> Axes:
    """Return the axes to draw into: ``ax``, or those of a new figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def show_or_save(name: str, ax: Axes, *, show: bool | None, save: bool | str | None) -> Axes | None:
    """Save and/or show the figure of ``ax``, with scanpy's public settings as defaults.

    ``show=None`` means ``scanpy.settings.autoshow`` and ``save=None`` means
    ``scanpy.settings.autosave``. ``save=True`` writes
    ``{settings.figdir}/{name}{settings.plot_suffix}.{settings.file_format_figs}``; a string
    is appended to ``name`` and, when it ends in ``.png``, ``.pdf`` or ``.svg``, sets the
    format. Returns ``ax`` unless the figure was shown.
    """
    import matplotlib.pyplot as plt
    from scanpy import settings

    fig = cast("Figure", ax.figure)  # get_axes makes axes of a Figure, not a SubFigure
    if save is None:
        save = settings.autosave
    if save:
        stem, ext = name, settings.file_format_figs
        if isinstance(save, str):
            stem, dot, suffix = (name + save).rpartition(".")
            if not dot or suffix not in ("png", "pdf", "svg"):
                stem, ext = name + save, settings.file_format_figs
            else:
                ext = suffix
        path = Path(settings.figdir) / f"{stem}{settings.plot_suffix}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
    if settings.autoshow if show is None else show:
        plt.show()
        return None
    if save:
        plt.close(fig)
    return ax
