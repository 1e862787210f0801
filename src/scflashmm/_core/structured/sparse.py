"""Large ``q``: lme4's profiled criterion with a sparse factorisation, gene by gene."""

from __future__ import annotations

import numpy as np

from .._options import check_method
from ..stats import SummaryStats
from ..structure import CovarianceStructure
from .scoring import StructuredFit


def fit_structured_sparse(
    stats: SummaryStats, structure: CovarianceStructure, *, method: str = "REML"
) -> StructuredFit:
    """Prototype for large ``q``: lme4's profiled criterion with a sparse factorisation.

    For each gene the criterion of lme4 (``s0`` and ``beta`` profiled out) is minimised over
    ``theta`` with bounds (Powell; L-BFGS-B with a numerical
    gradient and Nelder-Mead stopped early on Chem97), evaluating it from the sparse
    ``A = Lambda' Z'Z Lambda + I`` (``scipy.sparse.linalg.splu``, whose pattern is that of
    ``Z'Z``) and ``p + 1`` solves. ``Z'Z`` must be sparse for this to pay off. This loops over
    genes and is a prototype: standard errors of ``theta`` and Satterthwaite parts are missing.

    Parameters
    ----------
    stats
        Summary statistics (``ZZ`` dense or scipy sparse).
    structure
        The covariance structure.
    method
        ``"REML"`` or ``"ML"``.

    Returns
    -------
    The per-gene :class:`StructuredFit` (``niter`` counts criterion evaluations).
    """
    import scipy.optimize
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    method = check_method(method)
    st = structure
    reml = method == "REML"
    ZZ = sp.csc_matrix(stats.ZZ)
    ZX = np.asarray(stats.ZX)
    n, p = stats.n, stats.XX.shape[0]
    m = stats.XY.shape[1]
    lower = st.lower_bounds()
    eye = sp.identity(st.q, format="csc")

    def lam(theta: np.ndarray) -> sp.csc_matrix:
        return sp.block_diag(
            [
                sp.kron(sp.identity(t.n_levels), T)
                for t, T in zip(st.terms, st.cholesky_factors(theta), strict=True)
            ],
            format="csc",
        )

    def parts(theta: np.ndarray, g: int):
        Lm = lam(theta)
        A = (Lm.T @ ZZ @ Lm + eye).tocsc()
        lu = spla.splu(A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0)
        logdet_a = float(np.sum(np.log(np.abs(lu.U.diagonal()))))
        rhs = Lm.T @ np.column_stack([ZX, stats.ZY[:, g]])
        sol = lu.solve(rhs)
        cross = rhs.T @ sol  # [RZX'RZX, RZX'cu; ., |cu|^2]
        xvx = stats.XX - cross[:p, :p]
        xy = stats.XY[:, g] - cross[:p, p]
        beta = np.linalg.solve(xvx, xy)
        r2 = stats.Ynorm[g] - cross[p, p] - xy @ beta
        return logdet_a, xvx, beta, r2

    def deviance(theta: np.ndarray, g: int) -> float:
        logdet_a, xvx, _, r2 = parts(theta, g)
        nd = n - p if reml else n
        dev = logdet_a + nd * (1 + np.log(2 * np.pi * r2 / nd))
        if reml:
            dev += np.linalg.slogdet(xvx)[1]
        return float(dev)

    k = st.n_theta
    theta = np.zeros((m, k))
    niter = np.zeros(m, dtype=np.int64)
    converged = np.zeros(m, dtype=bool)
    start = np.array([1.0 if lo == 0 else 0.0 for lo in lower])
    bounds = [(0.0, None) if lo == 0 else (None, None) for lo in lower]
    for g in range(m):
        res = scipy.optimize.minimize(
            deviance,
            start,
            args=(g,),
            method="Powell",
            bounds=bounds,
            options={"xtol": 1e-8, "ftol": 1e-15, "maxfev": 4000},
        )
        theta[g], niter[g], converged[g] = res.x, res.nfev, res.success
    coef = np.empty((m, p))
    cov = np.empty((m, p, p))
    s0 = np.empty(m)
    ll = np.empty(m)
    for g in range(m):
        _, xvx, beta, r2 = parts(theta[g], g)
        nd = n - p if reml else n
        s0[g] = r2 / nd
        coef[g] = beta
        cov[g] = np.linalg.inv(xvx) * s0[g]
        ll[g] = -deviance(theta[g], g) / 2
    diag_ix = np.flatnonzero(lower == 0)
    blocks = st.covariance_blocks(theta, s0)
    return StructuredFit(
        coef=coef,
        se=np.sqrt(np.diagonal(cov, axis1=1, axis2=2)),
        cov=cov,
        theta=theta,
        sigma2=s0,
        varcorr=st.varcorr(theta, s0),
        gamma=st.gamma_from_blocks(blocks),
        logLik=ll,
        niter=niter,
        converged=converged,
        singular=np.any(theta[:, diag_ix] < 1e-4, axis=1),
        structure=st,
        method=method,
    )
