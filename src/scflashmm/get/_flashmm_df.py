"""``get.flashmm_df``: the results of :func:`scflashmm.tl.flashmm_de` as a long tidy table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._core.inference import (
    Alternative,
    bh_adjust,
    check_alternative,
    contrast_estimates,
    t_pvalue,
)
from .._lmm_test import contrast_matrix
from .._results import CONTRAST_DF, COV, DF, DIAG, results_uns, varm_key
from ._grouped import grouped_df, grouped_info

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["flashmm_df"]

COLUMNS = [
    "variable", "contrast", "log_fc", "sd", "t_value", "df", "p_value", "adj_p_value", "converged"
]  # fmt: skip


def flashmm_df(
    adata: AnnData,
    *,
    key: str = "flashmm",
    term: str | Sequence[str] | None = None,
    contrast: str | Sequence[str] | None = None,
    alternative: Alternative = "two-sided",
    group: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Tidy table of the tests of :func:`scflashmm.tl.flashmm_de`, one row per gene and term.

    Parameters
    ----------
    adata
        AnnData on which :func:`~scflashmm.tl.flashmm_de` was run (subsetting genes afterwards
        is fine: the rows follow ``adata.var_names``).
    key
        The ``key_added`` used for the fit.
    term
        Design column(s) to report: an exact column name (``"cls[1]:trt[T.B]"``), else a
        pattern matched anywhere in the names, as a substring or a regular expression
        (``":trt"`` gives every interaction with ``trt``). Default: every design column,
        unless ``contrast`` is given.
    contrast
        Contrast(s) to report: names given to ``flashmm_de(contrasts=...)``, or new expressions
        over the design columns, which are computed here from the stored covariance (not
        with Satterthwaite df: pass those to ``flashmm_de(contrasts=...)``).
    alternative
        ``"two-sided"``, ``"less"`` (effect < 0) or ``"greater"`` (effect > 0); p-values are
        recomputed from the t values with the fit's degrees of freedom (column ``df``).
    group
        For a fit with ``flashmm_de(..., groupby=...)``: the group(s) to report; default all
        groups fit. Each group's tests are adjusted within the group (and term).

    Returns
    -------
    Columns ``variable`` (gene), ``contrast`` (design column or contrast name), ``log_fc``
    (the estimate: a log2 fold change when the fit used ``log2(1 + counts)``), ``sd`` (its
    standard error), ``t_value``, ``df`` (``n - p``, or Satterthwaite's per gene when the fit
    used ``df="satterthwaite"``), ``p_value``, ``adj_p_value`` (Benjamini-Hochberg within each
    term/contrast, over the genes present; NaN p-values are not counted) and ``converged``.
    The column names follow pertpy's differential-expression schema. Terms come in the order
    asked (design order by default); within a term rows are sorted by p-value, NaN last.
    For a fit with ``groupby``, a first column ``group`` (categorical, in the order of the
    groups), the groups one after the other.
    """
    if group is not None or grouped_info(adata, key) is not None:
        return grouped_df(
            adata, key=key, group=group, term=term, contrast=contrast, alternative=alternative
        )
    side = check_alternative(alternative)
    info = results_uns(adata, key)
    x_columns = [str(c) for c in info["x_columns"]]
    df = int(info["df"])
    satterthwaite = info.get("params", {}).get("df", "residual") == "satterthwaite"
    converged = adata.varm[varm_key(key, DIAG)]["converged"].to_numpy(dtype=bool)
    genes = adata.var_names

    blocks = []
    if term is not None or contrast is None:
        coef = adata.varm[varm_key(key, "coef")]
        se = adata.varm[varm_key(key, "se")]
        t = adata.varm[varm_key(key, "t")]
        for name in _select_terms(term, x_columns):
            ddf = adata.varm[varm_key(key, DF)][name] if satterthwaite else df
            blocks.append(_block(genes, name, coef[name], se[name], t[name], ddf, side, converged))
    if contrast is not None:
        stored = [str(c) for c in info.get("contrast_names", [])]
        for name in [contrast] if isinstance(contrast, str) else list(contrast):
            if name in stored:
                est = adata.varm[varm_key(key, "contrast_coef")][name]
                se_c = adata.varm[varm_key(key, "contrast_se")][name]
                t_c = adata.varm[varm_key(key, "contrast_t")][name]
                ddf = adata.varm[varm_key(key, CONTRAST_DF)][name] if satterthwaite else df
            elif satterthwaite:
                msg = (
                    f"Contrast {name!r} was not computed by flashmm_de; with df='satterthwaite' "
                    f"new contrasts need the fit: pass them as flashmm_de(contrasts=...). "
                    f"Stored contrasts: {stored}."
                )
                raise ValueError(msg)
            else:
                est, se_c, t_c = _new_contrast(adata, key, name, x_columns, stored)
                ddf = df
            blocks.append(_block(genes, name, est, se_c, t_c, ddf, side, converged))
    if not blocks:
        msg = "No term or contrast selected."
        raise ValueError(msg)
    return pd.concat(blocks, ignore_index=True)[COLUMNS]


def _select_terms(term: str | Sequence[str] | None, x_columns: list[str]) -> list[str]:
    if term is None:
        return list(x_columns)
    selected: list[str] = []
    if not isinstance(term, str) and not list(term):
        msg = "term is empty."
        raise ValueError(msg)
    for pattern in [term] if isinstance(term, str) else list(term):
        if pattern in x_columns:
            hits = [pattern]
        else:
            hits = [c for c in x_columns if pattern in c]
            if not hits:
                try:
                    regex = re.compile(pattern)
                except re.error:
                    regex = None
                if regex is not None:
                    hits = [c for c in x_columns if regex.search(c)]
        if not hits:
            msg = f"No design column matches term {pattern!r}; the columns are {x_columns}."
            raise ValueError(msg)
        selected.extend(h for h in hits if h not in selected)
    return selected


def _new_contrast(
    adata: AnnData, key: str, expression: str, x_columns: list[str], stored: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        cmat = contrast_matrix({expression: expression}, x_columns)
    except ValueError as exc:
        known = f" Stored contrasts: {stored}." if stored else ""
        msg = f"{expression!r} is neither a stored contrast nor a valid expression: {exc}{known}"
        raise ValueError(msg) from exc
    if varm_key(key, COV) not in adata.varm:
        msg = f"Cannot compute contrast {expression!r}: varm[{varm_key(key, COV)!r}] is missing."
        raise KeyError(msg)
    coef = adata.varm[varm_key(key, "coef")][x_columns].to_numpy(dtype=np.float64)
    cov = np.asarray(adata.varm[varm_key(key, COV)], dtype=np.float64)
    est, se = contrast_estimates(coef, cov, cmat.to_numpy(dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = est / se
    return est[:, 0], se[:, 0], t[:, 0]


def _block(
    genes: pd.Index,
    name: str,
    est: Any,
    se: Any,
    t: Any,
    df: Any,
    alternative: str,
    converged: np.ndarray,
) -> pd.DataFrame:
    t = np.asarray(t, dtype=np.float64)
    df = np.broadcast_to(np.asarray(df, dtype=np.float64), t.shape)
    p = t_pvalue(t, df, alternative)
    table = pd.DataFrame(
        {
            "variable": np.asarray(genes, dtype=object),
            "contrast": name,
            "log_fc": np.asarray(est, dtype=np.float64),
            "sd": np.asarray(se, dtype=np.float64),
            "t_value": t,
            "df": df,
            "p_value": p,
            "adj_p_value": bh_adjust(p),
            "converged": converged,
        }
    )
    return table.sort_values("p_value", kind="stable", na_position="last")
