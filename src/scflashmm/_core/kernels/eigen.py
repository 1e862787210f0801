"""One random component (``D = r I``): every quantity is a sum over ``q`` eigenvalues.

After diagonalising ``zrz = U diag(lam) U'`` and ``ZZ = V diag(mu) V'`` once for all genes,
``M = (r zrz + I)^-1 = U diag(1/(1 + r lam)) U'``, so the score, the information, the
log-determinant and the Satterthwaite pieces cost O(q) per gene and iteration (O(p^2 q) for the
fixed effects). ``M0`` and ``ZR`` share the basis of ``ZR`` (``zrz`` for REML, ``ZZ`` for ML),
eigenvalues ``lam0``. The fixed-effects weights ``W = (r ZZ + I)^-1 r`` live in the basis of
``ZZ``. Notation: docs/model.md, Fisher scoring and Satterthwaite degrees of freedom.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..stats import SummaryStats
from .base import FixedEffects, GeneState, Kernel, gls


@dataclass(frozen=True)
class EigenState(GeneState):
    """``w2 = (U' Z'Ry)^2``: squared coordinates of ``Z'Ry`` in the eigenbasis of zrz (genes, q)."""

    w2: np.ndarray


class EigenKernel(Kernel[EigenState]):
    """The one-component kernel (FLASHMM's common case: one random intercept per sample)."""

    def __init__(self, stats: SummaryStats, zrz: np.ndarray, method: str):
        self.k = 1
        self.n, p, self.q, _ = stats.shape
        self.pres = p if method == "REML" else 0
        self.lam, self.U = np.linalg.eigh(zrz)
        self.mu, V = np.linalg.eigh(stats.ZZ)
        self.lam0 = self.lam if method == "REML" else self.mu
        self.V = V
        self.XX = stats.XX
        self.B = V.T @ stats.ZX  # ZX in the eigenbasis of ZZ, (q, p)
        # Outer products of the rows of B, flattened: xvx = XX - c @ BB for weights c (genes, q).
        self.BB = np.einsum("jp,jr->jpr", self.B, self.B).reshape(self.q, p * p)

    def prepare(self, zry: np.ndarray, yry: np.ndarray) -> EigenState:
        return EigenState(yry=yry, w2=(zry @ self.U) ** 2)

    def score_information(self, state: EigenState, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = (s[:, 0] / s[:, 1])[:, None]
        s0 = s[:, 1]
        h = 1 / (1 + r * self.lam)  # eigenvalues of M
        h0 = h if self.lam0 is self.lam else 1 / (1 + r * self.lam0)  # eigenvalues of M0
        w2h = state.w2 * h
        zvz = self.lam0 * h0  # eigenvalues of ZR M0
        rest = self.n - self.pres - self.q
        u2 = _rowdot(w2h, h)  # sum w2 h^2
        yr2y = state.yry - r[:, 0] * (u2 + w2h.sum(axis=1))  # sum w2 h (h + 1)
        dl = np.column_stack(
            [
                (u2 / s0**2 - zvz.sum(1) / s0) / 2,
                (yr2y / s0**2 - (rest + h0.sum(1)) / s0) / 2,
            ]
        )
        f11 = _rowdot(zvz, zvz)
        f12 = _rowdot(zvz, h0)
        f22 = rest + _rowdot(h0, h0)
        fim = np.stack([np.column_stack([f11, f12]), np.column_stack([f12, f22])], axis=1)
        return dl, fim / (2 * s0**2)[:, None, None]

    def residual_variance(self, state: EigenState, s: np.ndarray) -> np.ndarray:
        r = (s[:, 0] / s[:, 1])[:, None]
        ryMy = r[:, 0] * np.sum(state.w2 / (1 + r * self.lam), axis=1)
        return (state.yry - ryMy) / (self.n - self.pres)

    def logdet(self, state: EigenState, s: np.ndarray) -> np.ndarray:
        r = (s[:, 0] / s[:, 1])[:, None]
        return -np.sum(np.log(np.abs(1 + r * self.lam0)), axis=1)

    def satterthwaite_parts(
        self, state: EigenState, s: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        quad = quadratic_eigen(self.lam, state.w2, state.yry, s)
        return quad, precision_derivatives_eigen(self.BB, self.mu, s, self.XX.shape[0])

    def fixed_effects(
        self,
        s: np.ndarray,
        XY: np.ndarray,
        ZY: np.ndarray,
        *,
        output_re: bool,
        output_fim: bool,
    ) -> FixedEffects:
        r = (s[:, 0] / s[:, 1])[:, None]
        c = r / (1 + r * self.mu)  # eigenvalues of W = (r ZZ + I)^-1 r
        p = self.XX.shape[0]
        xvx = self.XX - (c @ self.BB).reshape(-1, p, p)
        v = ZY @ self.V  # V' ZY_g, (genes, q)
        rhs = XY - (c * v) @ self.B
        out = gls(xvx, rhs, s[:, -1], output_fim=output_fim)
        if output_re:
            out = replace(out, re=(c * (v - out.coef @ self.B.T)) @ self.V.T)
        return out


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum(a * b, axis=1)`` without the temporary (the hot loop of the scoring)."""
    return np.einsum("gj,gj->g", a, b)


def quadratic_eigen(lam: np.ndarray, w2: np.ndarray, yry: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``e' V_i P V_j e`` for one component (genes, 2, 2), from the eigenvalues ``lam`` of ``zrz``.

    ``w2`` holds the squared coordinates ``(U' zry)^2`` (genes, q), ``s`` the ``(s_1, s_0)``.
    """
    r = (s[:, 0] / s[:, 1])[:, None]
    s0 = s[:, 1]
    h = 1 / (1 + r * lam)  # eigenvalues of M
    h3w2 = h**3 * w2
    yr2y = yry - r[:, 0] * np.sum(w2 * h * (h + 1), axis=1)
    qcc = np.sum(lam * h3w2, axis=1)  # u' zrz M u
    qcr = np.sum(h3w2, axis=1)  # u' M' u
    qrr = yr2y - r[:, 0] * qcr  # yR2y - u' M D u
    out = np.stack([np.column_stack([qcc, qcr]), np.column_stack([qcr, qrr])], axis=1)
    return out / (s0**3)[:, None, None]


def precision_derivatives_eigen(
    BB: np.ndarray, mu: np.ndarray, s: np.ndarray, p: int
) -> np.ndarray:
    """``d(X'V^-1X)/ds_1 = -G G'`` (genes, 1, p, p) for one component.

    ``mu`` are the eigenvalues of ``ZZ`` (eigenvectors ``V``) and ``BB`` the flattened outer
    products of the rows of ``B = V' ZX`` (q, p * p): ``G = B' diag(1 / (1 + r mu)) V' / s0``.
    """
    r = (s[:, 0] / s[:, 1])[:, None]
    weights = 1 / ((1 + r * mu) * s[:, 1:2]) ** 2
    return -(weights @ BB).reshape(-1, 1, p, p)
