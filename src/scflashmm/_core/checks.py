"""Checks of the input of the pass over the cells: designs, chunk size, non-finite values."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from ._options import check_positive_int

#: Cells per chunk when none is given: bounds the working memory of one block.
DEFAULT_CHUNK_SIZE = 10_000


class NonFiniteError(ValueError):
    """``Y`` has a NaN or infinite value.

    It is in the cells ``start:stop`` (``axis = 0``) or, in a pass over blocks of genes (CSC),
    in the genes ``start:stop`` (``axis = 1``).
    """

    def __init__(self, msg: str, start: int | None = None, stop: int | None = None, axis: int = 0):
        super().__init__(msg)
        self.start, self.stop, self.axis = start, stop, axis


class CorruptMatrixError(ValueError):
    """The stored arrays of a sparse ``Y`` are inconsistent (indices out of range ...)."""


def check_indptr(indptr: np.ndarray, n_major: int, nnz: int, *, what: str) -> None:
    """Check a compressed matrix's ``indptr``: length, start, monotone, within the stored values.

    Cheap (one pass over ``n_major + 1`` numbers); run before any kernel sees the arrays.
    """
    if indptr.ndim != 1 or indptr.size != n_major + 1:
        msg = f"{what}: indptr has {indptr.size} entries, expected {n_major + 1}: corrupt matrix."
        raise CorruptMatrixError(msg)
    if indptr.dtype.kind not in "iu":
        msg = f"{what}: indptr has dtype {indptr.dtype}, expected integers: corrupt matrix."
        raise CorruptMatrixError(msg)
    if indptr.size and (indptr[0] < 0 or indptr[-1] > nnz):
        msg = (
            f"{what}: indptr runs from {int(indptr[0])} to {int(indptr[-1])}, outside the "
            f"{nnz} stored values: corrupt matrix."
        )
        raise CorruptMatrixError(msg)
    if indptr.size > 1:
        step = np.diff(indptr)
        if step.min() < 0:
            i = int(np.flatnonzero(step < 0)[0])
            msg = f"{what}: indptr decreases at position {i} (not monotone): corrupt matrix."
            raise CorruptMatrixError(msg)


def check_indices(indices: np.ndarray, n_minor: int, *, where: str, axis_name: str) -> None:
    """Check that the stored minor indices of a piece lie in ``0 .. n_minor - 1``."""
    if not indices.size:
        return
    if indices.dtype.kind not in "iu":
        msg = f"Y's {axis_name} indices have dtype {indices.dtype}, expected integers."
        raise CorruptMatrixError(msg)
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n_minor:
        bad = lo if lo < 0 else hi
        msg = (
            f"Y has a {axis_name} index {bad} outside 0..{n_minor - 1} (in {where}): the "
            "sparse matrix is corrupt."
        )
        raise CorruptMatrixError(msg)


def _numpy_not_canonical(indices: np.ndarray, indptr: np.ndarray) -> bool:
    if indices.size < 2:
        return False
    step = np.diff(indices.astype(np.int64, copy=False))
    bad = step <= 0
    if not bad.any():
        return False
    inner = indptr[1:-1]
    inner = inner[(inner > 0) & (inner < indices.size)]
    bad[inner - 1] = False  # the first entry of a row may be below the last of the previous
    return bool(bad.any())


def _compiled_not_canonical() -> Any:
    """Scipy's compiled check (one pass, no allocation), if it behaves as expected."""
    try:
        from scipy.sparse._sparsetools import csr_has_canonical_format as canonical
    except ImportError:  # pragma: no cover - private API gone
        return None

    def not_canonical(indices: np.ndarray, indptr: np.ndarray) -> bool:
        return not canonical(indptr.size - 1, indptr, indices)

    cases = [
        (np.array([0, 0], np.int32), np.array([0, 2, 2], np.int64)),
        (np.array([0, 1, 0], np.int32), np.array([0, 2, 3], np.int64)),
        (np.array([1, 0, 2], np.int32), np.array([0, 2, 3], np.int64)),
    ]
    try:
        ok = all(not_canonical(i, p) == _numpy_not_canonical(i, p) for i, p in cases)
    except Exception:  # pragma: no cover - any failure of the private API
        return None
    return not_canonical if ok else None


_NOT_CANONICAL = _compiled_not_canonical() or _numpy_not_canonical


def has_duplicates_or_unsorted(indices: np.ndarray, indptr: np.ndarray) -> bool:
    """Whether some row (CSR; column for CSC) of a piece has indices not strictly increasing.

    ``indptr`` (checked, relative to ``indices``) delimits the rows. True for duplicate
    entries (which must be summed before squaring or log-transforming) and for unsorted ones
    (harmless, but canonicalised together).
    """
    return bool(_NOT_CANONICAL(indices, indptr))


def _check_chunk_size(chunk_size: Any) -> int:
    """Cells per block: ``chunk_size``, or :data:`DEFAULT_CHUNK_SIZE` if None."""
    if chunk_size is None:
        return DEFAULT_CHUNK_SIZE
    return check_positive_int(chunk_size, "chunk_size")


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


#: Environment variable that turns the memory check of a fit off (``SCFLASHMM_MEMORY_CHECK=0``).
MEMORY_CHECK_ENV = "SCFLASHMM_MEMORY_CHECK"


def fit_memory_bytes(n: int, p: int, q: int, m: int, k: int, *, n_jobs: int) -> int:
    """Estimate the peak working memory (bytes) of a fit: statistics, pass and solver.

    Calibrated on measured peaks (docs/guarantees.md): the one-component solver holds about
    six ``q x q`` arrays; the solver of several components about as many per thread; the
    statistics ``(p + q) x m`` a few times; the pass about ``(p + q) x m`` per thread.
    """
    solver = 6 * q * q * (1 + (n_jobs if k > 1 else 0))
    stats = 4 * (p + q) * (p + q + m) + 4 * p * p * m
    passes = (n_jobs + 1) * (p + q + 1) * m
    return 8 * (solver + stats + passes) + 16 * n


def available_memory_bytes() -> int | None:
    """Memory available to this process (Linux ``MemAvailable`` and cgroup limit), or None."""
    import os

    found: list[int] = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
            if text.isdigit() and int(text) < 1 << 60:
                found.append(int(text))
        except OSError:
            pass
    if os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return None
    return min(found) if found else None


def check_fit_memory(
    n: int, p: int, q: int, m: int, k: int, *, n_jobs: int, available: int | None = None
) -> None:
    """Raise MemoryError before any work if a fit would need more memory than is available."""
    if available is None:
        available = available_memory_bytes()
    if available is None:
        return
    need = fit_memory_bytes(n, p, q, m, k, n_jobs=n_jobs)
    if need <= available:
        return
    gb = 1024**3
    helps = []
    if k > 1 and n_jobs > 1 and fit_memory_bytes(n, p, q, m, k, n_jobs=1) <= available:
        helps.append("n_jobs=1 (the solver holds q x q arrays per thread)")
    if 6 * 8 * q * q > available / 2:
        helps.append(
            f"fewer random-effect levels (q = {q:,} columns in all: memory grows with q^2), "
            "e.g. group rare levels, or use a coarser grouping"
        )
    if 8 * 4 * (p + q) * m > available / 2:
        helps.append("fewer genes per fit (fit subsets of genes: the results do not change)")
    msg = (
        f"This fit needs about {need / gb:.1f} GB (n = {n:,} cells, p = {p}, q = {q:,}, "
        f"m = {m:,} genes, {k} component(s)) but about {available / gb:.1f} GB is available. "
        f"Try {'; or '.join(helps) or 'a machine with more memory'}. (Set {MEMORY_CHECK_ENV}=0 "
        "to skip this check.)"
    )
    raise MemoryError(msg)
