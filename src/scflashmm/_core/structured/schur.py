"""Large ``q``: a Schur complement on one large scalar term, every gene at once.

See :mod:`scflashmm._core.structured` for the model and the notation.

A scalar term ``(1 | f)`` (or ``(0 + x | f)``) has one level of ``f`` per cell, so its block of
``Z'Z`` is diagonal. With its ``q1`` columns first and the other ``q2 = q - q1`` after,

    Z'Z = [[diag(c), N], [N', C]],     D = G / s0 = [[d1 I, 0], [0, D2]],

and eliminating the diagonal block leaves dense ``q2 x q2`` algebra per gene (131 x 131 for
mlmRev's Chem97 with ``(1 | school) + (1 | lea)``, where ``q = 2,541``). With
``a = 1 + d1 c``, ``v = 1 / a``, ``w = d1 v`` (elementwise over the ``q1`` levels):

- ``S = (I + D Z'Z)^-1 D = diag(w) + T' S2 T`` with ``T = [-N' diag(w), I]``,
  ``C~ = C - N' diag(w) N`` and ``S2 = (I + D2 C~)^-1 D2``; so ``x' S y`` is
  ``x1' diag(w) y1 + x~2' S2 y~2`` with ``x~2 = x2 - N' (w x1)``, and
  ``log|I + D Z'Z| = sum(log a) + log|I + D2 C~|``;
- ``s0 Z'V^-1 Z = B0 - R' S2 R`` with ``B0 = [[diag(c v), diag(v) N], [N' diag(v), C~]]`` and
  ``R = [N' diag(v), C~]``, and ``s0 Z'V^-1 X`` is spanned by the columns of
  ``U = [[diag(v) [N, K1], 0], [0, I]]`` (``K = Z'X``). Hence ``Q = Z'PZ`` (REML) or
  ``Z'V^-1Z`` (ML) is ``diag(c v / s0) (+) 0`` plus ``U M U'`` with a small ``M`` of order
  ``2 q2 + p``, and the traces of the score and information of the large term,
  ``tr(Q11)`` and ``||Q11||_F^2``, need only ``U1' diag(x) U1`` for two weights ``x``: products
  of the weights with the fixed sparse row outer products of ``[N, K1]``.

The score and information in the other terms are those of :class:`.problem._Problem` on
``Q22`` (dense, ``q2 x q2``); the residual variance's entries follow from homogeneity as in
:class:`.block._BlockProblem`. Work per gene: ``O(q2^3 + nnz)`` instead of ``O(q^3)``; when the
large term is nested in the others, all scalar (:func:`nested`), ``C~`` and ``I + D2 C~`` stay
diagonal and it is ``O(p (q2 + p)^2 + nnz)``.
"""

from __future__ import annotations

import numpy as np

from ..stats import SummaryStats
from ..structure import CovarianceStructure
from .block import zz_blocks
from .problem import _pair, _Problem, score_from_traces

#: ``q`` from which a structure with a large scalar term is fit by the Schur complement
#: automatically (below it the dense or block algebra is as fast).
SCHUR_MIN_Q = 300

#: ``q`` from which a large scalar term nested in the others (:func:`nested`) is fit by the
#: Schur complement automatically, even when ``Z'Z`` splits into small blocks: its work per
#: gene is then ``O(p (q2 + p)^2)`` (5 times faster than the block algebra for
#: ``(1 | donor) + (1 | donor:celltype)`` over 25 x 10 levels).
NESTED_MIN_Q = 100


def schur_candidate(structure: CovarianceStructure) -> int | None:
    """Return the scalar term with the most levels if the others have fewer columns, else None.

    Decided from the structure alone (before the pass over the cells): every scalar term
    built from a grouping factor has a diagonal block of ``Z'Z``.
    """
    scalar = [i for i, t in enumerate(structure.terms) if t.n_effects == 1]
    if not scalar:
        return None
    i = max(scalar, key=lambda j: structure.terms[j].n_levels)
    q1 = structure.terms[i].q
    return i if structure.q - q1 <= q1 else None


def schur_term(stats: SummaryStats, structure: CovarianceStructure, kernel: str) -> int | None:
    """Term eliminated by the Schur complement, or None for the dense/block algebra.

    The candidate is the scalar term with the most levels whose block of ``Z'Z`` is diagonal.
    ``kernel`` is ``"schur"`` (required: a ``ValueError`` when there is none), ``"dense"``
    (None) or ``"auto"``: the candidate when the rest stays diagonal after the elimination
    (:func:`nested`; from :data:`NESTED_MIN_Q` random effects), or from :data:`SCHUR_MIN_Q`
    when the other terms have fewer columns and ``Z'Z`` does not split into small blocks.
    """
    if kernel == "dense" or (kernel == "auto" and structure.q < NESTED_MIN_Q):
        return None
    best = None
    scalar = [i for i, t in enumerate(structure.terms) if t.n_effects == 1]
    for i in sorted(scalar, key=lambda j: -structure.terms[j].n_levels):
        lo, hi = structure.offsets[i], structure.offsets[i + 1]
        block = np.asarray(stats.ZZ[lo:hi, lo:hi])
        if np.count_nonzero(block) == np.count_nonzero(np.diagonal(block)):
            best = i
            break
    if best is None and kernel == "schur":
        msg = (
            "The Schur kernel needs a scalar random term whose block of Z'Z is diagonal "
            "(one level per cell, e.g. (1 | school)); this structure has none."
        )
        raise ValueError(msg)
    if best is None or kernel == "schur" or nested(stats, structure, best):
        return best
    q1 = structure.terms[best].q
    large = structure.q >= SCHUR_MIN_Q and structure.q - q1 <= q1
    return best if large and zz_blocks(stats, structure) is None else None


def nested(stats: SummaryStats, structure: CovarianceStructure, term: int) -> bool:
    """Whether ``C~`` stays diagonal when ``term`` is eliminated.

    True when the other terms are scalar, their block of ``Z'Z`` is diagonal and each level of
    ``term`` meets one level of them (``N'N`` diagonal; e.g. schools in education
    authorities, or ``donor:celltype`` in ``donor``): then ``I + D2 C~`` is diagonal too.
    """
    import scipy.sparse as sp

    if any(t.n_effects != 1 for i, t in enumerate(structure.terms) if i != term):
        return False
    lo, hi = int(structure.offsets[term]), int(structure.offsets[term + 1])
    cols2 = np.r_[0:lo, hi : structure.q]
    ZZ = stats.ZZ
    C = sp.csr_matrix(np.asarray(ZZ[np.ix_(cols2, cols2)], dtype=float))
    N = sp.csr_matrix(np.asarray(ZZ[lo:hi][:, cols2], dtype=float))
    return _off_diagonal(C) == 0 and _off_diagonal(N.T @ N) == 0


def _off_diagonal(M) -> int:
    """Count the nonzeros of sparse ``M`` off its diagonal."""
    return int(M.count_nonzero() - np.count_nonzero(M.diagonal()))


def _row_outer(A) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO entries ``(row, a r + b, value)`` of the row-wise outer products of ``A`` (n x r)."""
    A = A.tocsr()
    A.sum_duplicates()
    r = A.shape[1]
    counts = np.diff(A.indptr)
    rows = np.repeat(np.arange(A.shape[0]), counts)  # row of each stored entry
    reps = counts[rows]  # each entry pairs with every entry of its row
    first = np.repeat(np.arange(A.nnz), reps)
    start = np.repeat(A.indptr[rows], reps)
    within = np.arange(first.size) - np.repeat(np.cumsum(reps) - reps, reps)
    second = start + within
    return (
        rows[first],
        A.indices[first] * r + A.indices[second],
        A.data[first] * A.data[second],
    )


class _SchurProblem(_Problem):
    """:class:`_Problem` with the Schur complement on one large scalar term (see the module)."""

    def __init__(self, stats: SummaryStats, structure: CovarianceStructure, method: str, term: int):
        import scipy.sparse as sp

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
        lo, hi = int(structure.offsets[term]), int(structure.offsets[term + 1])
        cols2 = np.r_[0:lo, hi : self.q]
        self.q1, self.q2 = hi - lo, cols2.size
        ZZ = stats.ZZ
        self.c = np.asarray(np.diagonal(np.asarray(ZZ[lo:hi, lo:hi])), dtype=float).copy()
        self.N = sp.csr_matrix(np.asarray(ZZ[lo:hi][:, cols2], dtype=float))
        self.NT = self.N.T.tocsr()
        self.C = np.asarray(ZZ[np.ix_(cols2, cols2)], dtype=float)
        ZX = np.asarray(stats.ZX, dtype=float)
        self.K1, self.K2 = ZX[lo:hi], ZX[cols2]
        ZY = np.asarray(stats.ZY, dtype=float)
        self.zy1, self.zy2 = ZY[lo:hi].T.copy(), ZY[cols2].T.copy()  # (genes, q1), (genes, q2)
        self.xy = stats.XY.T
        self.yy = stats.Ynorm
        self.zry = self.zy2  # (only its length is used outside)
        # U1' diag(x) U1 for U1 = [N, K1] as x @ O, O the row outer products (q1, ra^2).
        Ua = sp.hstack([self.N, sp.csr_matrix(self.K1)], format="csr")
        self.ra = ra = self.q2 + self.p
        r, col, val = _row_outer(Ua)
        upper = col // ra <= col % ra  # (the products are symmetric)
        self.Ot = sp.csr_matrix((val[upper], (col[upper], r[upper])), shape=(ra * ra, self.q1))
        self.ix_a = np.arange(ra)
        # Parameters: the large term's variance (index j1), the others' patterns in q2.
        self.j1 = int(structure.theta_offsets[term])
        pos = np.empty(self.q, dtype=np.int64)
        pos[cols2] = np.arange(self.q2)
        self.pat2 = []
        for i, (t, off, toff) in enumerate(
            zip(structure.terms, structure.offsets[:-1], structure.theta_offsets[:-1], strict=True)
        ):
            if i == term:
                continue
            base = off + np.arange(t.n_levels) * t.n_effects
            for e, (a, b) in enumerate(t.entries):
                self.pat2.append((pos[base + a], pos[base + b], 0.5 if a == b else 1.0, toff + e))
        self.eye2 = np.eye(self.q2)
        self.d2_diag = all(t.n_effects == 1 for i, t in enumerate(structure.terms) if i != term)
        self.nested = nested(stats, structure, term)  # then C~, I + D2 C~ are diagonal

    # ------------------------------------------------------------------ algebra

    def _outer(self, W: np.ndarray) -> np.ndarray:
        """``[N, K1]' diag(w) [N, K1]`` (..., ra, ra) for each row ``w`` of ``W`` (..., q1)."""
        lead = W.shape[:-1]
        U = (self.Ot @ W.reshape(-1, self.q1).T).T.reshape(*lead, self.ra, self.ra)
        out = U + np.swapaxes(U, -1, -2)
        out[..., self.ix_a, self.ix_a] /= 2
        return out

    def _d2(self, gamma: np.ndarray, s0: np.ndarray) -> np.ndarray:
        """``D2`` (genes, q2, q2), or its diagonal (genes, q2) when every other term is scalar."""
        g = gamma.shape[0]
        D2 = np.zeros((g, self.q2) if self.d2_diag else (g, self.q2, self.q2))
        for A, B, _, j in self.pat2:
            val = (gamma[:, j] / s0)[:, None]
            if self.d2_diag:
                D2[:, A] = val
            else:
                D2[:, A, B] = val
                D2[:, B, A] = val
        return D2

    def _core(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray, *, full: bool = False
    ) -> dict[str, np.ndarray]:
        """Shared algebra of the genes ``rows``.

        ``full`` adds ``S2`` and ``(I + D2 C~)^-1`` (for the score) in place of the
        log-determinant.
        """
        q2 = self.q2
        d1 = gamma[:, self.j1] / s0
        a = 1 + d1[:, None] * self.c
        v = 1 / a
        w = d1[:, None] * v
        P = self._outer(w)
        Ct = self.C - P[:, :q2, :q2]
        Kt2 = self.K2 - P[:, :q2, q2:]
        D2 = self._d2(gamma, s0)
        if self.nested:  # C~, D2, I + D2 C~ and S2 as their diagonals (genes, q2)
            Ct = np.diagonal(Ct, axis1=1, axis2=2)
            A2 = 1 + D2 * Ct
        else:
            A2 = self.eye2 + (D2[:, :, None] * Ct if self.d2_diag else D2 @ Ct)
        zy1, zy2 = self.zy1[rows], self.zy2[rows]
        wz1 = w * zy1
        zt2 = zy2 - (self.NT @ wz1.T).T
        out = {"v": v, "w": w, "Ct": Ct, "Kt2": Kt2}
        # S2 [Kt2, zt2] with S2 = (I + D2 C~)^-1 D2
        rhs = np.concatenate([Kt2, zt2[:, :, None]], axis=2)
        rhs = D2[:, :, None] * rhs if self.d2_diag else D2 @ rhs
        if self.nested:
            Ainv = 1 / A2
            if full:
                out |= {"S2": D2 * Ainv, "Ainv": Ainv}
            else:
                sign, lda = np.where(np.all(A2 > 0, axis=1), 1.0, -1.0), np.sum(np.log(A2), axis=1)
            S2r = Ainv[:, :, None] * rhs
        elif full:
            Ainv = np.linalg.inv(A2)
            S2 = Ainv * D2[:, None, :] if self.d2_diag else Ainv @ D2
            out["S2"] = (S2 + np.swapaxes(S2, 1, 2)) / 2
            out["Ainv"] = Ainv
            S2r = Ainv @ rhs
        else:
            sign, lda = np.linalg.slogdet(A2)
            S2r = np.linalg.solve(A2, rhs)
        S2K, S2z = S2r[..., :-1], S2r[..., -1]
        XH = self.XX - P[:, q2:, q2:] - np.swapaxes(Kt2, 1, 2) @ S2K
        XH = (XH + np.swapaxes(XH, 1, 2)) / 2
        yvy = self.yy[rows] - np.sum(wz1 * zy1, axis=1) - np.sum(zt2 * S2z, axis=1)
        xvy = self.xy[rows] - wz1 @ self.K1 - np.einsum("gqp,gq->gp", Kt2, S2z)
        XHi = np.linalg.inv(XH)
        beta = np.einsum("gpr,gr->gp", XHi, xvy)
        out |= {"S2K": S2K, "XHi": XHi, "beta": beta, "quad": yvy - np.sum(xvy * beta, axis=1)}
        if not full:
            logdet = np.sum(np.log(a), axis=1) + lda
            ok = (sign > 0) & np.all(a > 0, axis=1)
            if self.reml:
                sx, lx = np.linalg.slogdet(XH)
                logdet = logdet + lx - self.logdet_xx
                ok &= sx > 0
            out |= {"logdet": logdet, "ok": ok}
        return out

    def loglik(self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray) -> np.ndarray:
        """Log-likelihood (without constants) of the genes ``rows``."""
        c = self._core(rows, gamma, s0)
        out = -0.5 * (self.n_eff * np.log(s0) + c["logdet"] + c["quad"] / s0)
        return np.where(c["ok"] & (s0 > 0), out, -np.inf)

    def score_information(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score and expected information in ``(gamma, s0)`` for the genes ``rows``."""
        c = self._core(rows, gamma, s0, full=True)
        q2, p, g = self.q2, self.p, len(rows)
        v, w, Ct, S2, S2K, XHi = c["v"], c["w"], c["Ct"], c["S2"], c["S2K"], c["XHi"]
        s = s0[:, None, None]
        # u = Z'V^-1 (y - X beta), through S applied to Z'r.
        beta = c["beta"]
        zr1 = self.zy1[rows] - beta @ self.K1.T
        zr2 = self.zy2[rows] - beta @ self.K2.T
        zt2 = zr2 - (self.NT @ (w * zr1).T).T
        x2 = S2 * zt2 if self.nested else np.einsum("gij,gj->gi", S2, zt2)
        Nx2 = (self.N @ x2.T).T
        x1 = w * (zr1 - Nx2)
        u1 = (zr1 - self.c * x1 - Nx2) / s0[:, None]
        u2 = (zr2 - (self.NT @ x1.T).T - x2 @ self.C) / s0[:, None]
        # Q = diag(delta) (+) 0 + U M U', M = [[Ma, Mb], [Mb', Mc]] (ra + q2 square).
        # I - S2 C~ = (I + D2 C~)^-1, so C~ - C~ S2 C~ = C~ (I + D2 C~)^-1. REML subtracts
        # rank p: Ma -= Ja X Ja', Mb -= Ja X Jc', Mc -= Jc X Jc' (X = XHi).
        Ainv = c["Ainv"]
        ix = np.arange(q2)
        delta = self.c * v / s0[:, None]
        GH = self._outer(np.stack([v * v, v * v * delta]))
        G, H = GH[0], GH[1]
        Ma = np.zeros((g, self.ra, self.ra))
        Mb = np.zeros((g, self.ra, q2))
        if self.nested:
            Ma[:, ix, ix] = -S2
            Mb[:, ix, ix] = Ainv
            Mc = np.zeros((g, q2, q2))
            Mc[:, ix, ix] = Ct * Ainv
            MaG = np.zeros_like(G)
            MaG[:, :q2] = -S2[:, :, None] * G[:, :q2]
            GMb = G[:, :, :q2] * Ainv[:, None, :]
        else:
            Ma[:, :q2, :q2] = -S2
            Mb[:, :q2] = Ainv
            Mc = Ct @ Ainv
        if self.reml:
            Ja = np.concatenate([-S2K, np.broadcast_to(np.eye(p), (g, p, p))], axis=1)
            Jc = c["Kt2"] - (Ct[:, :, None] * S2K if self.nested else Ct @ S2K)
            JaX = Ja @ XHi
            JcX = Jc @ XHi
            Ma -= JaX @ np.swapaxes(Ja, 1, 2)
            Mb -= JaX @ np.swapaxes(Jc, 1, 2)
            Mc = Mc - JcX @ np.swapaxes(Jc, 1, 2)
            if self.nested:  # rank p: O(p ra^2) instead of O(ra^3)
                MaG -= JaX @ (np.swapaxes(Ja, 1, 2) @ G)
                GMb -= (G @ JaX) @ np.swapaxes(Jc, 1, 2)
        Ma, Mb, Mc = Ma / s, Mb / s, Mc / s
        Ma = (Ma + np.swapaxes(Ma, 1, 2)) / 2
        Mc = (Mc + np.swapaxes(Mc, 1, 2)) / 2
        if self.nested:
            MaG, GMb = MaG / s, GMb / s
        else:
            MaG = Ma @ G
            GMb = G @ Mb
        k = self.structure.n_theta
        j1 = self.j1
        uu = np.empty((g, k))
        tq = np.empty((g, k))
        fq = np.empty((g, k, k))
        uu[:, j1] = np.sum(u1 * u1, axis=1)
        tq[:, j1] = np.sum(delta, axis=1) + np.trace(MaG, axis1=1, axis2=2)
        fq[:, j1, j1] = (
            np.sum(delta * delta, axis=1)
            + 2 * np.einsum("gij,gji->g", Ma, H)
            + np.einsum("gij,gji->g", MaG, MaG)
        )
        # tr(E_j Q21 Q12) = 2 f sum_l Mb[:, A_l]' G Mb[:, B_l]
        for A, B, f, j in self.pat2:
            uu[:, j] = 2 * f * np.sum(u2[:, A] * u2[:, B], axis=1)
            tq[:, j] = f * (np.sum(Mc[:, A, B], axis=1) + np.sum(Mc[:, B, A], axis=1))
            fq[:, j, j1] = fq[:, j1, j] = 2 * f * np.einsum("gil,gil->g", Mb[:, :, A], GMb[:, :, B])
            for A2, B2, f2, i in self.pat2:
                if i > j:
                    continue
                tr = (
                    _pair(Mc, B, A2, B2, A)
                    + _pair(Mc, B, B2, A2, A)
                    + _pair(Mc, A, A2, B2, B)
                    + _pair(Mc, A, B2, A2, B)
                )
                fq[:, j, i] = fq[:, i, j] = f * f2 * tr
        return score_from_traces(gamma, s0, self.n_eff, c["quad"], uu, tq, fq)

    def fixed_effects(
        self, stats: SummaryStats, gamma: np.ndarray, s0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """GLS ``beta`` and its covariance at the estimates."""
        c = self._core(np.arange(gamma.shape[0]), gamma, s0)
        return c["beta"], c["XHi"] * s0[:, None, None]
