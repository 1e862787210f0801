"""Any number of random components: batched ``q x q`` algebra with ``D = diag(r_i repeated q_i)``.

``M = (D zrz + I)^-1`` and ``M0`` (``M`` for REML, ``(D ZZ + I)^-1`` for ML) are formed for every
gene and iteration: O(q^3) per gene. Notation: docs/model.md, Fisher scoring and Satterthwaite
degrees of freedom.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..stats import SummaryStats
from .base import FixedEffects, GeneState, Kernel, batched_inverse, gls


@dataclass(frozen=True)
class DenseState(GeneState):
    """``zry = Z'Ry`` of every gene (genes, q)."""

    zry: np.ndarray


class DenseKernel(Kernel[DenseState]):
    """The general kernel: ``k`` independent components of sizes ``d = (q_1 .. q_k)``."""

    def __init__(self, stats: SummaryStats, d: tuple[int, ...], zrz: np.ndarray, method: str):
        self.n, p, self.q, _ = stats.shape
        self.k = len(d)
        self.pres = p if method == "REML" else 0
        self.ml = method == "ML"
        self.zrz = zrz
        self.ZZ = stats.ZZ
        self.ZR = stats.ZZ if self.ml else zrz
        self.XX = stats.XX
        self.ZX = stats.ZX
        self.blocks = np.repeat(np.arange(self.k), d)
        self.slices = [
            slice(a, b) for a, b in zip(np.cumsum((0, *d))[:-1], np.cumsum(d), strict=True)
        ]
        self.eye = np.eye(self.q)

    def prepare(self, zry: np.ndarray, yry: np.ndarray) -> DenseState:
        return DenseState(yry=yry, zry=zry)

    def _rrep(self, s: np.ndarray) -> np.ndarray:
        return (s[:, : self.k] / s[:, self.k : self.k + 1])[:, self.blocks]

    def _inv(self, rrep: np.ndarray, A: np.ndarray) -> np.ndarray:
        """``(D A + I)^-1`` for every gene."""
        return batched_inverse(rrep[:, :, None] * A + self.eye)

    def _m_m0(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rrep = self._rrep(s)
        M = self._inv(rrep, self.zrz)
        M0 = self._inv(rrep, self.ZZ) if self.ml else M
        return rrep, M, M0

    def score_information(self, state: DenseState, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zry = state.zry
        k, s0 = self.k, s[:, self.k]
        rrep, M, M0 = self._m_m0(s)
        u = np.einsum("gi,gij->gj", zry, M)
        zvz = self.ZR @ M0
        rest = self.n - self.pres - self.q
        dl = np.empty((s.shape[0], k + 1))
        fim = np.empty((s.shape[0], k + 1, k + 1))
        for i, Ii in enumerate(self.slices):
            dl[:, i] = (np.sum(u[:, Ii] ** 2, 1) / s0**2 - _trace(zvz[:, Ii, Ii]) / s0) / 2
            for j, Ij in enumerate(self.slices[: i + 1]):
                fim[:, i, j] = fim[:, j, i] = np.sum(zvz[:, Ij, Ii] ** 2, axis=(1, 2))
            # tr (ZVZ M0)[Ii, Ii] without forming the product ZVZ M0.
            fim[:, i, k] = fim[:, k, i] = np.einsum("gab,gba->g", zvz[:, Ii, :], M0[:, :, Ii])
        fim[:, k, k] = rest + np.einsum("gij,gji->g", M0, M0)
        Mzry = np.einsum("gji,gj->gi", M, zry) + zry  # (M' + I) zry
        MDzry = np.einsum("gij,gj->gi", M, rrep * zry)  # M D zry
        yr2y = state.yry - np.sum(Mzry * MDzry, axis=1)
        dl[:, k] = (yr2y / s0**2 - (rest + _trace(M0)) / s0) / 2
        return dl, fim / (2 * s0**2)[:, None, None]

    def residual_variance(self, state: DenseState, s: np.ndarray) -> np.ndarray:
        zry = state.zry
        rrep, M, _ = self._m_m0(s)
        ryMy = np.einsum("gi,gij,gj->g", zry, M, rrep * zry)
        return (state.yry - ryMy) / (self.n - self.pres)

    def logdet(self, state: DenseState, s: np.ndarray) -> np.ndarray:
        _, _, M0 = self._m_m0(s)
        return np.linalg.slogdet(M0)[1]

    def satterthwaite_parts(
        self, state: DenseState, s: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        rrep = self._rrep(s)
        M = self._inv(rrep, self.zrz)
        quad = quadratic_dense(self.zrz, state.zry, state.yry, s, M, rrep, self.slices)
        N = self._inv(rrep, self.ZZ)  # (D ZZ + I)^-1
        return quad, precision_derivatives_dense(self.ZX, N, s, self.slices)

    def fixed_effects(
        self,
        s: np.ndarray,
        XY: np.ndarray,
        ZY: np.ndarray,
        *,
        output_re: bool,
        output_fim: bool,
    ) -> FixedEffects:
        rrep = self._rrep(s)
        W = self._inv(rrep, self.ZZ) * rrep[:, None, :]  # (D ZZ + I)^-1 D
        WZX = W @ self.ZX
        xvx = self.XX - np.einsum("qp,gqr->gpr", self.ZX, WZX)
        rhs = XY - np.einsum("gqp,gq->gp", WZX, ZY)
        out = gls(xvx, rhs, s[:, -1], output_fim=output_fim)
        if output_re:
            out = replace(out, re=np.einsum("gij,gj->gi", W, ZY - out.coef @ self.ZX.T))
        return out


def quadratic_dense(
    zrz: np.ndarray,
    zry: np.ndarray,
    yry: np.ndarray,
    s: np.ndarray,
    M: np.ndarray,
    rrep: np.ndarray,
    slices: list[slice],
) -> np.ndarray:
    """``e' V_i P V_j e`` for k components (genes, k + 1, k + 1).

    ``M = (D zrz + I)^-1`` (genes, q, q) and ``rrep`` the diagonal of ``D`` (genes, q) at ``s``.
    """
    k = len(slices)
    s0 = s[:, k]
    u = np.einsum("gi,gij->gj", zry, M)  # M' zry
    mu = np.einsum("gji,gj->gi", M, u)  # M' u
    yr2y = yry - np.einsum(
        "gi,gi->g", np.einsum("gji,gj->gi", M, zry) + zry, np.einsum("gij,gj->gi", M, rrep * zry)
    )
    out = np.empty((s.shape[0], k + 1, k + 1))
    for j, Ij in enumerate(slices):
        Mu = np.einsum("gab,gb->ga", M[:, :, Ij], u[:, Ij])  # M[:, I_j] u_j
        for i, Ii in enumerate(slices[j:], start=j):
            # zrz M is symmetric, so the (i, j) and (j, i) terms agree.
            out[:, i, j] = out[:, j, i] = np.einsum("gi,gi->g", u[:, Ii], Mu @ zrz[Ii].T)
        out[:, j, k] = out[:, k, j] = np.einsum("gi,gi->g", u[:, Ij], mu[:, Ij])
    out[:, k, k] = yr2y - np.einsum("gi,gi->g", u, rrep * mu)  # u' M D u = (M'u)' D u
    return out / (s0**3)[:, None, None]


def precision_derivatives_dense(
    ZX: np.ndarray, N: np.ndarray, s: np.ndarray, slices: list[slice]
) -> np.ndarray:
    """``d(X'V^-1X)/ds_i = -G_i G_i'`` (genes, k, p, p) with ``N = (D ZZ + I)^-1`` (genes, q, q).

    ``G = X'V^-1 Z = ZX' (I - W ZZ) / s0 = ZX' N / s0``.
    """
    k = len(slices)
    G = np.einsum("qp,gqr->gpr", ZX, N) / s[:, k][:, None, None]
    out = np.empty((s.shape[0], k, ZX.shape[1], ZX.shape[1]))
    for i, Ii in enumerate(slices):
        out[:, i] = -G[:, :, Ii] @ G[:, :, Ii].transpose(0, 2, 1)
    return out


def _trace(A: np.ndarray) -> np.ndarray:
    return np.trace(A, axis1=1, axis2=2)
