"""``tl.flashmm_de``: a linear mixed model for every gene of an AnnData (FLASHMM's ``flashmm``)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._core.inference import t_pvalue
from .._core.reml import lmm
from .._core.sumstats import NonFiniteError, _check_chunk_size, summary_stats
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
    _check_chunk_size(chunk_size)

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

    bar = _ProgressBar(progress, unit="genes" if _is_csc(Y) else "cells")
    try:
        stats = summary_stats(
            design.X, Y, design.Z, chunk_size=chunk_size, is_counts=is_counts, progress=bar
        )
    except NonFiniteError as exc:
        raise _nonfinite_error(exc, Y, source, adata.obs_names, adata.var_names) from exc
    except ValueError as exc:
        msg = f"{source}: {exc}"
        raise ValueError(msg) from exc
    finally:
        bar.close()
    if not is_counts and _looks_like_counts(Y):
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
    """Whether ``Y`` is CSC (in memory or backed), which the pass reads by blocks of genes."""
    return getattr(Y, "format", None) == "csc"


def _materialize(block: Any) -> Any:
    """Return a block of ``Y`` as numpy or scipy sparse (a dask block is computed here)."""
    if sparse.issparse(block) or isinstance(block, np.ndarray):
        return block
    if hasattr(block, "compute"):
        return _materialize(block.compute())
    return np.asarray(block)


#: stored values inspected for the raw-counts warning (a bounded cost per fit)
_COUNTS_SAMPLE = 2_000_000


def _looks_like_counts(Y: Any) -> bool:
    """Whether the stored values of the first cells (genes, for CSC) are integers >= 0, not all 0.

    Reads at most ``_COUNTS_SAMPLE`` values, separately from the pass.
    """
    n, m = Y.shape
    if _is_csc(Y):
        block = Y[:, : max(1, _COUNTS_SAMPLE // n)]
    else:
        block = Y[: max(1, _COUNTS_SAMPLE // m)]
    block = _materialize(block)
    values = block.data if sparse.issparse(block) else block
    if values.dtype.kind not in "biuf" or not values.size:
        return False
    if values.dtype.kind == "f" and not (values == np.round(values)).all():  # also NaN
        return False
    return bool(values.min() >= 0 and values.max() > 0)


def _nonfinite_error(exc: NonFiniteError, Y: Any, source: str, obs_names, var_names) -> ValueError:
    """Name the cell and gene of a non-finite value, reading the range reported again."""
    if exc.start is None:
        return ValueError(f"{source}: {exc}")
    if exc.axis == 0:
        block, row0, col0 = Y[exc.start : exc.stop], exc.start, 0
    else:
        block, row0, col0 = Y[:, exc.start : exc.stop], 0, exc.start
    block = _materialize(block)
    if sparse.issparse(block):
        coo = sparse.coo_matrix(block)
        i = int(np.flatnonzero(~np.isfinite(coo.data))[0])
        r, c = int(coo.row[i]), int(coo.col[i])
    else:
        r, c = np.argwhere(~np.isfinite(np.asarray(block, dtype=float)))[0]
    msg = (
        f"{source} contains NaN or infinite values, e.g. cell "
        f"{obs_names[row0 + r]!r}, gene {var_names[col0 + c]!r}."
    )
    return ValueError(msg)


class _ProgressBar:
    """``progress(done, total)`` for :func:`summary_stats`, updating a tqdm bar.

    The bar is made at the first report, when the total is known; by default it is shown only
    on a terminal and when that report is not already the last (more than one chunk).
    """

    def __init__(self, show: bool | None, unit: str):
        self.show, self.unit = show, unit
        self.bar, self.done = None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            show = self.show
            if show is None:
                show = done < total and sys.stderr.isatty()
            self.bar = tqdm(
                total=total, unit=self.unit, disable=not show, desc="flashmm pass", leave=False
            )
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        est, se, ddf = fit.contrast_estimates(cmat.to_numpy(dtype=np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            t = est / se
        p = t_pvalue(t, ddf)
        names = pd.Index([str(c) for c in cmat.columns], dtype=object)
        for what, values in zip(CONTRAST_TABLES, (est, se, t, p), strict=True):
            out[f"{key}_{what}"] = pd.DataFrame(values, index=index, columns=names)
        if fit.df_method == "satterthwaite":
            out[f"{key}_contrast_df"] = pd.DataFrame(ddf, index=index, columns=names)
    return out
