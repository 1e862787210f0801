"""Kenward-Roger adjusted covariance and df of fixed effects from summary statistics, batched.

See docs/model.md, Kenward-Roger. For every gene ``V = sum_i gamma_i G_i`` with ``G_i = Z_i Z_i'``
for the random components and ``G_{k+1} = I_n`` for the residual; ``gamma`` is the variance
components ``theta = (s_1 .. s_k, s_0)`` (residual last) at the REML estimate. Kenward and Roger
(1997), as pbkrtest computes it (``vcovAdj``, ``Lb_ddf``), needs

    Phi   = (X'V^-1X)^-1                          unadjusted covariance of beta
    P_i   = -X'V^-1 G_i V^-1 X
    Q_ij  =  X'V^-1 G_i V^-1 G_j V^-1 X           (Q_ji = Q_ij')
    K_ij  =  tr(G_i V^-1 G_j V^-1)
    IE_ij =  K_ij - 2 tr(Phi Q_ij) + tr(Phi P_i Phi P_j)   (= tr(P G_i P G_j), P: REML projection)
    W     =  2 IE^-1                              (pseudo-inverse when min |eig IE| <= 1e-10)
    U     =  sum_ij W_ij (Q_ij - P_i Phi P_j)
    Phi_A =  Phi + 2 Phi U Phi                    adjusted covariance (V is linear in gamma, so
                                                  the second-derivative term of Kenward-Roger is 0)

and, for one contrast ``L`` (a column; a coefficient is a unit vector), ``g_i = L'Phi P_i Phi L``
and ``A = g'Wg / (L'Phi L)^2``. pbkrtest's general formula (``A1``, ``A2``, ``B``, ``g``,
``c1..c3``, ``rho``, ``df = 4 + 3 / (rho - 1)``) has ``A1 = A2 = A`` for a single contrast row,
and then reduces exactly to ``df = 2 / A = 2 (L'Phi L)^2 / (g'Wg)``: Satterthwaite's formula with
the unadjusted ``Phi`` and the expected (REML Fisher) information ``IE / 2`` of ``gamma``. The
adjusted standard error is ``sqrt(L'Phi_A L)``.

Only ``X'X``, ``Z'X``, ``Z'Z`` and ``n`` are needed (Woodbury; never an n x n matrix). With
``D = diag(r_i repeated q_i)``, ``r_i = s_i / s0``, ``N = (D Z'Z + I)^-1``, ``W_D = N D`` and
``E = I - Z W_D Z'`` (so ``V^-1 = E / s0``): ``Z'E = N'Z'``, hence

    Z'V^-1 X = N'Z'X / s0            Z'V^-1 Z = Z'Z N / s0          Z'V^-2 Z = N'Z'Z N / s0^2
    Z'V^-2 X = N'N'Z'X / s0^2        X'V^-1 X = (X'X - Z'X' W_D Z'X) / s0
    X'V^-2 X = (X'EX - (N'Z'X)' W_D Z'X) / s0^2
    X'V^-3 X = (X'EEX - (N'Z'X)' W_D N'Z'X) / s0^3
    tr(V^-2) = (n - 2 tr(W_D Z'Z) + tr((W_D Z'Z)^2)) / s0^2

and the blocks ``[I_i, I_j]`` of these give ``P``, ``Q`` and ``K`` of the components (``P_{k+1} =
-X'V^-2X``, ``Q_{i,k+1} = (Z'V^-1X)_i' (Z'V^-2X)_i``, ``Q_{k+1,k+1} = X'V^-3X``, ``K_{i,k+1} =
tr (Z'V^-2Z)_ii``). Cost per gene: O(q^3 + q^2 p + q p^2 + k^2 p^3).

One component (``k = 1``, the eigen path): with ``Z'Z = V diag(mu) V'``, ``B = V'Z'X`` and ``h =
1 / (1 + r mu)`` every ``q x q`` factor is diagonal: ``E`` has eigenvalue ``h`` along ``Z v_j``, so
``X'V^-aX = (X'X - B' diag(r h (1 + .. + h^(a-1))) B) / s0^a``, ``P_1 = -B' diag(h^2) B / s0^2``,
``Q_11 = B' diag(mu h^3) B / s0^3``, ``Q_12 = B' diag(h^3) B / s0^3``,
``K_11 = sum (mu h)^2 / s0^2``, ``K_12 = sum mu h^2 / s0^2``, ``K_22 = (n - q + sum h^2) / s0^2``:
O(q p^2 + p^3) per gene, the cost of the fit.

At the boundary (a component ``s_i = 0``, lme4's singular fit) nothing is special: ``D`` has zeros,
``W_D`` is 0 on that block (``M = 0`` for one component), ``IE`` stays finite and invertible, the
adjustment is non-zero and the df of a between-sample coefficient stay on the scale of the samples,
as pbkrtest's (lmerTest's Satterthwaite instead falls back to ``n - p`` there).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

#: pbkrtest inverts ``IE`` when its smallest absolute eigenvalue exceeds this, else takes the
#: pseudo-inverse (MASS::ginv, relative tolerance sqrt(machine epsilon)).
_IE_ABS_TOL = 1e-10
_GINV_RTOL = float(np.sqrt(np.finfo(np.float64).eps))


@dataclass(eq=False)
class KenwardRoger:
    """Kenward-Roger quantities per gene (genes first).

    Attributes
    ----------
    cov
        Unadjusted covariance of beta ``Phi = (X'V^-1X)^-1`` (genes, p, p).
    cov_adjusted
        Kenward-Roger adjusted covariance ``Phi_A`` (genes, p, p).
    dprec
        ``P_i = d(X'V^-1X)/dgamma_i = -X'V^-1 G_i V^-1 X`` for the components and the residual
        (genes, k + 1, p, p); ``dPhi/dgamma_i = -Phi P_i Phi`` (:attr:`dcov`). For the
        components these are the Satterthwaite fit's ``dfim_beta``.
    W
        Asymptotic covariance of the variance components, ``2 IE^-1`` (genes, k + 1, k + 1).
    """

    cov: np.ndarray
    cov_adjusted: np.ndarray
    dprec: np.ndarray
    W: np.ndarray

    @property
    def dcov(self) -> np.ndarray:
        """``dPhi/dgamma_i = -Phi P_i Phi`` (genes, k + 1, p, p)."""
        return _sym(-self.cov[:, None] @ self.dprec @ self.cov[:, None])

    def se(self, contrast: np.ndarray | None = None) -> np.ndarray:
        """Return the adjusted se of the coefficients (genes, p) or of contrasts (genes, c)."""
        return adjusted_se(self.cov_adjusted, contrast)

    def df(self, contrast: np.ndarray | None = None) -> np.ndarray:
        """Return the Kenward-Roger df of the coefficients (genes, p) or of contrasts (genes, c)."""
        return kenward_roger_df(self.cov, self.dprec, self.W, contrast)


def kenward_roger(
    XX: np.ndarray,
    ZX: np.ndarray,
    ZZ: np.ndarray,
    n: int,
    d: Any,
    theta: np.ndarray,
    *,
    eigen: bool | None = None,
    cov: np.ndarray | None = None,
    information: np.ndarray | None = None,
    basis: tuple[np.ndarray, np.ndarray] | None = None,
) -> KenwardRoger:
    """Kenward-Roger adjusted covariance of beta and the parts of its df, for every gene.

    Parameters
    ----------
    XX, ZX, ZZ
        Summary statistics ``X'X`` (p, p), ``Z'X`` (q, p) and ``Z'Z`` (q, q).
    n
        Number of cells.
    d
        Sizes ``(q_1 .. q_k)`` of the random components (column blocks of ``Z``).
    theta
        Variance components at the REML estimate (genes, k + 1), components first, residual last;
        components may be exactly 0 (boundary fits).
    eigen
        Use the eigen path (one component only); default: when ``k == 1``.
    cov, information
        Optional, from the fit at ``theta``: the unadjusted covariance ``Phi`` (genes, p, p)
        and the REML Fisher information of theta ``IE / 2`` (genes, k + 1, k + 1). Given, they
        are not computed again (the fit's solver has them; it saves a p x p inverse per gene
        and the traces of ``IE``).
    basis
        Optional, for the eigen path: ``(mu, BB)``, the eigenvalues of ``Z'Z`` and the
        flattened outer products of the rows of ``V'Z'X`` (q, p * p), as the fit's eigen
        kernel holds them (saves a ``q x q`` eigendecomposition per call).

    Returns
    -------
    The per-gene :class:`KenwardRoger` quantities; ``.se()`` and ``.df()`` give the adjusted
    standard errors and df of coefficients or contrasts.
    """
    theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
    d = tuple(int(x) for x in np.atleast_1d(d))
    k = len(d)
    if theta.shape[1] != k + 1:
        msg = f"theta must have k + 1 = {k + 1} columns, got {theta.shape[1]}."
        raise ValueError(msg)
    if eigen is None:
        eigen = k == 1
    if eigen and k != 1:
        msg = "The eigen path needs a single random component (k = 1)."
        raise ValueError(msg)
    args = (np.asarray(XX), np.asarray(ZX), np.asarray(ZZ), int(n), d, theta)
    xv1x, P, Q, K = _parts_eigen(*args, basis=basis) if eigen else _parts_dense(*args)
    return _assemble(xv1x, P, Q, K, Phi=cov, IE=None if information is None else 2 * information)


def kenward_roger_df(
    cov: np.ndarray, dprec: np.ndarray, W: np.ndarray, contrast: np.ndarray | None = None
) -> np.ndarray:
    """Kenward-Roger df ``2 (L'Phi L)^2 / (g'Wg)``, ``g_i = (Phi L)' P_i (Phi L)``, per gene.

    Parameters
    ----------
    cov, dprec, W
        As in :class:`KenwardRoger` (the unadjusted ``Phi``, as lmerTest passes it).
    contrast
        Contrast matrix (p, c), one contrast per column; default every coefficient.

    Returns
    -------
    df (genes, p) or (genes, c); infinite where ``g'Wg = 0``.
    """
    if contrast is None:
        contrast = np.eye(cov.shape[1])
    contrast = np.asarray(contrast, dtype=np.float64).reshape(cov.shape[1], -1)
    v = cov @ contrast  # Phi L, (genes, p, c)
    var = np.einsum("pc,gpc->gc", contrast, v)
    grad = np.sum((dprec @ v[:, None]) * v[:, None], axis=2)  # (genes, k + 1, c)
    denom = np.einsum("gjc,gjl,glc->gc", grad, W, grad)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 2 * var**2 / denom


def adjusted_se(cov_adjusted: np.ndarray, contrast: np.ndarray | None = None) -> np.ndarray:
    """``sqrt(L'Phi_A L)`` for the coefficients (genes, p) or contrasts ``(p, c)`` (genes, c)."""
    if contrast is None:
        return np.sqrt(np.diagonal(cov_adjusted, axis1=1, axis2=2))
    contrast = np.asarray(contrast, dtype=np.float64).reshape(cov_adjusted.shape[1], -1)
    return np.sqrt(np.einsum("pc,gpr,rc->gc", contrast, cov_adjusted, contrast))


# --------------------------------------------------------------------------- shared assembly


def _sym(A: np.ndarray) -> np.ndarray:
    return (A + np.swapaxes(A, -1, -2)) / 2


def _assemble(
    xv1x: np.ndarray,
    P: list[np.ndarray],
    Q: dict[tuple[int, int], np.ndarray],
    K: np.ndarray,
    *,
    Phi: np.ndarray | None = None,
    IE: np.ndarray | None = None,
) -> KenwardRoger:
    """``Phi``, ``IE``, ``W``, ``U`` and ``Phi_A`` from ``P_i``, ``Q_ij`` (i <= j) and ``K``.

    ``Phi`` and ``IE`` are computed unless given.
    """
    m = len(P)
    if Phi is None:
        Phi = _sym(np.linalg.inv(xv1x))
    PhiP = [Phi @ Pi for Pi in P]
    if IE is None:
        IE = np.empty_like(K)
        for i in range(m):
            for j in range(i, m):
                # tr(Phi Q_ij) = sum(Phi * Q_ij) (Phi symmetric); tr(Phi P_i Phi P_j)
                IE[:, i, j] = IE[:, j, i] = (
                    K[:, i, j]
                    - 2 * np.einsum("gab,gab->g", Phi, Q[i, j])
                    + np.einsum("gab,gba->g", PhiP[i], PhiP[j])
                )
    W = 2 * _inverse_ie(IE)
    # U = sum_ij W_ij Q_ij - sum_i P_i Phi (sum_j W_ij P_j), with Q_ji = Q_ij'
    U = np.zeros_like(Phi)
    for i in range(m):
        U += W[:, i, i, None, None] * Q[i, i]
        for j in range(i + 1, m):
            U += W[:, i, j, None, None] * (Q[i, j] + np.swapaxes(Q[i, j], 1, 2))
        U -= P[i] @ sum(W[:, i, j, None, None] * PhiP[j] for j in range(m))
    cov_adjusted = _sym(Phi + 2 * (Phi @ U) @ Phi)
    return KenwardRoger(cov=Phi, cov_adjusted=cov_adjusted, dprec=np.stack(P, axis=1), W=W)


def _inverse_ie(IE: np.ndarray) -> np.ndarray:
    """``IE^-1``, or its pseudo-inverse where its smallest absolute eigenvalue is <= 1e-10."""
    IE = _sym(IE)
    out = np.full_like(IE, np.nan)
    finite = np.isfinite(IE).all(axis=(1, 2))
    small = np.zeros(IE.shape[0], dtype=bool)
    small[finite] = np.abs(np.linalg.eigvalsh(IE[finite])).min(axis=1) <= _IE_ABS_TOL
    regular = finite & ~small
    if regular.any():
        out[regular] = np.linalg.inv(IE[regular])
    if small.any():
        out[small] = np.linalg.pinv(IE[small], rcond=_GINV_RTOL, hermitian=True)
    return out


# --------------------------------------------------------------------------- kernels


def _parts_eigen(XX, ZX, ZZ, n, d, theta, basis=None):
    """``X'V^-1X``, ``P``, ``Q`` and ``K`` for one component, in the eigenbasis of ``Z'Z``.

    ``basis`` may give ``(mu, BB)``: the eigenvalues of ``Z'Z`` and the flattened outer
    products of the rows of ``B = V'Z'X`` (q, p * p), as the fit's eigen kernel holds them.
    """
    p, q = XX.shape[0], ZZ.shape[0]
    if basis is None:
        mu, V = np.linalg.eigh(ZZ)
        B = V.T @ ZX
        BB = np.einsum("jp,jr->jpr", B, B).reshape(q, p * p)
    else:
        mu, BB = basis
    mu = np.clip(mu, 0, None)

    def weighted(c: np.ndarray) -> np.ndarray:  # B' diag(c) B for weights c (genes, q)
        return (c @ BB).reshape(-1, p, p)  # exactly symmetric: BB holds outer products

    s0 = theta[:, 1]
    r = (theta[:, 0] / s0)[:, None]
    h = 1 / (1 + r * mu)
    rh = r * h
    e1, e2, e3 = (s0[:, None, None] ** a for a in (1, 2, 3))
    xv1x = (XX - weighted(rh)) / e1
    xv2x = (XX - weighted(rh * (1 + h))) / e2
    xv3x = (XX - weighted(rh * (1 + h + h * h))) / e3
    h2 = h * h
    P = [-weighted(h2) / e2, -xv2x]
    Q = {(0, 0): weighted(mu * h2 * h) / e3, (0, 1): weighted(h2 * h) / e3, (1, 1): xv3x}
    K = np.empty((theta.shape[0], 2, 2))
    K[:, 0, 0] = np.sum((mu * h) ** 2, axis=1)
    K[:, 0, 1] = K[:, 1, 0] = np.sum(mu * h2, axis=1)
    K[:, 1, 1] = n - q + np.sum(h2, axis=1)
    return xv1x, P, Q, K / (s0**2)[:, None, None]


def _parts_dense(XX, ZX, ZZ, n, d, theta):
    """``X'V^-1X``, ``P``, ``Q`` and ``K`` for any number of components (batched q x q)."""
    k, q = len(d), ZZ.shape[0]
    bounds = np.cumsum((0, *d))
    slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    s0 = theta[:, k]
    rrep = (theta[:, :k] / s0[:, None])[:, np.repeat(np.arange(k), d)]
    N = np.linalg.inv(rrep[:, :, None] * ZZ + np.eye(q))  # (D ZZ + I)^-1
    Nt = np.swapaxes(N, 1, 2)
    WD = _sym(N * rrep[:, None, :])  # N D, symmetric
    NtZX = Nt @ ZX  # s0 Z'V^-1X
    S = _sym(ZZ @ N)  # s0 Z'V^-1Z
    ZEEX = Nt @ NtZX  # s0^2 Z'V^-2X
    ZEEZ = _sym(Nt @ ZZ @ N)  # s0^2 Z'V^-2Z
    WZX = WD @ ZX
    xex = XX - _sym(ZX.T @ WZX)
    xeex = xex - _sym(np.swapaxes(NtZX, 1, 2) @ WZX)
    xeeex = xeex - _sym(np.swapaxes(NtZX, 1, 2) @ WD @ NtZX)
    WZZ = WD @ ZZ
    tr_e2 = n - 2 * np.trace(WZZ, axis1=1, axis2=2) + np.einsum("gab,gba->g", WZZ, WZZ)

    e1, e2, e3 = (s0[:, None, None] ** a for a in (1, 2, 3))
    G = [NtZX[:, Ii] / e1 for Ii in slices]  # (Z'V^-1X)_i
    G2 = [ZEEX[:, Ii] / e2 for Ii in slices]  # (Z'V^-2X)_i
    P = [-np.swapaxes(Gi, 1, 2) @ Gi for Gi in G] + [-xeex / e2]
    Q: dict[tuple[int, int], np.ndarray] = {}
    K = np.empty((theta.shape[0], k + 1, k + 1))
    for i, Ii in enumerate(slices):
        GiT = np.swapaxes(G[i], 1, 2)
        for j in range(i, k):
            block = S[:, Ii, slices[j]] / e1
            Q[i, j] = GiT @ block @ G[j]
            K[:, i, j] = K[:, j, i] = np.sum(block**2, axis=(1, 2))
        Q[i, k] = GiT @ G2[i]
        K[:, i, k] = K[:, k, i] = np.trace(ZEEZ[:, Ii, Ii], axis1=1, axis2=2) / s0**2
    Q[k, k] = xeeex / e3
    K[:, k, k] = tr_e2 / s0**2
    return xex / e1, P, Q, K
