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
from .nested import _NestedProblem, nested_levels
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


@dataclass(frozen=True, eq=False)
class Algebra:
    """The likelihood algebra a structure is fit with, decided once per fit from ``Z'Z``.

    ``kind`` is ``"nested"`` (closed forms for ``(1 | a) + (1 | a:b)``), ``"block"``
    (block-diagonal ``Z'Z``, ``labels`` its blocks), ``"schur"`` (the scalar ``term``
    eliminated by a Schur complement) or ``"dense"``.
    """

    kind: str
    labels: np.ndarray | None = None
    term: int | None = None
    nested: tuple[int, np.ndarray] | None = None


def choose_algebra(
    stats: SummaryStats, structure: CovarianceStructure, kernel: str = "auto"
) -> Algebra:
    """Pick the algebra: nested closed forms, Schur, block-diagonal or dense, in that order.

    ``kernel`` is ``"auto"``, ``"dense"`` (no Schur complement) or ``"schur"`` (required;
    :func:`.schur.schur_term`).
    """
    labels = None if kernel == "schur" else zz_blocks(stats, structure)
    if labels is not None:
        nested = nested_levels(stats, structure, labels)
        if nested is not None:
            return Algebra("nested", labels=labels, nested=nested)
    term = schur_term(stats, structure, kernel)
    if term is not None:
        return Algebra("schur", term=term)
    if labels is not None:
        return Algebra("block", labels=labels)
    return Algebra("dense")


def make_problem(
    stats: SummaryStats,
    structure: CovarianceStructure,
    method: str,
    algebra: Algebra | None = None,
) -> _Problem:
    """Return the likelihood algebra for ``stats`` (default: :func:`choose_algebra`'s)."""
    a = choose_algebra(stats, structure) if algebra is None else algebra
    if a.kind == "nested" and a.nested is not None:
        return _NestedProblem(stats, structure, method, *a.nested)
    if a.kind == "schur" and a.term is not None:
        return _SchurProblem(stats, structure, method, a.term)
    if a.kind == "block" and a.labels is not None:
        return _BlockProblem(stats, structure, method, a.labels)
    return _Problem(stats, structure, method)


def fit_structured(
    stats: SummaryStats,
    structure: CovarianceStructure,
    *,
    method: str = "REML",
    max_iter: int = 200,
    tol: float = 1e-9,
    problem: _Problem | None = None,
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
    problem
        The likelihood algebra of ``stats`` (default: :func:`make_problem`'s), built by the
        caller when it also needs it after the fit.

    Returns
    -------
    The per-gene :class:`StructuredFit`.
    """
    method = check_method(method)
    prob = make_problem(stats, structure, method) if problem is None else problem
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
    # The score and information at the current point are kept from the line search's first
    # (full) step, which is usually accepted: one factorisation per pass.
    ll, dl_at, fim_at = prob.loglik_score(rows_all, gamma, s0)
    L, s0, ll = _linear_start(prob, L, s0, ll, gamma, dl_at, fim_at)
    fresh = np.ones(m, dtype=bool)
    active = rows_all.copy()
    for _ in range(max_iter):
        if active.size == 0:
            break
        niter[active] += 1
        La, sa = L[active], s0[active]
        gam, J = prob.gamma_and_jacobian(La)
        st_ix = np.flatnonzero(~fresh[active])
        if st_ix.size:
            stale = active[st_ix]
            _, dl_at[stale], fim_at[stale] = prob.loglik_score(stale, gam[st_ix], sa[st_ix])
        dl, fim = dl_at[active], fim_at[active]
        Jf = np.zeros((len(active), k + 1, k + 1))
        Jf[:, :k, :k] = J
        Jf[:, k, k] = 1.0
        score = np.einsum("gji,gj->gi", Jf, dl)
        info = np.swapaxes(Jf, 1, 2) @ fim @ Jf
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
        fresh[active] = False
        # A full step below the tolerance ends the fit: no score is needed after it.
        s_end = sa + delta[:, k]
        last = (np.max(np.abs(delta[:, :k]), axis=1, initial=0) < tol * np.sqrt(np.abs(s_end))) & (
            np.abs(delta[:, k]) < tol * s_end
        )
        for halving in range(40):
            if todo.size == 0:
                break
            trial = La[todo] + alpha[todo, None] * delta[todo, :k]
            ts0 = sa[todo] + alpha[todo] * delta[todo, k]
            ok_s = ts0 > 0
            ts0 = np.where(ok_s, ts0, sa[todo] / 2)
            tgam = prob.gamma_and_jacobian(trial)[0]
            if halving == 0:  # todo is every active gene
                tll = np.empty(todo.size)
                fin, sc = np.flatnonzero(last), np.flatnonzero(~last)
                if fin.size:
                    tll[fin] = prob.loglik(active[fin], tgam[fin], ts0[fin])
                if sc.size:
                    tll[sc], tdl, tfim = prob.loglik_score(active[sc], tgam[sc], ts0[sc])
            else:
                tll = prob.loglik(active[todo], tgam, ts0)
            good = ok_s & (tll >= base[todo] - 1e-15 * np.abs(base[todo]))
            if halving == 0 and sc.size:
                kept = good[sc]
                rows = active[sc[kept]]
                dl_at[rows], fim_at[rows], fresh[rows] = tdl[kept], tfim[kept], True
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
            fresh[active[rows]] = False
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


def _linear_start(
    prob: _Problem,
    L: np.ndarray,
    s0: np.ndarray,
    ll: np.ndarray,
    gamma: np.ndarray,
    dl: np.ndarray,
    fim: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Fisher step in the linear parameters ``(gamma, s0)`` from lme4's start.

    The Cholesky parameterisation is far from linear at lme4's start; the step in ``gamma``
    (iterated MINQUE's first step) lands much closer. Each ``Sigma_t`` is made positive
    definite (eigenvalues at least ``1e-4 s0``); the step is kept where it raises the
    likelihood. ``dl`` and ``fim`` (the score and information at the start) are updated in
    place for the genes that move.
    """
    st = prob.structure
    k = st.n_theta
    par = np.column_stack([gamma, s0]) + _solve(fim, dl)
    s0c = par[:, k]
    ok = np.flatnonzero(np.isfinite(s0c) & (s0c > 0) & np.all(np.isfinite(par), axis=1))
    if ok.size == 0:
        return L, s0, ll
    s0c = s0c[ok]
    blocks = []
    for B in st.blocks_from_gamma(par[ok, :k]):
        w, v = np.linalg.eigh(B)
        w = np.maximum(w, 1e-4 * s0c[:, None])
        blocks.append((v * w[:, None, :]) @ np.swapaxes(v, -1, -2))
    Lc = st.theta_from_gamma(st.gamma_from_blocks(blocks), s0c) * np.sqrt(s0c)[:, None]
    gc = prob.gamma_and_jacobian(Lc)[0]
    llc, dlc, fimc = prob.loglik_score(ok, gc, s0c)
    up = llc > ll[ok]
    rows = ok[up]
    L, s0, ll = L.copy(), s0.copy(), ll.copy()
    L[rows], s0[rows], ll[rows] = Lc[up], s0c[up], llc[up]
    dl[rows], fim[rows] = dlc[up], fimc[up]
    return L, s0, ll


def _solve(info: np.ndarray, score: np.ndarray) -> np.ndarray:
    """``info^-1 score`` per gene; ``pinv`` where the information is singular (boundary)."""
    try:
        out = np.linalg.solve(info, score[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.full_like(score, np.nan)
    bad = ~np.all(np.isfinite(out), axis=1)
    if bad.any():
        out[bad] = np.einsum("gij,gj->gi", np.linalg.pinv(info[bad], hermitian=True), score[bad])
    return out


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
