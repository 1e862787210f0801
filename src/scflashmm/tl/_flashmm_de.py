"""``tl.flashmm_de``: a linear mixed model for every gene of an AnnData (FLASHMM's ``flashmm``)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._core.inference import contrast_estimates, t_pvalue
from .._core.reml import lmm
from .._core.satterthwaite import contrast_df
from .._core.sumstats import DEFAULT_CHUNK_SIZE, SummaryStats, prepare_chunk, summary_stats
from .._design import make_design
from .._lmm_test import contrast_matrix

if TYPE_CHECKING:
    from anndata import AnnData

    from .._core.reml import LMMFit

__all__ = ["flashmm_de"]

#: Suffixes of the ``varm`` keys written by :func:`flashmm_de` (after ``f"{key_added}_"``).
RESULT_TABLES = ("coef", "se", "t", "p")
CONTRAST_TABLES = ("contrast_coef", "contrast_se", "contrast_t", "contrast_p")


def flashmm_de(
    adata: AnnData,
    fixed: str,
    random: str | Sequence[str],
    *,
    layer: str | None = None,
    is_counts: bool = False,
    method: str = "REML",
    df: str = "residual",
    contrasts: Mapping[str, str] | Sequence[str] | None = None,
    theta0: Sequence[float] | None = None,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    key_added: str = "flashmm",
    chunk_size: int | None = None,
    copy: bool = False,
    progress: bool | None = None,
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
        Layer to fit; default ``adata.X``.
    is_counts
        Fit ``log2(1 + y)`` as ``flashmm(is.counts=TRUE)``, applied to the stored values chunk by
        chunk. With False, a warning is given when the data look like raw counts (the first two
        million stored values are all non-negative integers).
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
        there is more than one chunk.

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
        Covariance of the fixed effects, array (genes, p, p) in the design column order, so
        that further contrasts can be tested later (:func:`scflashmm.get.flashmm_df`).
    ``varm[f"{key}_contrast_coef"]``, ``_contrast_se``, ``_contrast_t``, ``_contrast_p``
        Only with ``contrasts``: estimate, standard error, t and two-sided p of each contrast
        (one column per contrast name); other alternatives from
        :func:`scflashmm.get.flashmm_df`.
    ``varm[f"{key}_df"]``, ``varm[f"{key}_contrast_df"]``
        Only with ``df="satterthwaite"``: the df of each coefficient and contrast.
    ``uns[key]``
        ``params`` (fixed, random, method, df, layer, is_counts, epsilon, max_iter, theta0,
        chunk_size), ``x_columns``, ``random_terms``, ``random_formulas``, ``d``,
        ``z_columns``, ``contrast_names``, ``contrast_expressions``, ``contrast_matrix``
        (design columns x contrasts, only with contrasts), ``n_cells``, ``n_genes``, ``df``,
        ``n_nonconverged``, ``n_degenerate``, ``varm_keys`` and ``version``; ``df`` is the
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
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        msg = f"adata must be an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        msg = f"key_added must be a non-empty string without '/', got {key_added!r}."
        raise ValueError(msg)
    if method not in ("REML", "ML"):
        msg = f"method must be 'REML' or 'ML', got {method!r}."
        raise ValueError(msg)
    if df not in ("residual", "satterthwaite"):
        msg = f"df must be 'residual' or 'satterthwaite', got {df!r}."
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
    Y, source = _get_matrix(adata, layer)

    design = make_design(adata.obs, fixed, random)
    k = len(design.d)
    if theta0 is not None:
        theta0 = [float(x) for x in np.asarray(theta0, dtype=float).ravel()]
        if len(theta0) != k + 1:
            msg = (
                f"theta0 must have {k + 1} values (one per random term "
                f"{design.random_terms}, then the residual), got {len(theta0)}."
            )
            raise ValueError(msg)
    cmat = None
    if contrasts is not None:
        cmat = contrast_matrix(contrasts, design.x_columns)
        bad = [c for c in cmat.columns if "/" in c]
        if bad:
            msg = (
                f"Contrast names cannot contain '/' (they are stored as h5ad keys): {bad}. "
                "Name them with a mapping, e.g. {'BvsA': '(a + b)/2'}."
            )
            raise ValueError(msg)
        if isinstance(contrasts, str):
            exprs = {contrasts: contrasts}
        elif isinstance(contrasts, Mapping):
            exprs = {str(name): expr for name, expr in contrasts.items()}
        else:
            exprs = {c: c for c in contrasts}

    stats, integer_valued = _accumulate(
        Y,
        design.X,
        design.Z,
        is_counts=is_counts,
        chunk_size=chunk_size,
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        source=source,
        progress=progress,
    )
    if integer_valued and not is_counts:
        msg = (
            f"{source} looks like raw counts (non-negative integers), but "
            "is_counts=False fits them untransformed. Pass is_counts=True to fit log2(1 + y) "
            "as FLASHMM does, or normalise and log-transform first."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)

    fit = lmm(
        stats,
        design.d,
        method=method,
        theta0=theta0,
        max_iter=max_iter,
        epsilon=epsilon,
        output_cov=True,
        df=df,
        feature_names=list(map(str, adata.var_names)),
        covariate_names=design.x_columns,
        component_names=design.random_terms,
    )

    varm = _result_tables(fit, adata.var_names, key_added, cmat)
    from .. import __version__

    uns = {
        "params": {
            "fixed": fixed,
            "random": [random] if isinstance(random, str) else list(random),
            "method": method,
            "df": df,
            "layer": layer,
            "is_counts": bool(is_counts),
            "epsilon": float(epsilon),
            "max_iter": int(max_iter),
            "theta0": theta0,
            "chunk_size": chunk_size,
        },
        "x_columns": list(design.x_columns),
        "random_terms": list(design.random_terms),
        "random_formulas": list(design.random),
        "d": [int(x) for x in design.d],
        "z_columns": list(design.z_columns),
        "contrast_names": [] if cmat is None else [str(c) for c in cmat.columns],
        "contrast_expressions": [] if cmat is None else [str(exprs[c]) for c in cmat.columns],
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "df": int(fit.df),
        "n_nonconverged": int((~fit.converged & ~np.isnan(fit.theta[:, -1])).sum()),
        "n_degenerate": int(np.isnan(fit.theta[:, -1]).sum()),
        "varm_keys": list(varm),
        "version": __version__,
    }
    if cmat is not None:
        uns["contrast_matrix"] = cmat

    # Everything is computed: write (nothing below can fail on user input).
    target = adata.copy() if copy else adata
    if target.is_view:
        target._init_as_actual(target.copy())
    previous = target.uns.get(key_added)
    if isinstance(previous, Mapping) and "varm_keys" in previous:
        for old in previous["varm_keys"]:
            target.varm.pop(str(old), None)
    for name, value in varm.items():
        target.varm[name] = value
    target.uns[key_added] = uns
    return target if copy else None


# --------------------------------------------------------------------------------------------
# data access and the pass over the cells
# --------------------------------------------------------------------------------------------


def _get_matrix(adata: AnnData, layer: str | None) -> tuple[Any, str]:
    if layer is None:
        if adata.X is None:
            msg = "adata.X is None: pass layer=... to choose the matrix to fit."
            raise ValueError(msg)
        return adata.X, "adata.X"
    if layer not in adata.layers:
        avail = ", ".join(repr(k) for k in adata.layers) or "none"
        msg = f"adata has no layer {layer!r}; layers: {avail}."
        raise ValueError(msg)
    return adata.layers[layer], f"adata.layers[{layer!r}]"


def _is_csc(Y: Any) -> bool:
    return getattr(Y, "format", None) == "csc" or (sparse.issparse(Y) and Y.format == "csc")


def _materialize(chunk: Any) -> Any:
    """Return a chunk as numpy or scipy sparse (a dask chunk is computed once, here)."""
    if sparse.issparse(chunk) or isinstance(chunk, np.ndarray):
        return chunk
    if hasattr(chunk, "compute"):
        return _materialize(chunk.compute())
    return np.asarray(chunk)


def _values(chunk: Any) -> np.ndarray:
    return chunk.data if sparse.issparse(chunk) else np.asarray(chunk)


def _locate_nonfinite(chunk: Any) -> tuple[int, int]:
    """(row, column) of the first non-finite entry of a chunk."""
    if sparse.issparse(chunk):
        coo = sparse.coo_matrix(chunk)
        i = int(np.flatnonzero(~np.isfinite(coo.data))[0])
        return int(coo.row[i]), int(coo.col[i])
    r, c = np.argwhere(~np.isfinite(np.asarray(chunk, dtype=float)))[0]
    return int(r), int(c)


class _Checker:
    """Inspect the chunks of the data on their way to the summary statistics.

    Names the cell and gene of a non-finite value when the pass fails, and tracks whether the
    first values seen are all integers >= 0 (raw counts?).
    """

    #: stored values inspected for the raw-counts heuristic (a bounded cost per fit)
    SAMPLE = 2_000_000

    def __init__(self, obs_names, var_names, source: str, *, look_for_counts: bool):
        self.obs_names, self.var_names, self.source = obs_names, var_names, source
        self.integer_valued = look_for_counts
        self.any_nonzero = False
        self.seen = 0

    def __call__(self, chunk: Any) -> None:
        if not self.integer_valued or self.seen >= self.SAMPLE:
            return
        values = _values(chunk).ravel()[: self.SAMPLE - self.seen]
        self.seen += values.size
        if values.dtype.kind not in "biuf" or not values.size:
            return
        if values.min() < 0 or (values.dtype.kind == "f" and (values != np.round(values)).any()):
            self.integer_valued = False
        elif values.max() > 0:
            self.any_nonzero = True

    def error(self, exc: ValueError, chunk: Any, row0: int, col0: int) -> ValueError:
        """Build the error to raise when the pass failed on ``chunk``."""
        values = _values(chunk)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            r, c = _locate_nonfinite(chunk)
            msg = (
                f"{self.source} contains NaN or infinite values, e.g. cell "
                f"{self.obs_names[row0 + r]!r}, gene {self.var_names[col0 + c]!r}."
            )
        else:
            msg = f"{self.source}: {exc}"
        return ValueError(msg)

    @property
    def looks_like_counts(self) -> bool:
        return self.integer_valued and self.any_nonzero


def _progress_bar(total: int, unit: str, progress: bool | None, n_chunks: int):
    from tqdm.auto import tqdm

    if progress is None:
        progress = n_chunks > 1 and sys.stderr.isatty()
    return tqdm(total=total, unit=unit, disable=not progress, desc="flashmm pass", leave=False)


def _accumulate(
    Y: Any,
    X: np.ndarray,
    Z: sparse.csr_matrix,
    *,
    is_counts: bool,
    chunk_size: int | None,
    obs_names,
    var_names,
    source: str,
    progress: bool | None,
) -> tuple[SummaryStats, bool]:
    """Summary statistics in one pass over ``Y``: row chunks, or gene blocks for CSC data."""
    n, m = Y.shape
    if X.shape[0] != n:
        msg = f"The design has {X.shape[0]} rows but {source} has {n} cells."
        raise ValueError(msg)
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(size, bool) or int(size) != size or size < 1:
        msg = f"chunk_size must be a positive integer, got {chunk_size!r}."
        raise ValueError(msg)
    size = int(size)
    check = _Checker(obs_names, var_names, source, look_for_counts=not is_counts)
    p = X.shape[1]
    XX = X.T @ X
    ZX = np.asarray(Z.T @ X)
    ZZ = (Z.T @ Z).toarray()
    XY = np.zeros((p, m))
    ZY = np.zeros((Z.shape[1], m))
    Ynorm = np.zeros(m)
    if _is_csc(Y):
        # column slices of CSC are cheap and row slices are not: blocks of genes holding
        # about as many entries as a chunk of `size` cells
        block = max(1, (size * m) // n)
        starts = range(0, m, block)
        with _progress_bar(m, "genes", progress, len(starts)) as bar:
            for j0 in starts:
                chunk = _materialize(Y[:, j0 : j0 + block])
                check(chunk)
                try:
                    prepared = sparse.csc_matrix(prepare_chunk(chunk, is_counts=is_counts))
                except ValueError as exc:
                    raise check.error(exc, chunk, 0, j0) from exc
                j1 = j0 + prepared.shape[1]
                rows = prepared.T  # CSR, genes x cells
                XY[:, j0:j1] = np.asarray(rows @ X).T
                ZY[:, j0:j1] = (rows @ Z).toarray().T
                genes = np.repeat(np.arange(j1 - j0), np.diff(prepared.indptr))
                Ynorm[j0:j1] = np.bincount(genes, weights=prepared.data**2, minlength=j1 - j0)
                bar.update(j1 - j0)
    else:
        starts = range(0, n, size)
        with _progress_bar(n, "cells", progress, len(starts)) as bar:
            for i0 in starts:
                chunk = _materialize(Y[i0 : i0 + size])
                check(chunk)
                i1 = i0 + chunk.shape[0]
                try:
                    part = summary_stats(
                        X[i0:i1], chunk, Z[i0:i1], chunk_size=i1 - i0, is_counts=is_counts
                    )
                except ValueError as exc:
                    raise check.error(exc, chunk, i0, 0) from exc
                XY += part.XY
                ZY += part.ZY
                Ynorm += part.Ynorm
                bar.update(i1 - i0)
    stats = SummaryStats(XX=XX, XY=XY, ZX=ZX, ZY=ZY, ZZ=ZZ, Ynorm=Ynorm, n=n)
    return stats, check.looks_like_counts


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


def _result_tables(
    fit: LMMFit, var_names: pd.Index, key: str, cmat: pd.DataFrame | None
) -> dict[str, Any]:
    index = pd.Index(var_names)
    cols = pd.Index(fit.covariate_names, dtype=object)
    comps = pd.Index([*fit.component_names, "residual"], dtype=object)
    out: dict[str, Any] = {}
    for what in RESULT_TABLES:
        out[f"{key}_{what}"] = pd.DataFrame(getattr(fit, what), index=index, columns=cols)
    out[f"{key}_theta"] = pd.DataFrame(fit.theta, index=index, columns=comps)
    out[f"{key}_se_theta"] = pd.DataFrame(fit.se_theta, index=index, columns=comps)
    out[f"{key}_diag"] = pd.DataFrame(
        {
            "niter": fit.niter.astype(np.int64),
            "converged": fit.converged.astype(bool),
            "max_abs_dlogL": np.abs(fit.dlogL).max(axis=1),
            "logLik": fit.logLik,
        },
        index=index,
    )
    out[f"{key}_cov"] = np.ascontiguousarray(fit.cov)
    if fit.df_satterthwaite is not None:
        out[f"{key}_df"] = pd.DataFrame(fit.df_satterthwaite, index=index, columns=cols)
    if cmat is not None:
        L = cmat.to_numpy(dtype=np.float64)
        est, se = contrast_estimates(fit.coef, fit.cov, L)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = est / se
        ddf = fit.df
        if fit.dfim_beta is not None:
            ddf = contrast_df(fit.cov, fit.dfim_beta, fit.theta, fit.vcov_theta, L)
        p = t_pvalue(t, ddf)
        names = pd.Index([str(c) for c in cmat.columns], dtype=object)
        for what, values in zip(CONTRAST_TABLES, (est, se, t, p), strict=True):
            out[f"{key}_{what}"] = pd.DataFrame(values, index=index, columns=names)
        if fit.dfim_beta is not None:
            out[f"{key}_contrast_df"] = pd.DataFrame(ddf, index=index, columns=names)
    return out
