"""Route :func:`scflashmm.lmm` with a structure, and fit every gene in blocks of genes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .._options import check_choice, check_df, check_method
from ..fit import LMMFit
from ..inference import t_pvalue
from ..satterthwaite import inverse_information
from ..stats import SummaryStats
from ..structure import CovarianceStructure
from .block import zz_blocks
from .scoring import StructuredFit, fit_structured, make_problem
from .sparse import fit_structured_sparse

#: ``q`` above which the sparse path is chosen automatically (dense q x q work per gene is
#: O(q^3); a sparse factorisation of ``Lambda' Z'Z Lambda + I`` pays off for large q).
SPARSE_MIN_Q = 1000

#: ``q`` from which independent scalar terms nested in one factor (``Z'Z`` block-diagonal,
#: e.g. ``(1 | donor) + (1 | donor:celltype)``) go to the block solver rather than the dense
#: component kernel, whose work per gene is O(q^3).
BLOCK_MIN_Q = 100

#: Bytes of dense working memory one block of genes may use (the memory guard's budget).
MEMORY_BUDGET = 2 * 2**30

#: Dense (genes, q, q) working arrays held at once by the dense structured solver.
_DENSE_ARRAYS = 12

StructuredKernel = Literal["auto", "dense", "sparse"]


@dataclass(eq=False)
class StructuredLMMFit(LMMFit):
    """:class:`~scflashmm._core.fit.LMMFit` of a structured (lme4-style) model.

    ``theta`` holds the variances and covariances of the random effects in the order of
    ``structure.varcorr_names(correlation=False)`` (``component_names``), then the residual
    variance; ``varcorr`` the same with correlations instead of covariances (named by
    ``structure.varcorr_names()``); ``theta_lme4`` lme4's relative Cholesky entries;
    ``singular`` marks fits on the boundary (lme4's ``isSingular``); ``kernel`` is
    ``"block"`` (block-diagonal ``Z'Z``), ``"dense"`` or ``"sparse"``.
    """

    structure: CovarianceStructure | None = None
    varcorr: np.ndarray | None = None
    theta_lme4: np.ndarray | None = None
    singular: np.ndarray | None = None
    kernel: str = "dense"


def choose_structured_kernel(structure: CovarianceStructure, kernel: str = "auto") -> str:
    """``"dense"`` for small ``q``, ``"sparse"`` from :data:`SPARSE_MIN_Q` on (or as forced)."""
    check_choice(kernel, "kernel", StructuredKernel)
    if kernel != "auto":
        return kernel
    return "sparse" if structure.q >= SPARSE_MIN_Q else "dense"


def dense_genes_per_block(structure: CovarianceStructure, p: int) -> int:
    """Genes per block of the dense structured solver within :data:`MEMORY_BUDGET`.

    Raises
    ------
    MemoryError
        When not even one gene's dense ``q x q`` work fits: the message says to use the sparse
        path (``kernel="sparse"``) or fewer random effects.
    """
    q = structure.q
    per_gene = 8 * (_DENSE_ARRAYS * q * q + 4 * p * p + 4 * q * (p + 1))
    if per_gene > MEMORY_BUDGET:
        msg = (
            f"The random design has q = {q} random effects: the dense structured solver needs "
            f"{per_gene / 2**30:.1f} GiB of q x q work per gene, more than its budget of "
            f"{MEMORY_BUDGET / 2**30:.0f} GiB. Use kernel='sparse' (the default from "
            f"q = {SPARSE_MIN_Q}) or fewer levels."
        )
        raise MemoryError(msg)
    return max(1, min(4096, MEMORY_BUDGET // (8 * per_gene)))


def check_memory(structure: CovarianceStructure, p: int, kernel: str = "auto") -> int:
    """Refuse, before any pass over the cells, a structure whose work would not fit in memory.

    The summary statistics hold ``Z'Z`` densely (q x q, reduced once more by the fixed
    effects); the dense path also holds :data:`_DENSE_ARRAYS` (q x q) arrays per gene of a
    block. Returns the genes per block of the dense path (0 for the sparse path).

    Raises
    ------
    MemoryError
        With the sizes and what to do instead.
    """
    q = structure.q
    stats_bytes = 8 * 3 * q * q
    if stats_bytes > MEMORY_BUDGET:
        msg = (
            f"The random design has q = {q} random effects: Z'Z alone needs "
            f"{stats_bytes / 2**30:.1f} GiB (dense q x q, three copies while fitting), more "
            f"than the budget of {MEMORY_BUDGET / 2**30:.0f} GiB. Use fewer levels (e.g. "
            "merge rare levels) or fewer random terms."
        )
        raise MemoryError(msg)
    if choose_structured_kernel(structure, kernel) == "sparse":
        return 0
    return dense_genes_per_block(structure, p)


def check_structure(structure: Any, q: int) -> CovarianceStructure:
    """Check that ``structure`` is a :class:`CovarianceStructure` with ``q`` columns."""
    if not isinstance(structure, CovarianceStructure):
        msg = (
            "structure must be a CovarianceStructure (e.g. random_design(terms, obs).structure), "
            f"got {type(structure).__name__}."
        )
        raise TypeError(msg)
    if structure.q != q:
        msg = f"The structure has q = {structure.q} random effects; the statistics have {q}."
        raise ValueError(msg)
    return structure


def _subset(stats: SummaryStats, genes: np.ndarray) -> SummaryStats:
    return SummaryStats(
        stats.XX,
        stats.XY[:, genes],
        stats.ZX,
        stats.ZY[:, genes],
        stats.ZZ,
        stats.Ynorm[genes],
        stats.n,
    )


def lmm_structured(
    stats: SummaryStats,
    structure: CovarianceStructure,
    *,
    method: str = "REML",
    max_iter: int = 200,
    epsilon: float = 1e-5,
    output_cov: bool = True,
    df: str = "residual",
    feature_names: Any = None,
    covariate_names: Any = None,
    kernel: str = "auto",
    n_jobs: int | None = None,
) -> StructuredLMMFit:
    """Fit a structured (lme4-style) model to every gene; :func:`scflashmm.lmm` dispatches here.

    Parameters
    ----------
    stats
        Summary statistics; ``Z``'s columns in the order of ``structure``.
    structure
        The covariance structure of the random effects.
    method
        ``"REML"`` or ``"ML"``.
    max_iter
        Maximum Fisher-scoring passes (dense path).
    epsilon
        Convergence tolerance on the relative change of the parameters (at most ``1e-9``
        is used: lme4-level agreement needs tight convergence).
    output_cov
        Keep the covariance of the fixed effects.
    df
        ``"residual"`` or ``"satterthwaite"`` (dense path).
    feature_names, covariate_names
        Names of genes and fixed-effect columns.
    kernel
        ``"auto"`` (dense below :data:`SPARSE_MIN_Q` random effects, else sparse), ``"dense"``
        or ``"sparse"``.
    n_jobs
        Threads over blocks of genes.

    Returns
    -------
    The per-gene :class:`StructuredLMMFit`.
    """
    from .._threads import check_n_jobs, ordered_map, single_threaded_blas
    from ..fit import (
        ConvergenceWarning,
        _check_names,
        _select_fittable,
        reduce_fixed_effects,
    )

    method = check_method(method)
    df = check_df(df)
    structure = check_structure(structure, stats.shape[2])
    kind = choose_structured_kernel(structure, kernel)
    if kind == "sparse" and df == "satterthwaite":
        msg = "Satterthwaite df are not available on the sparse (large q) path yet."
        raise ValueError(msg)
    jobs = check_n_jobs(n_jobs)
    n, p, _, m = stats.shape
    check_memory(structure, p, kind)
    if n <= p:
        msg = f"Need more cells than fixed-effect columns: n = {n}, p = {p}."
        raise ValueError(msg)
    features = _check_names(
        stats.feature_names if feature_names is None else feature_names, m, "feature_names"
    )
    covariates = _check_names(
        stats.covariate_names if covariate_names is None else covariate_names, p, "covariate_names"
    )
    ynorm = stats.Ynorm
    stats, offset = stats.centred()  # of y - c for a large mean (docs/model.md, Offsets)
    reduced = reduce_fixed_effects(stats, covariates)
    genes = _select_fittable(ynorm, reduced.yry, features, reduced.yry_error)
    k = structure.n_theta
    size = dense_genes_per_block(structure, p) if kind == "dense" else 64
    size = max(1, min(size, -(-genes.size // jobs)))  # at least one block per thread
    blocks = [genes[lo : lo + size] for lo in range(0, genes.size, size)]
    tol = min(float(epsilon), 1e-9)

    def fit_block(rows: np.ndarray) -> dict[str, np.ndarray]:
        sub = _subset(stats, rows)
        if kind == "sparse":
            f = fit_structured_sparse(sub, structure, method=method)
            extra = {
                "dlogL": np.full((rows.size, k + 1), np.nan),
                "se_theta": np.full((rows.size, k + 1), np.nan),
            }
        else:
            f = fit_structured(sub, structure, method=method, max_iter=max_iter, tol=tol)
            extra = _theta_inference(sub, structure, method, f, satterthwaite=df != "residual")
        return {
            "coef": f.coef,
            "se": f.se,
            "cov": f.cov,
            "theta": np.column_stack([f.gamma, f.sigma2]),
            "varcorr": f.varcorr,
            "theta_lme4": f.theta,
            "logLik": f.logLik,
            "niter": f.niter,
            "converged": f.converged,
            "singular": f.singular,
            **extra,
        }

    shapes = {
        "coef": (p,),
        "se": (p,),
        "cov": (p, p),
        "theta": (k + 1,),
        "se_theta": (k + 1,),
        "dlogL": (k + 1,),
        "varcorr": (k,),
        "theta_lme4": (k,),
        "logLik": (),
        "df_satterthwaite": (p,),
        "dfim_beta": (k, p, p),
        "vcov_theta": (k + 1, k + 1),
    }
    out: dict[str, np.ndarray] = {name: np.full((m, *s), np.nan) for name, s in shapes.items()}
    out |= {
        "niter": np.zeros(m, dtype=np.int64),
        "converged": np.zeros(m, dtype=bool),
        "singular": np.zeros(m, dtype=bool),
    }
    with single_threaded_blas(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = ordered_map(fit_block, blocks, min(jobs, max(1, len(blocks))), window=len(blocks))
        for rows, res in zip(blocks, results, strict=True):
            for name, value in res.items():
                out[name][rows] = value
    if offset is not None:
        out["coef"] += offset
    t = out["coef"] / out["se"]
    satt = df == "satterthwaite"
    pval = t_pvalue(t, out["df_satterthwaite"] if satt else n - p)
    n_failed = int((~out["converged"][genes]).sum())
    if n_failed:
        msg = (
            f"{n_failed} feature(s) for which the structured LMM fit did not converge "
            f"within {max_iter} passes; see the `converged` flag."
        )
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    logdet_xx = np.linalg.slogdet(stats.XX)[1] if method == "REML" else 0.0
    return StructuredLMMFit(
        coef=out["coef"],
        se=out["se"],
        t=t,
        p=pval,
        theta=out["theta"],
        se_theta=out["se_theta"],
        dlogL=out["dlogL"],
        logLik=out["logLik"] + 0.5 * logdet_xx,  # LMMFit's convention (FLASHMM's logLik)
        niter=out["niter"],
        converged=out["converged"],
        df=n - p,
        method=method,
        epsilon=float(epsilon),
        cov=out["cov"] if output_cov else None,
        feature_names=features,
        covariate_names=covariates,
        component_names=structure.varcorr_names(correlation=False),
        d=(),
        df_method=df,
        df_satterthwaite=out["df_satterthwaite"] if satt else None,
        vcov_theta=out["vcov_theta"] if satt else None,
        dfim_beta=out["dfim_beta"] if satt and output_cov else None,
        structure=structure,
        varcorr=out["varcorr"],
        theta_lme4=out["theta_lme4"],
        singular=out["singular"],
        kernel="block" if kind == "dense" and zz_blocks(stats, structure) is not None else kind,
    )


def _theta_inference(
    stats: SummaryStats,
    structure: CovarianceStructure,
    method: str,
    fit: StructuredFit,
    *,
    satterthwaite: bool,
) -> dict[str, np.ndarray]:
    """Score, standard errors of ``(gamma, s0)`` and, optionally, Satterthwaite's df.

    Standard errors come from the expected information. Satterthwaite's df (as lmerTest) use
    the observed information (central differences of the analytic score) and the derivatives
    of ``cov(beta)`` (central differences of the GLS fit); both are invariant to the
    parameterisation of the covariance, so ``(gamma, s0)`` gives lmerTest's numbers.
    """
    prob = make_problem(stats, structure, method)
    rows = np.arange(fit.coef.shape[0])
    dl, fim = prob.score_information(rows, fit.gamma, fit.sigma2)
    cov_t = np.linalg.pinv(fim, hermitian=True)
    out = {"dlogL": dl, "se_theta": np.sqrt(np.maximum(np.diagonal(cov_t, axis1=1, axis2=2), 0))}
    if not satterthwaite:
        return out
    par = np.column_stack([fit.gamma, fit.sigma2])
    k1 = par.shape[1]
    g, p = fit.coef.shape
    hess = np.empty((g, k1, k1))
    dcov = np.empty((g, k1, p, p))
    scale = np.sqrt(fit.sigma2)[:, None] * np.ones(k1)
    scale[:, -1] = fit.sigma2
    h = 1e-4 * scale
    for j in range(k1):
        up, dn = par.copy(), par.copy()
        up[:, j] += h[:, j]
        dn[:, j] -= h[:, j]
        dl_up, _ = prob.score_information(rows, up[:, :-1], up[:, -1])
        dl_dn, _ = prob.score_information(rows, dn[:, :-1], dn[:, -1])
        hess[:, :, j] = (dl_up - dl_dn) / (2 * h[:, j, None])
        c_up = prob.fixed_effects(stats, up[:, :-1], up[:, -1])[1]
        c_dn = prob.fixed_effects(stats, dn[:, :-1], dn[:, -1])[1]
        dcov[:, j] = (c_up - c_dn) / (2 * h[:, j, None, None])
    vcov = inverse_information(-hess)
    var_b = np.diagonal(fit.cov, axis1=1, axis2=2)  # (g, p)
    grad = np.diagonal(dcov, axis1=2, axis2=3)  # (g, k1, p)
    den = np.einsum("gip,gij,gjp->gp", grad, vcov, grad)
    out["df_satterthwaite"] = 2 * var_b**2 / den
    out["vcov_theta"] = vcov
    # d(X'V^-1X)/dtheta = -C^-1 (dC) C^-1, for the df of contrasts (LMMFit.dfim_beta)
    prec = np.linalg.inv(fit.cov)
    out["dfim_beta"] = -np.einsum("gab,gjbc,gcd->gjad", prec, dcov[:, :-1], prec)
    return out


def dispatch_structure(
    stats: SummaryStats, d: Any, structure: Any, options: dict[str, Any]
) -> StructuredLMMFit | tuple[tuple[int, ...], Any]:
    """Route :func:`scflashmm.lmm` with a ``structure``.

    Independent scalar terms return ``(d, component_names)`` for the component kernels
    (FLASHMM's parameterisation) when ``q`` is below :data:`BLOCK_MIN_Q`, or below
    :data:`SPARSE_MIN_Q` with a ``Z'Z`` that is not block-diagonal, or when ``kernel`` is
    ``"eigen"`` or ``"dense"``; anything else is fit here with lme4's parameterisation.
    """
    if d is not None:
        msg = "Give either d or structure, not both."
        raise ValueError(msg)
    structure = check_structure(structure, stats.shape[2])
    kernel = options.get("kernel", "auto")
    names = options.get("component_names")
    if structure.d is not None and kernel != "sparse":
        small = structure.q < BLOCK_MIN_Q or (
            structure.q < SPARSE_MIN_Q and zz_blocks(stats, structure) is None
        )
        if kernel in ("eigen", "dense") or small:
            return structure.d, structure.varcorr_names() if names is None else names
    if kernel == "eigen":
        msg = "The eigen kernel fits one scalar random component; this structure has slopes."
        raise ValueError(msg)
    unsupported = {
        "theta0": options.get("theta0") is not None,
        "output_fim": bool(options.get("output_fim")),
        "output_re": bool(options.get("output_re")),
        "component_names": names is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        msg = (
            f"{', '.join(bad)} not supported for structured random effects (random slopes, "
            "or large q); the names come from the structure."
        )
        raise ValueError(msg)
    return lmm_structured(
        stats,
        structure,
        method=options.get("method", "REML"),
        max_iter=max(int(options.get("max_iter", 50)), 200),
        epsilon=options.get("epsilon", 1e-5),
        output_cov=bool(options.get("output_cov", True)),
        df=options.get("df", "residual"),
        feature_names=options.get("feature_names"),
        covariate_names=options.get("covariate_names"),
        kernel=kernel,
        n_jobs=options.get("n_jobs"),
    )
