"""``pl.qq``: observed against expected -log10 p-values, with a confidence band."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from ..get._grouped import resolve_key
from ._utils import get_axes, neg_log10, savefig_or_show, terms_tables

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["qq"]


def qq(
    adata: AnnData,
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
    (small expected values) means inflated p-values.

    Parameters
    ----------
    adata
        AnnData on which :func:`scflashmm.tl.flashmm_de` was run.
    term
        Term(s) to show, one series each: design columns, patterns matching them (``":trt"``),
        contrast names or expressions, as for :func:`volcano`. Default: every design column,
        then every stored contrast.
    key
        The ``key_added`` of the fit.
    group
        For a fit with ``flashmm_de(..., groupby=...)``: the group whose results to plot.
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
    asked, labelled with the term; genes with a NaN p-value are left out.

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
    table = terms_tables(adata, term, resolve_key(adata, key, group))
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
        ax.scatter(
            neg_log10(_uniform_positions(p.size)), neg_log10(p), s=6, linewidths=0, label=name
        )
    ax.set_xlabel(r"expected $-\log_{10}$ p-value")
    ax.set_ylabel(r"observed $-\log_{10}$ p-value")
    if len(names) == 1:
        ax.set_title(names[0], fontsize="medium")
    ax.legend(fontsize="x-small", loc="upper left", frameon=False, markerscale=1.5)
    return savefig_or_show("qq", ax, show=show, save=save)


def _uniform_positions(m: int) -> np.ndarray:
    """Return ``(i - 0.5) / m`` for ``i = 1..m``: R's ``ppoints`` for m > 10."""
    return (np.arange(1, m + 1) - 0.5) / m
