"""``get.flashmm_df``: the results of :func:`scflashmm.tl.flashmm_de` as a long tidy table."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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
from .._results import CONTRAST_DF, COV, DF, DIAG, results_uns, varm_key
from ._grouped import grouped_df, grouped_info
from ._tables import contrast_vector, finish_table

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["flashmm_df"]

COLUMNS = [
    "variable", "contrast", "log_fc", "sd", "t_value", "df", "p_value", "adj_p_value",
    "converged", "singular",
]  # fmt: skip


def flashmm_df(
    adata: AnnData,
    *,
    key: str = "flashmm",
    term: str | Sequence[str] | None = None,
    contrast: str | Sequence[str] | None = None,
    alternative: Alternative = "two-sided",
    group: str | Sequence[str] | None = None,
    gene_symbols: str | None = None,
    pval_cutoff: float | None = None,
    log2fc_min: float | None = None,
    log2fc_max: float | None = None,
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
        over the design columns or ``cond(...)`` (docs/effect_sizes.md), which are computed
        here from the covariance stored by ``flashmm_de(..., store_cov=True)`` when the fit used
        ``n - p`` df; with per-test df or moderation, test new contrasts with
        :func:`scflashmm.tl.flashmm_refit` (no pass over the cells).
    alternative
        ``"two-sided"``, ``"less"`` (effect < 0) or ``"greater"`` (effect > 0); p-values are
        recomputed from the t values with the fit's degrees of freedom (column ``df``), or,
        for moderated tests, from the stored two-sided p value and the sign of the estimate.
    group
        For a fit with ``flashmm_de(..., groupby=...)``: the group(s) to report; default all
        groups fit. Each group's tests are adjusted within the group (and term).
    gene_symbols
        Column of ``adata.var`` to add to the table (under its own name), as in
        :func:`scanpy.get.rank_genes_groups_df`.
    pval_cutoff
        Keep rows with ``adj_p_value < pval_cutoff``.
    log2fc_min, log2fc_max
        Keep rows with a log2 fold change ``> log2fc_min`` (``< log2fc_max``): the column
        ``log2fc_means`` when the fit has effect sizes, else ``log_fc``. Filters are applied
        after the adjustment of the p-values.

    Returns
    -------
    Columns ``variable`` (gene), ``contrast`` (design column or contrast name), ``log_fc``
    (the estimate, on the scale of the fit: with ``is_counts=True`` a difference of mean
    ``log2(1 + counts)`` adjusted for the other fixed effects, which is *not* a log2 fold
    change of means and is smaller for lowly expressed genes; see ``log2fc_means``), ``sd``
    (its standard error), ``t_value``, ``df`` (``n - p``, or per gene with Satterthwaite or
    Kenward-Roger df; NaN for moderated tests, whose p value is posterior-predictive),
    ``p_value``, ``adj_p_value`` (Benjamini-Hochberg within each term/contrast, over the genes
    present; NaN p-values are not counted), ``converged`` and ``singular`` (a variance component
    estimated at exactly 0 with ``nonnegative=True``).
    Then, with effect sizes (``flashmm_de(..., effect_size=True)``, the default for counts),
    ``log2fc_means``: the log2 fold change of normalised means (sum of counts over sum of
    library sizes) between the groups of cells the term or contrast compares, NaN for
    numeric covariates (definition in docs/effect_sizes.md); and the ``gene_symbols`` column
    if asked. The column names follow pertpy's differential-expression schema. Terms come in
    the order asked (design order by default); within a term rows are sorted by p-value, NaN
    last. For a fit with ``groupby``, a first column ``group`` (categorical, in the order of
    the groups), the groups one after the other.
    """
    if group is not None or grouped_info(adata, key) is not None:
        return grouped_df(
            adata, key=key, group=group, term=term, contrast=contrast, alternative=alternative,
            gene_symbols=gene_symbols, pval_cutoff=pval_cutoff, log2fc_min=log2fc_min,
            log2fc_max=log2fc_max,
        )  # fmt: skip
    side = check_alternative(alternative)
    _check_selection_types(adata, term=term, contrast=contrast)
    info = results_uns(adata, key)
    x_columns = [str(c) for c in info["x_columns"]]
    df = int(info["df"])
    params = info.get("params", {})
    moderated = bool(params.get("moderate", False))
    per_test = not moderated and params.get("df", "residual") != "residual"
    diag = adata.varm[varm_key(key, DIAG)]
    flags = {
        "converged": diag["converged"].to_numpy(dtype=bool),
        "singular": (
            diag["singular"].to_numpy(dtype=bool)
            if "singular" in diag
            else np.zeros(adata.n_vars, dtype=bool)
        ),
    }
    genes = adata.var_names

    blocks = []
    if term is not None or contrast is None:
        coef = adata.varm[varm_key(key, "coef")]
        se = adata.varm[varm_key(key, "se")]
        t = adata.varm[varm_key(key, "t")]
        for name in _select_terms(term, x_columns):
            ddf = adata.varm[varm_key(key, DF)][name] if per_test else df
            p2 = adata.varm[varm_key(key, "p")][name] if moderated else None
            blocks.append(_block(genes, name, coef[name], se[name], t[name], ddf, side, flags, p2))
    if contrast is not None:
        stored = [str(c) for c in info.get("contrast_names", [])]
        for name in [contrast] if isinstance(contrast, str) else list(contrast):
            if name in stored:
                est = adata.varm[varm_key(key, "contrast_coef")][name]
                se_c = adata.varm[varm_key(key, "contrast_se")][name]
                t_c = adata.varm[varm_key(key, "contrast_t")][name]
                ddf = adata.varm[varm_key(key, CONTRAST_DF)][name] if per_test else df
                p2 = adata.varm[varm_key(key, "contrast_p")][name] if moderated else None
            elif moderated or per_test:
                how = "moderated tests" if moderated else f"df={params.get('df')!r}"
                msg = (
                    f"Contrast {name!r} was not computed by the fit; with {how} new contrasts "
                    f"need a refit: scflashmm.tl.flashmm_refit(adata, key={key!r}, "
                    f"contrasts=...) (no pass over the cells), or flashmm_de(contrasts=...). "
                    f"Stored contrasts: {stored}."
                )
                raise ValueError(msg)
            else:
                est, se_c, t_c = _new_contrast(adata, key, name, x_columns, stored)
                ddf, p2 = df, None
            blocks.append(_block(genes, name, est, se_c, t_c, ddf, side, flags, p2))
    if not blocks:
        msg = "No term or contrast selected."
        raise ValueError(msg)
    table = pd.concat(blocks, ignore_index=True)[COLUMNS]
    return finish_table(
        table, adata, key, gene_symbols=gene_symbols, pval_cutoff=pval_cutoff,
        log2fc_min=log2fc_min, log2fc_max=log2fc_max,
    )  # fmt: skip


def _check_selection_types(adata: Any, **selection: Any) -> None:
    """Raise TypeError for an ``adata`` that is not an AnnData or a selection of wrong type."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        msg = f"adata must be an AnnData with flashmm results, got {type(adata).__name__}."
        raise TypeError(msg)
    for name, value in selection.items():
        ok = value is None or isinstance(value, str | Mapping)
        if not ok and isinstance(value, Sequence | np.ndarray | pd.Index):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            msg = f"{name} must be a string or a list of strings, got {value!r}."
            raise TypeError(msg)


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
        vector = contrast_vector(adata, key, expression)
        cmat = pd.DataFrame({expression: vector}, index=x_columns)
    except ValueError as exc:
        known = f" Stored contrasts: {stored}." if stored else ""
        msg = f"{expression!r} is neither a stored contrast nor a valid expression: {exc}{known}"
        raise ValueError(msg) from exc
    if varm_key(key, COV) not in adata.varm:
        msg = (
            f"Cannot test the new contrast {expression!r}: the covariance of the fixed effects "
            f"(varm[{varm_key(key, COV)!r}]) was not stored. Pass it to flashmm_de(contrasts="
            "...), or fit with store_cov=True."
        )
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
    flags: dict[str, np.ndarray],
    p_two_sided: Any = None,
) -> pd.DataFrame:
    t = np.asarray(t, dtype=np.float64)
    if p_two_sided is None:
        df = np.broadcast_to(np.asarray(df, dtype=np.float64), t.shape)
        p = t_pvalue(t, df, alternative)
    else:
        df = np.full(t.shape, np.nan)
        p = _one_sided(np.asarray(p_two_sided, dtype=np.float64), t, alternative)
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
            **flags,
        }
    )
    return table.sort_values("p_value", kind="stable", na_position="last")


def _one_sided(p: np.ndarray, t: np.ndarray, alternative: str) -> np.ndarray:
    """One-sided p values from two-sided ones of a test symmetric under the null."""
    if alternative == "two-sided":
        return p
    sign = np.sign(t) if alternative == "greater" else -np.sign(t)
    with np.errstate(invalid="ignore"):
        return np.where(sign > 0, p / 2, 1 - p / 2)
