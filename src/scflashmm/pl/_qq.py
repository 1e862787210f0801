"""``pl.qq``: observed against expected -log10 p-values, with a confidence band."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from ..get._grouped import resolve_key
from ._utils import (
    check_tidy,
    factor_levels,
    get_axes,
    neg_log10,
    readable_term,
    results_info,
    show_or_save,
    terms_tables,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["qq"]


def qq(
    data: AnnData | pd.DataFrame,
    term: str | Sequence[str] | None = None,
    *,
    key: str = "flashmm",
    group: str | None = None,
    band: float = 0.95,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Quantile-quantile plot of the p-values against the uniform distribution.

    For each term, the sorted ``-log10`` p-values of the genes against their expected values
    under the null, ``-log10((i - 0.5) / m)`` for ``m`` genes. Well calibrated tests of genes
    without an effect lie on the diagonal, inside the band; a cloud above it at the left
    (small expected values) means inflated p-values. Each series is labelled with its term
    in words and its genomic inflation factor
    ``lambda = median(chi2_1 quantile of 1 - p) / median(chi2_1)``: about 1 when most genes
    are null and the tests calibrated, above 1 when the p-values are inflated (or many genes
    have an effect), below 1 when they are conservative.

    Parameters
    ----------
    data
        AnnData on which :func:`scflashmm.tl.flashmm_de` was run, or a tidy table of
        :func:`scflashmm.get.flashmm_df`.
    term
        Term(s) to show, one series each: design columns, patterns matching them (``":trt"``),
        contrast names or expressions, as for :func:`volcano`; with a table, values of its
        ``contrast`` column. Default: every design column, then every stored contrast (every
        contrast of the table).
    key
        The ``key_added`` of the fit (AnnData only).
    group
        For a fit with ``flashmm_de(..., groupby=...)``: the group whose results to plot
        (AnnData only; for a grouped tidy table, select the group's rows first).
    band
        Coverage of the pointwise confidence band of the ``i``-th smallest of ``m`` uniform
        p-values (a Beta(i, m - i + 1) interval), for the largest ``m`` among the terms.
        0 draws no band.
    ax
        Axes to draw into; default a new figure.
    show
        Show the figure; default ``scanpy.settings.autoshow``.
    save
        Save the figure as scanpy does (see :func:`volcano`), with the name ``"qq"``.

    Returns
    -------
    The axes, unless the figure was shown. One collection of points per term, in the order
    asked, labelled ``"{term in words} (λ = {lambda:.2f})"``; genes with a NaN p-value are
    left out.

    Examples
    --------
    >>> import scflashmm as sfm
    >>> adata = sfm.datasets.simulate_rnaseq(n_genes=100, n_cells=2000, n_clusters=2, seed=1)
    >>> sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    >>> ax = sfm.pl.qq(adata, ":trt", show=False)
    """
    if not 0 <= band < 1:
        msg = f"band must be in [0, 1), got {band!r}."
        raise ValueError(msg)
    if not isinstance(data, pd.DataFrame):
        key = resolve_key(data, key, group)
    table, levels = _qq_table(data, term, key)
    table = table[table["p_value"].notna()]
    names = list(dict.fromkeys(table["contrast"]))
    if not names:
        msg = "No gene has a p-value for the terms asked (all NaN)."
        raise ValueError(msg)

    ax = get_axes(ax)
    m_max = int(table.groupby("contrast", sort=False).size().max())
    expected_max = neg_log10(_uniform_positions(m_max))
    if band > 0:
        i = np.arange(1, m_max + 1)
        lo = stats.beta.ppf((1 - band) / 2, i, m_max - i + 1)
        hi = stats.beta.ppf((1 + band) / 2, i, m_max - i + 1)
        ax.fill_between(
            expected_max, neg_log10(hi), neg_log10(lo), color="0.85", lw=0, label=f"{band:.0%} band"
        )
    ax.plot([0, expected_max[0]], [0, expected_max[0]], color="0.3", lw=0.8, ls="--")
    for name in names:
        p = np.sort(table.loc[table["contrast"] == name, "p_value"].to_numpy(dtype=np.float64))
        label = f"{readable_term(str(name), levels)} (λ = {inflation(p):.2f})"
        ax.scatter(
            neg_log10(_uniform_positions(p.size)), neg_log10(p), s=6, linewidths=0, label=label
        )
    ax.set_xlabel(r"expected $-\log_{10}$ p-value")
    ax.set_ylabel(r"observed $-\log_{10}$ p-value")
    if len(names) == 1:
        ax.set_title(readable_term(str(names[0]), levels), fontsize="medium")
    ax.legend(fontsize="x-small", loc="upper left", frameon=False, markerscale=1.5)
    return show_or_save("qq", ax, show=show, save=save)


def _uniform_positions(m: int) -> np.ndarray:
    """Return ``(i - 0.5) / m`` for ``i = 1..m``: R's ``ppoints`` for m > 10."""
    return (np.arange(1, m + 1) - 0.5) / m


def inflation(p: np.ndarray) -> float:
    """Genomic inflation factor of p-values: median chi-square(1) statistic over its expectation.

    ``lambda = chi2_1.isf(median(p)) / chi2_1.ppf(0.5)`` (the ratio of the median statistic to
    0.455, the median of a chi-square with one degree of freedom).
    """
    p = np.asarray(p, dtype=np.float64)
    p = p[~np.isnan(p)]
    if p.size == 0:
        return float("nan")
    return float(stats.chi2.isf(np.median(p), 1) / stats.chi2.ppf(0.5, 1))


def _qq_table(
    data: AnnData | pd.DataFrame, term: str | Sequence[str] | None, key: str
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    if not isinstance(data, pd.DataFrame):
        info = results_info(data, key)
        levels = factor_levels(data, [str(c) for c in info["x_columns"]])
        return terms_tables(data, term, key), levels
    table = check_tidy(data)
    if term is None:
        return table, {}
    items = [term] if isinstance(term, str) else list(term)
    have = [str(c) for c in dict.fromkeys(table["contrast"])]
    missing = [t for t in items if t not in have]
    if missing or not items:
        msg = f"terms {missing or items} are not in the table's contrast column {have}."
        raise ValueError(msg)
    parts = [table[table["contrast"].astype(str) == t] for t in items]
    return pd.concat(parts, ignore_index=True), {}
