"""Summary statistics of a linear mixed model, accumulated in one pass over the cells.

For ``y = X beta + Z b + e`` and a cells x genes response ``Y`` the statistics are

    XX = X'X (p, p)   XY = X'Y (p, m)   ZX = Z'X (q, p)   ZY = Z'Y (q, m)
    ZZ = Z'Z (q, q)   Ynorm = column sums of Y * Y (m,)   n = number of cells

All are sums over cells, so they are accumulated chunk by chunk over rows of ``Y`` and
statistics of disjoint sets of cells add up (:meth:`SummaryStats.__add__`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import scipy.sparse as sp

#: Cells per chunk when none is given: bounds the dense (chunk x genes) work buffers.
DEFAULT_CHUNK_SIZE = 10_000


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
    """

    XX: np.ndarray
    XY: np.ndarray
    ZX: np.ndarray
    ZY: np.ndarray
    ZZ: np.ndarray
    Ynorm: np.ndarray
    n: int

    def __post_init__(self) -> None:
        p, m = self.XY.shape
        q = self.ZY.shape[0]
        expected = {
            "XX": (p, p),
            "XY": (p, m),
            "ZX": (q, p),
            "ZY": (q, m),
            "ZZ": (q, q),
            "Ynorm": (m,),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                msg = f"SummaryStats.{name} has shape {getattr(self, name).shape}, expected {shape}."
                raise ValueError(msg)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(n, p, q, m)``: cells, fixed-effect columns, random-effect columns, genes."""
        return self.n, self.XX.shape[0], self.ZZ.shape[0], self.Ynorm.shape[0]

    def __add__(self, other: SummaryStats) -> SummaryStats:
        if not isinstance(other, SummaryStats):
            return NotImplemented
        if self.shape[1:] != other.shape[1:]:
            msg = f"Cannot add summary statistics of shapes (n, p, q, m) {self.shape} and {other.shape}."
            raise ValueError(msg)
        arrays = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        return SummaryStats(**arrays)


def summary_stats(
    X: Any,
    Y: Any,
    Z: Any,
    *,
    chunk_size: int | None = None,
    is_counts: bool = False,
) -> SummaryStats:
    """Compute the summary statistics of a linear mixed model in one pass over the cells.

    Parameters
    ----------
    X
        Fixed-effects design, cells x p (numpy array or scipy sparse).
    Y
        Response, cells x genes: a numpy array, any scipy sparse matrix or array, or any
        object with ``.shape`` whose row slices ``Y[i:j]`` give one of those (such as the
        ``X`` of an AnnData opened with ``backed="r"``). Sparse input is never densified.
    Z
        Random-effects design ``[Z_1 .. Z_k]``, cells x q (numpy array or scipy sparse).
    chunk_size
        Cells per chunk (default 10,000).
    is_counts
        If True, fit ``log2(1 + Y)`` as FLASHMM's ``flashmm(is.counts=TRUE)``: the transform
        is applied chunk by chunk to the stored values only (zeros stay zero).

    Returns
    -------
    The statistics ``XX, XY, ZX, ZY, ZZ, Ynorm, n``.
    """
    X = _as_design(X, "X")
    Z = _as_design(Z, "Z")
    n, m = _shape2(Y)
    if X.shape[0] != n or Z.shape[0] != n:
        msg = (
            f"X, Y and Z must have one row per cell: X has {X.shape[0]} rows, "
            f"Y {n} and Z {Z.shape[0]}."
        )
        raise ValueError(msg)
    _check_finite(X, "X")
    _check_finite(Z, "Z")
    XZ = np.hstack([X, Z])
    p = X.shape[1]
    cross = XZ.T @ XZ
    XZY = np.zeros((XZ.shape[1], m))
    Ynorm = np.zeros(m)
    for start, chunk in iter_row_chunks(Y, chunk_size):
        chunk = prepare_chunk(chunk, is_counts=is_counts, offset=start)
        XZY += _crossprod(XZ[start : start + chunk.shape[0]], chunk)
        Ynorm += _column_sumsq(chunk)
    return SummaryStats(
        XX=cross[:p, :p],
        XY=XZY[:p],
        ZX=cross[p:, :p],
        ZY=XZY[p:],
        ZZ=cross[p:, p:],
        Ynorm=Ynorm,
        n=n,
    )


def iter_row_chunks(Y: Any, chunk_size: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, Y[start:start + chunk_size])`` over the rows of ``Y``."""
    n = _shape2(Y)[0]
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if size < 1:
        msg = f"chunk_size must be a positive integer, got {chunk_size}."
        raise ValueError(msg)
    if isinstance(Y, sp.coo_matrix | sp.coo_array | sp.dia_matrix | sp.dia_array):
        Y = Y.tocsr()
    for start in range(0, n, size):
        yield start, Y[start : start + size]


def prepare_chunk(chunk: Any, *, is_counts: bool, offset: int = 0) -> np.ndarray | sp.csr_array:
    """Check a chunk of ``Y`` for finite values and apply ``log2(1 + y)`` to counts.

    Returns a float64 numpy array or CSR/CSC sparse array; the input is never modified.
    """
    if sp.issparse(chunk):
        if chunk.format not in ("csr", "csc"):
            chunk = sp.csr_array(chunk)
        values = chunk.data
    else:
        chunk = np.asarray(chunk)
        values = chunk
    if values.dtype.kind not in "biuf":
        msg = f"Y must be numeric, got dtype {values.dtype}."
        raise ValueError(msg)
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        msg = f"Y contains NaN or infinite values (in cells {offset}..{offset + chunk.shape[0] - 1})."
        raise ValueError(msg)
    if is_counts:
        if (values < 0).any():
            msg = (
                "Y contains negative values, so it cannot be counts: is_counts=True applies "
                "log2(1 + y). Pass is_counts=False for already transformed data."
            )
            raise ValueError(msg)
        values = np.log1p(values) / np.log(2.0)
    if sp.issparse(chunk):
        # Same sparsity structure, new values: the caller's matrix is never modified.
        return type(chunk)((values, chunk.indices, chunk.indptr), shape=chunk.shape)
    return values


def _crossprod(XZ: np.ndarray, chunk: np.ndarray | sp.sparray) -> np.ndarray:
    """``XZ' chunk`` as a dense (p + q) x genes array, sparse-aware."""
    if sp.issparse(chunk):
        # (genes x cells) sparse times dense (cells x (p+q)): reads each stored value once.
        return np.asarray(chunk.T @ XZ).T
    return XZ.T @ chunk


def _column_sumsq(chunk: np.ndarray | sp.sparray) -> np.ndarray:
    if sp.issparse(chunk):
        m = chunk.shape[1]
        if chunk.format == "csr":
            columns = chunk.indices
        else:  # CSC: stored values are grouped by column
            columns = np.repeat(np.arange(m), np.diff(chunk.indptr))
        return np.bincount(columns, weights=chunk.data**2, minlength=m)
    return np.einsum("ij,ij->j", chunk, chunk)


def _as_design(A: Any, name: str) -> np.ndarray:
    A = A.toarray() if sp.issparse(A) else np.asarray(A)
    if A.ndim == 1:
        A = A[:, None]
    if A.ndim != 2:
        msg = f"{name} must be a 2-D cells x columns matrix, got {A.ndim} dimensions."
        raise ValueError(msg)
    if A.dtype.kind not in "biuf":
        msg = f"{name} must be numeric, got dtype {A.dtype}."
        raise ValueError(msg)
    return A.astype(np.float64, copy=False)


def _check_finite(A: np.ndarray, name: str) -> None:
    if not np.isfinite(A).all():
        msg = f"{name} contains NaN or infinite values."
        raise ValueError(msg)


def _shape2(Y: Any) -> tuple[int, int]:
    shape = getattr(Y, "shape", None)
    if shape is None:
        Y = np.asarray(Y)
        shape = Y.shape
    if len(shape) != 2:
        msg = f"Y must be a 2-D cells x genes matrix, got shape {tuple(shape)}."
        raise ValueError(msg)
    return int(shape[0]), int(shape[1])
