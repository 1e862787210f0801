"""Block kernels: one block of ``Y`` (cells or genes) -> packed partial statistics.

The packing follows :class:`~scflashmm._core.plan.DesignPlan`: per-pattern sums of each group
(a scatter-add of the stored values), the product columns, then the squared norms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._accumulate import csc_matmul_add, csr_matmul_add, scatter_add
from .checks import NonFiniteError, check_indices, check_indptr, has_duplicates_or_unsorted
from .sources import CompressedBlock


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
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Packed partial statistics of one block of ``Y``.

    Row blocks (``axis=0``): ``chunk`` is cells x genes (numpy or sparse) and ``codes``
    (n_groups, cells) and ``cont`` (cells, c) are those of its cells, the first being cell
    ``start``. Column blocks (``axis=1``): ``chunk`` is a CSC all cells x some genes, the
    first being gene ``start``, and ``codes``/``cont`` cover all cells. Returns ``(rows, genes
    in the block)``: the per-pattern sums of each group, the product columns, then the squared
    norms; values are ``ln(1 + y)`` for counts (rescaled in :meth:`DesignPlan.unpack`).

    With ``shift`` (genes,), for a dense row block only, the statistics are those of the
    shifted values ``y - shift`` (after the counts transform), and a last row holds their sums.
    """
    _n_cells, genes = chunk.shape
    c = cont.shape[1]
    out = np.zeros((sum(sizes) + c + (1 if shift is None else 2), genes))
    offsets = np.cumsum([0, *sizes])
    S = [out[offsets[g] : offsets[g + 1]] for g in range(len(sizes))]
    C = np.zeros((genes, c))  # product columns, genes x c
    ynorm = out[offsets[-1] + c]
    compressed = isinstance(chunk, CompressedBlock)
    if shift is not None:
        if compressed or sp.issparse(chunk) or axis != 0:
            msg = "A shift applies to dense blocks of cells only."
            raise ValueError(msg)
        shifted = (np.asarray(shift, dtype=np.float64), out[-1])
    else:
        shifted = None
    if compressed or (sp.issparse(chunk) and chunk.format in ("csr", "csc")):
        _check_block(chunk, axis=axis, start=start)
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
        chunk = np.asarray(chunk)
        _dense_rows(
            chunk, codes, cont, S, C, ynorm, is_counts=is_counts, start=start, shifted=shifted
        )
        if shifted is not None and S:  # every cell has one pattern of a group: the sums
            shifted[1][:] = S[0].sum(axis=0)
    out[offsets[-1] : offsets[-1] + c] = C.T
    return out


def _canonical_piece(
    data: np.ndarray, idx: np.ndarray, ip: np.ndarray, n_minor: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return a piece's arrays with duplicate entries summed and indices sorted, if needed.

    Every statistic is a function of the summed entries (``|y|^2``, ``log(1 + y)`` per entry
    of the matrix, not per stored value), so duplicates are summed before anything else.
    """
    if not has_duplicates_or_unsorted(idx, ip):
        return data, idx, ip
    piece = sp.csr_matrix((data, idx, ip), shape=(ip.size - 1, n_minor), copy=True)
    piece.sum_duplicates()
    return piece.data, piece.indices, piece.indptr


def _check_block(chunk: Any, *, axis: int, start: int) -> None:
    """Check a compressed block's ``indptr`` (and, before a format conversion, its indices).

    scipy's compiled kernels do no bounds checks, so nothing reaches them unchecked: the
    indices are checked piece by piece in :func:`_csr_rows` and :func:`_csc_columns`, and here
    for a block that scipy converts first.
    """
    n_rows, n_cols = chunk.shape
    major, minor = (n_rows, n_cols) if chunk.format == "csr" else (n_cols, n_rows)
    unit = "cells" if (chunk.format == "csr") == (axis == 0) else "genes"
    where = f"the block starting at {unit[:-1]} {start}"
    check_indptr(np.asarray(chunk.indptr), major, len(chunk.indices), what=f"Y ({where})")
    direct = chunk.format == "csr" or axis == 1
    if not direct:
        name = "cell (row)" if chunk.format == "csc" else "gene (column)"
        check_indices(np.asarray(chunk.indices), minor, where=where, axis_name=name)


def _csr_rows(chunk, codes, cont, S, C, ynorm, *, is_counts: bool, start: int) -> None:
    data, indices, indptr = chunk.data, chunk.indices, chunk.indptr
    c = cont.shape[1]
    n_genes = chunk.shape[1]
    for a, b in _pieces(indptr):
        lo, hi = int(indptr[a]), int(indptr[b])
        if hi == lo:
            continue
        where = f"cells {start + a}..{start + b - 1}"
        check_indices(indices[lo:hi], n_genes, where=where, axis_name="gene (column)")
        raw, idx, ip = _canonical_piece(
            data[lo:hi], indices[lo:hi], indptr[a : b + 1] - lo, n_genes
        )
        v = _values(raw, is_counts=is_counts, where=where, start=start + a, stop=start + b)
        # ip, idx: the piece as CSC genes x cells
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
        check_indices(indices[lo:hi], n_cells, where=where, axis_name="cell (row)")
        raw, idx, ip = _canonical_piece(
            data[lo:hi], indices[lo:hi], indptr[a : b + 1] - lo, n_cells
        )
        v = _values(raw, is_counts=is_counts, where=where, start=start + a, stop=start + b, axis=1)
        # ip, idx: the piece as CSR genes x cells
        gene = np.repeat(np.arange(a, b, dtype=idx.dtype), np.diff(ip))
        for g, Sg in enumerate(S):
            scatter_add(Sg, codes[g].take(idx), gene, v)
        if c == 1:
            csr_matmul_add(C[a:b, 0], ip, idx, v, cont[:, 0])
        elif c:
            csr_matmul_add(C[a:b], ip, idx, v, cont)
        csr_matmul_add(ynorm[a:b], ip, idx, v * v, ones)


def _dense_rows(
    chunk, codes, cont, S, C, ynorm, *, is_counts: bool, start: int, shifted=None
) -> None:
    """Dense rows; with ``shifted = (shift, ysum)`` of ``y - shift``, whose sums go to ``ysum``."""
    n_cells, genes = chunk.shape
    step = max(1, _PIECE // max(genes, 1))
    if shifted is not None:
        shift, ysum = shifted
        buffer = np.empty((min(step, n_cells), genes))  # reused: no allocation per piece
    for a in range(0, n_cells, step):
        b = min(a + step, n_cells)
        where = f"cells {start + a}..{start + b - 1}"
        v = _values(chunk[a:b], is_counts=is_counts, where=where, start=start + a, stop=start + b)
        if shifted is not None:  # never in place: v may be a view of the input
            v = np.subtract(v, shift, out=buffer[: b - a])
            if not S:  # else the sums are those of any group's pattern sums
                ysum += v.sum(axis=0)
        pointers = np.arange(b - a + 1)
        for g, Sg in enumerate(S):  # S += G' v with G the pattern indicator of the cells
            csc_matmul_add(Sg, pointers, codes[g, a:b], np.ones(b - a), v)
        if cont.shape[1]:
            C += v.T @ cont[a:b]
        ynorm += np.einsum("ij,ij->j", v, v)
