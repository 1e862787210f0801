"""REML / ML over nonnegative variance components (as lme4), batched over genes.

See docs/model.md, Nonnegative variance components. FLASHMM's Fisher scoring is
unconstrained: a component ``s_i`` (``i = 1 .. k``) may end below zero. lme4 maximises the same
restricted (or full) likelihood over ``s_i >= 0`` and reports a *singular fit* when a component
ends exactly at 0. This driver does the same with any kernel that evaluates, for a block of
genes and variances ``s = (s_1 .. s_k, s_0)`` (residual last),

- ``score_information(state, s) -> (dl, fim)``: the score and Fisher information in ``s``;
- ``residual_variance(state, s)``: ``s0_hat(r)``, the residual variance that maximises the
  likelihood for the ratios ``r_i = s_i / s_0`` of ``s``;
- ``logdet(state, s)``: ``log det M0(r)``, the ratio-dependent log-determinant of the kernel.

The likelihood profiled over ``s_0`` at fixed ``r`` is, up to a constant,
``l(r) = -(n_res / 2) log s0_hat(r) + logdet(r) / 2`` (``n_res = n - p`` for REML, ``n`` for ML);
at ``s_0 = s0_hat(r)`` the solver's ``logLik`` is ``-(n_res/2)(1 + log(2 pi s0_hat)) + logdet/2``.

Projected Fisher scoring with an active set, per gene and iteration:

1. ``s`` is kept profiled (``s_0 = s0_hat(r)``, ``s_i = r_i s_0``); components start at
   ``max(s_i, 0)``.
2. The bound set is ``{i : s_i = 0 and dl_i <= 0}``: a component at 0 whose score points below 0.
   The gene has converged when ``max |dl_i|`` over the other (free) parameters is ``<= epsilon``;
   by construction the bound ones satisfy the KKT condition ``dl_i <= 0``.
3. Otherwise the Fisher step is taken in the free parameters only (``fim_FF delta_F = dl_F``,
   ``delta_B = 0``); the new components are projected onto ``s_i >= 0`` (a component that steps
   below 0 lands at exactly 0), ``s`` is profiled again, and the step is halved until ``l(r)``
   does not decrease.

A component left within ``1e-12 s_0`` of 0 by step halving, with its score pointing below 0, is
set to exactly 0 (otherwise projected steps approach 0 only geometrically). A gene whose step
cannot increase ``l`` after ``max_halvings`` halvings stops where it is (its score then tells
whether it converged). The singular flag is ``any(s_i == 0)`` over components.
"""

from __future__ import annotations

import numpy as np

from .kernels.base import GeneState, Kernel

#: Relative slack on the objective when accepting a step (rounding of ``l`` near the optimum).
_OBJECTIVE_RTOL = 1e-12

#: A component with ``s_i <= _SNAP_RTOL * s_0`` whose score points below 0 is set to exactly 0.
_SNAP_RTOL = 1e-12


def fisher_scoring_nonnegative(
    kernel: Kernel,
    state: GeneState,
    s: np.ndarray,
    max_iter: int,
    epsilon: float,
    *,
    n_res: int | None = None,
    max_halvings: int = 30,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximise REML/ML over variance components ``>= 0`` for a block of genes.

    Parameters
    ----------
    kernel
        Evaluates score, information, profiled residual variance and log-determinant.
    state
        The kernel's per-gene state for this block (arrays with genes first).
    s
        Start values (genes, k + 1), components first, residual last (positive).
    max_iter
        Maximum number of Fisher-scoring passes.
    epsilon
        Convergence tolerance on the largest absolute score of the free parameters.
    n_res
        ``n - p`` (REML) or ``n`` (ML); default ``kernel.n - kernel.pres``.
    max_halvings
        Step halvings tried before a gene stops.

    Returns
    -------
    The profiled estimates (genes, k + 1), the passes per gene, and the singular flag (any
    component exactly 0).
    """
    if n_res is None:
        n_res = kernel.n - kernel.pres  # type: ignore[attr-defined]
    s = np.array(s, dtype=np.float64, copy=True)
    k = s.shape[1] - 1
    s[:, :k] = np.maximum(s[:, :k], 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = _profile(kernel, state, s)
        obj = profiled_loglik(kernel, state, s, n_res)
        niter = np.zeros(s.shape[0], dtype=np.int64)
        active = np.flatnonzero(np.isfinite(obj))
        for _ in range(max_iter):
            if active.size == 0:
                break
            sub = kernel.subset(state, active)
            sa = s[active]
            dl, fim = kernel.score_information(sub, sa)
            # a component that halving has left within rounding of 0 while its score points
            # below 0 is put at exactly 0 (projected steps would only approach 0 geometrically)
            snap = (sa[:, :k] > 0) & (sa[:, :k] <= _SNAP_RTOL * sa[:, k:]) & (dl[:, :k] <= 0)
            rows = np.flatnonzero(snap.any(axis=1))
            if rows.size:
                snapped = sa[rows]
                snapped[:, :k][snap[rows]] = 0.0
                part = kernel.subset(sub, rows)
                sa[rows] = _profile(kernel, part, snapped)
                s[active[rows]] = sa[rows]
                obj[active[rows]] = profiled_loglik(kernel, part, sa[rows], n_res)
                dl[rows], fim[rows] = kernel.score_information(part, sa[rows])
            niter[active] += 1  # as FLASHMM: the pass that finds convergence counts
            bound = _bound(dl, sa)
            free_dl = np.where(bound, 0.0, dl)
            moving = ~(np.max(np.abs(free_dl), axis=1) <= epsilon) & np.isfinite(dl).all(axis=1)
            active, sa, fim, free_dl, bound = (
                active[moving],
                sa[moving],
                fim[moving],
                free_dl[moving],
                bound[moving],
            )
            if active.size == 0:
                break
            sub = kernel.subset(state, active)
            delta = _free_step(fim, free_dl, bound)
            s_new, obj_new, accepted = _line_search(
                kernel, sub, sa, delta, obj[active], n_res, max_halvings
            )
            s[active[accepted]] = s_new[accepted]
            obj[active[accepted]] = obj_new[accepted]
            active = active[accepted]  # a gene whose step cannot improve l stops
    singular = np.any(s[:, :k] == 0, axis=1)
    return s, niter, singular


def kkt_score(dl: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Return the score with the bound components (``s_i = 0`` and ``dl_i <= 0``) set to 0.

    Its largest absolute value is the convergence criterion of the nonnegative fit (the KKT
    conditions hold when it is 0).
    """
    return np.where(_bound(dl, s), 0.0, dl)


def _bound(dl: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Components at 0 whose score points below 0 (genes, k + 1; the residual is never bound)."""
    k = s.shape[1] - 1
    bound = np.zeros(dl.shape, dtype=bool)
    bound[:, :k] = (s[:, :k] <= 0) & (dl[:, :k] <= 0)
    return bound


def profiled_loglik(kernel: Kernel, state: GeneState, s: np.ndarray, n_res: int) -> np.ndarray:
    """Return the solver's ``logLik`` at ``s_0 = s0_hat(r)``.

    ``-(n_res / 2)(1 + log(2 pi s0_hat)) + logdet / 2``, a function of the ratios
    ``r_i = s_i / s_0`` of ``s`` only.
    """
    s0 = kernel.residual_variance(state, s)
    return -n_res * (1 + np.log(2 * np.pi * s0)) / 2 + kernel.logdet(state, s) / 2


def _profile(kernel: Kernel, state: GeneState, s: np.ndarray) -> np.ndarray:
    """``s_0 = s0_hat(r)`` and ``s_i = r_i s_0`` at the ratios ``r`` of ``s``."""
    k = s.shape[1] - 1
    s0 = kernel.residual_variance(state, s)
    out = np.empty_like(s)
    out[:, :k] = s[:, :k] / s[:, k : k + 1] * s0[:, None]
    out[:, k] = s0
    return out


def _free_step(fim: np.ndarray, dl: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Fisher step in the free parameters: ``fim_FF delta_F = dl_F``, ``delta_B = 0``."""
    F = np.where(bound[:, :, None] | bound[:, None, :], 0.0, fim)
    idx = np.arange(fim.shape[1])
    F[:, idx, idx] = np.where(bound, 1.0, F[:, idx, idx])
    rhs = np.where(bound, 0.0, dl)
    return np.einsum("gij,gj->gi", np.linalg.pinv(F, hermitian=True), rhs)


def _line_search(
    kernel: Kernel,
    state: GeneState,
    s: np.ndarray,
    delta: np.ndarray,
    obj: np.ndarray,
    n_res: int,
    max_halvings: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projected step ``max(s + t delta, 0)``, profiled; ``t`` halved until ``l`` does not drop."""
    k = s.shape[1] - 1
    out = s.copy()
    out_obj = obj.copy()
    accepted = np.zeros(s.shape[0], dtype=bool)
    t = 1.0
    todo = np.arange(s.shape[0])
    for _ in range(max_halvings + 1):
        cand = s[todo] + t * delta[todo]
        cand[:, :k] = np.maximum(cand[:, :k], 0)
        ok = cand[:, k] > 0
        sub = kernel.subset(state, todo)
        cand = _profile(kernel, sub, np.where(ok[:, None], cand, s[todo]))
        new = profiled_loglik(kernel, sub, cand, n_res)
        good = (
            ok & np.isfinite(new) & (new >= obj[todo] - _OBJECTIVE_RTOL * (1 + np.abs(obj[todo])))
        )
        out[todo[good]] = cand[good]
        out_obj[todo[good]] = new[good]
        accepted[todo[good]] = True
        todo = todo[~good]
        if todo.size == 0:
            break
        t /= 2
    return out, out_obj, accepted
