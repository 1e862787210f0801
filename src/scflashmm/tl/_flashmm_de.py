"""``tl.flashmm_de``: a linear mixed model for every gene of an AnnData (FLASHMM's ``flashmm``).

The steps, top to bottom: validate the options, build the design from ``obs``, accumulate the
summary statistics in one pass over the cells, fit every gene, turn the fit into tables, and
write them into the AnnData (names from :mod:`scflashmm._results`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._contrast import DesignConditions
from .._core._options import (
    Criterion,
    DfMethod,
    Method,
    check_criterion,
    check_df,
    check_method,
    check_positive_float,
    check_positive_int,
    check_theta0,
)
from .._core._threads import check_n_jobs
from .._core.checks import check_fit_memory, memory_layout
from .._core.fit import lmm
from .._core.inference import t_pvalue
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
    MODERATION,
    RESIDUAL,
    SE_THETA,
    STATS_XY,
    STATS_YY,
    STATS_ZY,
    THETA,
    check_h5ad_name,
    varm_key,
)
from ._effect_size import fit_effect_sizes
from ._matrix import (
    ProgressBar,
    check_backed_view,
    get_matrix,
    has_non_integers,
    is_csc,
    looks_like_counts,
    nonfinite_error,
)
from ._moderate import Moderated, moderate_fit, resolve_moderate

if TYPE_CHECKING:
    from datetime import datetime

    from anndata import AnnData

    from .._core.lmmfit import LMMFit
    from .._core.sumstats import SummaryStats
    from .._design import Design


@dataclass(frozen=True)
class DesignInfo:
    """What a fit needs to know of the design besides the summary statistics."""

    x_columns: list[str]
    random_terms: list[str]
    random: list[str]
    d: list[int]
    z_columns: list[str]
    x_sum: np.ndarray  # X'1, for the mean-expression trend of the moderation
    structure: Any = None  # lme4-style terms: the CovarianceStructure of G (else None)

    @classmethod
    def of(cls, design: Design) -> DesignInfo:
        """Return the information of an encoded :class:`~scflashmm._design.Design`."""
        return cls(
            x_columns=list(design.x_columns),
            random_terms=list(design.random_terms),
            random=list(design.random),
            d=[int(x) for x in design.d],
            z_columns=list(design.z_columns),
            x_sum=np.asarray(design.X.sum(axis=0), dtype=np.float64).ravel(),
            structure=design.structure,
        )


@dataclass(frozen=True)
class FitOptions:
    """The checked options of a fit (shared by :func:`flashmm_de` and ``flashmm_refit``)."""

    method: Method
    df: DfMethod
    nonnegative: bool
    moderate: bool
    theta0: np.ndarray | None
    max_iter: int
    epsilon: float
    criterion: Criterion = "relative"


__all__ = ["flashmm_de"]


def flashmm_de(
    adata: AnnData,
    fixed: str,
    random: str | Sequence[str],
    *,
    layer: str | None = None,
    is_counts: bool = False,
    method: Method = "REML",
    df: DfMethod = "satterthwaite",
    nonnegative: bool | None = None,
    moderate: bool | None = None,
    contrasts: Mapping[str, str] | Sequence[str] | None = None,
    theta0: Sequence[float] | None = None,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    criterion: Criterion = "relative",
    store_stats: bool = True,
    key_added: str = "flashmm",
    chunk_size: int | None = None,
    copy: bool = False,
    progress: bool | None = None,
    n_jobs: int | None = None,
    groupby: str | None = None,
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

    The defaults are the setting that docs/calibration.md measured to keep false positives and
    false discoveries in check with 3 to 25 samples: with one random component the tests are
    moderated (``moderate=None``), otherwise Satterthwaite df. FLASHMM's exact numbers are
    ``moderate=False, df="residual"`` (``nonnegative=False``, the default for these forms).

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
        list of them (``["sam", "location"]``); or lme4-style terms, alone or added, such as
        ``"(1|sam) + (1|batch)"``, ``"(1|donor/sample)"``, ``"(1 + time|donor)"`` (correlated
        random slopes) or ``"(1 + time||donor)"`` (docs/model.md, Random-effects structures:
        their ``theta`` columns are lme4 ``VarCorr``-like names, ``"donor: (Intercept)"``,
        ``"donor: corr((Intercept), time)"``, and ``uns[key]`` gets ``random_structure``).
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
        Degrees of freedom of the t tests when they are not moderated: ``"residual"``
        (``n - p``, FLASHMM), ``"satterthwaite"`` (default; per gene and test, as lmerTest) or
        ``"kenward-roger"`` (REML only; adjusted standard errors and df, as pbkrtest), all from
        the summary statistics. ``n - p`` counts cells as replicates: when the tested effect
        varies between few samples (samples nested in the condition) it is liberal.
    nonnegative
        Maximise the likelihood over variance components ``>= 0``, as lme4 (a gene whose
        optimum is on the boundary gets exactly 0 and is flagged ``singular``). Default: True
        for lme4-style terms (``"(1 | sam)"``, lme4's boundary), False for the other forms of
        ``random`` (FLASHMM's unconstrained Fisher scoring, and the estimates the moderation
        was measured with).
    moderate
        Empirical-Bayes moderation of the between-sample variance ``tau = s_1 + s_0 / n_s``
        (``n_s`` about the cells per sample): the genes' estimates, each on ``d`` df (about the
        samples minus the fixed effects between samples), share a prior centred on a trend in
        the mean expression, with a shape estimated from all genes (a grid of multiples of the
        trend, weights by maximum likelihood); each gene's p value averages the GLS tests over
        its posterior (docs/calibration.md, ``scflashmm._core.moderation``). It replaces
        ``se``, ``t``, ``p`` and ``cov`` of the coefficients and contrasts (``cov`` of the GLS
        estimate at the posterior mean of ``tau``; ``p`` is the posterior-predictive p value,
        so no df is reported); the estimates stay the fit's. Assumes one random component and
        genes' ``tau`` drawn from one smooth distribution around the trend. ``None``
        (default): moderate when the model has exactly one random component; ``True`` with
        several components is an error.
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
    criterion
        ``"relative"`` (default): the score is that of each gene's response scaled to unit
        residual variance, so that t and p do not depend on the units of the data
        (docs/model.md, Convergence); ``"flashmm"``: FLASHMM's score in the units of the data
        (its exact iterations and numbers).
    store_stats
        Keep the summary statistics in the AnnData, so that :func:`scflashmm.tl.flashmm_refit`
        can test new contrasts or refit with another method, df, ``nonnegative`` or
        ``moderate`` without the cells: ``8 (p + q + 1)`` bytes per gene in ``varm`` (``q``:
        columns of the random design) and ``8 (p + q)^2`` bytes in ``uns``.
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
        there is more than one chunk. For a Dask array the bar counts the cells of the
        blocks done, on the active ``dask.distributed`` client if there is one (to run the
        pass on an existing cluster, connect first: ``Client("tcp://scheduler:8786")``).
    n_jobs
        Threads for the pass over the data and for the fits (default: the CPUs available).
        The results do not depend on it.
    groupby
        A column of ``adata.obs``: fit a separate model within each of its levels (formulas
        evaluated on the group's cells, so a factor level absent from a group drops out of
        its design), all groups accumulated in the same single pass over the cells. Groups
        that cannot be fit (no cells, too few cells, a rank-deficient design, a random term
        with a single level) are skipped with a warning naming them; the others are fit.
        Effect sizes, when asked for, are those of each group's design on its cells (one
        more pass over the cells for all groups).
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
        ``niter``, ``converged``, ``max_abs_dlogL``, ``logLik``, ``singular`` (a component
        estimated at exactly 0 with ``nonnegative=True``).
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
        Only with per-test df (``"satterthwaite"``, ``"kenward-roger"``) and no moderation:
        the df of each coefficient and contrast.
    ``varm[f"{key}_moderation"]``
        Only when moderated: ``tau`` (the gene's between-sample variance from the fit) and
        ``tau_moderated`` (its posterior mean).
    ``varm[f"{key}_stats_xy"]``, ``varm[f"{key}_stats_zy"]``, ``varm[f"{key}_stats_yy"]``
        Only with ``store_stats``: ``X'y`` (columns: design columns), ``Z'y`` (array, genes x
        q) and ``y'y`` (column ``"yy"``) of every gene.
    ``uns[key]``
        ``params`` (fixed, random, method, df, nonnegative, moderate (as applied), layer,
        is_counts, epsilon, criterion, max_iter, theta0, chunk_size, store_stats, effect_size (as
        resolved), library_size, store_cov, and ``transform``: ``"log2(1 + y)"`` or
        ``"identity"``, the scale of the coefficients), ``x_columns``,
        ``random_terms``, ``random_formulas``, ``d``, ``z_columns``, ``contrast_names``,
        ``contrast_expressions``, ``contrast_matrix`` (design columns x contrasts, only with
        contrasts), ``n_cells``, ``n_genes``, ``df``, ``n_nonconverged``, ``n_degenerate``,
        ``n_singular``, ``moderation`` (only when moderated: method, ``d``, ``bar_lambda``, the
        prior's ``multipliers`` and ``weights``), ``stats`` (only with ``store_stats``: ``XX``,
        ``ZX``, ``ZZ``, ``x_sum``, ``n``), ``varm_keys`` and ``version``; ``df`` is the
        residual df ``n - p`` whatever the ``df`` parameter.

    With ``groupby``, each group's fit is stored as above under the key
    ``sub = f"{key}:{group}"`` (``"/"`` in a group name becomes ``"|"``): ``varm[f"{sub}_coef"]``
    ..., and ``uns[sub]`` with ``n_cells`` of the group and ``group``; ``uns[key]`` then holds
    ``params`` (with ``groupby``), ``groupby``, ``groups`` and ``group_keys`` (the groups fit,
    in level order, and their keys), ``n_cells``, ``skipped`` and ``skipped_reasons`` (groups
    not fit and why), ``varm_keys`` and ``version``. Read them with
    ``scflashmm.get.flashmm_df(adata, group=...)`` or the plots' ``group``.

    Genes that cannot be fit (all zero, or exactly explained by the fixed effects) are NaN.
    On any error ``adata`` is left unchanged.

    Examples
    --------
    >>> import scflashmm as sfm
    >>> adata = sfm.datasets.simulate_rnaseq(n_genes=50, n_cells=1000, n_de_genes=5, seed=1)
    >>> sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    >>> sfm.get.flashmm_df(adata, term=":trt").head()  # doctest: +SKIP
    """
    from scanpy import logging as logg  # scanpy's log (lazily: importing scanpy is slow)

    start = logg.info(f"fitting the mixed model {fixed} to every gene")
    note_duplicate_var_names(adata)
    if groupby is not None:
        from ._groupby import flashmm_de_groupby

        return flashmm_de_groupby(
            adata, fixed, random, groupby=groupby, layer=layer, is_counts=is_counts,
            method=method, df=df, contrasts=contrasts, theta0=theta0, max_iter=max_iter,
            epsilon=epsilon, key_added=key_added, chunk_size=chunk_size, copy=copy,
            progress=progress, nonnegative=nonnegative, moderate=moderate, n_jobs=n_jobs,
            criterion=criterion,
            store_stats=store_stats, store_cov=store_cov, effect_size=effect_size,
            library_size=library_size,
        )  # fmt: skip
    Y, source = _check_input(adata, layer=layer, key_added=key_added, copy=copy)
    max_iter = check_positive_int(max_iter, "max_iter")
    epsilon = check_positive_float(epsilon, "epsilon")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    store_stats = _check_bool(store_stats, "store_stats")

    jobs = check_n_jobs(n_jobs)

    design = make_design(adata.obs, fixed, random)
    info = DesignInfo.of(design)
    opts = check_fit_options(
        method=method,
        df=df,
        nonnegative=nonnegative,
        moderate=moderate,
        theta0=theta0,
        max_iter=max_iter,
        epsilon=epsilon,
        info=info,
        criterion=criterion,
    )
    cond = DesignConditions(adata.obs, fixed, design.x_columns)
    cmat, expressions = _contrasts(contrasts, design.x_columns, cond)
    _check_memory(adata.n_obs, design, adata.n_vars, n_jobs=jobs)

    stats = _summary_statistics(
        adata,
        Y,
        source,
        design,
        chunk_size=chunk_size,
        is_counts=is_counts,
        progress=progress,
        n_jobs=jobs,
    )
    effect_sizes = fit_effect_sizes(
        adata, Y, design.X, design.x_columns, key_added, effect_size=effect_size,
        is_counts=is_counts, library_size=library_size, chunk_size=chunk_size,
    )  # fmt: skip
    params = data_params(
        fixed=fixed,
        random=random,
        layer=layer,
        is_counts=is_counts,
        chunk_size=chunk_size,
        store_stats=store_stats,
        effect_size=bool(effect_sizes),
        library_size=library_size,
        store_cov=store_cov,
    )
    varm, uns = fit_and_record(
        adata,
        stats,
        info,
        opts,
        params,
        cmat,
        expressions,
        key_added,
        store_stats=store_stats,
        n_jobs=jobs,
        extra_tables=effect_sizes,
        progress=progress,
    )
    return write_results(adata, key_added, varm, uns, copy=copy, start=start)


def note_duplicate_var_names(adata: Any) -> None:
    """Warn when ``adata.var_names`` repeat: results are indexed by gene name."""
    names = getattr(adata, "var_names", None)
    if names is None or names.is_unique:
        return
    repeated = names[names.duplicated()].unique()
    shown = ", ".join(map(repr, repeated[:5])) + (", ..." if len(repeated) > 5 else "")
    msg = (
        f"adata.var_names are not unique ({len(repeated)} repeated: {shown}); the result "
        "tables are indexed by gene name, so repeated genes cannot be told apart. Call "
        "adata.var_names_make_unique() first."
    )
    warnings.warn(msg, UserWarning, stacklevel=3)


def view_to_actual(adata: AnnData) -> None:
    """Turn a view into an actual AnnData (a copy) before writing results, as scanpy does."""
    if adata.is_view:
        from scanpy import logging as logg

        logg.warning("Received a view of an AnnData. Making a copy.")
        adata._init_as_actual(adata.copy())


def data_params(
    *,
    fixed: str,
    random: str | Sequence[str],
    layer: str | None,
    is_counts: bool,
    chunk_size: int | None,
    store_stats: bool,
    effect_size: bool,
    library_size: str | None,
    store_cov: bool,
) -> dict[str, Any]:
    """``uns[key]["params"]`` entries about the data and storage (the model's come with the fit)."""
    return {
        "fixed": fixed,
        "random": [random] if isinstance(random, str) else list(random),
        "layer": layer,
        "is_counts": bool(is_counts),
        "chunk_size": chunk_size,
        "store_stats": store_stats,
        "transform": "log2(1 + y)" if is_counts else "identity",
        "effect_size": bool(effect_size),
        "library_size": library_size,
        "store_cov": bool(store_cov),
    }


def warn_if_raw_counts(Y: Any, source: str, *, is_counts: bool) -> None:
    """Warn when data fitted untransformed look like raw counts (non-negative integers)."""
    if not is_counts and looks_like_counts(Y):
        msg = (
            f"{source} looks like raw counts (non-negative integers), but "
            "is_counts=False fits them untransformed. Pass is_counts=True to fit log2(1 + y) "
            "as FLASHMM does, or normalise and log-transform first."
        )
        warnings.warn(msg, UserWarning, stacklevel=4)


def check_fit_options(
    *,
    method: Any,
    df: Any,
    nonnegative: Any,
    moderate: Any,
    theta0: Any,
    max_iter: int,
    epsilon: float,
    info: DesignInfo,
    criterion: Any = "relative",
) -> FitOptions:
    """Check the model options against the design; ``moderate=None`` is resolved here."""
    method = check_method(method)
    df = check_df(df, method)
    # lme4-style terms get lme4's boundary; FLASHMM's forms keep its unconstrained scoring
    structured = info.structure is not None
    nonnegative = structured if nonnegative is None else _check_bool(nonnegative, "nonnegative")
    start = check_theta0(theta0, len(info.d))
    return FitOptions(
        method=method,
        df=df,
        nonnegative=nonnegative,
        moderate=resolve_moderate(moderate, info.d, info.random_terms, structured=structured),
        theta0=start,
        max_iter=max_iter,
        epsilon=epsilon,
        criterion=check_criterion(criterion),
    )


def fit_and_record(
    adata: AnnData,
    stats: SummaryStats,
    info: DesignInfo,
    opts: FitOptions,
    params: dict[str, Any],
    cmat: pd.DataFrame | None,
    expressions: Mapping[str, str],
    key: str,
    *,
    store_stats: bool,
    n_jobs: int | None = None,
    extra_tables: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit every gene from ``stats``; return the ``varm`` entries and ``uns[key]``."""
    structured = info.structure is not None
    bar = ProgressBar(progress, unit="genes", desc="flashmm fit")
    try:
        fit = lmm(
            stats,
            None if structured else info.d,
            structure=info.structure,
            method=opts.method,
            theta0=opts.theta0,
            max_iter=opts.max_iter,
            epsilon=opts.epsilon,
            output_cov=True,
            df=opts.df,
            feature_names=list(map(str, adata.var_names)),
            covariate_names=info.x_columns,
            component_names=None if structured else info.random_terms,
            n_jobs=n_jobs,
            nonnegative=opts.nonnegative,
            criterion=opts.criterion,
            progress=bar,
        )
    finally:
        bar.close()
    moderated = None
    if opts.moderate:
        cm = None if cmat is None else cmat.to_numpy(dtype=np.float64)
        moderated = moderate_fit(stats, fit.theta, fit.coef, info.x_sum, cm)
    varm = _result_tables(fit, adata.var_names, key, cmat, moderated)
    if not params.get("store_cov", True):
        del varm[varm_key(key, COV)]
    varm.update(extra_tables or {})
    if store_stats:
        varm.update(_stats_tables(stats, adata.var_names, key, info))
    params = {
        **params,
        "method": opts.method,
        "df": opts.df,
        "nonnegative": opts.nonnegative,
        "criterion": opts.criterion,
        "moderate": opts.moderate,
        "epsilon": opts.epsilon,
        "max_iter": opts.max_iter,
        "theta0": None if opts.theta0 is None else opts.theta0.tolist(),
    }
    uns = _uns_record(adata, info, fit, params, cmat, expressions, list(varm))
    if moderated is not None:
        uns["moderation"] = moderated.record
    if store_stats:
        uns["stats"] = {
            "XX": np.asarray(stats.XX, dtype=np.float64),
            "ZX": np.asarray(stats.ZX, dtype=np.float64),
            "ZZ": np.asarray(stats.ZZ, dtype=np.float64),
            "x_sum": np.asarray(info.x_sum, dtype=np.float64),
            "n": int(stats.n),
        }
    return varm, uns


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------


def _check_input(adata: Any, *, layer: str | None, key_added: Any, copy: bool) -> tuple[Any, str]:
    """Check the AnnData and the key; return the matrix to fit and its name for messages."""
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        msg = f"adata must be an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    check_h5ad_name(key_added, "key_added")
    check_backed_view(adata)
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
    _check_contrast_names([str(c) for c in cmat.columns], x_columns)
    if isinstance(contrasts, str):
        return cmat, {contrasts: contrasts}
    if isinstance(contrasts, Mapping):
        return cmat, {str(name): expr for name, expr in contrasts.items()}
    return cmat, {c: c for c in contrasts}


def _check_contrast_names(names: Sequence[str], x_columns: Sequence[str]) -> None:
    """Contrast names must be storable in h5ad and differ from the design columns."""
    for name in names:
        check_h5ad_name(name, f"The contrast name {name!r}")
        if name in x_columns:
            msg = (
                f"The contrast name {name!r} is also a design column, so results under that "
                "name would be ambiguous (get.flashmm_df, pl.qq, pl.volcano); name the "
                "contrast differently, e.g. {'" + name + "_contrast': '...'}."
            )
            raise ValueError(msg)


def _check_memory(n: int, design: Design, m: int, *, n_jobs: int | None) -> None:
    """Refuse, before the pass, a fit that would not fit in memory (see check_fit_memory)."""
    p, q, k = design.X.shape[1], design.Z.shape[1], len(design.d)
    layout = memory_layout(design.d, design.structure)
    check_fit_memory(n, p, q, m, k, n_jobs=check_n_jobs(n_jobs), **layout)


def _summary_statistics(
    adata: AnnData,
    Y: Any,
    source: str,
    design: Design,
    *,
    chunk_size: int | None,
    is_counts: bool,
    progress: bool | None,
    n_jobs: int,
) -> SummaryStats:
    """One pass over the cells; errors name ``source``, a non-finite value its cell and gene."""
    bar = ProgressBar(progress, unit="genes" if is_csc(Y) else "cells")
    try:
        stats = summary_stats(
            design.X,
            Y,
            design.Z,
            chunk_size=chunk_size,
            is_counts=is_counts,
            progress=bar,
            n_jobs=n_jobs,
        )
    except NonFiniteError as exc:
        raise nonfinite_error(exc, Y, source, adata.obs_names, adata.var_names) from exc
    except ValueError as exc:
        msg = f"{source}: {exc}"
        raise ValueError(msg) from exc
    finally:
        bar.close()
    warn_if_raw_counts(Y, source, is_counts=is_counts)
    if is_counts and has_non_integers(Y):
        msg = (
            f"{source} has non-integer values, but is_counts=True treats them as counts and "
            "fits log2(1 + y). If the data are already normalised or log-transformed, pass "
            "is_counts=False (or choose the layer of raw counts)."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
    return stats


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        msg = f"{name} must be True or False, got {value!r}."
        raise TypeError(msg)
    return bool(value)


def _singular(fit: LMMFit) -> np.ndarray:
    """Return the per-gene singular flag (False where the solver does not report one)."""
    flag = getattr(fit, "singular", None)
    if flag is None:
        return np.zeros(fit.n_features, dtype=bool)
    return np.asarray(flag, dtype=bool)


def _per_test_df(fit: LMMFit) -> np.ndarray | None:
    """Per-coefficient df of a Satterthwaite or Kenward-Roger fit, else None."""
    if fit.df_method == "satterthwaite":
        return fit.df_satterthwaite
    return getattr(fit, "df_kenward_roger", None) if fit.df_method != "residual" else None


def _result_tables(
    fit: LMMFit,
    var_names: pd.Index,
    key: str,
    cmat: pd.DataFrame | None,
    moderated: Moderated | None = None,
) -> dict[str, Any]:
    """Return the ``varm`` entries of a fit, by key (see :mod:`scflashmm._results`)."""
    index = pd.Index(var_names)
    cols = pd.Index(fit.covariate_names, dtype=object)
    names, theta, se_theta = _random_effect_tables(fit)
    comps = pd.Index([*names, RESIDUAL], dtype=object)
    out: dict[str, Any] = {}
    source: Any = fit if moderated is None else moderated
    for what in COEF_TABLES:
        values = getattr(fit if what == "coef" else source, what)
        out[varm_key(key, what)] = pd.DataFrame(values, index=index, columns=cols)
    out[varm_key(key, THETA)] = pd.DataFrame(theta, index=index, columns=comps)
    out[varm_key(key, SE_THETA)] = pd.DataFrame(se_theta, index=index, columns=comps)
    out[varm_key(key, DIAG)] = pd.DataFrame(
        {
            "niter": fit.niter.astype(np.int64),
            "converged": fit.converged.astype(bool),
            "max_abs_dlogL": np.abs(fit.dlogL).max(axis=1),
            "logLik": fit.logLik,
            "singular": _singular(fit),
        },
        index=index,
    )
    out[varm_key(key, COV)] = np.ascontiguousarray(source.cov)
    ddf = _per_test_df(fit)
    if ddf is not None and moderated is None:
        out[varm_key(key, DF)] = pd.DataFrame(ddf, index=index, columns=cols)
    if moderated is not None:
        out[varm_key(key, MODERATION)] = pd.DataFrame(
            {"tau": moderated.tau, "tau_moderated": moderated.tau_post}, index=index
        )
    if cmat is not None:
        out.update(_contrast_tables(fit, index, key, cmat, moderated))
    return out


def _random_effect_tables(fit: LMMFit) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, estimates and standard errors of the random-effect parameters (then residual).

    For a structured fit (lme4-style terms with slopes or large q): variances and correlations
    named as lme4's ``VarCorr`` (``"donor: (Intercept)"``, ``"donor: corr((Intercept), time)"``);
    the standard errors are those of the variances, NaN for correlations.
    """
    from .._core.structured import StructuredLMMFit

    if not isinstance(fit, StructuredLMMFit) or fit.structure is None or fit.varcorr is None:
        return list(fit.component_names or []), fit.theta, fit.se_theta
    structure = fit.structure
    names = structure.varcorr_names()
    is_var = np.array([a == b for t in structure.terms for a, b in t.entries] + [True])
    theta = np.column_stack([fit.varcorr, fit.theta[:, -1]])
    se = np.where(is_var, fit.se_theta, np.nan)
    return names, theta, se


def _structure_record(structure: Any) -> dict[str, Any]:
    """h5ad-safe description of a covariance structure: one entry per term, in Z's order."""
    return {
        str(i): {
            "group": t.group,
            "n_levels": int(t.n_levels),
            "effects": list(t.effects),
            "correlated": bool(t.correlated),
        }
        for i, t in enumerate(structure.terms)
    }


def _contrast_tables(
    fit: LMMFit,
    index: pd.Index,
    key: str,
    cmat: pd.DataFrame,
    moderated: Moderated | None,
) -> dict[str, pd.DataFrame]:
    names = pd.Index([str(c) for c in cmat.columns], dtype=object)
    if moderated is not None and moderated.contrast is not None:
        values: tuple[np.ndarray, ...] = moderated.contrast
        ddf = None
    else:
        est, se, ddf = fit.contrast_estimates(cmat.to_numpy(dtype=np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            t = est / se
        values = (est, se, t, t_pvalue(t, ddf))
    out = {
        varm_key(key, what): pd.DataFrame(v, index=index, columns=names)
        for what, v in zip(CONTRAST_TABLES, values, strict=True)
    }
    if ddf is not None and fit.df_method != "residual":
        out[varm_key(key, CONTRAST_DF)] = pd.DataFrame(ddf, index=index, columns=names)
    return out


def _stats_tables(
    stats: SummaryStats, var_names: pd.Index, key: str, info: DesignInfo
) -> dict[str, Any]:
    """Return the gene-wise summary statistics, for refits without the cells."""
    index = pd.Index(var_names)
    cols = pd.Index(info.x_columns, dtype=object)
    return {
        varm_key(key, STATS_XY): pd.DataFrame(
            np.asarray(stats.XY, dtype=np.float64).T, index=index, columns=cols
        ),
        varm_key(key, STATS_ZY): np.ascontiguousarray(np.asarray(stats.ZY, dtype=np.float64).T),
        varm_key(key, STATS_YY): pd.DataFrame(
            {"yy": np.asarray(stats.Ynorm, dtype=np.float64)}, index=index
        ),
    }


def _uns_record(
    adata: AnnData,
    info: DesignInfo,
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
        "x_columns": list(info.x_columns),
        "random_terms": list(info.random_terms),
        "random_formulas": list(info.random),
        "d": [int(x) for x in info.d],
        "z_columns": list(info.z_columns),
        "contrast_names": names,
        "contrast_expressions": [str(expressions[c]) for c in names],
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "df": int(fit.df),
        "n_nonconverged": int((~fit.converged & ~degenerate).sum()),
        "n_degenerate": int(degenerate.sum()),
        "n_singular": int(_singular(fit).sum()),
        "varm_keys": varm_keys,
        "version": __version__,
    }
    if cmat is not None:
        uns["contrast_matrix"] = cmat
    if info.structure is not None:
        uns["random_structure"] = _structure_record(info.structure)
        uns["solver"] = str(getattr(fit, "kernel", "components"))
    return uns


def write_results(
    adata: AnnData,
    key: str,
    varm: Mapping[str, Any],
    uns: dict[str, Any],
    *,
    copy: bool,
    start: datetime | None = None,
) -> AnnData | None:
    """Write the results (nothing here can fail on user input), replacing an earlier fit.

    ``start`` is the time logged when the fit started (the log then gives the time taken).
    """
    target = adata.copy() if copy else adata
    view_to_actual(target)
    previous = target.uns.get(key)
    if isinstance(previous, Mapping) and "varm_keys" in previous:
        for old in previous["varm_keys"]:
            target.varm.pop(str(old), None)
    for name, value in varm.items():
        target.varm[name] = value
    target.uns[key] = uns
    from scanpy import logging as logg

    added = ", ".join(f"{name!r}" for name in varm)
    logg.info("    finished", time=start, deep=f"added\n    {added} (varm)\n    {key!r} (uns)")
    return target if copy else None
