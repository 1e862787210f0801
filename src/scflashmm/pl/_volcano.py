"""``pl.volcano``: estimate against -log10 p of one term, significant genes coloured."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..get._grouped import resolve_key
from ._utils import (
    COLOR_DOWN,
    COLOR_NS,
    COLOR_UP,
    get_axes,
    neg_log10,
    savefig_or_show,
    tests_table,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["volcano"]


def volcano(
    adata: AnnData,
    term: str,
    *,
    key: str = "flashmm",
    group: str | None = None,
    fdr: float = 0.05,
    lfc: float | None = None,
    label_top: int = 10,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Volcano plot of one term or contrast: estimate against ``-log10`` p-value.

    Genes with a Benjamini-Hochberg adjusted p-value below ``fdr`` (and, with ``lfc``, an
    absolute estimate of at least ``lfc``) are coloured, red when the estimate is positive
    and blue when it is negative; the ``label_top`` most significant of them are labelled.
    A dashed line marks the largest p-value that is significant at ``fdr``.

    Parameters
    ----------
    adata
        AnnData on which :func:`scflashmm.tl.flashmm_de` was run.
    term
        One design column (``"cls[1]:trt[T.B]"``), a pattern matching exactly one, a contrast
        named in ``flashmm_de(contrasts=...)``, or a new contrast expression over the design
        columns (computed from the stored covariance, see :func:`scflashmm.get.flashmm_df`).
    key
        The ``key_added`` of the fit.
    group
        For a fit with ``flashmm_de(..., groupby=...)``: the group whose results to plot.
    fdr
        False discovery rate: genes with ``adj_p_value < fdr`` are significant.
    lfc
        If given, significant genes must also have ``|log_fc| >= lfc``; dotted lines mark
        ``+/- lfc``.
    label_top
        Number of significant genes, the smallest p-values first, labelled by name.
    ax
        Axes to draw into; default a new figure.
    show
        Show the figure (``plt.show()``); default ``scanpy.settings.autoshow``.
    save
        Save the figure as scanpy does: True writes
        ``{sc.settings.figdir}/volcano{sc.settings.plot_suffix}.{sc.settings.file_format_figs}``;
        a string is appended to ``"volcano"`` and may end with the format
        (``save="_trt.pdf"``). Default ``scanpy.settings.autosave``.

    Returns
    -------
    The axes, unless the figure was shown. Their collections are, in this order, the genes
    not significant, significantly up and significantly down (each labelled with its count
    in the legend); genes with a NaN p-value are not drawn.

    Examples
    --------
    >>> import scflashmm as sfm
    >>> adata = sfm.datasets.simulate_rnaseq(n_genes=100, n_cells=2000, n_clusters=2, seed=1)
    >>> sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    >>> ax = sfm.pl.volcano(adata, "cls[1]:trt[T.B]", show=False)
    """
    if not 0 < fdr < 1:
        msg = f"fdr must be in (0, 1), got {fdr!r}."
        raise ValueError(msg)
    if lfc is not None and not lfc >= 0:
        msg = f"lfc must be None or >= 0, got {lfc!r}."
        raise ValueError(msg)
    if isinstance(label_top, bool) or int(label_top) != label_top or label_top < 0:
        msg = f"label_top must be a non-negative integer, got {label_top!r}."
        raise ValueError(msg)
    table = tests_table(adata, term, resolve_key(adata, key, group))
    names = list(dict.fromkeys(table["contrast"]))
    if len(names) != 1:
        msg = (
            f"term {term!r} matches {len(names)} design columns {names}; a volcano plot shows "
            "one: pass one of them."
        )
        raise ValueError(msg)
    name = names[0]

    table = table[table["p_value"].notna()]
    x = table["log_fc"].to_numpy(dtype=np.float64)
    y = neg_log10(table["p_value"])
    significant = (table["adj_p_value"] < fdr).to_numpy()
    threshold = table["p_value"][significant].max() if significant.any() else None
    if lfc is not None:
        significant &= np.abs(x) >= lfc
    up = significant & (x > 0)
    down = significant & (x < 0)
    rest = ~(up | down)

    ax = get_axes(ax)
    ax.scatter(
        x[rest], y[rest], s=6, c=COLOR_NS, linewidths=0, label=f"not significant ({rest.sum()})"
    )
    ax.scatter(x[up], y[up], s=10, c=COLOR_UP, linewidths=0, label=f"up ({up.sum()})")
    ax.scatter(x[down], y[down], s=10, c=COLOR_DOWN, linewidths=0, label=f"down ({down.sum()})")
    if threshold is not None:
        ax.axhline(float(neg_log10(threshold)), color="0.4", ls="--", lw=0.8, zorder=0)
    if lfc is not None:
        for v in (-lfc, lfc):
            ax.axvline(v, color="0.4", ls=":", lw=0.8, zorder=0)

    top = table[significant].head(int(label_top))  # flashmm_df sorts by p-value
    for gene, gx, gy in zip(top["variable"], top["log_fc"], neg_log10(top["p_value"]), strict=True):
        ax.annotate(
            str(gene),
            (gx, gy),
            xytext=(3, 3),
            textcoords="offset points",
            fontsize="x-small",
        )
    ax.set_xlabel("log fold change (estimate)")
    ax.set_ylabel(r"$-\log_{10}$ p-value")
    rule = f"FDR < {fdr:g}" + ("" if lfc is None else f", |log fc| >= {lfc:g}")
    ax.set_title(f"{name}\n{rule}", fontsize="medium")
    ax.legend(fontsize="x-small", loc="best", frameon=False, markerscale=1.5)
    return savefig_or_show("volcano", ax, show=show, save=save)
