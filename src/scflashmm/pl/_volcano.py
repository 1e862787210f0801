"""``pl.volcano``: estimate against -log10 p of one term, significant genes coloured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..get._grouped import resolve_key
from ._utils import (
    COLOR_DOWN,
    COLOR_NS,
    COLOR_UP,
    check_tidy,
    factor_levels,
    get_axes,
    log_fc_label,
    neg_log10,
    readable_term,
    results_info,
    show_or_save,
    tests_table,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["volcano"]

#: Number of points, the smallest p-values first, that push the labels away.
_REPELLING_POINTS = 1000


def volcano(
    data: AnnData | pd.DataFrame,
    term: str | None = None,
    *,
    key: str = "flashmm",
    group: str | None = None,
    fdr: float = 0.05,
    lfc: float | None = None,
    label_top: int = 10,
    genes: Sequence[str] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
) -> Axes | None:
    """Volcano plot of one term or contrast: estimate against ``-log10`` p-value.

    Genes with a Benjamini-Hochberg adjusted p-value below ``fdr`` (and, with ``lfc``, an
    absolute estimate of at least ``lfc``) are coloured, red when the estimate is positive
    and blue when it is negative; the ``label_top`` most significant of them, and the
    ``genes`` asked for, are labelled, the labels moved apart so that they do not overlap
    (adjustText). A dashed line marks the largest p-value that is significant at ``fdr``.

    The estimate (``log_fc``) is the model's coefficient: with ``is_counts=True`` a
    difference of mean ``log2(1 + counts)``, which is smaller than the log2 fold change of
    mean counts (pseudobulk tools such as PyDESeq2 report the latter); the x axis says so.

    Parameters
    ----------
    data
        AnnData on which :func:`scflashmm.tl.flashmm_de` was run, or a tidy table of
        :func:`scflashmm.get.flashmm_df` (columns ``variable``, ``contrast``, ``log_fc``,
        ``p_value``, ``adj_p_value``).
    term
        One design column (``"cls[1]:trt[T.B]"``), a pattern matching exactly one, a contrast
        named in ``flashmm_de(contrasts=...)``, or a new contrast expression over the design
        columns (computed from the stored covariance, see :func:`scflashmm.get.flashmm_df`).
        With a table: a value of its ``contrast`` column; None if it holds only one.
    key
        The ``key_added`` of the fit (AnnData only).
    group
        For a fit with ``flashmm_de(..., groupby=...)``: the group whose results to plot
        (AnnData only; for a grouped tidy table, select the group's rows first).
    fdr
        False discovery rate: genes with ``adj_p_value < fdr`` are significant.
    lfc
        If given, significant genes must also have ``|log_fc| >= lfc``; dotted lines mark
        ``+/- lfc``.
    label_top
        Number of significant genes, the smallest p-values first, labelled by name.
    genes
        Genes (``variable`` names) labelled as well, significant or not.
    title
        Title of the plot; default the term in words (``cls[1]:trt[T.B]`` reads "trt B vs A
        in cls 1") above the significance rule.
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
    >>> ax = sfm.pl.volcano(adata, "cls[1]:trt[T.B]", genes=["Gene1"], show=False)
    >>> table = sfm.get.flashmm_df(adata, term="cls[2]:trt[T.B]")
    >>> ax = sfm.pl.volcano(table, show=False)
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
    if not isinstance(data, pd.DataFrame):
        key = resolve_key(data, key, group)
    genes = _check_genes(genes)
    table, name, levels, is_counts = _volcano_table(data, term, key)
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
    if genes:
        missing = [g for g in genes if g not in set(table["variable"].astype(str))]
        if missing:
            msg = f"genes not in the results (or with a NaN p-value): {missing}."
            raise ValueError(msg)
        asked = table[table["variable"].astype(str).isin(genes)]
        top = pd.concat([top, asked[~asked.index.isin(top.index)]])
    _label(ax, top, x, y)
    ax.set_xlabel(log_fc_label(is_counts))
    ax.set_ylabel(r"$-\log_{10}$ p-value")
    if title is None:
        rule = f"FDR < {fdr:g}" + ("" if lfc is None else f", |log_fc| >= {lfc:g}")
        title = f"{readable_term(name, levels)}\n{rule}"
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="x-small", loc="best", frameon=False, markerscale=1.5)
    return show_or_save("volcano", ax, show=show, save=save)


def _check_genes(genes: Sequence[str] | None) -> list[str]:
    if genes is None:
        return []
    if isinstance(genes, str):
        return [genes]
    return [str(g) for g in genes]


def _volcano_table(
    data: AnnData | pd.DataFrame, term: str | None, key: str
) -> tuple[pd.DataFrame, str, dict[str, list[str]], bool | None]:
    """Return the tidy table of one term, its name, the factors' levels and ``is_counts``."""
    if isinstance(data, pd.DataFrame):
        table = check_tidy(data)
        names = [str(c) for c in dict.fromkeys(table["contrast"])]
        if term is None and len(names) != 1:
            msg = f"The table holds {len(names)} contrasts {names}: pass term= to pick one."
            raise ValueError(msg)
        name = names[0] if term is None else term
        if name not in names:
            msg = f"term {term!r} is not in the table's contrast column {names}."
            raise ValueError(msg)
        table = table[table["contrast"].astype(str) == name]
        table = table.sort_values("p_value", kind="stable")
        return table, name, {}, table.attrs.get("is_counts")
    info = results_info(data, key)
    if term is None:
        msg = "term is required with an AnnData: pass a design column or a contrast."
        raise ValueError(msg)
    table = tests_table(data, term, key)
    names = list(dict.fromkeys(table["contrast"]))
    if len(names) != 1:
        msg = (
            f"term {term!r} matches {len(names)} design columns {names}; a volcano plot shows "
            "one: pass one of them."
        )
        raise ValueError(msg)
    levels = factor_levels(data, [str(c) for c in info["x_columns"]])
    return table, str(names[0]), levels, bool(info["params"].get("is_counts", False))


def _label(ax: Axes, top: pd.DataFrame, x: np.ndarray, y: np.ndarray) -> None:
    """Write the genes of ``top`` next to their points, moved apart so they do not overlap."""
    if top.empty:
        return
    from adjustText import adjust_text

    tx = top["log_fc"].to_numpy(dtype=np.float64)
    ty = neg_log10(top["p_value"])
    texts = [
        ax.text(gx, gy, str(gene), fontsize="x-small")
        for gene, gx, gy in zip(top["variable"], tx, ty, strict=True)
    ]
    # the points repel the labels too, so that no label hides a gene; the highest points only
    # (where the labels are), as adjustText's cost grows with the number of points
    near = np.argsort(-y, kind="stable")[:_REPELLING_POINTS]
    adjust_text(
        texts,
        x=x[near],
        y=y[near],
        ax=ax,
        arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.5},
    )
