"""The design plan: how ``[X Z]' Y`` is computed (chosen by measurement, docs/benchmarks.md).

Design columns that take one non-zero value (indicators of factor levels, interactions of
factors, an intercept) are grouped: the cells of a group fall into ``U`` distinct *patterns*
(e.g. cell type x sample), and ``[X Z]' Y`` restricted to those columns is ``P' S`` with ``P``
the ``U`` distinct design rows and ``S = G' Y`` the sum of ``Y`` over the cells of each pattern.
``S`` is a scatter-add of the stored values (one pass over them, whatever the number of
columns), done by scipy's COO-to-dense kernel, which releases the GIL. The other columns
(e.g. ``log(libsize)``) use a sparse-times-dense product. For counts, ``log(1 + y)`` is
computed once per stored value and the base-2 scale applied to the sums at the end.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

#: A group of indicator-like design columns is summed by pattern only if it has at least
#: this many columns: one scatter-add pass costs about as much as a sparse product with 3
#: (products of few columns) to 7 (of many) dense columns (docs/benchmarks.md, T6).
_MIN_GROUP_COLUMNS = 4

_LN2 = float(np.log(2.0))


class DesignPlan:
    """How ``[X Z]' Y`` is computed for a design, and the per-cell arrays it needs.

    Attributes
    ----------
    groups
        One ``(columns, U)`` per group of indicator-like columns: the design columns (indices
        into ``[X Z]``) and the number ``U`` of distinct patterns (design rows) in the group.
    codes
        Pattern of each cell in each group, int32 (n_groups, n).
    patterns
        Per group the ``U x len(columns)`` distinct design rows.
    continuous
        Indices of the columns computed by a product, and ``cont`` their values (n, c).
    """

    def __init__(self, X: np.ndarray, Z: np.ndarray | sp.csc_matrix, m: int):
        n, p = X.shape
        q = Z.shape[1]
        self.n, self.m, self.r = n, m, p + q
        indicator, values = _indicator_columns(X, Z)
        max_patterns = max(4 * (p + q), (1 << 21) // max(m, 1), 2)
        groups, codes = _group_columns(indicator, max_patterns)
        self.groups: list[tuple[np.ndarray, int]] = []
        code_columns, self.patterns = [], []
        in_group = np.zeros(self.r, dtype=bool)
        for (local, U), code in zip(groups, codes, strict=True):
            columns = np.flatnonzero(values.notna)[local]
            if columns.size < _MIN_GROUP_COLUMNS:
                continue
            first = np.full(U, -1, dtype=np.int64)
            first[code[::-1]] = np.arange(n - 1, -1, -1)  # first cell of each pattern
            on = indicator[first][:, local].toarray() != 0
            self.patterns.append(np.where(on, values.value[columns], 0.0))
            self.groups.append((columns, U))
            code_columns.append(code)
            in_group[columns] = True
        self.continuous = np.flatnonzero(~in_group)
        self.codes = (
            np.vstack(code_columns).astype(np.int32)
            if code_columns
            else np.zeros((0, n), dtype=np.int32)
        )
        self.cont = _design_columns(X, Z, self.continuous)
        self.sizes = [U for _, U in self.groups]
        #: rows of a packed block result: pattern sums, product columns, then Ynorm (and, for
        #: shifted blocks, one more: the sums of the shifted values)
        self.rows = sum(self.sizes) + self.continuous.size + 1

    def unpack(self, packed: np.ndarray, *, is_counts: bool) -> tuple[np.ndarray, np.ndarray]:
        """``[X Z]' Y`` and ``Ynorm`` from the summed packed block results."""
        XZY = np.zeros((self.r, packed.shape[1]))
        row = 0
        for (columns, U), P in zip(self.groups, self.patterns, strict=True):
            XZY[columns] = P.T @ packed[row : row + U]
            row += U
        XZY[self.continuous] = packed[row : row + self.continuous.size]
        Ynorm = packed[self.rows - 1].copy()
        if is_counts:  # blocks hold sums of ln(1 + y): rescale to log2
            XZY /= _LN2
            Ynorm /= _LN2 * _LN2
        return XZY, Ynorm

    def unpack_sums(self, packed: np.ndarray, *, is_counts: bool) -> np.ndarray:
        """Return the sums ``1'Y`` of shifted blocks (the extra last row of their results)."""
        if packed.shape[0] != self.rows + 1:
            msg = f"Expected {self.rows + 1} packed rows (shifted blocks), got {packed.shape[0]}."
            raise ValueError(msg)
        return packed[self.rows] / _LN2 if is_counts else packed[self.rows].copy()


@dataclass
class _ColumnValues:
    notna: np.ndarray  # bool (r,): the column takes one non-zero value (or is all zero)
    value: np.ndarray  # float (r,): that value


def _indicator_columns(X: np.ndarray, Z: Any) -> tuple[sp.csc_matrix, _ColumnValues]:
    """Find the columns of ``[X Z]`` that take a single non-zero value (CSC indicator matrix)."""
    n, p = X.shape
    q = Z.shape[1]
    lo = np.full(p + q, np.inf)
    hi = np.full(p + q, -np.inf)
    step = max(1, (1 << 22) // max(p, 1))
    for start in range(0, n, step):
        block = X[start : start + step]
        nz = block != 0
        lo[:p] = np.minimum(lo[:p], np.where(nz, block, np.inf).min(axis=0, initial=np.inf))
        hi[:p] = np.maximum(hi[:p], np.where(nz, block, -np.inf).max(axis=0, initial=-np.inf))
    if sp.issparse(Z):
        Zc = sp.csc_matrix(Z, copy=True)
        Zc.eliminate_zeros()
        for j in range(q):
            data = Zc.data[Zc.indptr[j] : Zc.indptr[j + 1]]
            if data.size:
                lo[p + j], hi[p + j] = data.min(), data.max()
    else:
        for start in range(0, n, step):
            block = Z[start : start + step]
            nz = block != 0
            lo[p:] = np.minimum(lo[p:], np.where(nz, block, np.inf).min(axis=0, initial=np.inf))
            hi[p:] = np.maximum(hi[p:], np.where(nz, block, -np.inf).max(axis=0, initial=-np.inf))
    single = (lo == hi) | (np.isinf(lo) & np.isinf(hi))  # one non-zero value, or all zero
    value = np.where(np.isfinite(lo), lo, 0.0)
    columns = np.flatnonzero(single)
    xcols, zcols = columns[columns < p], columns[columns >= p] - p
    parts = []
    if xcols.size:
        parts.append(
            sp.vstack(
                [sp.csr_matrix(X[s : s + step, xcols] != 0) for s in range(0, n, step)]
            ).tocsc()
        )
    if zcols.size:
        Zs = Zc if sp.issparse(Z) else sp.csc_matrix(Z)
        parts.append((Zs[:, zcols] != 0).tocsc())
    indicator = sp.hstack(parts, format="csc") if parts else sp.csc_matrix((n, 0), dtype=bool)
    indicator.sort_indices()
    return indicator, _ColumnValues(single, value)


def _group_columns(
    indicator: sp.csc_matrix, max_patterns: int
) -> tuple[list[tuple[np.ndarray, int]], list[np.ndarray]]:
    """Group indicator columns into sets whose cells fall into at most ``max_patterns`` patterns.

    Consecutive columns with disjoint cells form a *factor* (e.g. the levels of a categorical
    variable); factors are merged into a group while the number of distinct combinations
    stays within ``max_patterns``. Returns ``(local column indices, U)`` per group and the
    pattern code (0 .. U-1) of every cell.
    """
    n, t = indicator.shape
    factors: list[tuple[list[int], np.ndarray]] = []
    code = np.zeros(n, dtype=np.int64)
    columns: list[int] = []
    for j in range(t):
        rows = indicator.indices[indicator.indptr[j] : indicator.indptr[j + 1]]
        if columns and code[rows].any():
            factors.append((columns, code))
            code, columns = np.zeros(n, dtype=np.int64), []
        columns.append(j)
        code[rows] = len(columns)
    if columns:
        factors.append((columns, code))

    groups: list[tuple[np.ndarray, int]] = []
    codes: list[np.ndarray] = []
    g_cols: list[int] = []
    g_code = np.zeros(n, dtype=np.int64)
    g_size = 1
    for f_cols, f_code in factors:
        radix = len(f_cols) + 1
        combined, size = _renumber(g_code * radix + f_code, g_size * radix)
        if g_cols and size > max_patterns:
            groups.append((np.asarray(g_cols), g_size))
            codes.append(g_code)
            g_cols = []
            combined, size = _renumber(f_code, radix)
        g_cols = [*g_cols, *f_cols]
        g_code, g_size = combined, size
    if g_cols:
        groups.append((np.asarray(g_cols), g_size))
        codes.append(g_code)
    return groups, codes


def _renumber(code: np.ndarray, bound: int) -> tuple[np.ndarray, int]:
    """Codes ``0 .. U-1`` for the distinct values of ``code`` (all in ``0 .. bound-1``)."""
    present = np.zeros(bound, dtype=bool)
    present[code] = True
    remap = np.cumsum(present) - 1
    return remap[code], int(present.sum())


def _design_columns(X: np.ndarray, Z: Any, columns: np.ndarray) -> np.ndarray:
    p = X.shape[1]
    xcols, zcols = columns[columns < p], columns[columns >= p] - p
    parts = [X[:, xcols]]
    if zcols.size:
        parts.append(Z[:, zcols].toarray() if sp.issparse(Z) else Z[:, zcols])
    return np.ascontiguousarray(np.hstack(parts), dtype=np.float64)
