"""Two nested scalar terms, ``(1 | a) + (1 | a:b)``: closed forms per block.

See :mod:`scflashmm._core.structured` for the model and the notation.

Each block of ``Z'Z`` holds one level of the outer term ``a`` and its ``f`` levels of the
inner term ``a:b``. A cell is in one inner level, so the inner columns ``Z_f`` of a block are
orthogonal (``Z_f'Z_f = N = diag(n)``) and the outer column is their sum (``Z_f 1``). Then
``Z b = Z_f u`` with ``u = b_a 1 + b_f``, ``cov(u) / s0 = Psi = e I + a 1 1'`` (``a``, ``e``:
outer and inner variances relative to ``s0``), and ``I + Psi N`` is diagonal plus rank one.
With ``delta = 1 / (1 + e n)``, ``w = n delta`` and ``c = a / (1 + a sum(w))`` (Sherman and
Morrison):

- ``|I + D Z'Z| = |I + Psi N| = prod(1 + e n) (1 + a sum(w))``;
- ``S = (I + Psi N)^-1 Psi = e diag(delta) + c delta delta'`` (``Z'V^-1Z`` in the block,
  ``s0 (N - N S N) = diag(w) - c w w'``);

so every quantity of :class:`~scflashmm._core.structured.block._BlockProblem` is a sum over
cells' levels of elementwise products: ``O(L f p^2)`` per gene, no factorisation.
"""

from __future__ import annotations

import numpy as np

from ..stats import SummaryStats
from ..structure import CovarianceStructure
from .block import _BlockProblem


def nested_levels(
    stats: SummaryStats, structure: CovarianceStructure, labels: np.ndarray
) -> tuple[int, np.ndarray] | None:
    """Outer term and inner columns per block when the blocks are ``(1 | a) + (1 | a:b)``.

    Parameters
    ----------
    stats
        Summary statistics (``Z'Z`` is read).
    structure
        The covariance structure.
    labels
        Block of each column of ``Z`` (:func:`~scflashmm._core.structured.block.zz_blocks`).

    Returns
    -------
    The index of the outer term (0 or 1) and the inner columns of each block (blocks, f),
    padded with ``q``; None when the blocks are not of this form.
    """
    terms = structure.terms
    if len(terms) != 2 or any(t.n_effects != 1 for t in terms):
        return None
    n_blocks = int(labels.max()) + 1
    q = structure.q
    term_of = np.repeat([0, 1], [terms[0].q, terms[1].q])
    for outer in (0, 1):
        cols = np.flatnonzero(term_of == outer)
        if cols.size == n_blocks and np.array_equal(np.sort(labels[cols]), np.arange(n_blocks)):
            break
    else:
        return None
    inner = np.flatnonzero(term_of != outer)
    zz = np.asarray(stats.ZZ, dtype=float)
    zi = zz[np.ix_(inner, inner)]
    if np.any(zi[~np.eye(inner.size, dtype=bool)] != 0):
        return None
    # The outer column equals the sum of its block's inner columns (a cell is in one level):
    # Z'Z[o, o] = Z'Z[o, c] summed = Z'Z[c, c] summed, and Z'Z[o, c] = Z'Z[c, c].
    o_of = np.empty(n_blocks, dtype=np.int64)
    o_of[labels[cols]] = cols
    oc = zz[o_of[labels[inner]], inner]
    if not np.allclose(oc, zi.diagonal(), rtol=1e-12, atol=0):
        return None
    sums = np.bincount(labels[inner], weights=oc, minlength=n_blocks)
    if not np.allclose(sums, zz[o_of, o_of], rtol=1e-12, atol=0):
        return None
    sizes = np.bincount(labels[inner], minlength=n_blocks)
    order = inner[np.argsort(labels[inner], kind="stable")]
    pos = np.arange(inner.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    idx = np.full((n_blocks, int(sizes.max())), q)
    idx[np.sort(labels[inner]), pos] = order
    return outer, idx


class _NestedProblem(_BlockProblem):
    """:class:`_BlockProblem` for ``(1 | a) + (1 | a:b)`` by the closed forms of this module."""

    def __init__(
        self,
        stats: SummaryStats,
        structure: CovarianceStructure,
        method: str,
        outer: int,
        idx: np.ndarray,
    ):
        self.structure = structure
        self.n, self.p = stats.n, stats.XX.shape[0]
        self.q = structure.q
        self.reml = method == "REML"
        self.n_eff = self.n - self.p if self.reml else self.n
        self.XX = np.asarray(stats.XX, dtype=float)
        self.logdet_xx = np.linalg.slogdet(self.XX)[1]
        XXi = np.linalg.inv(self.XX)
        self.yry = stats.Ynorm - np.sum(stats.XY * (XXi @ stats.XY), axis=0)
        self.outer, self.inner = outer, 1 - outer
        zz = np.append(np.asarray(stats.ZZ, dtype=float).diagonal(), 0.0)
        self.nn = zz[idx]  # (L, f) cells per inner level; 0 pads
        self.K = np.vstack([stats.ZX, np.zeros((1, self.p))])[idx]  # (L, f, p)
        self.Kf = self.K.reshape(-1, self.p)
        self.KK = np.einsum("lcp,lcr->lcpr", self.K, self.K).reshape(-1, self.p**2)
        zy = np.vstack([stats.ZY, np.zeros((1, stats.ZY.shape[1]))])
        self.zy = np.moveaxis(zy[idx], -1, 0)  # (genes, L, f)
        self.xy = stats.XY.T
        self.yy = stats.Ynorm
        self.zry = self.zy  # (only its length is used outside)

    def _core(self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray) -> dict[str, np.ndarray]:
        g = len(rows)
        a = gamma[:, self.outer] / s0
        e = gamma[:, self.inner] / s0
        one_en = 1 + e[:, None, None] * self.nn
        delta = 1 / np.where(one_en == 0, 1.0, one_en)  # (g, L, f)
        w = self.nn * delta
        sw = w.sum(axis=2)
        one_asw = 1 + a[:, None] * sw  # (g, L)
        c = a[:, None] / np.where(one_asw == 0, 1.0, one_asw)
        sign = np.prod(np.sign(one_en), axis=2) * np.sign(one_asw)
        with np.errstate(divide="ignore"):
            logdet = np.log(np.abs(one_en)).sum(axis=(1, 2)) + np.log(np.abs(one_asw)).sum(axis=1)
        ed = e[:, None, None] * delta
        kd = self._kt(delta)  # K' delta per block (g, L, p)
        H = self._kkt(ed) + _osum(c, kd, kd)
        XH = self.XX - H
        XH = (XH + np.swapaxes(XH, 1, 2)) / 2
        zy = self.zy[rows]
        dy = np.sum(delta * zy, axis=2)  # delta' y per block
        xvy = (
            self.xy[rows] - (ed * zy).reshape(g, -1) @ self.Kf - np.sum((c * dy)[..., None] * kd, 1)
        )
        yvy = self.yy[rows] - np.sum(ed * zy**2, axis=(1, 2)) - np.sum(c * dy**2, axis=1)
        XHi = np.linalg.inv(XH)
        beta = np.einsum("gpr,gr->gp", XHi, xvy)
        quad = yvy - np.sum(xvy * beta, axis=1)
        ok = np.all(sign > 0, axis=1)
        if self.reml:
            sx, lx = np.linalg.slogdet(XH)
            logdet = logdet + lx - self.logdet_xx
            ok &= sx > 0
        return {
            "delta": delta, "w": w, "sw": sw, "c": c, "kd": kd,
            "XHi": XHi, "beta": beta, "quad": quad, "logdet": logdet, "ok": ok,
        }  # fmt: skip

    def _kt(self, x: np.ndarray) -> np.ndarray:
        """``K_l' x_l`` for every block ``l``: (g, L, f) -> (g, L, p)."""
        return np.swapaxes(np.swapaxes(x, 0, 1) @ self.K, 0, 1)

    def _kkt(self, x: np.ndarray) -> np.ndarray:
        """``sum_l K_l' diag(x_l) K_l``: (g, L, f) -> (g, p, p)."""
        return (x.reshape(x.shape[0], -1) @ self.KK).reshape(-1, self.p, self.p)

    def _score(
        self, rows: np.ndarray, gamma: np.ndarray, s0: np.ndarray, c: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        delta, w, sw, cc, kd = c["delta"], c["w"], c["sw"], c["c"], c["kd"]
        g, k = gamma.shape
        o, i = self.outer, self.inner
        s = s0[:, None, None]
        r = self.zy[rows] - (c["beta"] @ self.Kf.T).reshape(self.zy[rows].shape)
        dr = np.sum(delta * r, axis=2)
        u = (delta * r - cc[..., None] * w * dr[..., None]) / s  # Z_f'V^-1 r (g, L, f)
        uu = np.empty((g, k))
        uu[:, i] = np.sum(u**2, axis=(1, 2))
        uu[:, o] = np.sum(u.sum(axis=2) ** 2, axis=1)
        # s0 Qb = diag(w) - c w w': its trace, 1'Qb 1, ||Qb||^2, (1'Qb 1)^2 and ||Qb 1||^2.
        w2, w3 = np.sum(w**2, axis=2), np.sum(w**3, axis=2)
        q11 = sw - cc * sw**2
        s1, s2 = s0, s0**2
        tq = np.empty((g, k))
        tq[:, i] = np.sum(sw - cc * w2, axis=1) / s1
        tq[:, o] = np.sum(q11, axis=1) / s1
        fq = np.empty((g, k, k))
        fq[:, i, i] = np.sum(w2 - 2 * cc * w3 + cc**2 * w2**2, axis=1) / s2
        fq[:, o, o] = np.sum(q11**2, axis=1) / s2
        fq[:, i, o] = fq[:, o, i] = np.sum((1 - cc * sw) ** 2 * w2, axis=1) / s2
        JEJ = tmid = None
        if self.reml:
            # Z_f'V^-1X = (delta K - c w kd) / s0 per block; its outer rows m, w-weighted sums Jw.
            p = self.p
            m = ((1 - cc * sw) / s0[:, None])[..., None] * kd
            kdw, kdww = self._kt(delta * w), self._kt(delta * w**2)
            Jw = (kdw - (cc * w2)[..., None] * kd) / s
            JEJ = np.empty((g, k, p, p))
            cross = _osum(cc, kdw, kd)
            JEJ[:, i] = (
                self._kkt(delta**2) - cross - np.swapaxes(cross, 1, 2) + _osum(cc**2 * w2, kd, kd)
            )
            JEJ[:, i] /= s2[:, None, None]
            JEJ[:, o] = _osum(np.ones_like(cc), m, m)
            mid = np.empty((g, k, k, p, p))
            cross = _osum(cc, kdww, kd)
            mid[:, i, i] = (
                self._kkt(w * delta**2)
                - cross
                - np.swapaxes(cross, 1, 2)
                + _osum(cc**2 * w3, kd, kd)
            ) / (s0**3)[:, None, None] - _osum(cc, Jw, Jw) / s
            mid[:, i, o] = _osum(1 - cc * sw, Jw, m) / s
            mid[:, o, i] = np.swapaxes(mid[:, i, o], -1, -2)
            mid[:, o, o] = _osum(q11, m, m) / s
            tmid = np.einsum("gpr,gjkrp->gjk", c["XHi"] * s0[:, None, None], mid)
        return self._assemble(gamma, s0, c, uu, tq, fq, JEJ, tmid)


def _osum(wts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``sum_l wts_l x_l y_l'``: (g, L), (g, L, p), (g, L, p) -> (g, p, p)."""
    return np.swapaxes(x * wts[..., None], 1, 2) @ y
