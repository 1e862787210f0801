"""``pl.variance_components``: the share of variance of each random term across genes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._core._options import check_positive_int
from .._results import THETA, varm_key
from ._utils import get_axes, results_info, show_or_save

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["variance_components"]


#: Largest number of histogram bins (each bin is a matplotlib patch).
MAX_BINS = 1000


def variance_components(
    adata: AnnData,
    *,
    key: str = "flashmm",
    bins: int = 40,
    ax: Axes | None = None,
    corr_ax: Axes | None = None,
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
        Fisher scoring returned negative variance components, which are shown as they are);
        at most 1,000.
    ax
        Axes to draw into; default a new figure (with a second panel for correlations when
        the fit has correlated random slopes).
    corr_ax
        Axes for the histograms of the correlations of correlated random effects (columns
        ``"group: corr(a, b)"`` of lme4-style terms such as ``"(1 + time | donor)"``), which
        are not shares of variance; default the second panel of a new figure, or not drawn
        when ``ax`` is given without ``corr_ax``.
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
    if bins > MAX_BINS:  # matplotlib draws one patch per bin: a million take minutes
        msg = f"bins must be at most {MAX_BINS:,}, got {bins:,}."
        raise ValueError(msg)
    results_info(adata, key)
    theta_key = varm_key(key, THETA)
    if theta_key not in adata.varm:
        msg = f"adata.varm has no {theta_key!r}: run scflashmm.tl.flashmm_de first."
        raise KeyError(msg)
    theta = adata.varm[theta_key]
    is_corr = np.array([": corr(" in str(c) for c in theta.columns])
    corr = theta.loc[:, is_corr]
    theta = theta.loc[:, ~is_corr]
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

    if ax is None and corr.shape[1]:
        import matplotlib.pyplot as plt

        _, (ax, corr_ax) = plt.subplots(1, 2, figsize=(9.0, 4.5), layout="constrained")
    ax = get_axes(ax)
    if corr_ax is not None and corr.shape[1]:
        _correlations(corr, corr_ax, bins)
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


def _correlations(corr: Any, ax: Axes, bins: int) -> None:
    """Histograms of the random-effect correlations across genes, on [-1, 1]."""
    for i, name in enumerate(corr.columns):
        r = corr[name].to_numpy(dtype=np.float64)
        r = r[np.isfinite(r)]
        if r.size == 0:
            continue
        median = float(np.median(r))
        ax.hist(r, bins=int(bins), range=(-1, 1), alpha=0.55, color=f"C{i}", label=f"{name}")
        ax.axvline(median, color=f"C{i}", ls="--", lw=1)
    ax.set_xlabel("correlation of random effects")
    ax.set_ylabel("genes")
    ax.set_title("Random-effect correlations", fontsize="medium")
    ax.legend(fontsize="x-small", frameon=False)
