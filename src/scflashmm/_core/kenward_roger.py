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

Structured (lme4-style) terms: ``V = s0 I + sum_j gamma_j Z E_j Z'`` with ``gamma`` the
variances and covariances of the terms and ``E_j`` the symmetric pattern of entry ``j``
repeated over its term's levels (:class:`_Patterns`); FLASHMM's component ``i`` is ``E_i`` = the
identity on ``I_i``. With ``H = Z'V^-1X``, ``H_2 = Z'V^-2X`` and ``S = Z'V^-1Z`` as above, the
blocks become patterns: ``P_j = -H'E_jH``, ``Q_ij = H'E_i S E_j H``, ``Q_{j,k+1} = H'E_j H_2``,
``K_ij = tr(E_i S E_j S)``, ``K_{j,k+1} = tr(E_j Z'V^-2Z)``, and ``D = sum_j r_j E_j`` (no
longer diagonal with correlated slopes). This is the only dense kernel (``_parts_dense``): with
``labels`` (blocks of columns that neither ``Z'Z`` nor any ``E_j`` couples, e.g. the donors of
``(1 + x | donor)``) every q x q factor is block-diagonal and is held block by block.

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

from dataclasses import dataclass
from typing import Any

import numpy as np

from .structure import CovarianceStructure

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
    labels: np.ndarray | None = None,
) -> KenwardRoger:
    """Kenward-Roger adjusted covariance of beta and the parts of its df, for every gene.

    Parameters
    ----------
    XX, ZX, ZZ
        Summary statistics ``X'X`` (p, p), ``Z'X`` (q, p) and ``Z'Z`` (q, q).
    n
        Number of cells.
    d
        Sizes ``(q_1 .. q_k)`` of FLASHMM's random components (column blocks of ``Z``), or a
        :class:`~scflashmm._core.structure.CovarianceStructure` (lme4-style terms: ``k`` linear
        parameters, the variances and covariances of its terms).
    theta
        The linear parameters at the REML estimate (genes, k + 1), residual variance last:
        FLASHMM's variance components, or a structure's variances and covariances (in the
        order of ``structure.varcorr_names(correlation=False)``); variances may be exactly 0
        (boundary fits).
    eigen
        Use the eigen path (one scalar component only); default: when ``k == 1``.
    cov, information
        Optional, from the fit at ``theta``: the unadjusted covariance ``Phi`` (genes, p, p)
        and the REML Fisher information of theta ``IE / 2`` (genes, k + 1, k + 1). Given, they
        are not computed again (the fit's solver has them; it saves a p x p inverse per gene
        and the traces of ``IE``).
    basis
        Optional, for the eigen path: ``(mu, BB)``, the eigenvalues of ``Z'Z`` and the
        flattened outer products of the rows of ``V'Z'X`` (q, p * p), as the fit's eigen
        kernel holds them (saves a ``q x q`` eigendecomposition per call).
    labels
        Optional block of each column of ``Z`` (q,), when neither ``Z'Z`` nor the covariance
        couples different blocks (random effects nested in one factor): the ``q x q`` algebra
        is then done block by block. Default one block.

    Returns
    -------
    The per-gene :class:`KenwardRoger` quantities; ``.se()`` and ``.df()`` give the adjusted
    standard errors and df of coefficients or contrasts.
    """
    theta = np.atleast_2d(np.asarray(theta, dtype=np.float64))
    if isinstance(d, CovarianceStructure):
        structure = d
        scalar = structure.d is not None and structure.n_theta == 1
    else:
        structure = CovarianceStructure.from_d(tuple(int(x) for x in np.atleast_1d(d)))
        scalar = structure.n_theta == 1
    k = structure.n_theta
    if theta.shape[1] != k + 1:
        msg = f"theta must have k + 1 = {k + 1} columns, got {theta.shape[1]}."
        raise ValueError(msg)
    if structure.q != np.shape(ZZ)[0]:
        msg = f"The random effects have q = {structure.q} columns; Z'Z has {np.shape(ZZ)[0]}."
        raise ValueError(msg)
    if eigen is None:
        eigen = scalar and labels is None
    if eigen and not scalar:
        msg = "The eigen path needs a single random component (k = 1)."
        raise ValueError(msg)
    XX, ZX, ZZ = np.asarray(XX), np.asarray(ZX), np.asarray(ZZ)
    if eigen:
        xv1x, P, Q, K = _parts_eigen(XX, ZX, ZZ, int(n), theta, basis=basis)
    else:
        patterns = _Patterns(structure, ZZ, ZX, labels)
        xv1x, P, Q, K = _parts_dense(XX, int(n), patterns, theta)
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


def _parts_eigen(XX, ZX, ZZ, n, theta, basis=None):
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


class _Patterns:
    """The ``E_j`` of ``V = s0 I + sum_j gamma_j Z E_j Z'`` in the coordinates of blocks of ``Z'Z``.

    ``E_j = f_j sum_l (e_{a_l} e_{b_l}' + e_{b_l} e_{a_l}')`` over the levels ``l`` of its term:
    ``f = 1/2`` and ``a = b`` for a variance, ``f = 1`` for a covariance (the pattern of
    :class:`~scflashmm._core.structure.CovarianceStructure`'s linear parameters, and a block
    identity for FLASHMM's component ``i``: ``a = b`` over its columns ``I_i``). The columns of
    ``Z`` are grouped by ``labels`` into blocks that neither ``Z'Z`` nor any ``E_j`` couples
    (one block when ``labels`` is None): every ``q x q`` matrix below is block-diagonal, held as
    (genes, blocks, b, b) with padding columns (0 in ``Z'Z`` and ``Z'X``).
    """

    def __init__(
        self,
        structure: CovarianceStructure,
        ZZ: np.ndarray,
        ZX: np.ndarray,
        labels: np.ndarray | None = None,
    ):
        q, p = ZX.shape
        labels = np.zeros(q, dtype=np.int64) if labels is None else np.asarray(labels)
        if labels.shape != (q,):
            msg = f"labels must have one entry per column of Z ({q}), got {labels.shape}."
            raise ValueError(msg)
        if np.any(ZZ[labels[:, None] != labels[None, :]] != 0):
            msg = "Z'Z couples columns of different blocks (labels)."
            raise ValueError(msg)
        sizes = np.bincount(labels)
        nb, b = sizes.size, int(sizes.max())
        order = np.argsort(labels, kind="stable")
        pos = np.empty(q, dtype=np.int64)
        pos[order] = np.arange(q) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        idx = np.full((nb, b), q)  # padding points at a zero row / column
        idx[labels, pos] = np.arange(q)
        zz = np.zeros((q + 1, q + 1))
        zz[:q, :q] = ZZ
        self.ZZ = zz[idx[:, :, None], idx[:, None, :]]  # (blocks, b, b)
        self.ZX = np.vstack([ZX, np.zeros((1, p))])[idx]  # (blocks, b, p)
        self.entries: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []
        variance: list[bool] = []
        for t, lo in zip(structure.terms, structure.offsets[:-1], strict=True):
            base = lo + np.arange(t.n_levels) * t.n_effects
            for a, c in t.entries:
                A, B = base + a, base + c
                if np.any(labels[A] != labels[B]):
                    msg = f"A covariance of term {t.group!r} couples different blocks (labels)."
                    raise ValueError(msg)
                self.entries.append((labels[A], pos[A], pos[B], 0.5 if a == c else 1.0))
                variance.append(a == c)
        eye = np.broadcast_to(np.eye(b), (1, nb, b, b))
        self.E = np.stack([self.apply(j, eye)[0] for j in range(len(self.entries))])
        # variances: E_j = diag(mask_j), a 0/1 vector (k, blocks, b); D is diagonal when all are
        self.is_diag = np.array(variance)
        self.diagonal = bool(self.is_diag.all())
        self.mask = np.diagonal(self.E, axis1=-2, axis2=-1) * self.is_diag[:, None, None]

    def apply(self, j: int, M: np.ndarray) -> np.ndarray:
        """Return ``E_j M`` for ``M`` (genes, blocks, b, m): a scatter of rows, O(levels m)."""
        lab, pa, pb, f = self.entries[j]
        res = np.zeros(M.shape)
        res[:, lab, pa] += f * M[:, lab, pb]  # no repeated index within one statement
        res[:, lab, pb] += f * M[:, lab, pa]
        return res

    def quad(self, j: int, A: np.ndarray, B: np.ndarray) -> np.ndarray:
        """Return ``A' E_j B`` for ``A`` (genes, blocks, b, p) and ``B`` (genes, blocks, b, r)."""
        lab, pa, pb, f = self.entries[j]
        Aa, Ab = A[:, lab, pa], A[:, lab, pb]  # (genes, levels, p)
        Ba, Bb = B[:, lab, pa], B[:, lab, pb]
        return f * (np.swapaxes(Aa, 1, 2) @ Bb + np.swapaxes(Ab, 1, 2) @ Ba)


def _parts_dense(XX, n, patterns, theta):
    """``X'V^-1X``, ``P``, ``Q`` and ``K`` for any patterns ``E_j`` (batched, block-diagonal).

    See the module docstring: with ``D = sum_j r_j E_j`` (``r_j = gamma_j / s0``) every ``q x q``
    factor is block-diagonal over the blocks of :class:`_Patterns`; the blocks of ``I_i`` in
    FLASHMM's formulas become ``E_j``: ``P_j = -G'E_jG``, ``Q_ij = G'E_i S E_j G``,
    ``Q_{j,k+1} = G'E_j G_2``, ``K_ij = tr(E_i S E_j S)``, ``K_{j,k+1} = tr(E_j Z'V^-2Z)``
    (``G = Z'V^-1X``, ``G_2 = Z'V^-2X``, ``S = Z'V^-1Z``).
    """
    k = len(patterns.entries)
    ZZb, ZXb, E = patterns.ZZ, patterns.ZX, patterns.E
    b = ZZb.shape[-1]
    s0 = theta[:, k]
    r = theta[:, :k] / s0[:, None]
    if patterns.diagonal:  # D diagonal (FLASHMM's components, uncorrelated terms)
        dvec = (r @ patterns.mask.reshape(k, -1)).reshape(-1, *ZZb.shape[:2])
        N = np.linalg.inv(dvec[..., :, None] * ZZb + np.eye(b))  # (D ZZ + I)^-1
        WD = _sym(N * dvec[..., None, :])
    else:
        D = (r @ E.reshape(k, -1)).reshape(-1, *ZZb.shape)  # (genes, blocks, b, b)
        N = np.linalg.inv(D @ ZZb + np.eye(b))
        WD = _sym(N @ D)  # N D = D N', symmetric
    Nt = np.swapaxes(N, -1, -2)
    NtZX = Nt @ ZXb  # s0 Z'V^-1X
    ZN = ZZb @ N
    S = _sym(ZN)  # s0 Z'V^-1Z
    ZEEX = Nt @ NtZX  # s0^2 Z'V^-2X
    ZEEZ = _sym(Nt @ ZN)  # s0^2 Z'V^-2Z
    WZX = WD @ ZXb
    xex = XX - _sym(_tsum(ZXb, WZX))
    xeex = xex - _sym(_tsum(NtZX, WZX))
    xeeex = xeex - _sym(_tsum(NtZX, WD @ NtZX))
    WZZ = WD @ ZZb
    tr_e2 = (
        n - 2 * np.trace(WZZ, axis1=-2, axis2=-1).sum(axis=1) + np.einsum("gnab,gnba->g", WZZ, WZZ)
    )

    e1, e2, e3 = (s0[:, None, None] ** a for a in (1, 2, 3))
    f1, f2 = (s0[:, None, None, None] ** a for a in (1, 2))
    G, G2 = NtZX / f1, ZEEX / f2  # Z'V^-1X, Z'V^-2X
    S, ZEEZ = S / f1, ZEEZ / f2  # Z'V^-1Z, Z'V^-2Z
    EG = [patterns.apply(j, G) for j in range(k)]
    SEG = [S @ M for M in EG]  # S E_j G
    P = [-patterns.quad(j, G, G) for j in range(k)] + [-xeex / e2]
    Q: dict[tuple[int, int], np.ndarray] = {}
    K = np.empty((theta.shape[0], k + 1, k + 1))
    # K_ij = tr(E_i S E_j S): for two variances mask_i' (S o S) mask_j, else with E_i S
    diag = np.flatnonzero(patterns.is_diag)
    mask = np.moveaxis(patterns.mask[diag], 0, -1)  # (blocks, b, variances)
    Kd = np.einsum("nbi,gnbj->gij", mask, (S * S) @ mask)
    ES = {j: patterns.apply(j, S) for j in np.flatnonzero(~patterns.is_diag)}
    ES |= {j: mask[None, ..., i, None] * S for i, j in enumerate(diag) if ES}
    for i in range(k):
        for j in range(i, k):
            Q[i, j] = _tsum(EG[i], SEG[j])
            if patterns.is_diag[i] and patterns.is_diag[j]:
                K[:, i, j] = Kd[:, np.searchsorted(diag, i), np.searchsorted(diag, j)]
            else:
                K[:, i, j] = np.einsum("gnab,gnba->g", ES[i], ES[j])
            K[:, j, i] = K[:, i, j]
        Q[i, k] = patterns.quad(i, G, G2)
        lab, pa, pb, f = patterns.entries[i]
        K[:, i, k] = K[:, k, i] = 2 * f * ZEEZ[:, lab, pa, pb].sum(axis=1)
    Q[k, k] = xeeex / e3
    K[:, k, k] = tr_e2 / s0**2
    return xex / e1, P, Q, K


def _tsum(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``sum_blocks A_n' B_n`` for (genes or 1, blocks, b, p) and (genes, blocks, b, r)."""
    return (np.swapaxes(A, -1, -2) @ B).sum(axis=1)
