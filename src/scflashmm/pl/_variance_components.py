"""``pl.variance_components``: the share of variance of each random term across genes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._core._options import check_positive_int
from .._results import THETA, varm_key
from ._utils import get_axes, results_info, show_or_save

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["variance_components"]


def variance_components(
    adata: AnnData,
    *,
    key: str = "flashmm",
    bins: int = 40,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Histogram across genes of the share of variance of each random term.

    For random term ``i`` of a gene the share is ``s_i / (s_1 + ... + s_k + s_0)``, from the
    variance components in ``adata.varm[f"{key}_theta"]``: with a random intercept per
    sample, the fraction of the gene's variance (after the fixed effects) that lies between
    samples. Many genes far from 0 are a warning that tests which ignore the samples treat
    correlated cells as independent.

    Parameters
    ----------
    adata
        AnnData on which :func:`scflashmm.tl.flashmm_de` was run.
    key
        The ``key_added`` of the fit.
    bins
        Number of bins of each histogram, from 0 to the largest share (below 0 too when
        Fisher scoring returned negative variance components, which are shown as they are).
    ax
        Axes to draw into; default a new figure.
    show
        Show the figure; default ``scanpy.settings.autoshow``.
    save
        Save the figure as scanpy does (see :func:`volcano`), with the name
        ``"variance_components"``.

    Returns
    -------
    The axes, unless the figure was shown. One histogram (a patch per bin) per random term,
    labelled with the term and the median share; genes that could not be fit (NaN) are left
    out. A dashed line marks each median.

    Examples
    --------
    >>> import scflashmm as sfm
    >>> adata = sfm.datasets.simulate_rnaseq(n_genes=100, n_cells=2000, n_clusters=2, seed=1)
    >>> sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    >>> ax = sfm.pl.variance_components(adata, show=False)
    """
    bins = check_positive_int(bins, "bins")
    results_info(adata, key)
    theta_key = varm_key(key, THETA)
    if theta_key not in adata.varm:
        msg = f"adata.varm has no {theta_key!r}: run scflashmm.tl.flashmm_de first."
        raise KeyError(msg)
    theta = adata.varm[theta_key]
    terms = [str(c) for c in theta.columns[:-1]]
    values = theta.to_numpy(dtype=np.float64)
    values = values[np.isfinite(values).all(axis=1)]
    if values.shape[0] == 0:
        msg = "No gene has finite variance components to show."
        raise ValueError(msg)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = values[:, :-1] / values.sum(axis=1, keepdims=True)
    share = share[np.isfinite(share).all(axis=1)]
    lo, hi = min(0.0, float(share.min())), float(share.max())
    if hi <= lo:
        hi = lo + 1.0

    ax = get_axes(ax)
    colors = [f"C{i}" for i in range(len(terms))]
    for i, (term, color) in enumerate(zip(terms, colors, strict=True)):
        median = float(np.median(share[:, i]))
        ax.hist(
            share[:, i],
            bins=int(bins),
            range=(lo, hi),
            histtype="bar",
            alpha=0.55 if len(terms) > 1 else 0.85,
            color=color,
            label=f"{term} (median {median:.2f})",
        )
        ax.axvline(median, color=color, ls="--", lw=1)
    ax.set_xlabel("share of variance, " + r"$\theta_{term} / \sum \theta$")
    ax.set_ylabel("genes")
    ax.set_title(f"Variance components of {share.shape[0]} genes", fontsize="medium")
    ax.legend(fontsize="x-small", frameon=False)
    return show_or_save("variance_components", ax, show=show, save=save)
