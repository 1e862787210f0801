"""Route :func:`scflashmm.lmm` with a structure, and fit every gene in blocks of genes."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from .._options import check_choice, check_df, check_method
from ..inference import t_pvalue
from ..kenward_roger import kenward_roger
from ..lmmfit import ConvergenceWarning, LMMFit
from ..satterthwaite import coefficient_df, inverse_information
from ..stats import SummaryStats
from ..structure import CovarianceStructure
from .block import genes_per_block, zz_blocks
from .problem import _Problem
from .schur import SCHUR_MIN_Q, schur_candidate
from .scoring import StructuredFit, choose_algebra, fit_structured, make_problem

#: ``q`` from which independent scalar terms nested in one factor (``Z'Z`` block-diagonal,
#: e.g. ``(1 | donor) + (1 | donor:celltype)``) go to the block solver rather than the dense
#: component kernel, whose work per gene is O(q^3).
BLOCK_MIN_Q = 100

#: Bytes of dense working memory one block of genes may use (the memory guard's budget).
MEMORY_BUDGET = 2 * 2**30

#: Dense (genes, q, q) working arrays held at once by the dense structured solver.
_DENSE_ARRAYS = 12

StructuredKernel = Literal["auto", "dense", "schur"]


@dataclass(eq=False)
class StructuredLMMFit(LMMFit):
    """:class:`~scflashmm._core.fit.LMMFit` of a structured (lme4-style) model.

    ``theta`` holds the variances and covariances of the random effects in the order of
    ``structure.varcorr_names(correlation=False)`` (``component_names``), then the residual
    variance; ``varcorr`` the same with correlations instead of covariances (named by
    ``structure.varcorr_names()``); ``theta_lme4`` lme4's relative Cholesky entries;
    ``singular`` marks fits on the boundary (lme4's ``isSingular``); ``kernel`` is
    ``"block"`` (block-diagonal ``Z'Z``), ``"schur"`` (a large scalar term eliminated by a Schur
    complement) or ``"dense"``.
    """

    structure: CovarianceStructure | None = None
    varcorr: np.ndarray | None = None
    theta_lme4: np.ndarray | None = None
    singular: np.ndarray | None = None
    kernel: str = "dense"


def choose_structured_kernel(structure: CovarianceStructure, kernel: str = "auto") -> str:
    """Return the kernel a structure is fit with (from the structure alone).

    ``"schur"`` from :data:`SCHUR_MIN_Q` on when a scalar term has most of the columns
    (:func:`.schur.schur_candidate`), else ``"dense"``; or as forced.
    """
    check_choice(kernel, "kernel", StructuredKernel)
    if kernel != "auto":
        return kernel
    large = structure.q >= SCHUR_MIN_Q and schur_candidate(structure) is not None
    return "schur" if large else "dense"


def schur_genes_per_block(structure: CovarianceStructure, p: int, term: int | None = None) -> int:
    """Genes per block of the Schur path within :data:`MEMORY_BUDGET`.

    Its work per gene is (q2 x q2) and (q2 + p) x (q2 + p) arrays, ``q2`` the columns besides
    the eliminated ``term`` (default: :func:`.schur.schur_candidate`), and vectors over that
    term's levels.

    Raises
    ------
    MemoryError
        When not even one gene's work fits.
    """
    term = schur_candidate(structure) if term is None else term
    q1 = structure.terms[term].q if term is not None else 0
    q2 = structure.q - q1
    ra = q2 + p
    per_gene = 8 * (8 * ra * ra + 12 * q2 * q2 + 12 * q1 + 4 * p * p)
    if per_gene > MEMORY_BUDGET:
        msg = (
            f"The random design has q = {structure.q} random effects, {q2} of them besides its "
            f"largest scalar term: the structured solver needs {per_gene / 2**30:.1f} GiB per "
            f"gene, more than its budget of {MEMORY_BUDGET / 2**30:.0f} GiB. Use fewer levels."
        )
        raise MemoryError(msg)
    return max(1, min(4096, MEMORY_BUDGET // (8 * per_gene)))


def dense_genes_per_block(structure: CovarianceStructure, p: int) -> int:
    """Genes per block of the dense structured solver within :data:`MEMORY_BUDGET`.

    Raises
    ------
    MemoryError
        When not even one gene's dense ``q x q`` work fits.
    """
    q = structure.q
    per_gene = 8 * (_DENSE_ARRAYS * q * q + 4 * p * p + 4 * q * (p + 1))
    if per_gene > MEMORY_BUDGET:
        msg = (
            f"The random design has q = {q} random effects: the dense structured solver needs "
            f"{per_gene / 2**30:.1f} GiB of q x q work per gene, more than its budget of "
            f"{MEMORY_BUDGET / 2**30:.0f} GiB. Use fewer levels (a large scalar term such as "
            "(1 | school) is eliminated by a Schur complement when it has most of the columns)."
        )
        raise MemoryError(msg)
    return max(1, min(4096, MEMORY_BUDGET // (8 * per_gene)))


def check_memory(structure: CovarianceStructure, p: int, kernel: str = "auto") -> int:
    """Refuse, before any pass over the cells, a structure whose work would not fit in memory.

    The summary statistics hold ``Z'Z`` densely (q x q, reduced once more by the fixed
    effects); the dense path also holds :data:`_DENSE_ARRAYS` (q x q) arrays per gene of a
    block, the Schur path (q2 x q2) ones (:func:`schur_genes_per_block`). Returns the genes
    per block.

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
    if choose_structured_kernel(structure, kernel) == "schur":
        return schur_genes_per_block(structure, p)
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
        ``"residual"``, ``"satterthwaite"`` or ``"kenward-roger"`` (REML; Kenward-Roger's
        adjusted covariance and df as pbkrtest computes them, docs/model.md, Kenward-Roger;
        not on the Schur path).
    feature_names, covariate_names
        Names of genes and fixed-effect columns.
    kernel
        ``"auto"`` (the Schur complement on a large scalar term, :func:`.schur.schur_term`,
        else the block algebra when ``Z'Z`` splits into small blocks, else dense), ``"dense"``
        or ``"schur"``.
    n_jobs
        Threads over blocks of genes.

    Returns
    -------
    The per-gene :class:`StructuredLMMFit`.
    """
    from .._threads import check_n_jobs, ordered_map, single_threaded_blas
    from ..fit import _check_names, _select_fittable, reduce_fixed_effects

    method = check_method(method)
    structure = check_structure(structure, stats.shape[2])
    check_choice(kernel, "kernel", StructuredKernel)
    df = check_df(df, method)
    algebra = choose_algebra(stats, structure, kernel)  # decided once, not per block of genes
    if algebra.kind == "schur" and df == "kenward-roger":
        msg = (
            f"df='kenward-roger' is not available on the Schur path (a large scalar term "
            f"eliminated; q = {structure.q}): its q x q work per gene is what that path avoids. "
            "Use df='satterthwaite'."
        )
        raise ValueError(msg)
    jobs = check_n_jobs(n_jobs)
    n, p, _, m = stats.shape
    if algebra.kind == "schur":
        size = schur_genes_per_block(structure, p, algebra.term)  # (the memory guard)
    else:
        size = check_memory(structure, p, "dense")
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
    # y'Ry (and the rank check of X) only: Z'RZ (q x q) is not needed here
    reduced = reduce_fixed_effects(
        replace(stats, ZX=stats.ZX[:0], ZY=stats.ZY[:0], ZZ=np.zeros((0, 0)), shifted=None),
        covariates,
    )
    genes = _select_fittable(ynorm, reduced.yry, features, reduced.yry_error)
    k = structure.n_theta
    if algebra.labels is not None:
        size = genes_per_block(structure, algebra.labels)
    if df == "kenward-roger":  # k more (genes, q, q) arrays, and (k + 1)^2 (genes, p, p)
        q = structure.q
        per_gene = 8 * ((_DENSE_ARRAYS + k) * q * q + (k + 1) ** 2 * (p * p + 2 * q * p))
        size = max(1, min(size, MEMORY_BUDGET // (8 * per_gene)))
    # blocks that do not depend on n_jobs, so neither do the results (to the last bit)
    size = max(1, size)
    blocks = [genes[lo : lo + size] for lo in range(0, genes.size, size)]
    tol = min(float(epsilon), 1e-9)

    def fit_block(rows: np.ndarray) -> dict[str, np.ndarray]:
        sub = _subset(stats, rows)
        prob = make_problem(sub, structure, method, algebra)  # for the fit and the inference
        f = fit_structured(sub, structure, method=method, max_iter=max_iter, tol=tol, problem=prob)
        extra = _theta_inference(prob, sub, structure, f, df=df, labels=algebra.labels)
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
        "df_kenward_roger": (p,),
        "vcov_theta_kr": (k + 1, k + 1),
        "cov_adjusted": (p, p),
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
    satt, kr = df == "satterthwaite", df == "kenward-roger"
    per_test = {"satterthwaite": "df_satterthwaite", "kenward-roger": "df_kenward_roger"}
    pval = t_pvalue(t, out[per_test[df]] if df in per_test else n - p)
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
        dfim_beta=out["dfim_beta"] if (satt or kr) and output_cov else None,
        df_kenward_roger=out["df_kenward_roger"] if kr else None,
        vcov_theta_kr=out["vcov_theta_kr"] if kr else None,
        cov_adjusted=out["cov_adjusted"] if kr and output_cov else None,
        structure=structure,
        varcorr=out["varcorr"],
        theta_lme4=out["theta_lme4"],
        singular=out["singular"],
        kernel=algebra.kind,
    )


def _theta_inference(
    prob: _Problem,
    stats: SummaryStats,
    structure: CovarianceStructure,
    fit: StructuredFit,
    *,
    df: str = "residual",
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Score, standard errors of ``(gamma, s0)`` and, optionally, Satterthwaite's or KR's df.

    Standard errors come from the expected information. Satterthwaite's df (as lmerTest) use
    the observed information (central differences of the analytic score, in lme4's Cholesky
    coordinates) and the derivatives of ``cov(beta)`` (central differences of the GLS fit in
    ``(gamma, s0)``); at a stationary point ``g'Ag`` does not depend on the parameterisation,
    and the Cholesky coordinates keep singular fits stationary, so these are lmerTest's df.
    Kenward-Roger (as pbkrtest) is linear in ``(gamma, s0)``: ``V = s0 I + sum_j gamma_j Z E_j
    Z'`` (:func:`~scflashmm._core.kenward_roger.kenward_roger`, block by block with ``labels``,
    the blocks of ``Z'Z``), with the fit's covariance of beta and expected information.
    """
    rows = np.arange(fit.coef.shape[0])
    dl, fim = prob.score_information(rows, fit.gamma, fit.sigma2)
    cov_t = np.linalg.pinv(fim, hermitian=True)
    out = {"dlogL": dl, "se_theta": np.sqrt(np.maximum(np.diagonal(cov_t, axis1=1, axis2=2), 0))}
    if df == "kenward-roger":
        return out | _kenward_roger(stats, structure, fit, fim, labels)
    if df != "satterthwaite":
        return out
    par = np.column_stack([fit.gamma, fit.sigma2])
    k1 = par.shape[1]
    g, p = fit.coef.shape
    # The observed information in lme4's coordinates (absolute Cholesky entries L and s0),
    # where a singular fit (a zero Cholesky diagonal) is still a stationary point, as lmerTest
    # takes it; mapped to (gamma, s0) by the delta method. Inside the boundary this equals the
    # inverse Hessian in (gamma, s0); at a singular fit the directions that gamma = L L' cannot
    # move to first order drop out, as in lmerTest.
    chol = np.column_stack([fit.theta * np.sqrt(fit.sigma2)[:, None], fit.sigma2])

    def score_chol(x: np.ndarray) -> np.ndarray:
        gamma, jac = prob.gamma_and_jacobian(x[:, :-1])
        dl, _ = prob.score_information(rows, gamma, x[:, -1])
        return np.column_stack([np.einsum("gi,gij->gj", dl[:, :-1], jac), dl[:, -1]])

    hess = np.empty((g, k1, k1))
    dcov = np.empty((g, k1, p, p))
    # relative steps, with a floor for entries near zero (a small variance needs a step far
    # below its own size; the curvature there is large): Cholesky entries on the scale of
    # sqrt(s0), (co)variances on that of s0
    floor = np.sqrt(fit.sigma2)[:, None] * np.ones(k1)
    floor[:, -1] = fit.sigma2
    h_chol = 1e-4 * np.maximum(np.abs(chol), 1e-3 * floor)
    h = 1e-4 * np.maximum(np.abs(par), 1e-3 * fit.sigma2[:, None])
    for j in range(k1):
        up, dn = chol.copy(), chol.copy()
        up[:, j] += h_chol[:, j]
        dn[:, j] -= h_chol[:, j]
        hess[:, :, j] = (score_chol(up) - score_chol(dn)) / (2 * h_chol[:, j, None])
        up, dn = par.copy(), par.copy()
        up[:, j] += h[:, j]
        dn[:, j] -= h[:, j]
        c_up = prob.fixed_effects(stats, up[:, :-1], up[:, -1])[1]
        c_dn = prob.fixed_effects(stats, dn[:, :-1], dn[:, -1])[1]
        dcov[:, j] = (c_up - c_dn) / (2 * h[:, j, None, None])
    jac = np.zeros((g, k1, k1))
    jac[:, :-1, :-1] = prob.gamma_and_jacobian(chol[:, :-1])[1]
    jac[:, -1, -1] = 1.0
    vcov = jac @ inverse_information(-hess) @ np.swapaxes(jac, 1, 2)
    var_b = np.diagonal(fit.cov, axis1=1, axis2=2)  # (g, p)
    grad = np.diagonal(dcov, axis1=2, axis2=3)  # (g, k1, p)
    den = np.einsum("gip,gij,gjp->gp", grad, vcov, grad)
    out["df_satterthwaite"] = 2 * var_b**2 / den
    out["vcov_theta"] = vcov
    # d(X'V^-1X)/dtheta = -C^-1 (dC) C^-1, for the df of contrasts (LMMFit.dfim_beta)
    prec = np.linalg.inv(fit.cov)
    out["dfim_beta"] = -np.einsum("gab,gjbc,gcd->gjad", prec, dcov[:, :-1], prec)
    return out


def _kenward_roger(
    stats: SummaryStats,
    structure: CovarianceStructure,
    fit: StructuredFit,
    fim: np.ndarray,
    labels: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Kenward-Roger adjusted se, df and the parts for the df of contrasts, at the fit."""
    theta = np.column_stack([fit.gamma, fit.sigma2])
    kr = kenward_roger(
        stats.XX,
        stats.ZX,
        stats.ZZ,
        stats.n,
        structure,
        theta,
        eigen=False,
        cov=fit.cov,
        information=fim,
        labels=labels,
    )
    dfim = kr.dprec[:, :-1]
    return {
        "se": kr.se(),
        # Satterthwaite's formula with W (docs/model.md, Kenward-Roger), as for the components
        "df_kenward_roger": coefficient_df(kr.cov, dfim, theta, kr.W),
        "vcov_theta_kr": kr.W,
        "cov_adjusted": kr.cov_adjusted,
        "dfim_beta": dfim,
    }


def dispatch_structure(
    stats: SummaryStats, d: Any, structure: Any, options: dict[str, Any]
) -> StructuredLMMFit | tuple[tuple[int, ...], Any]:
    """Route :func:`scflashmm.lmm` with a ``structure``.

    Independent scalar terms return ``(d, component_names)`` for the component kernels
    (FLASHMM's parameterisation) when ``q`` is below :data:`BLOCK_MIN_Q`, or below
    :data:`SCHUR_MIN_Q` with a ``Z'Z`` that is not block-diagonal, or when ``kernel`` is
    ``"eigen"`` or ``"dense"``; anything else is fit here with lme4's parameterisation.
    """
    if d is not None:
        msg = "Give either d or structure, not both."
        raise ValueError(msg)
    structure = check_structure(structure, stats.shape[2])
    kernel = options.get("kernel", "auto")
    names = options.get("component_names")
    if structure.d is not None and kernel != "schur":
        small = structure.q < BLOCK_MIN_Q or (
            structure.q < SCHUR_MIN_Q and zz_blocks(stats, structure) is None
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
