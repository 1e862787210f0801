"""REML and ML estimation of linear mixed models from summary statistics, batched over genes.

For every gene ``y = X beta + Z b + e`` with ``Z = [Z_1 .. Z_k]``, ``b_i ~ N(0, s_i I_{q_i})`` and
``e ~ N(0, s_0 I_n)``. The variance components ``theta = (s_1 .. s_k, s_0)`` (residual last) are
estimated by Fisher scoring on the restricted (REML) or full (ML) log-likelihood, written in
terms of the summary statistics only, exactly as FLASHMM 1.3.0 computes them (see DESIGN.md,
section 3). Then ``beta`` is the generalised least-squares estimate at the final ``theta``.

Two interchangeable kernels evaluate the score and the Fisher information for a block of genes:

- :class:`_EigenKernel` (one random component): ``D = r I``, so after diagonalising ``zrz`` (and
  ``ZZ``) once every quantity is a sum over ``q`` eigenvalues: O(q) per gene and iteration.
- :class:`_DenseKernel` (any number of components): batched ``q x q`` linear algebra.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.linalg

from ._threads import check_n_jobs, single_threaded_blas
from .inference import contrast_estimates, t_pvalue
from .satterthwaite import (
    coefficient_df,
    contrast_df,
    inverse_information,
    precision_derivatives_dense,
    precision_derivatives_eigen,
    quadratic_dense,
    quadratic_eigen,
)
from .sumstats import ARRAY_FIELDS, SummaryStats, summary_stats

Method = Literal["REML", "ML"]
DfMethod = Literal["residual", "satterthwaite"]

#: Working-array budget (float64 elements) that bounds the genes processed per block.
_BLOCK_ELEMENTS = 2**22

#: A gene whose residual sum of squares after the fixed effects is below this fraction of its
#: sum of squares lies (numerically) in the span of X: there is no variance left to fit.
_DEGENERATE_RTOL = 1e-10


class ConvergenceWarning(UserWarning):
    """Fisher scoring stopped at ``max_iter`` with ``|dlogL| > epsilon`` for some genes."""


class DegenerateFeatureWarning(UserWarning):
    """Genes that cannot be fit (all zero, or exactly explained by the fixed effects)."""


@dataclass(eq=False)
class LMMFit:
    """Per-gene fit of a linear mixed model (genes first).

    Attributes
    ----------
    coef, se, t, p
        Fixed effects, their standard errors, t values and two-sided p values (genes, p).
    theta, se_theta, dlogL
        Variance components ``(s_1 .. s_k, s_0)``, residual last; their standard errors from the
        Fisher information; the score at the final estimate (genes, k + 1).
    logLik, niter
        Log-likelihood (REML: lme4's REML logLik + log det(X'X) / 2) and Fisher-scoring passes.
    converged
        ``all(|dlogL| <= epsilon)`` per gene; False for genes that could not be fit.
    df
        Residual degrees of freedom ``n - p`` (FLASHMM's df for every t test).
    df_method
        ``"residual"`` (``p`` on ``df``) or ``"satterthwaite"`` (``p`` on ``df_satterthwaite``).
    df_satterthwaite, vcov_theta, dfim_beta
        Only with ``df_method="satterthwaite"``: per-coefficient Satterthwaite df (genes, p);
        covariance of theta from the observed information (genes, k + 1, k + 1); and, when
        ``cov`` is kept, the derivatives of ``X'V^-1X`` (``cov^-1``) with respect to the
        component variances ``s_1 .. s_k`` (genes, k, p, p), from which
        :func:`scflashmm.lmm_test` gets the df of contrasts
        (:func:`scflashmm._core.satterthwaite.covariance_jacobian` gives ``dcov/dtheta``).
    cov, fim_beta, fim_theta, re
        Covariance of beta (genes, p, p); Fisher information of beta (genes, p, p) and of theta
        (genes, k + 1, k + 1); BLUPs of the random effects (genes, q). None unless requested.
    method, epsilon
        Estimation method and convergence tolerance.
    feature_names, covariate_names, component_names
        Names of genes, fixed-effect columns and random components, where given.
    """

    coef: np.ndarray
    se: np.ndarray
    t: np.ndarray
    p: np.ndarray
    theta: np.ndarray
    se_theta: np.ndarray
    dlogL: np.ndarray
    logLik: np.ndarray
    niter: np.ndarray
    converged: np.ndarray
    df: int
    method: str
    epsilon: float
    cov: np.ndarray | None = None
    fim_beta: np.ndarray | None = None
    fim_theta: np.ndarray | None = None
    re: np.ndarray | None = None
    feature_names: list[str] | None = None
    covariate_names: list[str] | None = None
    component_names: list[str] | None = None
    d: tuple[int, ...] = field(default=())
    df_method: str = "residual"
    df_satterthwaite: np.ndarray | None = None
    vcov_theta: np.ndarray | None = None
    dfim_beta: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        """Number of genes."""
        return self.coef.shape[0]

    def contrast_estimates(
        self, contrast: np.ndarray, df: DfMethod | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | int]:
        """Estimates, standard errors and degrees of freedom of contrasts for every gene.

        Parameters
        ----------
        contrast
            Contrast matrix (p, c), one column per contrast.
        df
            ``"residual"`` (``n - p``) or ``"satterthwaite"``; default the fit's ``df_method``.

        Returns
        -------
        ``c' beta`` and ``sqrt(c' cov c)`` (genes, c), and the df: ``n - p``, or Satterthwaite's
        per gene and contrast (genes, c).
        """
        if self.cov is None:
            msg = "Testing contrasts needs the covariance of beta: fit with output_cov=True."
            raise ValueError(msg)
        estimate, se = contrast_estimates(self.coef, self.cov, contrast)
        if (self.df_method if df is None else df) == "residual":
            return estimate, se, self.df
        if self.dfim_beta is None:
            msg = "Satterthwaite df of contrasts need dfim_beta: fit with output_cov=True."
            raise ValueError(msg)
        ddf = contrast_df(self.cov, self.dfim_beta, self.theta, self.vcov_theta, contrast)
        return estimate, se, ddf

    def to_frame(self) -> Any:
        """One row per gene: coefficients, se, t, p, variance components and diagnostics.

        Returns
        -------
        pandas.DataFrame with columns ``<cov>_coef``, ``<cov>_se``, ``<cov>_t``, ``<cov>_p`` (and
        ``<cov>_df`` with Satterthwaite df) per covariate, ``theta_<component>`` and
        ``theta_residual``, ``niter``, ``converged`` and ``logLik``.
        """
        import pandas as pd

        covs = self.covariate_names or [f"x{j + 1}" for j in range(self.coef.shape[1])]
        comps = self.component_names or [f"var{i + 1}" for i in range(self.theta.shape[1] - 1)]
        columns: dict[str, np.ndarray] = {}
        for j, name in enumerate(covs):
            for what in ("coef", "se", "t", "p"):
                columns[f"{name}_{what}"] = getattr(self, what)[:, j]
            if self.df_satterthwaite is not None:
                columns[f"{name}_df"] = self.df_satterthwaite[:, j]
        for i, name in enumerate([*comps, "residual"]):
            columns[f"theta_{name}"] = self.theta[:, i]
        columns |= {"niter": self.niter, "converged": self.converged, "logLik": self.logLik}
        return pd.DataFrame(columns, index=self.feature_names)


def lmm(
    stats: SummaryStats,
    d: Any = None,
    *,
    method: Method = "REML",
    theta0: Any = None,
    max_iter: int = 50,
    epsilon: float = 1e-5,
    output_cov: bool = True,
    output_fim: bool = False,
    output_re: bool = False,
    df: DfMethod = "residual",
    feature_names: Any = None,
    covariate_names: Any = None,
    component_names: Any = None,
    n_jobs: int | None = None,
) -> LMMFit:
    """Fit a linear mixed model to every gene from summary statistics (FLASHMM's ``lmm``).

    Parameters
    ----------
    stats
        Summary statistics, e.g. from :func:`scflashmm.summary_stats`.
    d
        Sizes ``(q_1 .. q_k)`` of the random components, in the column order of ``Z``; the
        default is one component of all ``q`` columns.
    method
        ``"REML"`` (restricted maximum likelihood) or ``"ML"``.
    theta0
        Start values ``(s_1 .. s_k, s_0)`` used for every gene; default ``(0 .. 0, yRy/(n-p))``
        per gene.
    max_iter
        Maximum number of Fisher-scoring passes.
    epsilon
        Convergence tolerance on the largest absolute score ``|dlogL|``.
    output_cov, output_fim, output_re
        Keep the covariance of beta; the Fisher information of beta and theta; the BLUPs.
    df
        Degrees of freedom of the t tests: ``"residual"`` (``n - p`` for every test, as FLASHMM)
        or ``"satterthwaite"`` (per gene and coefficient, as lmerTest; computed from the summary
        statistics at a small extra cost). Prefer ``"satterthwaite"`` when a coefficient is
        estimated between few samples (e.g. samples nested in the treatment): ``n - p`` then
        counts cells as replicates and makes the tests liberal. With ``output_cov`` the fit
        also keeps (genes, k, p, p) derivatives of ``cov^-1`` for the df of contrasts.
    feature_names, covariate_names, component_names
        Names of genes (m), fixed-effect columns (p) and random components (k), kept on the fit.
    n_jobs
        Threads over blocks of genes (default: the cores available). Results do not depend on it.

    Returns
    -------
    The per-gene fit. Genes with only zeros, or exactly explained by the fixed effects, are NaN
    (with a :class:`DegenerateFeatureWarning`); genes still above ``epsilon`` after ``max_iter``
    are flagged in ``converged`` (with a :class:`ConvergenceWarning`).
    """
    if not isinstance(stats, SummaryStats):
        msg = f"stats must be a SummaryStats (from summary_stats), got {type(stats).__name__}."
        raise TypeError(msg)
    if method not in ("REML", "ML"):
        msg = f"method must be 'REML' or 'ML', got {method!r}."
        raise ValueError(msg)
    if int(max_iter) != max_iter or max_iter < 1:
        msg = f"max_iter must be a positive integer, got {max_iter!r}."
        raise ValueError(msg)
    if not epsilon > 0:
        msg = f"epsilon must be positive, got {epsilon!r}."
        raise ValueError(msg)
    if df not in ("residual", "satterthwaite"):
        msg = f"df must be 'residual' or 'satterthwaite', got {df!r}."
        raise ValueError(msg)
    satterthwaite = df == "satterthwaite"
    n, p, q, m = stats.shape
    # metadata carried by the statistics (e.g. from SummaryStats.load) are the defaults
    d = _check_d(stats.d if d is None else d, q)
    k = len(d)
    feature_names = stats.feature_names if feature_names is None else feature_names
    covariate_names = stats.covariate_names if covariate_names is None else covariate_names
    if (
        component_names is None
        and stats.component_names is not None
        and len(stats.component_names) == k
    ):
        component_names = stats.component_names
    for name in ARRAY_FIELDS:
        value = getattr(stats, name)
        if not np.isfinite(value).all():
            msg = f"Summary statistic {name} contains NaN or infinite values."
            raise ValueError(msg)
    if n <= p:
        msg = f"Need more cells than fixed-effect columns: n = {n}, p = {p}."
        raise ValueError(msg)
    start = None
    if theta0 is not None:
        start = np.asarray(theta0, dtype=np.float64).ravel()
        if start.shape != (k + 1,):
            msg = (
                f"theta0 must have k + 1 = {k + 1} values (one per component, residual last), "
                f"got {start.size}."
            )
            raise ValueError(msg)
    covariate_names = _check_names(covariate_names, p, "covariate_names")
    feature_names = _check_names(feature_names, m, "feature_names")
    component_names = _check_names(component_names, k, "component_names")

    XXinv = _inverse_fixed_crossprod(stats.XX, covariate_names)
    AXY = XXinv @ stats.XY
    zrz = stats.ZZ - stats.ZX @ XXinv @ stats.ZX.T
    zrz = (zrz + zrz.T) / 2
    zry = stats.ZY - stats.ZX @ AXY
    yry = stats.Ynorm - np.einsum("pm,pm->m", stats.XY, AXY)

    out = _empty_results(m, p, q, k, output_cov, output_fim, output_re)
    if satterthwaite:
        out["df_satterthwaite"] = np.full((m, p), np.nan)
        out["vcov_theta"] = np.full((m, k + 1, k + 1), np.nan)
        out["dfim_beta"] = np.full((m, k, p, p), np.nan) if output_cov else None
    fit_genes = _select_fittable(stats.Ynorm, yry, feature_names)
    pres = p if method == "REML" else 0
    kernel_cls = _EigenKernel if k == 1 else _DenseKernel
    kernel = kernel_cls(stats, d, zrz, method)
    block = _block_size(q, p, k)
    if satterthwaite:  # (genes, k + 1, p, p) working arrays
        block = max(1, min(block, _BLOCK_ELEMENTS // (4 * (k + 1) * p * p)))

    def fit_block(genes: np.ndarray) -> None:
        # Fisher scoring is unconstrained (as in FLASHMM): a gene may step to a singular V,
        # giving inf/NaN for that gene only; `converged` and a ConvergenceWarning report it.
        # (errstate is per thread, so it is set here, in the worker.)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            state = kernel.prepare(zry[:, genes].T, yry[genes], n - pres)
            if start is None:
                s = np.zeros((genes.size, k + 1))
                s[:, k] = yry[genes] / (n - p)
            else:
                s = np.tile(start, (genes.size, 1))
            s, niter = _fisher_scoring(kernel, state, s, max_iter, epsilon)
            s[:, k] = kernel.residual_variance(state, s)
            dl, fim = kernel.score_information(state, s)
            cov_theta = _pinv_small(fim)
            out["theta"][genes] = s
            out["dlogL"][genes] = dl
            out["se_theta"][genes] = np.sqrt(np.diagonal(cov_theta, axis1=1, axis2=2))
            out["niter"][genes] = niter
            out["logLik"][genes] = (
                -(n - pres) * (1 + np.log(2 * np.pi * s[:, k])) / 2 + kernel.logdet(state, s) / 2
            )
            if output_fim:
                out["fim_theta"][genes] = fim
            fixed = kernel.fixed_effects(
                s, stats.XY[:, genes].T, stats.ZY[:, genes].T, output_re, output_fim
            )
            for name, value in fixed.items():
                if out[name] is not None:
                    out[name][genes] = value
            if satterthwaite:
                # observed information = quadratic term - Fisher information (satterthwaite.py)
                quad, dfim = kernel.satterthwaite_parts(state, s)
                vcov_theta = inverse_information(quad - fim)
                out["df_satterthwaite"][genes] = coefficient_df(fixed["cov"], dfim, s, vcov_theta)
                out["vcov_theta"][genes] = vcov_theta
                if out["dfim_beta"] is not None:
                    out["dfim_beta"][genes] = dfim
            t = fixed["coef"] / fixed["se"]
            df_block = out["df_satterthwaite"][genes] if satterthwaite else n - p
            out["t"][genes] = t
            out["p"][genes] = t_pvalue(t, df_block)

    # Blocks of genes are independent and write disjoint rows of `out`: run them in threads
    # (numpy's batched linear algebra releases the GIL), each with single-threaded BLAS.
    blocks = [fit_genes[lo : lo + block] for lo in range(0, fit_genes.size, block)]
    jobs = min(check_n_jobs(n_jobs), max(1, len(blocks)))
    with single_threaded_blas(), ThreadPoolExecutor(jobs) as pool:
        list(pool.map(fit_block, blocks))  # list(): re-raise any error of a worker
    out["converged"] = np.all(np.abs(out["dlogL"]) <= epsilon, axis=1)
    n_failed = int((~out["converged"][fit_genes]).sum())
    if n_failed:
        msg = (
            f"{n_failed} feature(s) for which LMM fitting did not converge, i.e. "
            f"abs(dlogL) > epsilon={epsilon:g} after at most {max_iter} iterations; "
            "see the `converged` flag."
        )
        warnings.warn(msg, ConvergenceWarning, stacklevel=2)
    return LMMFit(
        **out,
        df=n - p,
        method=method,
        epsilon=float(epsilon),
        feature_names=feature_names,
        covariate_names=covariate_names,
        component_names=component_names,
        d=tuple(d),
        df_method=df,
    )


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
        Passed on to :func:`lmm` (method, theta0, max_iter, epsilon, output_*, df, names).

    Returns
    -------
    The per-gene fit.
    """
    stats = summary_stats(X, Y, Z, chunk_size=chunk_size, is_counts=is_counts)
    return lmm(stats, d, **kwargs)


# --------------------------------------------------------------------------- driver


def _fisher_scoring(
    kernel: _EigenKernel | _DenseKernel,
    state: dict[str, np.ndarray],
    s: np.ndarray,
    max_iter: int,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fisher scoring ``s += pinv(F) dl`` for a block of genes, masking converged ones.

    As in FLASHMM a gene stops after the pass whose score (computed before that pass's update)
    falls below ``epsilon``; ``niter`` counts passes.
    """
    niter = np.zeros(s.shape[0], dtype=np.int64)
    active = np.arange(s.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        sub = _subset(state, active)
        dl, fim = kernel.score_information(sub, s[active])
        s[active] += np.einsum("gij,gj->gi", _pinv_small(fim), dl)
        niter[active] += 1
        # NaN scores (a diverged gene) compare False: the gene stops and is flagged later.
        active = active[np.max(np.abs(dl), axis=1) > epsilon]
    return s, niter


def _subset(state: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value[rows] for key, value in state.items()}


# --------------------------------------------------------------------------- kernels


class _EigenKernel:
    """One random component: every quantity is a sum over the eigenvalues of ``zrz``/``ZZ``.

    ``M = (r zrz + I)^-1 = U diag(1/(1 + r lam)) U'`` with ``zrz = U diag(lam) U'``. ``M0`` and
    ``ZR`` share the basis of ``ZR`` (``zrz`` for REML, ``ZZ`` for ML), eigenvalues ``lam0``. The
    fixed-effects weights ``W = (r ZZ + I)^-1 r`` live in the basis of ``ZZ`` (``V``, ``mu``).
    """

    def __init__(self, stats: SummaryStats, d: tuple[int, ...], zrz: np.ndarray, method: str):
        self.n, p, self.q, _ = stats.shape
        self.pres = p if method == "REML" else 0
        self.lam, self.U = np.linalg.eigh(zrz)
        self.mu, V = np.linalg.eigh(stats.ZZ)
        self.lam0 = self.lam if method == "REML" else self.mu
        self.V = V
        self.XX = stats.XX
        self.B = V.T @ stats.ZX  # ZX in the eigenbasis of ZZ, (q, p)
        # Outer products of the rows of B, flattened: xvx = XX - c @ BB for weights c (genes, q).
        self.BB = np.einsum("jp,jr->jpr", self.B, self.B).reshape(self.q, p * p)

    def prepare(self, zry: np.ndarray, yry: np.ndarray, n_res: int) -> dict[str, np.ndarray]:
        return {"w2": (zry @ self.U) ** 2, "yry": yry}

    def score_information(self, state: dict[str, np.ndarray], s: np.ndarray):
        r = (s[:, 0] / s[:, 1])[:, None]
        s0 = s[:, 1]
        h = 1 / (1 + r * self.lam)  # eigenvalues of M
        h0 = 1 / (1 + r * self.lam0)  # eigenvalues of M0
        w2 = state["w2"]
        zvz = self.lam0 * h0  # eigenvalues of ZR M0
        rest = self.n - self.pres - self.q
        u2 = np.sum(w2 * h**2, axis=1)
        yr2y = state["yry"] - r[:, 0] * np.sum(w2 * h * (h + 1), axis=1)
        dl = np.column_stack(
            [
                (u2 / s0**2 - zvz.sum(1) / s0) / 2,
                (yr2y / s0**2 - (rest + h0.sum(1)) / s0) / 2,
            ]
        )
        f11 = np.sum(zvz**2, axis=1)
        f12 = np.sum(zvz * h0, axis=1)
        f22 = rest + np.sum(h0**2, axis=1)
        fim = np.stack([np.column_stack([f11, f12]), np.column_stack([f12, f22])], axis=1)
        return dl, fim / (2 * s0**2)[:, None, None]

    def residual_variance(self, state: dict[str, np.ndarray], s: np.ndarray) -> np.ndarray:
        r = (s[:, 0] / s[:, 1])[:, None]
        ryMy = r[:, 0] * np.sum(state["w2"] / (1 + r * self.lam), axis=1)
        return (state["yry"] - ryMy) / (self.n - self.pres)

    def logdet(self, state: dict[str, np.ndarray], s: np.ndarray) -> np.ndarray:
        r = (s[:, 0] / s[:, 1])[:, None]
        return -np.sum(np.log(np.abs(1 + r * self.lam0)), axis=1)

    def satterthwaite_parts(self, state: dict[str, np.ndarray], s: np.ndarray):
        """Quadratic term of the observed information and ``d(X'V^-1X)/ds_1``."""
        quad = quadratic_eigen(self.lam, state["w2"], state["yry"], s)
        return quad, precision_derivatives_eigen(self.BB, self.mu, s, self.XX.shape[0])

    def fixed_effects(self, s, XY, ZY, output_re, output_fim):
        r = (s[:, 0] / s[:, 1])[:, None]
        c = r / (1 + r * self.mu)  # eigenvalues of W = (r ZZ + I)^-1 r
        p = self.XX.shape[0]
        xvx = self.XX - (c @ self.BB).reshape(-1, p, p)
        v = ZY @ self.V  # V' ZY_g, (genes, q)
        rhs = XY - (c * v) @ self.B
        out = _gls(xvx, rhs, s[:, -1], output_fim)
        if output_re:
            out["re"] = (c * (v - out["coef"] @ self.B.T)) @ self.V.T
        return out


class _DenseKernel:
    """Any number of components: batched ``q x q`` algebra with ``D = diag(r_i repeated q_i)``."""

    def __init__(self, stats: SummaryStats, d: tuple[int, ...], zrz: np.ndarray, method: str):
        self.n, p, self.q, _ = stats.shape
        self.k = len(d)
        self.pres = p if method == "REML" else 0
        self.ml = method == "ML"
        self.zrz = zrz
        self.ZZ = stats.ZZ
        self.ZR = stats.ZZ if self.ml else zrz
        self.XX = stats.XX
        self.ZX = stats.ZX
        self.blocks = np.repeat(np.arange(self.k), d)
        self.slices = [
            slice(a, b) for a, b in zip(np.cumsum((0, *d))[:-1], np.cumsum(d), strict=True)
        ]
        self.eye = np.eye(self.q)

    def prepare(self, zry: np.ndarray, yry: np.ndarray, n_res: int) -> dict[str, np.ndarray]:
        return {"zry": zry, "yry": yry}

    def _rrep(self, s: np.ndarray) -> np.ndarray:
        return (s[:, : self.k] / s[:, self.k : self.k + 1])[:, self.blocks]

    def _inv(self, rrep: np.ndarray, A: np.ndarray) -> np.ndarray:
        """``(D A + I)^-1`` for every gene."""
        return _batched_inverse(rrep[:, :, None] * A + self.eye)

    def _m_m0(self, s: np.ndarray):
        rrep = self._rrep(s)
        M = self._inv(rrep, self.zrz)
        M0 = self._inv(rrep, self.ZZ) if self.ml else M
        return rrep, M, M0

    def score_information(self, state: dict[str, np.ndarray], s: np.ndarray):
        zry = state["zry"]
        k, s0 = self.k, s[:, self.k]
        rrep, M, M0 = self._m_m0(s)
        u = np.einsum("gi,gij->gj", zry, M)
        zvz = self.ZR @ M0
        rest = self.n - self.pres - self.q
        dl = np.empty((s.shape[0], k + 1))
        fim = np.empty((s.shape[0], k + 1, k + 1))
        for i, Ii in enumerate(self.slices):
            dl[:, i] = (np.sum(u[:, Ii] ** 2, 1) / s0**2 - _trace(zvz[:, Ii, Ii]) / s0) / 2
            for j, Ij in enumerate(self.slices[: i + 1]):
                fim[:, i, j] = fim[:, j, i] = np.sum(zvz[:, Ij, Ii] ** 2, axis=(1, 2))
            # tr (ZVZ M0)[Ii, Ii] without forming the product ZVZ M0.
            fim[:, i, k] = fim[:, k, i] = np.einsum("gab,gba->g", zvz[:, Ii, :], M0[:, :, Ii])
        fim[:, k, k] = rest + np.einsum("gij,gji->g", M0, M0)
        Mzry = np.einsum("gji,gj->gi", M, zry) + zry  # (M' + I) zry
        MDzry = np.einsum("gij,gj->gi", M, rrep * zry)  # M D zry
        yr2y = state["yry"] - np.sum(Mzry * MDzry, axis=1)
        dl[:, k] = (yr2y / s0**2 - (rest + _trace(M0)) / s0) / 2
        return dl, fim / (2 * s0**2)[:, None, None]

    def residual_variance(self, state: dict[str, np.ndarray], s: np.ndarray) -> np.ndarray:
        zry = state["zry"]
        rrep, M, _ = self._m_m0(s)
        ryMy = np.einsum("gi,gij,gj->g", zry, M, rrep * zry)
        return (state["yry"] - ryMy) / (self.n - self.pres)

    def logdet(self, state: dict[str, np.ndarray], s: np.ndarray) -> np.ndarray:
        _, _, M0 = self._m_m0(s)
        return np.linalg.slogdet(M0)[1]

    def satterthwaite_parts(self, state: dict[str, np.ndarray], s: np.ndarray):
        """Quadratic term of the observed information and ``d(X'V^-1X)/ds_i``."""
        rrep = self._rrep(s)
        M = self._inv(rrep, self.zrz)
        quad = quadratic_dense(self.zrz, state["zry"], state["yry"], s, M, rrep, self.slices)
        N = self._inv(rrep, self.ZZ)  # (D ZZ + I)^-1
        return quad, precision_derivatives_dense(self.ZX, N, s, self.slices)

    def fixed_effects(self, s, XY, ZY, output_re, output_fim):
        rrep = self._rrep(s)
        W = self._inv(rrep, self.ZZ) * rrep[:, None, :]  # (D ZZ + I)^-1 D
        WZX = W @ self.ZX
        xvx = self.XX - np.einsum("qp,gqr->gpr", self.ZX, WZX)
        rhs = XY - np.einsum("gqp,gq->gp", WZX, ZY)
        out = _gls(xvx, rhs, s[:, -1], output_fim)
        if output_re:
            out["re"] = np.einsum("gij,gj->gi", W, ZY - out["coef"] @ self.ZX.T)
        return out


def _gls(
    xvx: np.ndarray, rhs: np.ndarray, s0: np.ndarray, output_fim: bool
) -> dict[str, np.ndarray]:
    """Generalised least squares from ``xvx = X' V^-1 X s0`` and ``rhs = X' V^-1 y s0``."""
    C = _batched_inverse(xvx)
    coef = np.einsum("gij,gj->gi", C, rhs)
    cov = (C + C.transpose(0, 2, 1)) * (s0[:, None, None] / 2)
    out = {"coef": coef, "se": np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), "cov": cov}
    if output_fim:
        out["fim_beta"] = (xvx + xvx.transpose(0, 2, 1)) / (2 * s0[:, None, None])
    return out


def _pinv_small(F: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a stack of small symmetric Fisher informations (FLASHMM's ginv).

    For one component (2 x 2) the closed-form inverse equals the SVD pseudo-inverse wherever the
    matrix is well conditioned and is ~10x faster; the SVD is kept for the other rows.
    """
    if F.shape[1] != 2:
        return np.linalg.pinv(F)
    a, b, c = F[:, 0, 0], F[:, 0, 1], F[:, 1, 1]
    det = a * c - b * b
    scale = np.maximum(np.abs(a), np.abs(c))
    regular = np.abs(det) > 1e-8 * scale**2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.stack([np.stack([c, -b], -1), np.stack([-b, a], -1)], axis=1) / det[:, None, None]
    if not regular.all():
        inv[~regular] = np.linalg.pinv(F[~regular])
    return inv


def _batched_inverse(A: np.ndarray) -> np.ndarray:
    """Inverse of each matrix of a stack; the pseudo-inverse (as FLASHMM's ginv) where singular."""
    try:
        return np.linalg.inv(A)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(A)


def _trace(A: np.ndarray) -> np.ndarray:
    return np.trace(A, axis1=1, axis2=2)


# --------------------------------------------------------------------------- checks and setup


def _check_d(d: Any, q: int) -> tuple[int, ...]:
    if q == 0:
        msg = "Z has no columns: a mixed model needs at least one random-effect column."
        raise ValueError(msg)
    if d is None:
        return (q,)
    sizes = np.atleast_1d(np.asarray(d))
    if sizes.dtype.kind not in "iu" and not np.all(np.mod(sizes, 1) == 0):
        msg = f"d must hold whole numbers of columns, got {d!r}."
        raise ValueError(msg)
    sizes = tuple(int(x) for x in sizes)
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
    if eigval[0] <= 1e-10 * eigval[-1]:
        null = eigvec[:, eigval <= 1e-10 * eigval[-1]]
        involved = [labels[j] for j in np.flatnonzero(np.abs(null).max(axis=1) > 1e-6)]
        msg = (
            "XX is not positive definite: the fixed design X is rank deficient (not full column "
            f"rank); these columns are linearly dependent: {involved}."
        )
        raise ValueError(msg)
    return scipy.linalg.cho_solve(scipy.linalg.cho_factor(XX), np.eye(XX.shape[0]))


def _select_fittable(Ynorm: np.ndarray, yry: np.ndarray, names: list[str] | None) -> np.ndarray:
    """Return the indices of genes that can be fit; warn about the others (left as NaN)."""
    zero = Ynorm <= 0
    if zero.any():
        msg = f"{int(zero.sum())} feature(s) with only zero counts! They are left as NaN."
        warnings.warn(msg, DegenerateFeatureWarning, stacklevel=3)
    flat = ~zero & (yry <= _DEGENERATE_RTOL * Ynorm)
    if flat.any():
        idx = np.flatnonzero(flat)
        labels = [names[j] if names else f"#{j}" for j in idx[:10]]
        more = f" and {idx.size - 10} more" if idx.size > 10 else ""
        msg = (
            f"{idx.size} feature(s) are exactly explained by the fixed effects (no residual "
            f"variance, e.g. constant genes): {', '.join(labels)}{more}. They are left as NaN."
        )
        warnings.warn(msg, DegenerateFeatureWarning, stacklevel=3)
    return np.flatnonzero(~zero & ~flat)


def _empty_results(
    m: int, p: int, q: int, k: int, output_cov: bool, output_fim: bool, output_re: bool
) -> dict[str, np.ndarray | None]:
    nan = np.full
    return {
        "coef": nan((m, p), np.nan),
        "se": nan((m, p), np.nan),
        "t": nan((m, p), np.nan),
        "p": nan((m, p), np.nan),
        "theta": nan((m, k + 1), np.nan),
        "se_theta": nan((m, k + 1), np.nan),
        "dlogL": nan((m, k + 1), np.nan),
        "logLik": nan(m, np.nan),
        "niter": np.zeros(m, dtype=np.int64),
        "converged": None,
        "cov": nan((m, p, p), np.nan) if output_cov else None,
        "fim_beta": nan((m, p, p), np.nan) if output_fim else None,
        "fim_theta": nan((m, k + 1, k + 1), np.nan) if output_fim else None,
        "re": nan((m, q), np.nan) if output_re else None,
    }


def _block_size(q: int, p: int, k: int) -> int:
    """Genes per block so that each (genes, ., .) working array stays within the budget."""
    per_gene = max(q * q if k > 1 else q, p * p)
    return max(1, _BLOCK_ELEMENTS // (4 * per_gene))
