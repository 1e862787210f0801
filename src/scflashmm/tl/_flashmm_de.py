"""``tl.flashmm_de``: a linear mixed model for every gene of an AnnData (FLASHMM's ``flashmm``).

The steps, top to bottom: validate the options, build the design from ``obs``, accumulate the
summary statistics in one pass over the cells, fit every gene, turn the fit into tables, and
write them into the AnnData (names from :mod:`scflashmm._results`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._contrast import DesignConditions
from .._core._options import (
    DfMethod,
    Method,
    check_df,
    check_method,
    check_positive_float,
    check_positive_int,
    check_theta0,
)
from .._core.inference import t_pvalue
from .._core.reml import lmm
from .._core.sumstats import NonFiniteError, summary_stats
from .._design import make_design
from .._lmm_test import contrast_matrix
from .._results import (
    COEF_TABLES,
    CONTRAST_DF,
    CONTRAST_TABLES,
    COV,
    DF,
    DIAG,
    RESIDUAL,
    SE_THETA,
    THETA,
    varm_key,
)
from ._effect_size import fit_effect_sizes
from ._matrix import ProgressBar, get_matrix, is_csc, looks_like_counts, nonfinite_error

if TYPE_CHECKING:
    from anndata import AnnData

    from .._core.reml import LMMFit
    from .._core.sumstats import SummaryStats
    from .._design import Design

__all__ = ["flashmm_de"]


def flashmm_de(
    adata: AnnData,
    fixed: str,
    random: str | Sequence[str],
    *,
    layer: str | None = None,
    is_counts: bool = False,
    method: Method = "REML",
    df: DfMethod = "residual",
    contrasts: Mapping[str, str] | Sequence[str] | None = None,
    theta0: Sequence[float] | None = None,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    key_added: str = "flashmm",
    chunk_size: int | None = None,
    copy: bool = False,
    progress: bool | None = None,
    effect_size: bool | None = None,
    library_size: str | None = None,
    store_cov: bool = False,
) -> AnnData | None:
    """Differential expression with a linear mixed model per gene, fit from summary statistics.

    For every gene ``y`` (a column of ``adata.X`` or of a layer) fits
    ``y = X beta + Z_1 b_1 + ... + Z_k b_k + e`` with ``b_i ~ N(0, s_i I)`` and
    ``e ~ N(0, s_0 I)`` by REML or ML, as the R package FLASHMM does: the cells are read once,
    in chunks, to accumulate summary statistics (never densifying cells x genes), and all genes
    are then fit together.

    Parameters
    ----------
    adata
        Cells x genes. Dense, CSR or CSC; in memory or backed (``read_h5ad(..., backed="r")``,
        streamed in chunks so the file is never loaded whole).
    fixed
        One-sided formula over ``adata.obs`` for the fixed effects, evaluated with formulaic,
        e.g. ``"~0+log(libsize)+cls+cls:trt"``. String and categorical columns are factors (level
        order: the categorical order, else sorted strings as R under the C locale).
    random
        The random effects, one variance component per item: a column name (``"sam"``, a
        random intercept per level), a one-sided formula (``"~0+sam"``, used as written) or a
        list of them (``["sam", "location"]``).
    layer
        Layer to fit; default ``adata.X``. (Only ``X`` of a backed AnnData stays on disk:
        anndata reads its layers into memory when it opens the file.)
    is_counts
        Fit ``log2(1 + y)`` as ``flashmm(is.counts=TRUE)``, applied to the stored values chunk by
        chunk. With False, a warning is given when the data look like raw counts (the stored
        values of the first cells, at most two million, are all non-negative integers).
    method
        ``"REML"`` or ``"ML"``.
    df
        Degrees of freedom of the t tests: ``"residual"`` (``n - p``, FLASHMM) or
        ``"satterthwaite"`` (per gene and test, as lmerTest, from the summary statistics).
        Choose ``"satterthwaite"`` when the tested effect varies between few samples (samples
        nested in the condition): ``n - p`` counts cells as replicates and is then liberal.
    contrasts
        Linear combinations of the design columns to test, as a mapping ``name -> expression``
        over the column names written by formulaic, e.g.
        ``{"BvsA": "(cls[1]:trt[T.B] + cls[2]:trt[T.B])/2"}``, or a list of expressions (each
        named by its text). Names may not contain ``"/"`` (they become h5ad keys).
        Expressions may also use conditions, as pertpy's formulaic-contrasts:
        ``'cond(trt="B") - cond(trt="A")'`` (see :func:`scflashmm.tl.contrasts_within` and
        docs/effect_sizes.md).
    theta0
        Start values ``(s_1 .. s_k, s_0)`` for every gene; default ``(0 .. 0, yRy/(n-p))``.
    max_iter
        Maximum number of Fisher-scoring iterations.
    epsilon
        Convergence tolerance on the largest absolute score.
    key_added
        Prefix of the keys written to ``adata.varm`` and the key in ``adata.uns``.
    chunk_size
        Cells per chunk of the pass over the data (default 10,000); for CSC data the pass is
        over blocks of genes of the same number of stored entries.
    copy
        Return a new AnnData with the results instead of writing into ``adata`` (not for
        backed AnnData).
    progress
        Show a progress bar over the pass over the data; default: when stderr is a terminal and
        there is more than one chunk. (Not for Dask arrays: use Dask's own diagnostics.)
    effect_size
        Also estimate log2 fold changes of normalised means (docs/effect_sizes.md), in a
        second streaming pass over the cells; default: with ``is_counts=True``. With
        ``is_counts=False`` the values must be on the linear scale (e.g. normalised counts).
    library_size
        Column of ``obs`` with each cell's library size for the effect sizes; default the
        cell's sum over the genes of the matrix fitted.
    store_cov
        Store the covariance of the fixed effects (genes x p x p; about 270 MB for 20,000
        genes and 41 columns), needed only to test new contrasts after the fit.

    Returns
    -------
    With ``copy=True`` a new AnnData, else None; ``adata`` (or the copy) gets, with
    ``key = key_added`` and DataFrames indexed by ``var_names``:

    ``varm[f"{key}_coef"]``, ``varm[f"{key}_se"]``, ``varm[f"{key}_t"]``, ``varm[f"{key}_p"]``
        Fixed effects, standard errors, t values and two-sided p values; one column per
        design column (formulaic names, the names contrasts are written in).
    ``varm[f"{key}_theta"]``, ``varm[f"{key}_se_theta"]``
        Variance components and their standard errors: one column per random term, then
        ``"residual"``.
    ``varm[f"{key}_diag"]``
        ``niter``, ``converged``, ``max_abs_dlogL``, ``logLik``.
    ``varm[f"{key}_cov"]``
        Only with ``store_cov=True``: covariance of the fixed effects, array (genes, p, p) in
        the design column order, so that further contrasts can be tested later
        (:func:`scflashmm.get.flashmm_df`).
    ``varm[f"{key}_log2fc"]``
        Only with effect sizes: log2 fold change of normalised means of each design column
        (NaN for columns that are not factor indicators; docs/effect_sizes.md).
    ``varm[f"{key}_contrast_coef"]``, ``_contrast_se``, ``_contrast_t``, ``_contrast_p``
        Only with ``contrasts``: estimate, standard error, t and two-sided p of each contrast
        (one column per contrast name); other alternatives from
        :func:`scflashmm.get.flashmm_df`.
    ``varm[f"{key}_df"]``, ``varm[f"{key}_contrast_df"]``
        Only with ``df="satterthwaite"``: the df of each coefficient and contrast.
    ``uns[key]``
        ``params`` (fixed, random, method, df, layer, is_counts, epsilon, max_iter, theta0,
        chunk_size, effect_size (as resolved), library_size, store_cov, and ``transform``:
        ``"log2(1 + y)"`` or ``"identity"``, the scale of the coefficients), ``x_columns``,
        ``random_terms``, ``random_formulas``, ``d``, ``z_columns``, ``contrast_names``,
        ``contrast_expressions``, ``contrast_matrix`` (design columns x contrasts, only with
        contrasts), ``n_cells``, ``n_genes``, ``df``, ``n_nonconverged``, ``n_degenerate``,
        ``varm_keys`` and ``version``; ``df`` is the
        residual df ``n - p`` whatever the ``df`` parameter.

    Genes that cannot be fit (all zero, or exactly explained by the fixed effects) are NaN.
    On any error ``adata`` is left unchanged.

    Examples
    --------
    >>> import scflashmm as sfm
    >>> adata = sfm.datasets.simulate_rnaseq(n_genes=50, n_cells=1000, n_de_genes=5, seed=1)
    >>> sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    >>> sfm.get.flashmm_df(adata, term=":trt").head()  # doctest: +SKIP
    """
    Y, source = _check_input(adata, layer=layer, key_added=key_added, copy=copy)
    method = check_method(method)
    df = check_df(df)
    max_iter = check_positive_int(max_iter, "max_iter")
    epsilon = check_positive_float(epsilon, "epsilon")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")

    design = make_design(adata.obs, fixed, random)
    start = check_theta0(theta0, len(design.d))
    cond = DesignConditions(adata.obs, fixed, design.x_columns)
    cmat, expressions = _contrasts(contrasts, design.x_columns, cond)

    stats = _summary_statistics(
        adata, Y, source, design, chunk_size=chunk_size, is_counts=is_counts, progress=progress
    )
    effect_sizes = fit_effect_sizes(
        adata, Y, design.X, design.x_columns, key_added, effect_size=effect_size,
        is_counts=is_counts, library_size=library_size, chunk_size=chunk_size,
    )  # fmt: skip
    fit = lmm(
        stats,
        design.d,
        method=method,
        theta0=start,
        max_iter=max_iter,
        epsilon=epsilon,
        output_cov=True,
        df=df,
        feature_names=list(map(str, adata.var_names)),
        covariate_names=design.x_columns,
        component_names=design.random_terms,
    )

    varm = _result_tables(fit, adata.var_names, key_added, cmat)
    if not store_cov:
        del varm[varm_key(key_added, COV)]
    varm.update(effect_sizes)
    params = {
        "fixed": fixed,
        "random": [random] if isinstance(random, str) else list(random),
        "method": method,
        "df": df,
        "layer": layer,
        "is_counts": bool(is_counts),
        "epsilon": epsilon,
        "max_iter": max_iter,
        "theta0": None if start is None else start.tolist(),
        "chunk_size": chunk_size,
        "transform": "log2(1 + y)" if is_counts else "identity",
        "effect_size": bool(effect_sizes),
        "library_size": library_size,
        "store_cov": bool(store_cov),
    }
    uns = _uns_record(adata, design, fit, params, cmat, expressions, list(varm))
    return _write(adata, key_added, varm, uns, copy=copy)


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------


def _check_input(adata: Any, *, layer: str | None, key_added: Any, copy: bool) -> tuple[Any, str]:
    """Check the AnnData and the key; return the matrix to fit and its name for messages."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        msg = f"adata must be an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        msg = f"key_added must be a non-empty string without '/', got {key_added!r}."
        raise ValueError(msg)
    if copy and adata.isbacked:
        msg = (
            "copy=True is not supported for a backed AnnData (it would load the data into "
            "memory); use copy=False, which writes the results to the in-memory varm/uns."
        )
        raise ValueError(msg)
    if adata.n_obs == 0:
        msg = "adata has no cells."
        raise ValueError(msg)
    if adata.n_vars == 0:
        msg = "adata has no genes (zero genes selected)."
        raise ValueError(msg)
    return get_matrix(adata, layer)


def _contrasts(
    contrasts: Mapping[str, str] | Sequence[str] | None,
    x_columns: Sequence[str],
    cond: DesignConditions | None = None,
) -> tuple[pd.DataFrame | None, dict[str, str]]:
    """Return the contrast matrix (design columns x contrasts) and each contrast's expression."""
    if contrasts is None:
        return None, {}
    cmat = contrast_matrix(contrasts, x_columns, cond=cond)
    bad = [c for c in cmat.columns if "/" in c]
    if bad:
        msg = (
            f"Contrast names cannot contain '/' (they are stored as h5ad keys): {bad}. "
            "Name them with a mapping, e.g. {'BvsA': '(a + b)/2'}."
        )
        raise ValueError(msg)
    if isinstance(contrasts, str):
        return cmat, {contrasts: contrasts}
    if isinstance(contrasts, Mapping):
        return cmat, {str(name): expr for name, expr in contrasts.items()}
    return cmat, {c: c for c in contrasts}


def _summary_statistics(
    adata: AnnData,
    Y: Any,
    source: str,
    design: Design,
    *,
    chunk_size: int | None,
    is_counts: bool,
    progress: bool | None,
) -> SummaryStats:
    """One pass over the cells; errors name ``source``, a non-finite value its cell and gene."""
    bar = ProgressBar(progress, unit="genes" if is_csc(Y) else "cells")
    try:
        stats = summary_stats(
            design.X, Y, design.Z, chunk_size=chunk_size, is_counts=is_counts, progress=bar
        )
    except NonFiniteError as exc:
        raise nonfinite_error(exc, Y, source, adata.obs_names, adata.var_names) from exc
    except ValueError as exc:
        msg = f"{source}: {exc}"
        raise ValueError(msg) from exc
    finally:
        bar.close()
    if not is_counts and looks_like_counts(Y):
        msg = (
            f"{source} looks like raw counts (non-negative integers), but "
            "is_counts=False fits them untransformed. Pass is_counts=True to fit log2(1 + y) "
            "as FLASHMM does, or normalise and log-transform first."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
    return stats


def _result_tables(
    fit: LMMFit, var_names: pd.Index, key: str, cmat: pd.DataFrame | None
) -> dict[str, Any]:
    """Return the ``varm`` entries of a fit, by key (see :mod:`scflashmm._results`)."""
    index = pd.Index(var_names)
    cols = pd.Index(fit.covariate_names, dtype=object)
    comps = pd.Index([*(fit.component_names or []), RESIDUAL], dtype=object)
    out: dict[str, Any] = {}
    for what in COEF_TABLES:
        out[varm_key(key, what)] = pd.DataFrame(getattr(fit, what), index=index, columns=cols)
    out[varm_key(key, THETA)] = pd.DataFrame(fit.theta, index=index, columns=comps)
    out[varm_key(key, SE_THETA)] = pd.DataFrame(fit.se_theta, index=index, columns=comps)
    out[varm_key(key, DIAG)] = pd.DataFrame(
        {
            "niter": fit.niter.astype(np.int64),
            "converged": fit.converged.astype(bool),
            "max_abs_dlogL": np.abs(fit.dlogL).max(axis=1),
            "logLik": fit.logLik,
        },
        index=index,
    )
    out[varm_key(key, COV)] = np.ascontiguousarray(fit.cov)
    if fit.df_satterthwaite is not None:
        out[varm_key(key, DF)] = pd.DataFrame(fit.df_satterthwaite, index=index, columns=cols)
    if cmat is not None:
        out.update(_contrast_tables(fit, index, key, cmat))
    return out


def _contrast_tables(
    fit: LMMFit, index: pd.Index, key: str, cmat: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    est, se, ddf = fit.contrast_estimates(cmat.to_numpy(dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = est / se
    p = t_pvalue(t, ddf)
    names = pd.Index([str(c) for c in cmat.columns], dtype=object)
    out = {
        varm_key(key, what): pd.DataFrame(values, index=index, columns=names)
        for what, values in zip(CONTRAST_TABLES, (est, se, t, p), strict=True)
    }
    if fit.df_method == "satterthwaite":
        out[varm_key(key, CONTRAST_DF)] = pd.DataFrame(ddf, index=index, columns=names)
    return out


def _uns_record(
    adata: AnnData,
    design: Design,
    fit: LMMFit,
    params: dict[str, Any],
    cmat: pd.DataFrame | None,
    expressions: Mapping[str, str],
    varm_keys: list[str],
) -> dict[str, Any]:
    """``uns[key]``: the fields of :data:`scflashmm._results.UNS_FIELDS`."""
    from .. import __version__

    names = [] if cmat is None else [str(c) for c in cmat.columns]
    degenerate = np.isnan(fit.theta[:, -1])
    uns: dict[str, Any] = {
        "params": params,
        "x_columns": list(design.x_columns),
        "random_terms": list(design.random_terms),
        "random_formulas": list(design.random),
        "d": [int(x) for x in design.d],
        "z_columns": list(design.z_columns),
        "contrast_names": names,
        "contrast_expressions": [str(expressions[c]) for c in names],
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "df": int(fit.df),
        "n_nonconverged": int((~fit.converged & ~degenerate).sum()),
        "n_degenerate": int(degenerate.sum()),
        "varm_keys": varm_keys,
        "version": __version__,
    }
    if cmat is not None:
        uns["contrast_matrix"] = cmat
    return uns


def _write(
    adata: AnnData, key: str, varm: Mapping[str, Any], uns: dict[str, Any], *, copy: bool
) -> AnnData | None:
    """Write the results (nothing here can fail on user input), replacing an earlier fit."""
    target = adata.copy() if copy else adata
    if target.is_view:
        target._init_as_actual(target.copy())
    previous = target.uns.get(key)
    if isinstance(previous, Mapping) and "varm_keys" in previous:
        for old in previous["varm_keys"]:
            target.varm.pop(str(old), None)
    for name, value in varm.items():
        target.varm[name] = value
    target.uns[key] = uns
    return target if copy else None
