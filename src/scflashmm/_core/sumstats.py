"""Summary statistics of a linear mixed model, accumulated in one pass over the cells.

For ``y = X beta + Z b + e`` and a cells x genes response ``Y`` the statistics are

    XX = X'X (p, p)   XY = X'Y (p, m)   ZX = Z'X (q, p)   ZY = Z'Y (q, m)
    ZZ = Z'Z (q, q)   Ynorm = column sums of Y * Y (m,)   n = number of cells

All are sums over cells, so they are accumulated block by block over the cells of ``Y`` and
statistics of disjoint sets of cells add up (:meth:`SummaryStats.__add__`).

How the pass computes ``[X Z]' Y`` (chosen by measurement, see docs/benchmarks.md)
-------------------------------------------------------------------------------
Design columns that take one non-zero value (indicators of factor levels, interactions of
factors, an intercept) are grouped: the cells of a group fall into ``U`` distinct *patterns*
(e.g. cell type x sample), and ``[X Z]' Y`` restricted to those columns is ``P' S`` with ``P``
the ``U`` distinct design rows and ``S = G' Y`` the sum of ``Y`` over the cells of each pattern.
``S`` is a scatter-add of the stored values (one pass over them, whatever the number of
columns), done by scipy's COO-to-dense kernel, which releases the GIL. The other columns
(e.g. ``log(libsize)``) use a sparse-times-dense product. For counts, ``log(1 + y)`` is
computed once per stored value and the base-2 scale applied to the sums at the end.

Blocks of cells are processed in a thread pool (``n_jobs``) and added in block order, so
the result does not depend on the number of threads. A Dask array is reduced where its
blocks live: each block gives its partial statistics, summed by a tree reduction.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._accumulate import csc_matmul_add, csr_matmul_add, scatter_add
from ._threads import check_n_jobs, single_threaded_blas
from .sources import CompressedBlock, Source, is_dask_array, open_source, shape2

#: Cells per chunk when none is given: bounds the working memory of one block.
DEFAULT_CHUNK_SIZE = 10_000

#: The statistics proper; other fields of :class:`SummaryStats` are optional metadata.
ARRAY_FIELDS = ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")
_NAME_FIELDS = ("feature_names", "covariate_names", "z_names", "component_names")
_FORMAT_VERSION = 1

#: A group of indicator-like design columns is summed by pattern only if it has at least
#: this many columns: one scatter-add pass costs about as much as a sparse product with 3
#: (products of few columns) to 7 (of many) dense columns (docs/benchmarks.md, T6).
_MIN_GROUP_COLUMNS = 4

_LN2 = float(np.log(2.0))


@dataclass(frozen=True, eq=False)
class SummaryStats:
    """Summary statistics of ``(X, Y, Z)`` over a set of cells.

    Attributes
    ----------
    XX, XY, ZX, ZY, ZZ
        Cross products ``X'X`` (p, p), ``X'Y`` (p, m), ``Z'X`` (q, p), ``Z'Y`` (q, m) and
        ``Z'Z`` (q, q).
    Ynorm
        Squared Euclidean norm of each gene over the cells (m,).
    n
        Number of cells.
    feature_names, covariate_names, z_names
        Optional names of the genes (m), of the columns of ``X`` (p) and of ``Z`` (q).
    d
        Optional sizes ``(q_1 .. q_k)`` of the random components (summing to q).
    component_names
        Optional names of the random components (k).

    Notes
    -----
    Statistics of disjoint sets of cells add up with ``a + b`` (names must agree where both
    have them). :meth:`save` and :meth:`load` keep statistics, with their metadata, in an
    ``.npz`` file, so that they can be fit again (:func:`scflashmm.lmm`) without the cells.
    """

    XX: np.ndarray
    XY: np.ndarray
    ZX: np.ndarray
    ZY: np.ndarray
    ZZ: np.ndarray
    Ynorm: np.ndarray
    n: int
    feature_names: tuple[str, ...] | None = field(default=None, kw_only=True)
    covariate_names: tuple[str, ...] | None = field(default=None, kw_only=True)
    z_names: tuple[str, ...] | None = field(default=None, kw_only=True)
    d: tuple[int, ...] | None = field(default=None, kw_only=True)
    component_names: tuple[str, ...] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        p, m = np.shape(self.XY)
        q = np.shape(self.ZY)[0]
        expected = {
            "XX": (p, p),
            "XY": (p, m),
            "ZX": (q, p),
            "ZY": (q, m),
            "ZZ": (q, q),
            "Ynorm": (m,),
        }
        for name, shape in expected.items():
            if np.shape(getattr(self, name)) != shape:
                actual = np.shape(getattr(self, name))
                msg = f"SummaryStats.{name} has shape {actual}, expected {shape}."
                raise ValueError(msg)
        sizes = {"feature_names": m, "covariate_names": p, "z_names": q}
        for name in _NAME_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = [value]
            value = tuple(str(v) for v in value)
            object.__setattr__(self, name, value)
            if name in sizes and len(value) != sizes[name]:
                msg = f"SummaryStats.{name} has {len(value)} names, expected {sizes[name]}."
                raise ValueError(msg)
        if self.d is not None:
            d = tuple(int(x) for x in np.atleast_1d(self.d))
            if sum(d) != q or any(x < 1 for x in d):
                msg = f"SummaryStats.d = {d} must be positive sizes summing to q = {q}."
                raise ValueError(msg)
            object.__setattr__(self, "d", d)
        if self.component_names is not None:
            k = 1 if self.d is None else len(self.d)
            if len(self.component_names) != k:
                msg = (
                    f"SummaryStats.component_names has {len(self.component_names)} names, "
                    f"expected one per random component ({k})."
                )
                raise ValueError(msg)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n, p, q, m)``: cells, fixed-effect columns, random-effect columns, genes."""
        return self.n, self.XX.shape[0], self.ZZ.shape[0], self.Ynorm.shape[0]

    def __add__(self, other: SummaryStats) -> SummaryStats:
        if not isinstance(other, SummaryStats):
            return NotImplemented
        if self.shape[1:] != other.shape[1:]:
            msg = (
                "Cannot add summary statistics of shapes (n, p, q, m) "
                f"{self.shape} and {other.shape}."
            )
            raise ValueError(msg)
        meta = {}
        for name in (*_NAME_FIELDS, "d"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                msg = f"Cannot add summary statistics with different {name}."
                raise ValueError(msg)
            meta[name] = a if a is not None else b
        arrays = {name: getattr(self, name) + getattr(other, name) for name in ARRAY_FIELDS}
        return SummaryStats(**arrays, n=self.n + other.n, **meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics and their metadata to an ``.npz`` file at ``path`` (as given).

        Read them back with :meth:`SummaryStats.load`.
        """
        payload: dict[str, np.ndarray] = {
            name: np.asarray(getattr(self, name)) for name in ARRAY_FIELDS
        }
        payload["n"] = np.asarray(self.n, dtype=np.int64)
        payload["format_version"] = np.asarray(_FORMAT_VERSION)
        for name in _NAME_FIELDS:
            value = getattr(self, name)
            if value is not None:
                payload[name] = np.asarray(value, dtype=np.str_)
        if self.d is not None:
            payload["d"] = np.asarray(self.d, dtype=np.int64)
        with open(Path(path), "wb") as fh:
            np.savez(fh, **payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SummaryStats:
        """Read statistics written by :meth:`SummaryStats.save`."""
        with np.load(Path(path), allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [name for name in (*ARRAY_FIELDS, "n") if name not in keys]
            if missing or "format_version" not in keys:
                absent = missing or ["format_version"]
                msg = f"{os.fspath(path)!r} is not a SummaryStats file (missing {absent})."
                raise ValueError(msg)
            version = int(npz["format_version"])
            if version > _FORMAT_VERSION:
                msg = (
                    f"{os.fspath(path)!r} has format version {version}; this scflashmm "
                    f"reads up to {_FORMAT_VERSION}."
                )
                raise ValueError(msg)
            arrays = {name: np.array(npz[name], dtype=np.float64) for name in ARRAY_FIELDS}
            meta: dict[str, Any] = {
                name: npz[name].tolist() for name in _NAME_FIELDS if name in keys
            }
            if "d" in keys:
                meta["d"] = npz["d"].tolist()
            return cls(**arrays, n=int(npz["n"]), **meta)


def summary_stats(
    X: Any,
    Y: Any,
    Z: Any,
    *,
    chunk_size: int | None = None,
    is_counts: bool = False,
    n_jobs: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SummaryStats:
    """Compute the summary statistics of a linear mixed model in one pass over the cells.

    Parameters
    ----------
    X
        Fixed-effects design, cells x p (numpy array or scipy sparse).
    Y
        Response, cells x genes, read once in blocks and never densified when sparse:

        - a numpy array or any scipy sparse matrix or array (CSR and dense are read by blocks
          of cells, CSC by blocks of genes, other formats are converted to CSR);
        - a backed matrix: the ``X`` of an AnnData opened with ``read_h5ad(path,
          backed="r")`` (dense or sparse), an :func:`anndata.io.sparse_dataset`, an h5py or
          zarr group in AnnData's sparse encoding (e.g. ``h5py.File(path)["layers/counts"]``)
          or a dense h5py/zarr dataset; or any object whose row slices ``Y[i:j]`` give one of
          the in-memory types;
        - a Dask array with numpy or scipy sparse blocks (e.g. from
          :func:`anndata.experimental.read_elem_lazy`): each block's statistics are computed
          where the block lives and summed by a tree reduction, on the active scheduler
          (a ``dask.distributed`` client if one is set).
    Z
        Random-effects design ``[Z_1 .. Z_k]``, cells x q (numpy array or scipy sparse; kept
        sparse).
    chunk_size
        Cells per block (default 10,000); for column blocks (CSC), genes holding as many
        entries. Not used for Dask arrays, whose own blocks are used.
    is_counts
        If True, fit ``log2(1 + Y)`` as FLASHMM's ``flashmm(is.counts=TRUE)``: the transform
        is applied block by block to the stored values only (zeros stay zero).
    n_jobs
        Threads for the blocks (default: the CPUs available). The result does not depend on
        it. Blocks of a backed matrix are read in the calling thread.
    progress
        Called as ``progress(done, total)`` after each block, with the cells (or, for
        column blocks, the genes) done so far and in all.

    Returns
    -------
    The statistics ``XX, XY, ZX, ZY, ZZ, Ynorm, n`` (without names; add them with
    :func:`dataclasses.replace`).

    Raises
    ------
    ValueError
        For mismatched numbers of cells, non-numeric or non-finite values, negative values
        with ``is_counts=True`` (:class:`NonFiniteError` gives the range of cells, or of
        genes for column blocks, of the piece with a non-finite value).
    """
    X = _as_design(X, "X", keep_sparse=False)
    Z = _as_design(Z, "Z", keep_sparse=True)
    source = None if is_dask_array(Y) else open_source(Y)
    if source is None and any(np.isnan(c) for c in Y.chunks[0]):  # e.g. after boolean indexing
        Y = Y.compute_chunk_sizes()
    n, m = shape2(Y) if source is None else source.shape
    if X.shape[0] != n or Z.shape[0] != n:
        msg = (
            f"X, Y and Z must have one row per cell: X has {X.shape[0]} rows, "
            f"Y {n} and Z {Z.shape[0]}."
        )
        raise ValueError(msg)
    size = _check_chunk_size(chunk_size)
    jobs = check_n_jobs(n_jobs)
    with single_threaded_blas():
        return _summary_stats(X, Y, Z, source, n, m, size, jobs, is_counts, progress)


def _summary_stats(X, Y, Z, source, n, m, size, jobs, is_counts, progress) -> SummaryStats:
    p = X.shape[1]
    XX = X.T @ X
    ZX = np.asarray(Z.T @ X)
    ZZ = Z.T @ Z
    ZZ = ZZ.toarray() if sp.issparse(ZZ) else np.asarray(ZZ)
    plan = DesignPlan(X, Z, m)
    if source is None:
        packed = _dask_pass(Y, plan, is_counts=is_counts)
    else:
        packed = _local_pass(
            source, plan, is_counts=is_counts, size=size, n_jobs=jobs, progress=progress
        )
    XZY, Ynorm = plan.unpack(packed, is_counts=is_counts)
    return SummaryStats(
        XX=XX,
        XY=XZY[:p],
        ZX=ZX,
        ZY=XZY[p:],
        ZZ=ZZ,
        Ynorm=Ynorm,
        n=n,
    )


class NonFiniteError(ValueError):
    """``Y`` has a NaN or infinite value.

    It is in the cells ``start:stop`` (``axis = 0``) or, in a pass over blocks of genes (CSC),
    in the genes ``start:stop`` (``axis = 1``).
    """

    def __init__(self, msg: str, start: int | None = None, stop: int | None = None, axis: int = 0):
        super().__init__(msg)
        self.start, self.stop, self.axis = start, stop, axis


# --------------------------------------------------------------------------------------------
# the design: indicator-like columns grouped by pattern, the rest multiplied
# --------------------------------------------------------------------------------------------


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
        #: rows of a packed block result: pattern sums, product columns, then Ynorm
        self.rows = sum(self.sizes) + self.continuous.size + 1

    def unpack(self, packed: np.ndarray, *, is_counts: bool) -> tuple[np.ndarray, np.ndarray]:
        """``[X Z]' Y`` and ``Ynorm`` from the summed packed block results."""
        XZY = np.zeros((self.r, packed.shape[1]))
        row = 0
        for (columns, U), P in zip(self.groups, self.patterns, strict=True):
            XZY[columns] = P.T @ packed[row : row + U]
            row += U
        XZY[self.continuous] = packed[row : row + self.continuous.size]
        Ynorm = packed[-1].copy()
        if is_counts:  # blocks hold sums of ln(1 + y): rescale to log2
            XZY /= _LN2
            Ynorm /= _LN2 * _LN2
        return XZY, Ynorm


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


# --------------------------------------------------------------------------------------------
# one block of Y -> packed partial statistics
# --------------------------------------------------------------------------------------------


def _values(
    values: np.ndarray, *, is_counts: bool, where: str, start=None, stop=None, axis: int = 0
) -> np.ndarray:
    """Check stored values and return them as float64, ``ln(1 + y)`` for counts.

    The input is never modified: for counts (or another dtype) the result is a new array.
    """
    kind = values.dtype.kind
    if kind not in "biuf":
        msg = f"Y must be numeric, got dtype {values.dtype}."
        raise ValueError(msg)
    if values.size and (kind == "f" or is_counts):
        lo, hi = values.min(), values.max()
        if kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
            msg = f"Y contains NaN or infinite values (in {where})."
            raise NonFiniteError(msg, start, stop, axis)
        if is_counts and lo < 0:
            msg = (
                "Y contains negative values, so it cannot be counts: is_counts=True applies "
                "log2(1 + y). Pass is_counts=False for already transformed data."
            )
            raise ValueError(msg)
    if is_counts:
        out = values.astype(np.float64)  # a copy, also for float64 input
        return np.log1p(out, out=out)
    return np.ascontiguousarray(values, dtype=np.float64)


#: Stored values per piece of a block: the pieces' working arrays (about 1 MB each) stay in
#: cache, which made the pass 1.4-1.6x faster than whole 10,000-cell blocks (measured on
#: 100k x 1,000 and 60k x 6,000 counts), and bounds its temporaries.
_PIECE = 1 << 17


def _pieces(indptr: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split the rows of a compressed matrix into ranges ``(a, b)`` of about ``_PIECE`` values."""
    target = _PIECE
    nnz = int(indptr[-1] - indptr[0])
    cuts = np.searchsorted(indptr, indptr[0] + np.arange(target, nnz, target), side="left")
    bounds = np.unique(np.concatenate([[0], cuts, [indptr.size - 1]]))
    return zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)


def block_stats(
    chunk: Any,
    codes: np.ndarray,
    cont: np.ndarray,
    sizes: Sequence[int],
    *,
    is_counts: bool,
    axis: int = 0,
    start: int = 0,
) -> np.ndarray:
    """Packed partial statistics of one block of ``Y``.

    Row blocks (``axis=0``): ``chunk`` is cells x genes (numpy or sparse) and ``codes``
    (n_groups, cells) and ``cont`` (cells, c) are those of its cells, the first being cell
    ``start``. Column blocks (``axis=1``): ``chunk`` is a CSC all cells x some genes, the
    first being gene ``start``, and ``codes``/``cont`` cover all cells. Returns ``(rows, genes
    in the block)``: the per-pattern sums of each group, the product columns, then the squared
    norms; values are ``ln(1 + y)`` for counts (rescaled in :meth:`DesignPlan.unpack`).
    """
    _n_cells, genes = chunk.shape
    c = cont.shape[1]
    out = np.zeros((sum(sizes) + c + 1, genes))
    offsets = np.cumsum([0, *sizes])
    S = [out[offsets[g] : offsets[g + 1]] for g in range(len(sizes))]
    C = np.zeros((genes, c))  # product columns, genes x c
    ynorm = out[-1]
    compressed = isinstance(chunk, CompressedBlock)
    if (compressed or sp.issparse(chunk)) and chunk.format == "csc" and axis == 1:
        _csc_columns(chunk, codes, cont, S, C, ynorm, is_counts=is_counts, start=start)
    elif compressed and chunk.format == "csr":
        _csr_rows(chunk, codes, cont, S, C, ynorm, is_counts=is_counts, start=start)
    elif sp.issparse(chunk) or compressed:
        if compressed:
            chunk = chunk.to_scipy()
        if chunk.format != "csr":
            chunk = sp.csr_matrix(chunk)
        _csr_rows(chunk, codes, cont, S, C, ynorm, is_counts=is_counts, start=start)
    else:
        _dense_rows(np.asarray(chunk), codes, cont, S, C, ynorm, is_counts=is_counts, start=start)
    out[offsets[-1] : -1] = C.T
    return out


def _csr_rows(chunk, codes, cont, S, C, ynorm, *, is_counts: bool, start: int) -> None:
    data, indices, indptr = chunk.data, chunk.indices, chunk.indptr
    c = cont.shape[1]
    for a, b in _pieces(indptr):
        lo, hi = int(indptr[a]), int(indptr[b])
        if hi == lo:
            continue
        where = f"cells {start + a}..{start + b - 1}"
        v = _values(data[lo:hi], is_counts=is_counts, where=where, start=start + a, stop=start + b)
        idx = indices[lo:hi]
        ip = indptr[a : b + 1] - lo  # the piece as CSC genes x cells
        counts = np.diff(ip)
        for g, Sg in enumerate(S):
            scatter_add(Sg, np.repeat(codes[g, a:b], counts), idx, v)
        if c == 1:
            csc_matmul_add(C[:, 0], ip, idx, v, cont[a:b, 0])
        elif c:
            csc_matmul_add(C, ip, idx, v, cont[a:b])
        csc_matmul_add(ynorm, ip, idx, v * v, np.ones(b - a))


def _csc_columns(chunk, codes, cont, S, C, ynorm, *, is_counts: bool, start: int) -> None:
    data, indices, indptr = chunk.data, chunk.indices, chunk.indptr
    n_cells = chunk.shape[0]
    c = cont.shape[1]
    ones = np.ones(n_cells)
    for a, b in _pieces(indptr):
        lo, hi = int(indptr[a]), int(indptr[b])
        if hi == lo:
            continue
        where = f"genes {start + a}..{start + b - 1}"
        v = _values(
            data[lo:hi], is_counts=is_counts, where=where, start=start + a, stop=start + b, axis=1
        )
        idx = indices[lo:hi]
        ip = indptr[a : b + 1] - lo  # the piece as CSR genes x cells
        gene = np.repeat(np.arange(a, b, dtype=idx.dtype), np.diff(ip))
        for g, Sg in enumerate(S):
            scatter_add(Sg, codes[g].take(idx), gene, v)
        if c == 1:
            csr_matmul_add(C[a:b, 0], ip, idx, v, cont[:, 0])
        elif c:
            csr_matmul_add(C[a:b], ip, idx, v, cont)
        csr_matmul_add(ynorm[a:b], ip, idx, v * v, ones)


def _dense_rows(chunk, codes, cont, S, C, ynorm, *, is_counts: bool, start: int) -> None:
    n_cells, genes = chunk.shape
    step = max(1, _PIECE // max(genes, 1))
    for a in range(0, n_cells, step):
        b = min(a + step, n_cells)
        where = f"cells {start + a}..{start + b - 1}"
        v = _values(chunk[a:b], is_counts=is_counts, where=where, start=start + a, stop=start + b)
        pointers = np.arange(b - a + 1)
        for g, Sg in enumerate(S):  # S += G' v with G the pattern indicator of the cells
            csc_matmul_add(Sg, pointers, codes[g, a:b], np.ones(b - a), v)
        if cont.shape[1]:
            C += v.T @ cont[a:b]
        ynorm += np.einsum("ij,ij->j", v, v)


# --------------------------------------------------------------------------------------------
# the pass: local thread pool or Dask
# --------------------------------------------------------------------------------------------


def _local_pass(
    source: Source,
    plan: DesignPlan,
    *,
    is_counts: bool,
    size: int,
    n_jobs: int,
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    n, m = source.shape
    total_units = n if source.axis == 0 else m
    total = np.zeros((plan.rows, m))
    spans = list(source.spans(size))
    done = 0

    def submit(start: int, stop: int) -> Any:
        chunk = source.read(start, stop)
        if source.axis == 0:
            return chunk, plan.codes[:, start:stop], plan.cont[start:stop]
        return chunk, plan.codes, plan.cont

    def collect(start: int, stop: int, result: np.ndarray) -> None:
        nonlocal done
        if source.axis == 0:
            total[:] += result
        else:
            total[:, start:stop] = result
        done += stop - start
        if progress is not None:
            progress(done, total_units)

    def run(args: tuple[Any, np.ndarray, np.ndarray], start: int) -> np.ndarray:
        chunk, codes, cont = args
        return block_stats(
            chunk,
            codes,
            cont,
            plan.sizes,
            is_counts=is_counts,
            axis=source.axis,
            start=start,
        )

    if n_jobs == 1 or len(spans) == 1:
        for start, stop in spans:
            collect(start, stop, run(submit(start, stop), start))
        return total
    with ThreadPoolExecutor(n_jobs) as pool:
        pending: deque = deque()
        try:
            for start, stop in spans:
                pending.append((start, stop, pool.submit(run, submit(start, stop), start)))
                while len(pending) > n_jobs:
                    s, e, future = pending.popleft()
                    collect(s, e, future.result())
            while pending:
                s, e, future = pending.popleft()
                collect(s, e, future.result())
        finally:
            for _, _, future in pending:
                future.cancel()
    return total


def _dask_block(
    y: Any,
    codes: np.ndarray,
    cont: np.ndarray,
    start: np.ndarray,
    *,
    sizes: tuple[int, ...],
    is_counts: bool,
) -> np.ndarray:
    """Partial statistics of one Dask block of cells, shaped (1, rows, genes) for the tree sum."""
    codes = np.ascontiguousarray(codes.T)
    out = block_stats(y, codes, cont, sizes, is_counts=is_counts, axis=0, start=int(start[0]))
    return out[None]


def _dask_pass(Y: Any, plan: DesignPlan, *, is_counts: bool) -> np.ndarray:
    import dask.array as da

    dtype = getattr(Y, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "biuf":
        msg = f"Y must be numeric, got dtype {dtype}."
        raise ValueError(msg)
    # the per-cell design arrays, cut like the cells of Y, and the first cell of each block
    rows = Y.chunks[0]
    codes = da.from_array(plan.codes.T, chunks=(rows, plan.codes.shape[0]))
    cont = da.from_array(plan.cont, chunks=(rows, plan.cont.shape[1]))
    starts = da.from_array(np.cumsum((0, *rows[:-1])), chunks=1)
    blocks = da.blockwise(
        _dask_block,
        "ikj",
        Y,
        "ij",
        codes,
        "ia",
        cont,
        "ib",
        starts,
        "i",
        new_axes={"k": plan.rows},
        adjust_chunks={"i": 1},
        align_arrays=False,
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        sizes=tuple(plan.sizes),
        is_counts=is_counts,
    )
    return np.asarray(blocks.sum(axis=0).compute())


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_chunk_size(chunk_size: Any) -> int:
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if isinstance(size, bool) or int(size) != size or size < 1:
        msg = f"chunk_size must be a positive integer, got {chunk_size!r}."
        raise ValueError(msg)
    return int(size)


def _as_design(A: Any, name: str, *, keep_sparse: bool) -> Any:
    if sp.issparse(A):
        if A.ndim != 2:
            msg = f"{name} must be a 2-D cells x columns matrix, got {A.ndim} dimensions."
            raise ValueError(msg)
        if keep_sparse:
            A = sp.csc_matrix(A)
            values = A.data
        else:
            A = A.toarray()
            values = A
    else:
        A = np.asarray(A)
        if A.ndim == 1:
            A = A[:, None]
        if A.ndim != 2:
            msg = f"{name} must be a 2-D cells x columns matrix, got {A.ndim} dimensions."
            raise ValueError(msg)
        values = A
    if values.dtype.kind not in "biuf":
        msg = f"{name} must be numeric, got dtype {values.dtype}."
        raise ValueError(msg)
    if sp.issparse(A):
        A = A.astype(np.float64)
        values = A.data
    else:
        A = A.astype(np.float64, copy=False)
        values = A
    if not np.isfinite(values).all():
        msg = f"{name} contains NaN or infinite values."
        raise ValueError(msg)
    return A
