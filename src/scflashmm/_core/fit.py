"""REML and ML fits of linear mixed models from summary statistics, batched over genes.

For every gene ``y = X beta + Z b + e`` with ``Z = [Z_1 .. Z_k]``, ``b_i ~ N(0, s_i I_{q_i})`` and
``e ~ N(0, s_0 I_n)``. The variance components ``theta = (s_1 .. s_k, s_0)`` (residual last) are
estimated by Fisher scoring on the restricted (REML) or full (ML) log-likelihood, written in
terms of the summary statistics only, exactly as FLASHMM 1.3.0 computes them (docs/model.md,
Fisher scoring). Then ``beta`` is the generalised least-squares estimate at the final ``theta``.

:func:`lmm` reads top to bottom: check the options and the statistics, reduce the statistics
by the fixed effects (:class:`Reduced`; with ``criterion="relative"`` those of ``y / c`` per
gene, :func:`standardise`), select a kernel (:mod:`scflashmm._core.kernels`), fit blocks of
genes in threads (:func:`_fit_block`: Fisher scoring, unconstrained or over nonnegative
components (:mod:`.boundary`), fixed effects, optional Satterthwaite or Kenward-Roger df, and
the results mapped back to the units of ``y``), and assemble the :class:`LMMFit`.
docs/model.md: Convergence, Nonnegative variance components, Kenward-Roger.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import scipy.linalg

from ._options import (
    RANK_RTOL,
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
from ._threads import check_n_jobs, ordered_map, single_threaded_blas
from .boundary import fisher_scoring_nonnegative, kkt_score
from .inference import t_pvalue
from .kenward_roger import kenward_roger
from .kernels import EigenKernel, Kernel, KernelChoice, select_kernel
from .lmmfit import ConvergenceWarning, DegenerateFeatureWarning, LMMFit
from .satterthwaite import coefficient_df, inverse_information
from .scoring import fisher_scoring, pinv_small
from .stats import ARRAY_FIELDS, SummaryStats
from .sumstats import summary_stats

#: Working-array budget (float64 elements) that bounds the genes processed per block.
_BLOCK_ELEMENTS = 2**22

#: A gene whose residual sum of squares ``y'Ry`` after the fixed effects is below this multiple
#: of its rounding error (:attr:`Reduced.yry_error`) lies in the span of X up to round-off: no
#: variance is left to fit (it would have fewer than two correct digits). Relative to the
#: rounding error rather than to ``y'y``, so that data with a large offset (``y + 1e5``,
#: ``y'Ry / y'y ~ 1e-10``) are still fit (docs/model.md, Convergence).
_DEGENERATE_ROUNDING = 100.0

#: Powers of the scale of ``y`` in each result (``theta`` is a variance: ``c^2``). A fit on
#: ``y / c`` is mapped back to the units of ``y`` with them (docs/model.md, Convergence).
_SCALE_POWERS = {
    "coef": 1,
    "se": 1,
    "re": 1,
    "cov": 2,
    "cov_adjusted": 2,
    "theta": 2,
    "se_theta": 2,
    "fim_beta": -2,
    "dlogL": -2,
    "fim_theta": -4,
    "dfim_beta": -4,
    "vcov_theta": 4,
    "vcov_theta_kr": 4,
}


@dataclass(frozen=True)
class _Options:
    """The checked options of one call of :func:`lmm`."""

    method: Method
    theta0: np.ndarray | None
    max_iter: int
    epsilon: float
    df: DfMethod
    output_cov: bool
    output_fim: bool
    output_re: bool
    nonnegative: bool = False
    criterion: Criterion = "flashmm"

    @property
    def satterthwaite(self) -> bool:
        return self.df == "satterthwaite"

    @property
    def kenward_roger(self) -> bool:
        return self.df == "kenward-roger"


@dataclass(frozen=True)
class _Names:
    features: list[str] | None
    covariates: list[str] | None
    components: list[str] | None


@dataclass(frozen=True)
class Reduced:
    """The statistics reduced by the fixed effects (``R = I - X (X'X)^-1 X'``).

    ``zrz = Z'RZ`` (q, q), ``zry = Z'Ry`` (q, genes) and ``yry = y'Ry`` (genes,);
    ``yry_error`` bounds the rounding error of ``yry``:
    ``eps (y'y + |X'y|' |(X'X)^-1| |X'y|)`` (genes,).
    """

    zrz: np.ndarray
    zry: np.ndarray
    yry: np.ndarray
    yry_error: np.ndarray | None = None


def lmm(
    stats: SummaryStats,
    d: Any = None,
    *,
    structure: Any = None,
    method: Method = "REML",
    theta0: Any = None,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    output_cov: bool = True,
    output_fim: bool = False,
    output_re: bool = False,
    df: DfMethod = "residual",
    nonnegative: bool | None = None,
    criterion: Criterion = "flashmm",
    feature_names: Any = None,
    covariate_names: Any = None,
    component_names: Any = None,
    kernel: KernelChoice = "auto",
    n_jobs: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LMMFit:
    """Fit a linear mixed model to every gene from summary statistics (FLASHMM's ``lmm``).

    Parameters
    ----------
    stats
        Summary statistics, e.g. from :func:`scflashmm.summary_stats`.
    d
        Sizes ``(q_1 .. q_k)`` of the random components, in the column order of ``Z``; the
        default is one component of all ``q`` columns.
    structure
        Instead of ``d``: a :class:`~scflashmm._core.structure.CovarianceStructure` of lme4-style
        terms (``random_design(terms, obs).structure``; docs/model.md, Random-effects
        structures). Independent scalar terms are fit as components ``d`` (FLASHMM's
        parameterisation) when ``q`` is small; random slopes, and any terms from ``q = 1000``
        on, by the structured solver (lme4's parameterisation, covariances positive
        semi-definite), which returns a :class:`~scflashmm._core.structured.StructuredLMMFit`.
    method
        ``"REML"`` (restricted maximum likelihood) or ``"ML"``.
    theta0
        Start values ``(s_1 .. s_k, s_0)`` used for every gene; default ``(0 .. 0, yRy/(n-p))``
        per gene.
    max_iter
        Maximum number of Fisher-scoring passes.
    epsilon
        Convergence tolerance on the largest absolute score ``|dlogL|`` (see ``criterion``).
    output_cov, output_fim, output_re
        Keep the covariance of beta; the Fisher information of beta and theta; the BLUPs.
    df
        Degrees of freedom of the t tests: ``"residual"`` (``n - p`` for every test, as FLASHMM)
        or ``"satterthwaite"`` (per gene and coefficient, as lmerTest; computed from the summary
        statistics at a small extra cost). Prefer ``"satterthwaite"`` when a coefficient is
        estimated between few samples (e.g. samples nested in the treatment): ``n - p`` then
        counts cells as replicates and makes the tests liberal. With ``output_cov`` the fit
        also keeps (genes, k, p, p) derivatives of ``cov^-1`` for the df of contrasts.
        ``"kenward-roger"`` (REML only; as pbkrtest and lmerTest's ``ddf="Kenward-Roger"``):
        Kenward-Roger's adjusted standard errors and df, which stay on the scale of the samples
        at a boundary fit where Satterthwaite's become ``n - p``; use it with
        ``nonnegative=True``. Genes with a negative variance component (possible with
        ``nonnegative=False``) get NaN se, t, p and df, with a warning (docs/model.md,
        Kenward-Roger).
    nonnegative
        Maximise over variance components ``>= 0``, as lme4: a component whose optimum lies
        at the boundary is exactly 0 and the gene is flagged in ``singular``. Default: True
        with a ``structure`` (lme4's boundary for lme4-style terms), False with ``d``
        (FLASHMM's unconstrained Fisher scoring).
    criterion
        Convergence test: ``"flashmm"`` (FLASHMM's: ``|dlogL| <= epsilon`` in the units of the
        data) or ``"relative"`` (the same test on the standardised response ``y / c`` with
        ``c^2 = y'Ry / (n - p)`` per gene; then t, p and df do not depend on the units of y,
        and data of any scale (``1e-160`` .. ``1e150``) are fit; docs/model.md, Convergence).
    feature_names, covariate_names, component_names
        Names of genes (m), fixed-effect columns (p) and random components (k), kept on the fit.
    kernel
        Solver kernel: ``"auto"`` (the eigen kernel for one component, else dense), or a
        forced ``"eigen"`` or ``"dense"`` (to compare them; the numbers agree to rounding).
    n_jobs
        Threads over blocks of genes (default: the cores available). Results do not depend on it.
    progress
        Called as ``progress(done, total)`` with the number of genes fit so far, after each
        block of genes (in the calling thread), e.g. to update a progress bar.

    Returns
    -------
    The per-gene fit. Genes with only zeros, or exactly explained by the fixed effects, are NaN
    (with a :class:`DegenerateFeatureWarning`); genes still above ``epsilon`` after ``max_iter``
    are flagged in ``converged`` (with a :class:`ConvergenceWarning`).
    """
    if not isinstance(stats, SummaryStats):
        msg = f"stats must be a SummaryStats (from summary_stats), got {type(stats).__name__}."
        raise TypeError(msg)
    if nonnegative is None:
        nonnegative = structure is not None
    if structure is not None:
        from .structured import dispatch_structure

        routed = dispatch_structure(stats, d, structure, locals())
        if not isinstance(routed, tuple):
            return routed
        d, component_names = routed
    d = _check_d(stats.d if d is None else d, stats.shape[2])
    opts = _Options(
        method=check_method(method),
        theta0=check_theta0(theta0, len(d), nonnegative=bool(nonnegative)),
        max_iter=check_positive_int(max_iter, "max_iter"),
        epsilon=check_positive_float(epsilon, "epsilon"),
        df=check_df(df, method),
        output_cov=bool(output_cov),
        output_fim=bool(output_fim),
        output_re=bool(output_re),
        nonnegative=bool(nonnegative),
        criterion=check_criterion(criterion),
    )
    jobs = check_n_jobs(n_jobs)
    names = _check_stats(stats, d, feature_names, covariate_names, component_names)
    # the statistics of y - c when the constant is in the span of X (docs/model.md, Offsets)
    fit_stats, offset = stats.centred()
    scale = None
    if opts.criterion == "relative":  # fit y / c, results mapped back to the units of y
        fit_stats, reduced, scale = standardise(fit_stats, names.covariates)
    else:
        reduced = reduce_fixed_effects(fit_stats, names.covariates)
    _check_identifiable(reduced.zrz, stats.ZZ, d, names.components)
    genes = _select_fittable(stats.Ynorm, reduced.yry, names.features, reduced.yry_error)
    solver = select_kernel(fit_stats, d, reduced.zrz, opts.method, kernel=kernel)
    out = _empty_results(stats.shape, len(d), opts)
    _fit_blocks(solver, fit_stats, reduced, opts, out, genes, jobs, d, scale, progress, offset)
    return _assemble(out, fit_stats, d, opts, names, genes)


def lmm_fit(
    Y: Any,
    X: Any,
    Z: Any,
    d: Any = None,
    *,
    chunk_size: int | None = None,
    is_counts: bool = False,
    **kwargs: Any,
) -> LMMFit:
    """Fit a linear mixed model to every gene from cell-level data (FLASHMM's ``lmmfit``).

    Computes :func:`scflashmm.summary_stats` in one pass over the cells, then :func:`lmm`.

    Parameters
    ----------
    Y
        Response, cells x genes (numpy, scipy sparse, or row-sliceable such as backed AnnData X).
    X
        Fixed-effects design, cells x p.
    Z
        Random-effects design ``[Z_1 .. Z_k]``, cells x q.
    d
        Sizes of the random components (default: one component of size q).
    chunk_size
        Cells per chunk of the pass over ``Y``.
    is_counts
        Fit ``log2(1 + Y)`` (applied to stored values, chunk by chunk).
    **kwargs
        Passed on to :func:`lmm` (method, theta0, max_iter, epsilon, output_*, df,
        nonnegative, criterion, names, kernel, n_jobs).

    Returns
    -------
    The per-gene fit.
    """
    stats = summary_stats(X, Y, Z, chunk_size=chunk_size, is_counts=is_counts)
    return lmm(stats, d, **kwargs)


# --------------------------------------------------------------------------- steps of lmm


def _check_stats(
    stats: SummaryStats,
    d: tuple[int, ...],
    feature_names: Any,
    covariate_names: Any,
    component_names: Any,
) -> _Names:
    """Check the statistics; names given here, else those the statistics carry."""
    n, p, _, m = stats.shape
    k = len(d)
    for name in ARRAY_FIELDS:
        if not np.isfinite(getattr(stats, name)).all():
            msg = f"Summary statistic {name} contains NaN or infinite values."
            raise ValueError(msg)
    if n <= p:
        msg = f"Need more cells than fixed-effect columns: n = {n}, p = {p}."
        raise ValueError(msg)
    if component_names is None and stats.component_names is not None:
        if len(stats.component_names) == k:
            component_names = stats.component_names
    return _Names(
        features=_check_names(
            stats.feature_names if feature_names is None else feature_names, m, "feature_names"
        ),
        covariates=_check_names(
            stats.covariate_names if covariate_names is None else covariate_names,
            p,
            "covariate_names",
        ),
        components=_check_names(component_names, k, "component_names"),
    )


def _check_identifiable(
    zrz: np.ndarray, ZZ: np.ndarray, d: tuple[int, ...], names: list[str] | None
) -> None:
    """Raise if a random component is zero or lies in the span of the fixed design.

    Its variance is then not identifiable (the same check as the AnnData layer's, here for
    statistics and design matrices given directly).
    """
    start = 0
    for i, q in enumerate(d):
        block = slice(start, start + q)
        start += q
        name = (
            repr(names[i])
            if names is not None
            else f"{i + 1} (columns {block.start}-{block.stop - 1} of Z)"
        )
        total = float(np.trace(ZZ[block, block]))
        if total <= 0:
            msg = f"Random component {name} is zero for every cell."
            raise ValueError(msg)
        if float(np.trace(zrz[block, block])) <= 1e-9 * total:
            msg = (
                f"Random component {name} is confounded with the fixed effects: its columns of Z "
                "lie in the span of X, so its variance is not identifiable."
            )
            raise ValueError(msg)


def reduce_fixed_effects(stats: SummaryStats, covariate_names: list[str] | None) -> Reduced:
    """``Z'RZ``, ``Z'Ry`` and ``y'Ry`` from the statistics (docs/model.md, Fisher scoring)."""
    XXinv = _inverse_fixed_crossprod(stats.XX, covariate_names)
    AXY = XXinv @ stats.XY
    zrz = stats.ZZ - stats.ZX @ XXinv @ stats.ZX.T
    zry = stats.ZY - stats.ZX @ AXY
    yry = stats.Ynorm - np.einsum("pm,pm->m", stats.XY, AXY)
    absXY = np.abs(stats.XY)
    error = np.finfo(np.float64).eps * (
        stats.Ynorm + np.einsum("pm,pm->m", absXY, np.abs(XXinv) @ absXY)
    )
    return Reduced(zrz=(zrz + zrz.T) / 2, zry=zry, yry=yry, yry_error=error)


def standardise(
    stats: SummaryStats, covariate_names: list[str] | None
) -> tuple[SummaryStats, Reduced, np.ndarray]:
    """Statistics of ``y / c`` per gene, with ``c^2 = y'Ry / (n - p)``, their reduction and ``c``.

    ``y'Ry`` is computed on ``y / sqrt(y'y / n)`` first, so that no square under- or
    overflows (docs/model.md, Convergence). Genes with ``y'Ry <= 0`` keep ``c = 1``.
    """
    n, p, _, _ = stats.shape

    def scaled(c: np.ndarray) -> SummaryStats:
        return replace(stats, XY=stats.XY / c, ZY=stats.ZY / c, Ynorm=stats.Ynorm / c**2)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        c = np.sqrt(stats.Ynorm / n)
        c[~(np.isfinite(c) & (c > 0))] = 1.0
        pre = reduce_fixed_effects(scaled(c), covariate_names)
        c2 = np.sqrt(pre.yry / (n - p))
        c2[~(np.isfinite(c2) & (c2 > 0))] = 1.0
        c = c * c2
        stats = scaled(c)
    error = None if pre.yry_error is None else pre.yry_error / c2**2
    reduced = Reduced(zrz=pre.zrz, zry=pre.zry / c2, yry=pre.yry / c2**2, yry_error=error)
    return stats, reduced, c


def _fit_blocks(
    solver: Kernel[Any],
    stats: SummaryStats,
    reduced: Reduced,
    opts: _Options,
    out: dict[str, np.ndarray | None],
    genes: np.ndarray,
    n_jobs: int,
    d: tuple[int, ...],
    scale: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    offset: np.ndarray | None = None,
) -> None:
    """Fit the genes in blocks, in threads, and write each block's rows of ``out``.

    Blocks are independent; numpy's batched linear algebra releases the GIL, and BLAS is
    limited to one thread per worker. Results do not depend on the number of threads.
    """
    _, p, q, _ = stats.shape
    size = _block_size(q, p, solver.k)
    if opts.satterthwaite or opts.kenward_roger:  # (genes, (k + 1)^2, p, p) working arrays
        per_gene = (solver.k + 1) ** 2 if opts.kenward_roger else solver.k + 1
        size = max(1, min(size, _BLOCK_ELEMENTS // (4 * per_gene * p * p)))
    blocks = [genes[lo : lo + size] for lo in range(0, genes.size, size)]
    jobs = min(n_jobs, max(1, len(blocks)))
    fit = partial(_fit_block, solver, stats, reduced, opts, d=d, scale=scale, offset=offset)
    with single_threaded_blas():
        # every block submitted at once (the blocks are small: only results wait in the queue)
        results = ordered_map(fit, blocks, jobs, window=len(blocks))
        done = 0
        for rows, result in zip(blocks, results, strict=True):
            for name, value in result.items():
                target = out[name]
                if target is not None and value is not None:
                    target[rows] = value
            done += rows.size
            if progress is not None:
                progress(done, genes.size)


def _fit_block(
    solver: Kernel[Any],
    stats: SummaryStats,
    reduced: Reduced,
    opts: _Options,
    genes: np.ndarray,
    *,
    d: tuple[int, ...],
    scale: np.ndarray | None = None,
    offset: np.ndarray | None = None,
) -> dict[str, np.ndarray | None]:
    """Fisher scoring, then fixed effects (and Satterthwaite or Kenward-Roger) for one block.

    With ``scale`` the statistics are those of ``y / scale`` (:func:`standardise`) and the
    results are mapped back to the units of ``y`` at the end. With ``offset`` (genes, p) they
    are those of a shifted response (:meth:`SummaryStats.centred`), whose coefficients are
    smaller by ``offset`` (added before t and p).
    """
    n, p, _, _ = stats.shape
    k = solver.k
    n_res = n - (p if opts.method == "REML" else 0)
    c = None if scale is None else scale[genes]
    # Fisher scoring is unconstrained (as in FLASHMM): a gene may step to a singular V,
    # giving inf/NaN for that gene only; `converged` and a ConvergenceWarning report it.
    # (errstate is per thread, so it is set here, in the worker.)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        state = solver.prepare(reduced.zry[:, genes].T, reduced.yry[genes])
        theta0 = opts.theta0
        s = _start_values(theta0, reduced.yry[genes] / (n - p), k)
        if theta0 is not None and c is not None:
            s /= (c**2)[:, None]
        if opts.nonnegative:
            s, niter, singular = fisher_scoring_nonnegative(
                solver, state, s, opts.max_iter, opts.epsilon, n_res=n_res
            )
        else:
            s, niter = fisher_scoring(
                solver, state, s, max_iter=opts.max_iter, epsilon=opts.epsilon
            )
            s[:, k] = solver.residual_variance(state, s)
            singular = np.zeros(s.shape[0], dtype=bool)
        dl, fim = solver.score_information(state, s)
        out = _variance_components(solver, state, s, dl, fim, n_res)
        criterion = kkt_score(dl, s) if opts.nonnegative else dl
        out |= {
            "niter": niter,
            "singular": singular,
            "converged": np.all(np.abs(criterion) <= opts.epsilon, axis=1),
        }
        fixed = solver.fixed_effects(
            s,
            stats.XY[:, genes].T,
            stats.ZY[:, genes].T,
            output_re=opts.output_re,
            output_fim=opts.output_fim,
        )
        out |= {name: getattr(fixed, name) for name in ("coef", "se", "cov", "fim_beta", "re")}
        if offset is not None:  # in the units of the fit (of y / c with a scale)
            shift = offset[genes] if c is None else offset[genes] / c[:, None]
            out["coef"] = out["coef"] + shift
        df_block: np.ndarray | int = n - p
        if opts.satterthwaite:
            satt = _satterthwaite(solver, state, s, fim, fixed.cov)
            out |= satt
            df_block = satt["df_satterthwaite"]
        elif opts.kenward_roger:
            kr = _kenward_roger(solver, stats, d, s, fixed.cov, fim)
            out |= kr
            df_block = kr["df_kenward_roger"]
        t = out["coef"] / out["se"]
        out |= {"t": t, "p": t_pvalue(t, df_block)}
    if c is not None:
        out = _unscale(out, c, n_res)
    return out


def _kenward_roger(
    solver: Kernel[Any],
    stats: SummaryStats,
    d: tuple[int, ...],
    s: np.ndarray,
    cov: np.ndarray,
    fim: np.ndarray,
) -> dict[str, Any]:
    """Kenward-Roger adjusted se and df at ``s`` (docs/model.md, Kenward-Roger).

    The fit's covariance of beta ``cov`` and REML Fisher information ``fim`` are reused.
    Defined at nonnegative estimates: genes with a negative component get NaN.
    """
    k = solver.k
    theta = np.where((s[:, :k] < 0).any(axis=1, keepdims=True), np.nan, s)
    kr = kenward_roger(
        stats.XX,
        stats.ZX,
        stats.ZZ,
        stats.n,
        d,
        theta,
        eigen=isinstance(solver, EigenKernel),
        cov=cov,
        information=fim,
        basis=(solver.mu, solver.BB) if isinstance(solver, EigenKernel) else None,
    )
    dfim = kr.dprec[:, :k]
    return {
        "se": kr.se(),
        # the df is Satterthwaite's formula with W (docs/model.md, Kenward-Roger): only the
        # diagonals of Phi P_i Phi are formed
        "df_kenward_roger": coefficient_df(kr.cov, dfim, s, kr.W),
        "vcov_theta_kr": kr.W,
        "cov_adjusted": kr.cov_adjusted,
        "dfim_beta": dfim,
    }


def _unscale(out: dict[str, Any], c: np.ndarray, n_res: int) -> dict[str, Any]:
    """Map the results of a fit of ``y / c`` back to the units of ``y`` (:data:`_SCALE_POWERS`)."""
    with np.errstate(over="ignore", under="ignore"):
        for name, power in _SCALE_POWERS.items():
            value = out.get(name)
            if value is not None:
                # one factor at a time: c**power alone may overflow where the result does not
                factor = (c if power > 0 else 1 / c).reshape(-1, *([1] * (value.ndim - 1)))
                for _ in range(abs(power)):
                    value = value * factor
                out[name] = value
    out["logLik"] = out["logLik"] - n_res * np.log(c)
    return out


def _start_values(theta0: np.ndarray | None, s0: np.ndarray, k: int) -> np.ndarray:
    """``theta0`` for every gene, or ``(0 .. 0, s0)`` with the genes' ``s0`` (genes, k + 1)."""
    if theta0 is not None:
        return np.tile(theta0, (s0.size, 1))
    s = np.zeros((s0.size, k + 1))
    s[:, k] = s0
    return s


def _variance_components(
    solver: Kernel[Any], state: Any, s: np.ndarray, dl: np.ndarray, fim: np.ndarray, n_res: int
) -> dict[str, np.ndarray | None]:
    """Theta with its score ``dl``, information ``fim`` and standard errors; the logLik."""
    cov_theta = pinv_small(fim)
    s0 = s[:, solver.k]
    return {
        "theta": s,
        "dlogL": dl,
        "fim_theta": fim,
        "se_theta": np.sqrt(np.diagonal(cov_theta, axis1=1, axis2=2)),
        "logLik": -n_res * (1 + np.log(2 * np.pi * s0)) / 2 + solver.logdet(state, s) / 2,
    }


def _satterthwaite(
    solver: Kernel[Any], state: Any, s: np.ndarray, fim: np.ndarray, cov: np.ndarray
) -> dict[str, np.ndarray]:
    """Satterthwaite df of the coefficients, covariance of theta and ``d(X'V^-1X)/ds_i``.

    A component exactly at 0 (a singular fit) is held fixed, as lmerTest does on its scale of
    standard deviations, whose derivative vanishes there: with all components at 0 the df is
    ``n - p`` (docs/model.md, Nonnegative variance components).
    """
    # observed information = quadratic term - Fisher information (satterthwaite.py)
    quad, dfim = solver.satterthwaite_parts(state, s)
    fixed = np.zeros(s.shape, dtype=bool)
    fixed[:, : solver.k] = s[:, : solver.k] == 0
    vcov_theta = inverse_information(quad - fim, fixed=fixed)
    return {
        "df_satterthwaite": coefficient_df(cov, dfim, s, vcov_theta),
        "vcov_theta": vcov_theta,
        "dfim_beta": dfim,
    }


def _assemble(
    out: dict[str, Any],
    stats: SummaryStats,
    d: tuple[int, ...],
    opts: _Options,
    names: _Names,
    genes: np.ndarray,
) -> LMMFit:
    """Build the :class:`LMMFit`, with a :class:`ConvergenceWarning` for genes above epsilon."""
    n, p, _, _ = stats.shape
    n_failed = int((~out["converged"][genes]).sum())
    if n_failed:
        msg = (
            f"{n_failed} feature(s) for which LMM fitting did not converge, i.e. "
            f"abs(dlogL) > epsilon={opts.epsilon:g} after at most {opts.max_iter} iterations; "
            "see the `converged` flag."
        )
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    if opts.kenward_roger:
        negative = int((out["theta"][genes, : len(d)] < 0).any(axis=1).sum())
        if negative:
            msg = (
                f"{negative} feature(s) with a negative variance component: Kenward-Roger is "
                "defined at nonnegative estimates, so their se, t, p and df are NaN; fit with "
                "nonnegative=True."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
    return LMMFit(
        **out,
        df=n - p,
        method=opts.method,
        epsilon=opts.epsilon,
        feature_names=names.features,
        covariate_names=names.covariates,
        component_names=names.components,
        d=tuple(d),
        df_method=opts.df,
        nonnegative=opts.nonnegative,
        criterion=opts.criterion,
    )


def _check_d(d: Any, q: int) -> tuple[int, ...]:
    if q == 0:
        msg = "Z has no columns: a mixed model needs at least one random-effect column."
        raise ValueError(msg)
    if d is None:
        return (q,)
    given = np.atleast_1d(np.asarray(d))
    if given.dtype.kind not in "iu" and not np.all(np.mod(given, 1) == 0):
        msg = f"d must hold whole numbers of columns, got {d!r}."
        raise ValueError(msg)
    sizes = tuple(int(x) for x in given)
    if any(x < 1 for x in sizes) or sum(sizes) != q:
        msg = f"d = {list(sizes)} must be positive component sizes that add up to ncol(Z) = {q}."
        raise ValueError(msg)
    return sizes


def _check_names(names: Any, size: int, what: str) -> list[str] | None:
    if names is None:
        return None
    names = [str(x) for x in names]
    if len(names) != size:
        msg = f"{what} has {len(names)} names, expected {size}."
        raise ValueError(msg)
    return names


def _inverse_fixed_crossprod(XX: np.ndarray, names: list[str] | None) -> np.ndarray:
    """``XX^-1`` by Cholesky; a clear error naming collinear columns when X is rank deficient."""
    scale = np.sqrt(np.diag(XX))
    labels = names or [f"column {j + 1}" for j in range(XX.shape[0])]
    if np.any(scale == 0):
        zero = [labels[j] for j in np.flatnonzero(scale == 0)]
        msg = f"The fixed design X is rank deficient: column(s) {zero} are all zero."
        raise ValueError(msg)
    corr = XX / np.outer(scale, scale)
    eigval, eigvec = np.linalg.eigh(corr)
    if eigval[0] <= RANK_RTOL * eigval[-1]:
        null = eigvec[:, eigval <= RANK_RTOL * eigval[-1]]
        involved = [labels[j] for j in np.flatnonzero(np.abs(null).max(axis=1) > 1e-6)]
        msg = (
            "XX is not positive definite: the fixed design X is rank deficient (not full column "
            f"rank); these columns are linearly dependent: {involved}."
        )
        raise ValueError(msg)
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(XX), np.eye(XX.shape[0]))


def _select_fittable(
    Ynorm: np.ndarray,
    yry: np.ndarray,
    names: list[str] | None,
    yry_error: np.ndarray | None = None,
) -> np.ndarray:
    """Return the indices of genes that can be fit; warn about the others (left as NaN).

    A gene is flat when ``y'Ry`` is within 100 times its rounding error ``yry_error`` (by
    default ``eps y'y``).
    """
    zero = Ynorm <= 0
    if zero.any():
        msg = f"{int(zero.sum())} feature(s) with only zero counts! They are left as NaN."
        warnings.warn(msg, DegenerateFeatureWarning, stacklevel=3)
    if yry_error is None:
        yry_error = np.finfo(np.float64).eps * Ynorm
    flat = ~zero & (yry <= _DEGENERATE_ROUNDING * yry_error)
    if flat.any():
        idx = np.flatnonzero(flat)
        labels = [names[j] if names else f"#{j}" for j in idx[:10]]
        more = f" and {idx.size - 10} more" if idx.size > 10 else ""
        msg = (
            f"{idx.size} feature(s) are exactly explained by the fixed effects (no residual "
            "variance beyond rounding, e.g. constant genes): "
            f"{', '.join(labels)}{more}. They are left as NaN."
        )
        warnings.warn(msg, DegenerateFeatureWarning, stacklevel=3)
    return np.flatnonzero(~zero & ~flat)


def _empty_results(
    shape: tuple[int, int, int, int], k: int, opts: _Options
) -> dict[str, np.ndarray | None]:
    """NaN arrays for every result of :class:`LMMFit` (None for those not requested)."""
    _, p, q, m = shape

    def nan(*dims: int) -> np.ndarray:
        return np.full((m, *dims), np.nan)

    satt = opts.satterthwaite
    kr = opts.kenward_roger
    return {
        "coef": nan(p),
        "se": nan(p),
        "t": nan(p),
        "p": nan(p),
        "theta": nan(k + 1),
        "se_theta": nan(k + 1),
        "dlogL": nan(k + 1),
        "logLik": nan(),
        "niter": np.zeros(m, dtype=np.int64),
        "converged": np.zeros(m, dtype=bool),
        "singular": np.zeros(m, dtype=bool),
        "cov": nan(p, p) if opts.output_cov else None,
        "fim_beta": nan(p, p) if opts.output_fim else None,
        "fim_theta": nan(k + 1, k + 1) if opts.output_fim else None,
        "re": nan(q) if opts.output_re else None,
        "df_satterthwaite": nan(p) if satt else None,
        "vcov_theta": nan(k + 1, k + 1) if satt else None,
        "dfim_beta": nan(k, p, p) if (satt or kr) and opts.output_cov else None,
        "df_kenward_roger": nan(p) if kr else None,
        "vcov_theta_kr": nan(k + 1, k + 1) if kr else None,
        "cov_adjusted": nan(p, p) if kr and opts.output_cov else None,
    }


def _block_size(q: int, p: int, k: int) -> int:
    """Genes per block so that each (genes, ., .) working array stays within the budget."""
    per_gene = max(q * q if k > 1 else q, p * p)
    return max(1, _BLOCK_ELEMENTS // (4 * per_gene))
