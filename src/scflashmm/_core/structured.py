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

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._options import check_choice, check_df, check_method
from .fit import LMMFit
from .inference import t_pvalue
from .satterthwaite import inverse_information
from .stats import SummaryStats
from .structure import CovarianceStructure

__all__ = [
    "StructuredFit",
    "StructuredLMMFit",
    "fit_structured",
    "fit_structured_sparse",
    "lmm_structured",
]

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


def make_problem(stats: SummaryStats, structure: CovarianceStructure, method: str) -> _Problem:
    """Return the block problem when ``Z'Z`` splits into small blocks, else the dense one."""
    labels = zz_blocks(stats, structure)
    if labels is None:
        return _Problem(stats, structure, method)
    return _BlockProblem(stats, structure, method, labels)


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
    prob = make_problem(stats, structure, method)
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


# --------------------------------------------------------------------------- driver for lmm

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
    from ._threads import check_n_jobs, ordered_map, single_threaded_blas
    from .fit import (
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
    reduced = reduce_fixed_effects(stats, covariates)
    genes = _select_fittable(stats.Ynorm, reduced.yry, features)
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


#: Largest block of ``Z'Z`` (after grouping its columns into connected blocks) for which the
#: block solver is used instead of dense q x q algebra.
BLOCK_MAX = 48


def zz_blocks(stats: SummaryStats, structure: CovarianceStructure) -> np.ndarray | None:
    """Label of the block of each column of ``Z``, or None when ``Z'Z`` is one big block.

    Columns are joined when ``Z'Z`` or a covariance parameter couples them (e.g. the donors of
    ``(1 + x | donor)``, or a donor with its cell types in ``(1 | donor) + (1 | donor:ct)``).
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    q = structure.q
    adj = sp.coo_matrix(np.asarray(stats.ZZ) != 0)
    rows, cols = [adj.row], [adj.col]
    for t, lo in zip(structure.terms, structure.offsets[:-1], strict=True):
        base = lo + np.arange(t.n_levels) * t.n_effects
        for a, b in t.entries:
            rows.append(base + a)
            cols.append(base + b)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sp.coo_matrix((np.ones(r.size), (r, c)), shape=(q, q))
    n_blocks, labels = connected_components(graph, directed=False)
    if n_blocks < 2 or np.bincount(labels).max() > BLOCK_MAX:
        return None
    return labels


class _BlockProblem(_Problem):
    """:class:`_Problem` for a block-diagonal ``Z'Z`` (random effects nested in one factor).

    ``I + D Z'Z`` is block-diagonal, so ``V^-1`` follows from ``L`` small ``b x b`` solves
    and the fixed effects enter by a rank-``p`` correction (``X'V^-1X = (X'X - H) / s0``):
    ``O(L b^3 + q p^2 + p^3)`` per gene instead of ``O(q^3)``. The score and information are
    those of :class:`_Problem` (``tr(E_j Q)``, ``tr(E_j Q E_k Q)`` with ``Q = Z'PZ``, or
    ``Z'V^-1Z`` for ML, written as block-diagonal minus rank ``p``); the residual variance's
    entries follow from ``V`` being homogeneous of degree one in the parameters
    (``sum_i theta_i P V_i P = P``).
    """

    def __init__(
        self,
        stats: SummaryStats,
        structure: CovarianceStructure,
        method: str,
        labels: np.ndarray,
    ):
        self.structure = structure
        self.n, self.p = stats.n, stats.XX.shape[0]
        self.q = structure.q
        if stats.ZZ.shape[0] != self.q:
            msg = f"The structure has q = {self.q}; the statistics {stats.ZZ.shape[0]}."
            raise ValueError(msg)
        self.reml = method == "REML"
        self.n_eff = self.n - self.p if self.reml else self.n
        self.XX = np.asarray(stats.XX, dtype=float)
        self.logdet_xx = np.linalg.slogdet(self.XX)[1]
        XXi = np.linalg.inv(self.XX)
        self.yry = stats.Ynorm - np.sum(stats.XY * (XXi @ stats.XY), axis=0)
        n_blocks = int(labels.max()) + 1
        sizes = np.bincount(labels, minlength=n_blocks)
        b = int(sizes.max())
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        pos = np.empty(self.q, dtype=np.int64)
        pos[order] = np.arange(self.q) - np.repeat(starts, sizes)
        idx = np.full((n_blocks, b), self.q)  # padding points at a zero column
        idx[labels, pos] = np.arange(self.q)
        zz = np.zeros((self.q + 1, self.q + 1))
        zz[: self.q, : self.q] = stats.ZZ
        self.B = zz[idx[:, :, None], idx[:, None, :]]  # (L, b, b)
        zx = np.vstack([stats.ZX, np.zeros((1, self.p))])
        self.K = zx[idx]  # (L, b, p)
        zy = np.vstack([stats.ZY, np.zeros((1, stats.ZY.shape[1]))])
        self.zy = np.moveaxis(zy[idx], -1, 0)  # (genes, L, b)
        self.xy = stats.XY.T
        self.yy = stats.Ynorm
        self.zry = self.zy  # (only its length is used outside)
        E = []
        for t, lo in zip(structure.terms, structure.offsets[:-1], strict=True):
            base = lo + np.arange(t.n_levels) * t.n_effects
            for a, c in t.entries:
                Ej = np.zeros((n_blocks, b, b))
                A, C = base + a, base + c
                Ej[labels[A], pos[A], pos[C]] = 1.0
                Ej[labels[A], pos[C], pos[A]] = 1.0
                E.append(Ej)
        self.E = np.stack(E)  # (k, L, b, b)
        self.eye_b = np.eye(b)

    def _core(self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray) -> dict[str, np.ndarray]:
        D = ((gamma / s0[:, None]) @ self.E.reshape(self.E.shape[0], -1)).reshape(-1, *self.B.shape)
        A = self.eye_b + D @ self.B
        sign, lda, Ainv = _inv_logdet(A)
        S = Ainv @ D
        S = (S + np.swapaxes(S, -1, -2)) / 2
        SK = S @ self.K
        Kf = self.K.reshape(-1, self.p)
        H = Kf.T @ SK.reshape(SK.shape[0], -1, self.p)
        XH = self.XX - H
        XH = (XH + np.swapaxes(XH, 1, 2)) / 2
        zy = self.zy[rows]
        Szy = (S @ zy[..., None])[..., 0]
        xvy = self.xy[rows] - Szy.reshape(len(rows), -1) @ Kf
        yvy = self.yy[rows] - np.sum((zy * Szy).reshape(len(rows), -1), axis=1)
        XHi = np.linalg.inv(XH)
        beta = np.einsum("gpr,gr->gp", XHi, xvy)
        quad = yvy - np.sum(xvy * beta, axis=1)
        logdet = lda.sum(axis=1)
        ok = np.all(sign > 0, axis=1)
        if self.reml:
            sx, lx = np.linalg.slogdet(XH)
            logdet = logdet + lx - self.logdet_xx
            ok &= sx > 0
        return {
            "S": S, "SK": SK, "XHi": XHi, "beta": beta, "quad": quad, "logdet": logdet, "ok": ok
        }  # fmt: skip

    def loglik(self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray) -> np.ndarray:
        """Log-likelihood (without constants) of the genes ``rows``."""
        c = self._core(rows, gamma, s0)
        out = -0.5 * (self.n_eff * np.log(s0) + c["logdet"] + c["quad"] / s0)
        return np.where(c["ok"] & (s0 > 0), out, -np.inf)

    def score_information(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score and expected information in ``(gamma, s0)`` for the genes ``rows``."""
        c = self._core(rows, gamma, s0)
        S, B, K, E = c["S"], self.B, self.K, self.E
        s = s0[:, None, None, None]
        r = self.zy[rows] - (K @ c["beta"][:, None, :, None])[..., 0]
        u = (r - (B @ (S @ r[..., None]))[..., 0]) / s0[:, None, None]
        Qb = (B - B @ S @ B) / s
        Qb = (Qb + np.swapaxes(Qb, -1, -2)) / 2
        J = (K - B @ c["SK"]) / s  # Z'V^-1X (g, L, b, p)
        phi = c["XHi"] * s0[:, None, None]  # (X'V^-1X)^-1
        k = E.shape[0]
        g = len(rows)
        EQ = E[None] @ Qb[:, None]  # (g, k, L, b, b)
        EJ = E[None] @ J[:, None]  # (g, k, L, b, p)
        Eu = (E[None] @ u[:, None, :, :, None])[..., 0]
        uu = np.sum((Eu * u[:, None]).reshape(g, k, -1), axis=2)
        tq = np.trace(EQ, axis1=-2, axis2=-1).sum(axis=-1)
        fim = np.empty((g, k + 1, k + 1))
        EQt = np.swapaxes(EQ, -1, -2).reshape(g, k, -1)
        fq = EQ.reshape(g, k, -1) @ np.swapaxes(EQt, 1, 2)
        if self.reml:
            p = self.p
            EJf = EJ.reshape(g, k, -1, p)
            JEJ = np.swapaxes(J.reshape(g, -1, p), 1, 2)[:, None] @ EJf  # J' E_j J
            tq = tq - np.einsum("gpr,gjrp->gj", phi, JEJ)
            QEJ = (Qb[:, None] @ EJ).reshape(g, k, -1, p)
            mid = np.swapaxes(EJf, -1, -2)[:, :, None] @ QEJ[:, None]  # J' E_j Qb E_k J
            PJ = np.einsum("gpr,gjrs->gjps", phi, JEJ)
            fq = (
                fq - 2 * np.einsum("gpr,gjkrp->gjk", phi, mid) + np.einsum("gjps,gksp->gjk", PJ, PJ)
            )
        fjk = fq / 2
        fim[:, :k, :k] = (fjk + np.swapaxes(fjk, 1, 2)) / 2
        dl = np.empty((g, k + 1))
        dl[:, :k] = (uu - tq) / 2
        # homogeneity: sum_i theta_i P V_i P = P gives the residual variance's entries
        yvvy = (c["quad"] / s0 - np.sum(gamma * uu, axis=1)) / s0
        trp = (self.n_eff - np.sum(gamma * tq, axis=1)) / s0
        dl[:, k] = (yvvy - trp) / 2
        fs = (tq / 2 - np.einsum("gk,gjk->gj", gamma, fim[:, :k, :k])) / s0[:, None]
        fim[:, :k, k] = fim[:, k, :k] = fs
        fim[:, k, k] = (trp / 2 - np.sum(gamma * fs, axis=1)) / s0
        return dl, fim

    def fixed_effects(
        self, stats: SummaryStats, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """GLS ``beta`` and its covariance at the estimates."""
        c = self._core(np.arange(gamma.shape[0]), gamma, s0)
        return c["beta"], c["XHi"] * s0[:, None, None]


def _inv_logdet(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sign and log of ``|det A|``, and ``A^-1``, of a stack of small matrices.

    Closed forms for 1 x 1 and 2 x 2 (the random-slope blocks; LAPACK's per-matrix overhead
    dominates there), LAPACK otherwise.
    """
    b = A.shape[-1]
    if b == 1:
        det = A[..., 0, 0]
        inv = 1 / np.where(det == 0, 1.0, det)[..., None, None]
    elif b == 2:
        det = A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
        safe = np.where(det == 0, 1.0, det)
        inv = np.empty_like(A)
        inv[..., 0, 0] = A[..., 1, 1] / safe
        inv[..., 1, 1] = A[..., 0, 0] / safe
        inv[..., 0, 1] = -A[..., 0, 1] / safe
        inv[..., 1, 0] = -A[..., 1, 0] / safe
    else:
        sign, logdet = np.linalg.slogdet(A)
        return sign, logdet, np.linalg.inv(A)
    with np.errstate(divide="ignore"):
        return np.sign(det), np.log(np.abs(det)), inv
