"""``tl.flashmm_refit``: test new contrasts or refit with other options, without the cells.

:func:`scflashmm.tl.flashmm_de` (with ``store_stats=True``, the default) keeps the gene-wise
summary statistics ``X'y``, ``Z'y``, ``y'y`` in ``varm`` and the shared ``X'X``, ``Z'X``,
``Z'Z``, ``n`` in ``uns``: everything the fit reads from the cells. A refit rebuilds the
:class:`~scflashmm.SummaryStats` from them (and, for lme4-style random terms, the covariance
structure from ``uns[key]["random_structure"]``) and fits again; its numbers equal those of a
fresh :func:`~scflashmm.tl.flashmm_de` with the same options.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core._options import DfMethod, Method
from .._core.structure import CovarianceStructure, RandomTermStructure
from .._core.sumstats import SummaryStats
from .._results import LOG2FC, STATS_XY, STATS_YY, STATS_ZY, results_uns, varm_key
from ._flashmm_de import (
    DesignInfo,
    _contrasts,
    check_fit_options,
    fit_and_record,
    write_results,
)

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["flashmm_refit"]


def flashmm_refit(
    adata: AnnData,
    *,
    key: str = "flashmm",
    method: Method | None = None,
    df: DfMethod | None = None,
    nonnegative: bool | None = None,
    moderate: bool | None = None,
    contrasts: Mapping[str, str] | Sequence[str] | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Refit a :func:`~scflashmm.tl.flashmm_de` result from its stored summary statistics.

    No pass over the cells: new contrasts can be tested with any df method, and the model
    refit with another ``method``, ``df``, ``nonnegative`` or ``moderate``, on the genes
    present (subsetting genes after the fit is fine). Fits with lme4-style random terms
    (``"(1 + x | donor)"``, ``"(1 | donor/sample)"``) are refit with the same covariance
    structure; the options they cannot take in :func:`~scflashmm.tl.flashmm_de` (e.g.
    ``moderate=True``) are refused here in the same words.

    Parameters
    ----------
    adata
        AnnData fit by :func:`~scflashmm.tl.flashmm_de` with ``store_stats=True``.
    key
        The ``key_added`` of that fit.
    method, df, nonnegative, moderate
        As in :func:`~scflashmm.tl.flashmm_de`; None keeps the fit's setting (for
        ``moderate``: as it was applied).
    contrasts
        Contrasts to test, as in :func:`~scflashmm.tl.flashmm_de`; None keeps the fit's.
    key_added
        Where to write the refit; default ``key`` (replacing the fit).
    copy
        Return a new AnnData instead of writing into ``adata``.

    Returns
    -------
    With ``copy=True`` a new AnnData, else None; ``adata`` gets under ``key_added`` every key
    that :func:`~scflashmm.tl.flashmm_de` writes (statistics included), with
    ``uns[key_added]["params"]`` those of the fit, updated by the options given here.
    """
    info_uns = results_uns(adata, key)
    key_added = key if key_added is None else key_added
    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        msg = f"key_added must be a non-empty string without '/', got {key_added!r}."
        raise ValueError(msg)
    stats, info = _stored_stats(adata, key, info_uns)
    params = dict(info_uns["params"])
    opts = check_fit_options(
        method=params["method"] if method is None else method,
        df=params["df"] if df is None else df,
        nonnegative=bool(params.get("nonnegative", False)) if nonnegative is None else nonnegative,
        moderate=bool(params.get("moderate", False)) if moderate is None else moderate,
        theta0=params.get("theta0"),
        max_iter=int(params["max_iter"]),
        epsilon=float(params["epsilon"]),
        criterion=str(params.get("criterion", "flashmm")),
        info=info,
    )
    if contrasts is None:
        names = [str(c) for c in info_uns.get("contrast_names", [])]
        exprs = [str(e) for e in info_uns.get("contrast_expressions", [])]
        contrasts = dict(zip(names, exprs, strict=True)) or None
    cmat, expressions = _contrasts(contrasts, info.x_columns)
    kept = {k: params[k] for k in ("fixed", "random", "layer", "is_counts", "chunk_size")}
    kept |= {
        k: params[k]
        for k in ("transform", "store_cov", "effect_size", "library_size")
        if k in params
    }
    # effect sizes do not depend on the model: carry them over from the fit refitted
    source = varm_key(key, LOG2FC)
    effect_sizes = {varm_key(key_added, LOG2FC): adata.varm[source]} if source in adata.varm else {}
    varm, uns = fit_and_record(
        adata, stats, info, opts, kept | {"store_stats": True}, cmat, expressions, key_added,
        store_stats=True, extra_tables=effect_sizes,
    )  # fmt: skip
    return write_results(adata, key_added, varm, uns, copy=copy)


def _stored_stats(adata: AnnData, key: str, info: Mapping[str, Any]) -> tuple[Any, DesignInfo]:
    """Rebuild the summary statistics and the design information of fit ``key``."""
    keys = [varm_key(key, what) for what in (STATS_XY, STATS_ZY, STATS_YY)]
    if "stats" not in info or any(k not in adata.varm for k in keys):
        msg = (
            f"The fit under key {key!r} has no stored summary statistics: fit it with "
            f"scflashmm.tl.flashmm_de(..., store_stats=True, key_added={key!r})."
        )
        raise KeyError(msg)
    shared = info["stats"]
    structure = None
    if "random_structure" in info:
        structure = _structure_from_record(info["random_structure"])
        q = np.shape(shared["ZZ"])[0]
        if structure.q != q:
            msg = (
                f"The random structure stored under key {key!r} has q = {structure.q} random "
                f"effects; the stored Z'Z has {q}."
            )
            raise ValueError(msg)
    x_columns = [str(c) for c in info["x_columns"]]
    xy = adata.varm[keys[0]][x_columns].to_numpy(dtype=np.float64)
    stats = SummaryStats(
        XX=np.asarray(shared["XX"], dtype=np.float64),
        XY=np.ascontiguousarray(xy.T),
        ZX=np.asarray(shared["ZX"], dtype=np.float64),
        ZY=np.ascontiguousarray(np.asarray(adata.varm[keys[1]], dtype=np.float64).T),
        ZZ=np.asarray(shared["ZZ"], dtype=np.float64),
        Ynorm=adata.varm[keys[2]]["yy"].to_numpy(dtype=np.float64),
        n=int(shared["n"]),
    )
    design = DesignInfo(
        x_columns=x_columns,
        random_terms=[str(t) for t in info["random_terms"]],
        random=[str(t) for t in info["random_formulas"]],
        d=[int(x) for x in info["d"]],
        z_columns=[str(c) for c in info["z_columns"]],
        x_sum=np.asarray(shared["x_sum"], dtype=np.float64),
        structure=structure,
    )
    return stats, design


def _structure_from_record(record: Mapping[str, Any]) -> CovarianceStructure:
    """Rebuild the covariance structure ``flashmm_de`` recorded (terms ``"0"``, ``"1"``, ...)."""
    terms = [record[str(i)] for i in range(len(record))]
    return CovarianceStructure(
        tuple(
            RandomTermStructure(
                group=str(t["group"]),
                n_levels=int(t["n_levels"]),
                effects=tuple(str(e) for e in np.atleast_1d(t["effects"])),
                correlated=bool(t["correlated"]),
            )
            for t in terms
        )
    )
