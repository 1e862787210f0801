"""Satterthwaite degrees of freedom for t tests of fixed effects, from summary statistics alone.

For a contrast ``c`` of the fixed effects, ``var(c'beta) = c' C(theta) c`` with
``C = (X' V^-1 X)^-1``. Satterthwaite's approximation, as lmerTest computes it, is

    df = 2 (c'Cc)^2 / (g' A g),   g_j = c' (dC/dtheta_j) c,

with ``A`` the asymptotic covariance of ``theta`` from the observed information (minus the
Hessian of the REML, or profiled ML, log-likelihood) at the estimate. At a stationary point
``g'Ag`` does not depend on how ``theta`` is parameterised, so lmerTest's numbers (computed on
the scale of relative standard deviations) are reproduced with the variances used here.

Notation as in docs/model.md (Satterthwaite degrees of freedom): ``V = s0 (I + Z D Z')``,
``D = diag(r_i repeated q_i)``, ``r_i = s_i/s0``, ``R = I - X (X'X)^-1 X'``,
``M = (D zrz + I)^-1``, ``V_j = dV/dtheta_j`` (``Z_j Z_j'`` for a component, ``I`` for the
residual). Within the span of ``R`` (Woodbury)

    P = V^-1 - V^-1 X C X' V^-1 = (R - R Z M D Z' R) / s0,   e = P y,

so that ``Z'e = u / s0`` with ``u = M' zry``, ``Z'PZ = zrz M / s0``, ``Z'Pe = M'u / s0^2`` and
``e'e = yR2y / s0^2`` (the solver's ``yR2y``). With ``l = -(log|V| [+ log|X'V^-1X|] + y'Py)/2``
(the bracket for REML; ML has beta profiled out, which gives the same ``y'Py``)

    -d2l / dtheta_i dtheta_j = e' V_i P V_j e - tr(P~ V_i P~ V_j) / 2,   P~ = P (REML), V^-1 (ML).

The trace term is the Fisher information the solver already has. The quadratic term is

    components i, j:       u_i' (zrz M)[I_i, I_j] u_j / s0^3
    component i, residual: u_i' (M'u)[I_i] / s0^3
    residual, residual:    e'Pe = (yR2y - u' M D u) / s0^3.

The derivatives of ``C`` are ``dC/dtheta_j = C (X'V^-1 V_j V^-1 X) C``. With
``N = (D ZZ + I)^-1`` (Woodbury), ``X'V^-1 Z = ZX' N / s0 =: G`` and, for a component,
``X'V^-1 Z_i Z_i' V^-1 X = G_i G_i'``. ``V = sum_j theta_j V_j``, so
``sum_j theta_j dC/dtheta_j = C`` gives the residual's derivative (and its ``g_0``) from the
components' without ``X'V^-2X``. The fit keeps only ``d(X'V^-1X)/ds_i = -G_i G_i'``
(genes, k, p, p); from it the gradient of ``c'Cc`` is ``g_i = (Cc)' G_i G_i' (Cc)``.

The quadratic term and ``d(X'V^-1X)/ds_i`` depend on how a kernel represents ``V``: each kernel
computes them (``Kernel.satterthwaite_parts``, beside its score). This module holds what is
generic: the inverse of the observed information, ``dC/dtheta`` and the df of coefficients and
contrasts.
"""

from __future__ import annotations

import numpy as np

#: Eigenvalues of the observed information at most this fraction of the largest are dropped
#: from its inverse (lmerTest inverts the positive part of the Hessian the same way).
_EIGEN_RTOL = 1e-10


# --------------------------------------------------------------------------- observed information


def inverse_information(observed: np.ndarray, fixed: np.ndarray | None = None) -> np.ndarray:
    """Covariance of theta: the inverse of the observed information over its positive eigenvalues.

    As lmerTest, directions with non-positive curvature (the estimate is not a strict maximum
    there) are left out rather than inverted. Parameters flagged in ``fixed`` (genes, k + 1),
    e.g. components at the boundary, are held fixed: their rows and columns are 0. Genes with
    a non-finite information get NaN.
    """
    observed = (observed + observed.transpose(0, 2, 1)) / 2
    if fixed is not None:
        free = ~fixed
        observed = observed * (free[:, :, None] & free[:, None, :])
    out = np.full_like(observed, np.nan)
    finite = np.isfinite(observed).all(axis=(1, 2))
    vals, vecs = np.linalg.eigh(observed[finite])
    keep = vals > _EIGEN_RTOL * np.abs(vals).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(keep, 1 / np.where(keep, vals, 1), 0.0)
    out[finite] = np.einsum("gik,gk,gjk->gij", vecs, inv, vecs)
    return out


# --------------------------------------------------------------------------- derivatives of C


def covariance_jacobian(cov: np.ndarray, dfim: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``dC/dtheta_j`` (genes, k + 1, p, p) from ``C`` (genes, p, p) and ``d(X'V^-1X)/ds_i``.

    For a component ``dC/ds_i = -C (d(X'V^-1X)/ds_i) C``. ``V`` is linear and homogeneous in
    theta, so ``sum_j theta_j dC/dtheta_j = C``: that gives the residual's derivative without
    forming ``X'V^-2X``.
    """
    comp = -cov[:, None] @ dfim @ cov[:, None]
    comp = (comp + comp.transpose(0, 1, 3, 2)) / 2
    resid = (cov - np.einsum("gj,gjpr->gpr", theta[:, :-1], comp)) / theta[:, -1, None, None]
    return np.concatenate([comp, resid[:, None]], axis=1)


# --------------------------------------------------------------------------- degrees of freedom


def coefficient_df(
    cov: np.ndarray, dfim: np.ndarray, theta: np.ndarray, vcov_theta: np.ndarray
) -> np.ndarray:
    """Satterthwaite df of every coefficient (genes, p).

    From ``C`` (genes, p, p), ``d(X'V^-1X)/ds_i`` (genes, k, p, p), theta (genes, k + 1) and the
    covariance of theta (genes, k + 1, k + 1); only the diagonals of ``dC/dtheta_j`` are formed.
    """
    var = np.diagonal(cov, axis1=1, axis2=2)
    grad = -np.einsum("gjab,gba->gja", cov[:, None] @ dfim, cov)  # diag of -C dfim_i C
    return _df(var, _with_residual(var, grad, theta), vcov_theta)


def contrast_df(
    cov: np.ndarray,
    dfim: np.ndarray,
    theta: np.ndarray,
    vcov_theta: np.ndarray,
    contrast: np.ndarray,
) -> np.ndarray:
    """Satterthwaite df of contrasts (genes, c).

    ``contrast`` is (p, c), the other arguments as for :func:`coefficient_df`.
    """
    w = cov @ contrast  # C c, (genes, p, c)
    var = np.einsum("pc,gpc->gc", contrast, w)
    grad = -np.einsum("gpc,gjpr,grc->gjc", w, dfim, w)
    return _df(var, _with_residual(var, grad, theta), vcov_theta)


def _with_residual(var: np.ndarray, grad: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Append the residual's ``g_0 = (c'Cc - sum_i s_i g_i) / s0`` (homogeneity, as above)."""
    resid = (var - np.einsum("gj,gj...->g...", theta[:, :-1], grad)) / theta[:, -1:]
    return np.concatenate([grad, resid[:, None]], axis=1)


def _df(var: np.ndarray, grad: np.ndarray, vcov_theta: np.ndarray) -> np.ndarray:
    denom = np.einsum("gj...,gjl,gl...->g...", grad, vcov_theta, grad)
    # A zero denominator (no information lost to estimating theta) gives infinite df, as in
    # lmerTest: the t test becomes a z test.
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2 * var**2 / denom
