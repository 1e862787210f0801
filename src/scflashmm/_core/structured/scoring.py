"""Fisher scoring on lme4's Cholesky parameterisation, every gene at once.

See :mod:`scflashmm._core.structured` for the model and the notation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._options import check_method
from ..stats import SummaryStats
from ..structure import CovarianceStructure
from .block import _BlockProblem, zz_blocks
from .problem import _Problem
from .schur import _SchurProblem, schur_term

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


def make_problem(
    stats: SummaryStats, structure: CovarianceStructure, method: str, kernel: str = "auto"
) -> _Problem:
    """Return the likelihood algebra of a structure.

    The Schur problem for a large scalar term (:func:`.schur.schur_term`; ``kernel``
    ``"auto"``, ``"dense"`` or ``"schur"``), else the block problem when ``Z'Z`` splits into
    small blocks, else the dense one.
    """
    term = schur_term(stats, structure, kernel)
    if term is not None:
        return _SchurProblem(stats, structure, method, term)
    labels = zz_blocks(stats, structure)
    if labels is not None:
        return _BlockProblem(stats, structure, method, labels)
    return _Problem(stats, structure, method)


def fit_structured(
    stats: SummaryStats,
    structure: CovarianceStructure,
    *,
    method: str = "REML",
    max_iter: int = 200,
    tol: float = 1e-9,
    kernel: str = "auto",
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
    kernel
        ``"auto"``, ``"dense"`` or ``"schur"`` (:func:`make_problem`).

    Returns
    -------
    The per-gene :class:`StructuredFit`.
    """
    method = check_method(method)
    prob = make_problem(stats, structure, method, kernel)
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
