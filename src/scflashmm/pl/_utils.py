"""Shared helpers of the plots: reading results, the axes, and scanpy's ``show``/``save``."""

from __future__ import annotations

from collections.abc import Sequence
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


def get_axes(ax: Axes | None, figsize: tuple[float, float] = (5.0, 4.5)) -> Axes:
    """Return the axes to draw into: ``ax``, or those of a new figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def savefig_or_show(
    writekey: str, ax: Axes, *, show: bool | None, save: bool | str | None
) -> Axes | None:
    """Save and/or show the figure of ``ax`` as scanpy's plotting functions do.

    ``show=None`` means ``scanpy.settings.autoshow`` and ``save=None`` means
    ``scanpy.settings.autosave``. ``save=True`` writes
    ``{settings.figdir}/{writekey}{settings.plot_suffix}.{settings.file_format_figs}``; a string
    is appended to ``writekey`` and, when it ends in ``.png``, ``.pdf`` or ``.svg``, sets the
    format. Returns ``ax`` unless the figure was shown (then None, as scanpy does).
    """
    import matplotlib.pyplot as plt
    from scanpy import settings

    ext = None
    if isinstance(save, str):
        for suffix in (".svg", ".pdf", ".png"):
            if save.endswith(suffix):
                ext = suffix[1:]
                save = save[: -len(suffix)]
                break
        writekey += save
        save = True
    save = settings.autosave if save is None else bool(save)
    show = settings.autoshow if show is None else bool(show)
    fig = cast("Figure", ax.figure)  # get_axes makes axes of a Figure, not a SubFigure
    if save:
        figdir = settings.figdir
        figdir.mkdir(parents=True, exist_ok=True)
        ext = ext or settings.file_format_figs
        fig.savefig(figdir / f"{writekey}{settings.plot_suffix}.{ext}", bbox_inches="tight")
    if show:
        plt.show()
    if save:
        plt.close(fig)
    return None if show else ax
