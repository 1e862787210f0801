"""REML/ML for structured random effects (lme4's family), every gene at once, dense small ``q``.

Model per gene: ``y = X beta + Z b + e``, ``b ~ N(0, G)``, ``e ~ N(0, s0 I)``, with ``G`` from a
:class:`~scflashmm._core.structure.CovarianceStructure`: block-diagonal over terms, each term
``I_L kron Sigma_t`` with ``Sigma_t = L_t L_t'`` positive semi-definite.

Only the summary statistics are used. REML is the likelihood of the residuals after the fixed
effects: with ``R = I - X (X'X)^-1 X'`` it is an ML problem in ``n' = n - p`` observations with
``Z'RZ`` (``zrz``), ``Z'Ry`` (``zry``) and ``y'Ry`` (``yry``); ML uses ``Z'Z`` in the traces.
With ``D = G / s0``, ``M = (I + D T)^-1`` (``T = zrz`` for REML, ``Z'Z`` for ML):

- ``log|V| = n' log s0 + log|I + D T|`` and ``y'V^-1y = (yry - zry' M D zry) / s0``;
- the score in the linear parameters ``gamma`` (entries of the ``Sigma_t``, then ``s0``) is
  ``(u'E_j u - tr(E_j W) / s0) / 2`` with ``u = M' zry / s0``, ``W = T M`` and ``E_j`` the
  symmetric unit pattern of entry ``j`` repeated over the term's levels; the expected information
  is ``tr(E_j W E_k W) / (2 s0^2)`` (and ``tr(E_j W M)``, ``n' - q + tr(M M)`` with ``s0``).

Fisher scoring runs on the Cholesky entries ``L_t`` (chain rule ``J' dl``, ``J' F J``), so that
every iterate is positive semi-definite, with a step-halving line search on the log-likelihood
and an active set for Cholesky diagonals that reach zero (a singular fit, lme4's boundary),
released again when the likelihood increases along them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._options import check_method
from .structure import CovarianceStructure
from .sumstats import SummaryStats

__all__ = ["StructuredFit", "fit_structured"]

#: A relative Cholesky diagonal below this is set to zero when that does not lower the
#: likelihood (lme4 calls a fit singular below 1e-4).
_SNAP = 1e-3
#: A zero diagonal is released when one scoring step of its variance would exceed this
#: (relative standard deviation).
_RELEASE = 1e-4


@dataclass(eq=False)
class StructuredFit:
    """Per-gene fit of a structured linear mixed model (genes first).

    Attributes
    ----------
    coef, se, cov
        Fixed effects and standard errors (genes, p); covariance (genes, p, p).
    theta
        lme4's ``theta``: relative Cholesky entries (genes, n_theta).
    sigma2
        Residual variance ``s0`` (genes,).
    varcorr
        Variances and correlations named by ``structure.varcorr_names()`` (genes, n_theta).
    gamma
        Variances and covariances, same order (genes, n_theta).
    logLik
        lme4's log-likelihood (REML criterion for ``method="REML"``) (genes,).
    niter, converged, singular
        Scoring passes; convergence; some covariance block on the boundary (genes,).
    structure, method
        What was fit.
    """

    coef: np.ndarray
    se: np.ndarray
    cov: np.ndarray
    theta: np.ndarray
    sigma2: np.ndarray
    varcorr: np.ndarray
    gamma: np.ndarray
    logLik: np.ndarray
    niter: np.ndarray
    converged: np.ndarray
    singular: np.ndarray
    structure: CovarianceStructure
    method: str


class _Problem:
    """Per-gene quantities after eliminating the fixed effects, and the likelihood algebra."""

    def __init__(self, stats: SummaryStats, structure: CovarianceStructure, method: str):
        self.structure = structure
        self.n, self.p = stats.n, stats.XX.shape[0]
        self.q = stats.ZZ.shape[0]
        if structure.q != self.q:
            msg = f"The structure has q = {structure.q} random effects; the statistics {self.q}."
            raise ValueError(msg)
        XXi = np.linalg.inv(stats.XX)
        self.XXi = XXi
        ZXi = stats.ZX @ XXi
        self.zrz = stats.ZZ - ZXi @ stats.ZX.T
        self.zry = (stats.ZY - ZXi @ stats.XY).T  # (genes, q)
        self.yry = stats.Ynorm - np.sum(stats.XY * (XXi @ stats.XY), axis=0)
        self.reml = method == "REML"
        self.T = self.zrz if self.reml else np.asarray(stats.ZZ, dtype=float)
        self.n_eff = self.n - self.p if self.reml else self.n
        self.eye = np.eye(self.q)
        self.logdet_xx = np.linalg.slogdet(stats.XX)[1]
        # Index sets of each linear parameter: E_j = f_j (A B' + B A').
        self.pat = []
        for t, lo in zip(structure.terms, structure.offsets[:-1], strict=True):
            base = lo + np.arange(t.n_levels) * t.n_effects
            for a, b in t.entries:
                self.pat.append((base + a, base + b, 0.5 if a == b else 1.0))

    # ------------------------------------------------------------------ parameters

    def gamma_and_jacobian(self, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``gamma`` (g, k) and ``d gamma / d L`` (g, k, k) from absolute Cholesky entries."""
        st = self.structure
        g = L.shape[0]
        k = st.n_theta
        J = np.zeros((g, k, k))
        factors = st.cholesky_factors(L)
        gamma = st.gamma_from_blocks([F @ np.swapaxes(F, -1, -2) for F in factors])
        for t, F, lo in zip(st.terms, factors, st.theta_offsets[:-1], strict=True):
            ent = t.entries
            for i, (a, b) in enumerate(ent):
                for j, (c, d) in enumerate(ent):
                    # d (sum_e L_ae L_be) / d L_cd = [a == c] L_bd + [b == c] L_ad
                    val = np.zeros(g)
                    if a == c:
                        val = val + F[:, b, d]
                    if b == c:
                        val = val + F[:, a, d]
                    J[:, lo + i, lo + j] = val
        return gamma, J

    def dense_d(self, gamma: np.ndarray, s0: np.ndarray) -> np.ndarray:
        st = self.structure
        return st.dense_from_blocks(st.blocks_from_gamma(gamma)) / s0[:, None, None]

    def loglik(self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray) -> np.ndarray:
        """Log-likelihood (without constants) of the genes ``rows``."""
        D = self.dense_d(gamma, s0)
        zry = self.zry[rows]
        sign, logdet = np.linalg.slogdet(self.eye + D @ self.T)
        A = self.eye + D @ self.zrz if not self.reml else None
        Dz = np.einsum("gij,gj->gi", D, zry)
        if self.reml:
            a = np.linalg.solve(self.eye + D @ self.T, Dz[..., None])[..., 0]
        else:
            a = np.linalg.solve(A, Dz[..., None])[..., 0]
        quad = (self.yry[rows] - np.sum(zry * a, axis=1)) / s0
        out = -0.5 * (self.n_eff * np.log(s0) + logdet + quad)
        return np.where((sign > 0) & (s0 > 0), out, -np.inf)

    def score_information(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score and expected information in ``(gamma, s0)`` for the genes ``rows``."""
        D = self.dense_d(gamma, s0)
        zry = self.zry[rows]
        MT = np.linalg.inv(self.eye + D @ self.T)
        MQ = MT if self.reml else np.linalg.inv(self.eye + D @ self.zrz)
        W = self.T @ MT
        W = (W + np.swapaxes(W, 1, 2)) / 2
        u = np.einsum("gji,gj->gi", MQ, zry) / s0[:, None]
        a = np.einsum("gij,gj->gi", MQ, np.einsum("gij,gj->gi", D, zry))
        yvvy = (
            self.yry[rows] - 2 * np.sum(zry * a, axis=1) + np.einsum("gi,ij,gj->g", a, self.zrz, a)
        ) / s0**2
        WM = W @ MT
        k = len(self.pat)
        g = len(rows)
        dl = np.empty((g, k + 1))
        fim = np.empty((g, k + 1, k + 1))
        for j, (A, B, f) in enumerate(self.pat):
            uu = 2 * f * np.sum(u[:, A] * u[:, B], axis=1)
            trw = f * (np.sum(W[:, A, B], axis=1) + np.sum(W[:, B, A], axis=1))
            dl[:, j] = (uu - trw / s0) / 2
            fim[:, j, k] = fim[:, k, j] = (
                f * (np.sum(WM[:, A, B], axis=1) + np.sum(WM[:, B, A], axis=1)) / (2 * s0**2)
            )
            for i in range(j + 1):
                A2, B2, f2 = self.pat[i]
                tr = (
                    _pair(W, B, A2, B2, A)
                    + _pair(W, B, B2, A2, A)
                    + _pair(W, A, A2, B2, B)
                    + _pair(W, A, B2, A2, B)
                )
                fim[:, j, i] = fim[:, i, j] = f * f2 * tr / (2 * s0**2)
        tr_m = np.trace(MT, axis1=1, axis2=2)
        dl[:, k] = (yvvy - (self.n_eff - self.q + tr_m) / s0) / 2
        fim[:, k, k] = (self.n_eff - self.q + np.einsum("gij,gji->g", MT, MT)) / (2 * s0**2)
        return dl, fim

    def fixed_effects(
        self, stats: SummaryStats, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """GLS ``beta`` and its covariance at the estimates."""
        D = self.dense_d(gamma, s0)
        Wd = np.linalg.solve(self.eye + D @ stats.ZZ, D)  # (I + D ZZ)^-1 D
        WZX = Wd @ stats.ZX
        xvx = stats.XX - np.einsum("qp,gqr->gpr", stats.ZX, WZX)
        xvx = (xvx + np.swapaxes(xvx, 1, 2)) / 2
        rhs = stats.XY.T - np.einsum("gqp,qg->gp", WZX, stats.ZY)
        C = np.linalg.inv(xvx)
        coef = np.einsum("gij,gj->gi", C, rhs)
        return coef, C * s0[:, None, None]


def _pair(W: np.ndarray, x: np.ndarray, y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``sum_{l,m} W[x_l, y_m] W[u_m, v_l]`` for every gene."""
    return np.einsum("glm,gml->g", W[:, x[:, None], y[None, :]], W[:, u[:, None], v[None, :]])


def fit_structured(
    stats: SummaryStats,
    structure: CovarianceStructure,
    *,
    method: str = "REML",
    max_iter: int = 200,
    tol: float = 1e-9,
) -> StructuredFit:
    """Fit ``y = X beta + Z b + e`` with structured ``G`` for every gene.

    Parameters
    ----------
    stats
        Summary statistics; ``Z``'s columns in the order of ``structure``.
    structure
        The covariance structure of the random effects.
    method
        ``"REML"`` or ``"ML"``.
    max_iter
        Maximum Fisher-scoring passes.
    tol
        Convergence tolerance on the relative change of the parameters and of the
        log-likelihood in one pass.

    Returns
    -------
    The per-gene :class:`StructuredFit`.
    """
    method = check_method(method)
    prob = _Problem(stats, structure, method)
    st = structure
    m = prob.zry.shape[0]
    k = st.n_theta
    diag = np.array([a == b for t in st.terms for a, b in t.entries])
    diag_ix = np.flatnonzero(diag)
    # lme4's start: theta = identity (Sigma_t = s0 I), s0 = y'Ry / n'.
    s0 = np.maximum(prob.yry / prob.n_eff, 1e-300)
    L = np.where(diag, 1.0, 0.0)[None, :] * np.sqrt(s0)[:, None]
    fixed = np.zeros((m, k), dtype=bool)
    niter = np.zeros(m, dtype=np.int64)
    converged = np.zeros(m, dtype=bool)
    stall = np.zeros(m, dtype=np.int64)
    gamma, _ = prob.gamma_and_jacobian(L)
    rows_all = np.arange(m)
    ll = prob.loglik(rows_all, gamma, s0)
    active = rows_all.copy()
    for _ in range(max_iter):
        if active.size == 0:
            break
        niter[active] += 1
        La, sa = L[active], s0[active]
        gam, J = prob.gamma_and_jacobian(La)
        dl, fim = prob.score_information(active, gam, sa)
        Jf = np.zeros((len(active), k + 1, k + 1))
        Jf[:, :k, :k] = J
        Jf[:, k, k] = 1.0
        score = np.einsum("gji,gj->gi", Jf, dl)
        info = np.einsum("gji,gjl,glm->gim", Jf, fim, Jf)
        # Release a fixed (zero) Cholesky diagonal when the likelihood grows along it: start
        # it from one scoring step of its variance (1/100 of it if that overshoots). A gene
        # with a released diagonal takes no other step in this pass.
        fa = fixed[active]
        var_step = dl[:, :k] / np.diagonal(fim, axis1=1, axis2=2)[:, :k]
        grow = fa & (var_step > _RELEASE**2 * sa[:, None])
        released = np.zeros(len(active), dtype=bool)
        for shrink in (1.0, 0.01):
            cand = np.flatnonzero(grow.any(axis=1) & ~released)
            if cand.size == 0:
                break
            trial = La[cand].copy()
            g_ix = grow[cand][:, diag_ix]
            trial[:, diag_ix] = np.where(
                g_ix, np.sqrt(np.maximum(shrink * var_step[cand][:, diag_ix], 0)), trial[:, diag_ix]
            )
            tll = prob.loglik(active[cand], prob.gamma_and_jacobian(trial)[0], sa[cand])
            ok = tll > ll[active[cand]]
            La[cand[ok]] = trial[ok]
            fa[cand[ok]] &= ~grow[cand[ok]]
            released[cand[ok]] = True
        grow = grow & released[:, None]
        free = np.concatenate([~fa, np.ones((len(active), 1), dtype=bool)], axis=1)
        score = np.where(free, score, 0.0)
        info = np.where(free[:, :, None] & free[:, None, :], info, 0.0)
        info = info + np.where(free, 0.0, 1.0)[:, :, None] * np.eye(k + 1)
        delta = np.where(free & ~released[:, None], _solve(info, score), 0.0)
        # Step-halving line search on the log-likelihood.
        base = ll[active].copy()
        if released.any():
            base[released] = prob.loglik(
                active[released], prob.gamma_and_jacobian(La[released])[0], sa[released]
            )
        alpha = np.ones(len(active))
        newL, news0, newll = La.copy(), sa.copy(), base.copy()
        todo = np.arange(len(active))
        for _ in range(40):
            if todo.size == 0:
                break
            trial = La[todo] + alpha[todo, None] * delta[todo, :k]
            ts0 = sa[todo] + alpha[todo] * delta[todo, k]
            ok_s = ts0 > 0
            ts0 = np.where(ok_s, ts0, sa[todo] / 2)
            tll = prob.loglik(active[todo], prob.gamma_and_jacobian(trial)[0], ts0)
            good = ok_s & (tll >= base[todo] - 1e-15 * np.abs(base[todo]))
            newL[todo[good]], news0[todo[good]], newll[todo[good]] = (
                trial[good],
                ts0[good],
                tll[good],
            )
            todo = todo[~good]
            alpha[todo] /= 2
        # Cholesky diagonals: the sign is free (flip the column). A small diagonal whose
        # removal does not lower the likelihood becomes a fixed zero (a singular fit).
        newL = _canonical(st, newL)
        rel_diag = newL[:, diag_ix] / np.sqrt(news0)[:, None]
        for c, j in enumerate(diag_ix):
            small = (rel_diag[:, c] < _SNAP) & ~fa[:, j]
            if not small.any():
                continue
            rows = np.flatnonzero(small)
            trial = newL[rows].copy()
            trial[:, j] = 0.0
            tll = prob.loglik(active[rows], prob.gamma_and_jacobian(trial)[0], news0[rows])
            keep = tll >= newll[rows] - 1e-14 * np.abs(newll[rows])
            rows = rows[keep]
            newL[rows, j] = 0.0
            newll[rows] = tll[keep]
            fa[rows, j] = True
        fixed[active] = fa
        change = np.max(np.abs(newL - La), axis=1) / np.sqrt(news0)
        change = np.maximum(change, np.abs(news0 - sa) / news0)
        # A pass that gains nothing measurable (three in a row) also ends: the likelihood is
        # flat to rounding along what still moves (e.g. a nearly zero covariance block).
        flat = newll - ll[active] <= 1e-15 * np.maximum(np.abs(newll), 1.0)
        stall[active] = np.where(flat, stall[active] + 1, 0)
        L[active], s0[active], ll[active] = newL, news0, newll
        done = ((change < tol) | (stall[active] >= 3)) & ~grow.any(axis=1)
        converged[active[done]] = True
        active = active[~done]
    gamma, _ = prob.gamma_and_jacobian(L)
    coef, cov = prob.fixed_effects(stats, gamma, s0)
    theta = L / np.sqrt(s0)[:, None]
    ll_lme4 = ll - 0.5 * prob.n_eff * np.log(2 * np.pi)
    if prob.reml:
        ll_lme4 = ll_lme4 - 0.5 * prob.logdet_xx
    singular = np.any(np.abs(theta[:, diag_ix]) < 1e-4, axis=1)
    return StructuredFit(
        coef=coef,
        se=np.sqrt(np.diagonal(cov, axis1=1, axis2=2)),
        cov=cov,
        theta=theta,
        sigma2=s0,
        varcorr=st.varcorr(theta, s0),
        gamma=gamma,
        logLik=ll_lme4,
        niter=niter,
        converged=converged,
        singular=singular,
        structure=st,
        method=method,
    )


def _solve(info: np.ndarray, score: np.ndarray) -> np.ndarray:
    """``pinv(info) score`` per gene (information may be singular at the boundary)."""
    return np.einsum("gij,gj->gi", np.linalg.pinv(info, hermitian=True), score)


def _canonical(st: CovarianceStructure, L: np.ndarray) -> np.ndarray:
    """Flip Cholesky columns so that every diagonal is ``>= 0`` (``L L'`` is unchanged)."""
    L = L.copy()
    for t, lo in zip(st.terms, st.theta_offsets[:-1], strict=True):
        ent = t.entries
        for c in range(t.n_effects):
            idx = [lo + i for i, (a, b) in enumerate(ent) if b == c]
            dpos = lo + ent.index((c, c))
            sign = np.where(L[:, dpos] < 0, -1.0, 1.0)
            L[:, idx] *= sign[:, None]
    return L


# --------------------------------------------------------------------------- large q (sparse)


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
