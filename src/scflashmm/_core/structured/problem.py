"""Dense likelihood algebra of a structured model (lme4's family), every gene at once.

See :mod:`scflashmm._core.structured` for the model and the notation.
"""

from __future__ import annotations

import numpy as np

from ..stats import SummaryStats
from ..structure import CovarianceStructure


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

    def loglik_score(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-likelihood, score and expected information of the genes ``rows`` at one point."""
        return self.loglik(rows, gamma, s0), *self.score_information(rows, gamma, s0)

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


def score_from_traces(
    gamma: np.ndarray,
    s0: np.ndarray,
    n_eff: int,
    quad: np.ndarray,
    uu: np.ndarray,
    tq: np.ndarray,
    fq: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Score and expected information in ``(gamma, s0)`` from the parts in ``gamma``.

    ``uu``: ``u'E_j u``; ``tq``, ``fq``: ``tr(E_j Q)``, ``tr(E_j Q E_k Q)`` (``Q = Z'PZ``, or
    ``Z'V^-1Z`` for ML); ``quad``: ``y'P y`` times ``s0``. The residual variance's entries
    follow from ``V`` being homogeneous of degree one (``sum_i theta_i P V_i P = P``).
    """
    g, k = gamma.shape
    fim = np.empty((g, k + 1, k + 1))
    fjk = fq / 2
    fim[:, :k, :k] = (fjk + np.swapaxes(fjk, 1, 2)) / 2
    dl = np.empty((g, k + 1))
    dl[:, :k] = (uu - tq) / 2
    yvvy = (quad / s0 - np.sum(gamma * uu, axis=1)) / s0
    trp = (n_eff - np.sum(gamma * tq, axis=1)) / s0
    dl[:, k] = (yvvy - trp) / 2
    fs = (tq / 2 - np.einsum("gk,gjk->gj", gamma, fim[:, :k, :k])) / s0[:, None]
    fim[:, :k, k] = fim[:, k, :k] = fs
    fim[:, k, k] = (trp / 2 - np.sum(gamma * fs, axis=1)) / s0
    return dl, fim
