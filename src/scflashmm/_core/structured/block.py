"""Block-diagonal ``Z'Z`` (random effects nested in one factor): per-block solves.

See :mod:`scflashmm._core.structured` for the model and the notation.
"""

from __future__ import annotations

import numpy as np

from ..stats import SummaryStats
from ..structure import CovarianceStructure
from .problem import _Problem, score_from_traces

#: Largest block of ``Z'Z`` (after grouping its columns into connected blocks) for which the
#: block solver is used instead of dense q x q algebra.
BLOCK_MAX = 48

#: Largest block with one pattern for every block (one level of one term) for which the score
#: sums over blocks first (``O(L b^4)`` per gene, no (g, k, L, b, b) products).
UNIFORM_MAX = 6


def genes_per_block(structure: CovarianceStructure, labels: np.ndarray) -> int:
    """Genes fit together by the block solver (the driver's blocks of genes).

    At most 512 (its working arrays then stay in cache), fewer when the largest,
    (genes, k, L, b, b), would pass 32 MiB.
    """
    sizes = np.bincount(labels)
    per_gene = structure.n_theta * sizes.size * int(sizes.max()) ** 2
    return int(np.clip(2**22 // per_gene, 16, 512))


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
    (``sum_i theta_i P V_i P = P``). With ``A = I + D B`` per block, ``B - B S B = B A^-1`` and
    ``Z'V^-1 = A^-T (.) / s0``. When every block has the same patterns (one level of one term,
    e.g. ``(1 + x | donor)``), sums over blocks come first (:meth:`_score_uniform`).
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
        # Every block with the same pattern (one level of one term, e.g. (1 + x | donor)):
        # sums over blocks first, then the patterns (see _score).
        self.uniform = b <= UNIFORM_MAX and bool(np.all(self.E == self.E[:, :1]))
        if self.uniform:
            e = self.E[:, 0]
            k = e.shape[0]
            self.e_flat = e.reshape(k, -1)
            # T[j, k, (b, c), (d, a)] = e_j[a, b] e_k[c, d]
            self.T = np.einsum("jab,kcd->jkbcda", e, e).reshape(k * k, -1)

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
        Szy = np.einsum("glab,glb->gla", S, zy)
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
            "Ainv": Ainv, "XHi": XHi, "beta": beta, "quad": quad, "logdet": logdet, "ok": ok
        }  # fmt: skip

    def loglik(self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray) -> np.ndarray:
        """Log-likelihood (without constants) of the genes ``rows``."""
        return self._loglik(self._core(rows, gamma, s0), s0)

    def score_information(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score and expected information in ``(gamma, s0)`` for the genes ``rows``."""
        return self._score(rows, gamma, s0, self._core(rows, gamma, s0))

    def loglik_score(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-likelihood, score and expected information from one factorisation."""
        c = self._core(rows, gamma, s0)
        return self._loglik(c, s0), *self._score(rows, gamma, s0, c)

    def _loglik(self, c: dict[str, np.ndarray], s0: np.ndarray) -> np.ndarray:
        out = -0.5 * (self.n_eff * np.log(s0) + c["logdet"] + c["quad"] / s0)
        return np.where(c["ok"] & (s0 > 0), out, -np.inf)

    def _score(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray, c: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        # With A = I + D B: I - S B = A^-1, so B - B S B = B A^-1 and I - B S = A^-T.
        B, K, E, Ainv = self.B, self.K, self.E, c["Ainv"]
        s = s0[:, None, None, None]
        zy = self.zy[rows]
        r = zy - (c["beta"] @ K.reshape(-1, self.p).T).reshape(zy.shape)
        u = np.einsum("glba,glb->gla", Ainv, r) / s0[:, None, None]
        Qb = (B @ Ainv) / s
        Qb = (Qb + np.swapaxes(Qb, -1, -2)) / 2
        J = (np.swapaxes(Ainv, -1, -2) @ K) / s  # Z'V^-1X (g, L, b, p)
        g, k = gamma.shape
        if self.uniform:
            return self._score_uniform(gamma, s0, c, u, Qb, J)
        EQ = E[None] @ Qb[:, None]  # (g, k, L, b, b)
        EJ = E[None] @ J[:, None]  # (g, k, L, b, p)
        Eu = (E[None] @ u[:, None, :, :, None])[..., 0]
        uu = np.sum((Eu * u[:, None]).reshape(g, k, -1), axis=2)
        tq = np.trace(EQ, axis1=-2, axis2=-1).sum(axis=-1)
        EQt = np.swapaxes(EQ, -1, -2).reshape(g, k, -1)
        fq = EQ.reshape(g, k, -1) @ np.swapaxes(EQt, 1, 2)
        JEJ = tmid = None
        if self.reml:
            p = self.p
            EJf = EJ.reshape(g, k, -1, p)
            JEJ = np.swapaxes(J.reshape(g, -1, p), 1, 2)[:, None] @ EJf  # J' E_j J
            QEJ = (Qb[:, None] @ EJ).reshape(g, k, -1, p)
            mid = np.swapaxes(EJf, -1, -2)[:, :, None] @ QEJ[:, None]  # J' E_j Qb E_k J
            tmid = np.einsum("gpr,gjkrp->gjk", c["XHi"] * s0[:, None, None], mid)
        return self._assemble(gamma, s0, c, uu, tq, fq, JEJ, tmid)

    def _score_uniform(
        self,
        gamma: np.ndarray,
        s0: np.ndarray,
        c: dict[str, np.ndarray],
        u: np.ndarray,
        Qb: np.ndarray,
        J: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_score` when every block has the same patterns ``e_j`` (b x b).

        ``u'E_j u = <e_j, sum_l u_l u_l'>``, ``tr(E_j Qb) = <e_j, sum_l Q_l>`` and
        ``tr(E_j Qb E_k Qb) = sum e_j[a, b] e_k[c, d] R[(b, c), (d, a)]`` with
        ``R = sum_l vec(Q_l) vec(Q_l)'``; REML's ``tr(phi J'E_j Qb E_k J)`` is the same with
        ``P_l = J_l phi J_l'`` in place of the second ``Q_l``.
        """
        g, L, b = u.shape
        k = self.e_flat.shape[0]
        ef = self.e_flat
        uu = (np.swapaxes(u, 1, 2) @ u).reshape(g, -1) @ ef.T
        Qf = Qb.reshape(g, L, b * b)
        tq = Qf.sum(axis=1) @ ef.T
        fq = ((np.swapaxes(Qf, 1, 2) @ Qf).reshape(g, -1) @ self.T.T).reshape(g, k, k)
        JEJ = tmid = None
        if self.reml:
            p = self.p
            phi = c["XHi"] * s0[:, None, None]
            Jphi = (J.reshape(g, L * b, p) @ phi).reshape(J.shape)
            Pf = (Jphi @ np.swapaxes(J, -1, -2)).reshape(g, L, b * b)  # J_l phi J_l
            tmid = ((np.swapaxes(Qf, 1, 2) @ Pf).reshape(g, -1) @ self.T.T).reshape(g, k, k)
            Jf = J.reshape(g, L, b * p)
            JJ = (np.swapaxes(Jf, 1, 2) @ Jf).reshape(g, b, p, b, p)
            JJ = np.swapaxes(JJ, 2, 3).reshape(g, b * b, p * p)
            JEJ = (ef @ JJ).reshape(g, k, p, p)  # J' E_j J
        return self._assemble(gamma, s0, c, uu, tq, fq, JEJ, tmid)

    def _assemble(
        self,
        gamma: np.ndarray,
        s0: np.ndarray,
        c: dict[str, np.ndarray],
        uu: np.ndarray,
        tq: np.ndarray,
        fq: np.ndarray,
        JEJ: np.ndarray | None,
        tmid: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score and information from the block parts of ``Q = Z'PZ`` (``Qb``, ``J = Z'V^-1X``).

        ``uu``: ``u'E_j u``; ``tq``, ``fq``: ``tr(E_j Qb)``, ``tr(E_j Qb E_k Qb)``; ``JEJ``,
        ``tmid``: ``J'E_j J`` (g, k, p, p) and ``tr(phi J'E_j Qb E_k J)`` (g, k, k) for REML's
        rank-p corrections (``phi = (X'V^-1X)^-1``); then :func:`.problem.score_from_traces`.
        """
        if self.reml:
            phi = c["XHi"] * s0[:, None, None]
            PJ = phi[:, None] @ JEJ  # (g, k, p, p)
            tq = tq - np.trace(PJ, axis1=-2, axis2=-1)
            PJt = np.swapaxes(PJ, -1, -2).reshape(*PJ.shape[:2], -1)
            fq = fq - 2 * tmid + PJ.reshape(PJt.shape) @ np.swapaxes(PJt, 1, 2)
        return score_from_traces(gamma, s0, self.n_eff, c["quad"], uu, tq, fq)

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
