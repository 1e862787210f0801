"""Effect sizes and filters of the tidy table, and a wide table for decoupler.

:func:`scflashmm.get.flashmm_df` calls :func:`finish_table` last; :func:`flashmm_matrix` pivots
its result to one row per term or contrast and one column per gene.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._contrast import DesignConditions
from .._lmm_test import contrast_matrix
from .._results import LOG2FC, results_uns, varm_key

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["EFFECT_SIZE", "contrast_vector", "finish_table", "flashmm_matrix"]

#: Column of the tidy table with the log2 fold change of normalised means.
EFFECT_SIZE = "log2fc_means"


def contrast_vector(adata: AnnData, key: str, name: str) -> np.ndarray:
    """Coefficients over the design columns of a term, a stored contrast or an expression."""
    info = results_uns(adata, key)
    x_columns = [str(c) for c in info["x_columns"]]
    if name in x_columns:
        vector = np.zeros(len(x_columns))
        vector[x_columns.index(name)] = 1.0
        return vector
    stored = info.get("contrast_matrix")
    if isinstance(stored, pd.DataFrame) and name in map(str, stored.columns):
        column = stored.loc[x_columns, stored.columns[list(map(str, stored.columns)).index(name)]]
        return column.to_numpy(dtype=np.float64)
    fixed = info.get("params", {}).get("fixed")
    cond = None if fixed is None else DesignConditions(adata.obs, str(fixed), x_columns)
    return contrast_matrix({name: name}, x_columns, cond=cond).to_numpy(np.float64)[:, 0]


def _effect_sizes(adata: AnnData, key: str, names: Sequence[str]) -> dict[str, pd.Series]:
    """Log2 fold change of normalised means of each term/contrast (NaN where undefined)."""
    table = adata.varm[varm_key(key, LOG2FC)]
    values = np.asarray(table, dtype=np.float64)
    out = {}
    for name in names:
        vector = contrast_vector(adata, key, name)
        used = vector != 0
        with np.errstate(invalid="ignore"):
            estimate = values[:, used] @ vector[used]
        out[name] = pd.Series(estimate, index=adata.var_names)
    return out


def finish_table(
    table: pd.DataFrame,
    adata: AnnData,
    key: str,
    *,
    gene_symbols: str | None = None,
    pval_cutoff: float | None = None,
    log2fc_min: float | None = None,
    log2fc_max: float | None = None,
) -> pd.DataFrame:
    """Add the effect sizes and gene symbols to the tidy table, then apply the filters."""
    if varm_key(key, LOG2FC) in adata.varm:
        names = list(dict.fromkeys(table["contrast"]))
        sizes = _effect_sizes(adata, key, names)
        column = np.full(len(table), np.nan)
        for name, series in sizes.items():
            rows = (table["contrast"] == name).to_numpy()
            column[rows] = series.reindex(table.loc[rows, "variable"]).to_numpy()
        table[EFFECT_SIZE] = column
    if gene_symbols is not None:
        if gene_symbols not in adata.var.columns:
            msg = f"gene_symbols={gene_symbols!r} is not a column of adata.var."
            raise ValueError(msg)
        symbols = adata.var[gene_symbols]
        table[gene_symbols] = symbols.reindex(table["variable"]).to_numpy()
    keep = np.ones(len(table), dtype=bool)
    if pval_cutoff is not None:
        cutoff = _number(pval_cutoff, "pval_cutoff")
        keep &= (table["adj_p_value"] < cutoff).to_numpy()
    fold = EFFECT_SIZE if EFFECT_SIZE in table.columns else "log_fc"
    if log2fc_min is not None:
        keep &= (table[fold] > _number(log2fc_min, "log2fc_min")).to_numpy()
    if log2fc_max is not None:
        keep &= (table[fold] < _number(log2fc_max, "log2fc_max")).to_numpy()
    return table[keep].reset_index(drop=True)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        msg = f"{name} must be a number, got {value!r}."
        raise TypeError(msg)
    if not np.isfinite(value):
        msg = f"{name} must be finite, got {value!r}."
        raise ValueError(msg)
    return float(value)


#: Columns of the tidy table that :func:`flashmm_matrix` can spread.
_VALUES = ("t_value", "log_fc", EFFECT_SIZE, "sd", "p_value", "adj_p_value")
_ALIASES = {"t": "t_value", "p": "p_value", "padj": "adj_p_value", "log2fc": EFFECT_SIZE}


def flashmm_matrix(
    adata: AnnData,
    *,
    values: str = "t_value",
    key: str = "flashmm",
    term: str | Sequence[str] | None = None,
    contrast: str | Sequence[str] | Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One statistic as a wide table: terms/contrasts x genes, as decoupler's methods take it.

    Parameters
    ----------
    adata
        AnnData on which :func:`~scflashmm.tl.flashmm_de` was run.
    values
        Column of :func:`~scflashmm.get.flashmm_df` to spread: ``"t_value"`` (default;
        ``"t"``), ``"log_fc"``, ``"log2fc_means"`` (``"log2fc"``), ``"sd"``, ``"p_value"``
        (``"p"``) or ``"adj_p_value"`` (``"padj"``).
    key
        The ``key_added`` of the fit.
    term
        Design column(s), as in :func:`~scflashmm.get.flashmm_df`.
    contrast
        Stored contrast names or new expressions, as in :func:`~scflashmm.get.flashmm_df`.
        Default, with neither: the stored contrasts if any, else every design column.

    Returns
    -------
    DataFrame with one row per term or contrast (in the order asked) and one column per gene
    (``var_names`` order). Genes that could not be fit are NaN (``.dropna(axis=1)`` before
    decoupler). Rows are observations and columns features, as ``decoupler.mt.ulm(data=...)``
    expects; ``.T`` gives genes x contrasts.

    Examples
    --------
    >>> mat = sfm.get.flashmm_matrix(adata, contrast="B vs A in cls 1")  # doctest: +SKIP
    >>> scores, pvals = dc.mt.ulm(data=mat.dropna(axis=1), net=net)  # doctest: +SKIP
    """
    from ._flashmm_df import flashmm_df

    column = _ALIASES.get(values, values)
    if column not in _VALUES:
        msg = f"values must be one of {list(_VALUES)}, got {values!r}."
        raise ValueError(msg)
    info = results_uns(adata, key)
    if term is None and contrast is None and list(info.get("contrast_names", [])):
        contrast = [str(c) for c in info["contrast_names"]]
    names: dict[str, str] = {}
    if isinstance(contrast, Mapping):
        names = {str(expr): str(name) for name, expr in contrast.items()}
        contrast = list(names)
    table = flashmm_df(adata, key=key, term=term, contrast=contrast)
    if column not in table.columns:
        msg = f"{column!r} is not available: the fit has no effect sizes (effect_size=True)."
        raise ValueError(msg)
    order = list(dict.fromkeys(table["contrast"]))
    wide = table.pivot(index="contrast", columns="variable", values=column)
    wide = wide.reindex(index=order, columns=adata.var_names)
    wide = wide.rename(index=names)
    wide.index.name, wide.columns.name = "contrast", None
    return wide
