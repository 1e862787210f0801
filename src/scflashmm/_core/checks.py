"""Checks of the input of the pass over the cells: designs, chunk size, non-finite values."""

from __future__ import annotations

from collections.abc import Sequence
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


def fit_memory_bytes(
    n: int,
    p: int,
    q: int,
    m: int,
    k: int,
    *,
    n_jobs: int,
    levels: Sequence[int] | None = None,
    continuous: int = 0,
    structured_dense: bool = False,
) -> int:
    """Estimate the peak working memory (bytes) of a fit: statistics, pass and solver.

    ``levels`` are the numbers of levels of the random factors (default: one factor of ``q``
    levels) and ``continuous`` the random-effect columns that are not indicators (the slopes
    of lme4-style terms). Calibrated on measured peaks for one to three components and the
    structured path (docs/guarantees.md, Memory; ``benchmarks/bench_fit_memory.py``):

    - the pass's plan holds the distinct design rows of the indicator columns densely: ``U``
      rows (cell patterns: at most ``n``, the plan's cap ``max(4 (p + q), 2^21 / m)`` and the
      combinations of the random factors' levels) by ``p + q`` columns; and about three
      copies of the other columns (``n`` rows); each block's packed result is ``U + p + q``
      rows by ``m``, one per thread and the total;
    - the statistics hold ``Z'Z`` and its reduction (``q x q``) and ``X'Y``, ``Z'Y`` and their
      reductions;
    - the solver holds about three ``q x q`` arrays with one component (the eigen path), and
      four and two per thread with several (the dense kernel, one block of genes per thread;
      not reached by the measured sizes, where the plan dominates: kept conservative);
      ``structured_dense`` (the dense structured solver: lme4-style terms with slopes on
      crossed factors) adds two ``q x q`` arrays per gene of the blocks in flight.
    """
    r = p + q
    factors = [q] if levels is None or not len(levels) else [int(x) for x in levels]
    combinations = 1
    for size in factors:
        combinations *= size + 1
        if combinations > n:
            break
    patterns = min(n, max(4 * r, (1 << 21) // max(m, 1)), combinations)
    plan = patterns * (r - continuous) + 3 * n * (continuous + p)
    passes = (n_jobs + 1) * (patterns + r + 1) * m
    stats = 2 * r * r + 4 * r * m + 4 * p * p * m
    solver = 3 * q * q if k == 1 else 4 * q * q + 2 * q * q * n_jobs
    if structured_dense:  # one block of genes per thread, as the structured driver cuts them
        from .structured.driver import _DENSE_ARRAYS, MEMORY_BUDGET

        per_block = max(1, min(4096, MEMORY_BUDGET // (8 * _DENSE_ARRAYS * q * q)))
        solver += 2 * q * q * min(m, n_jobs * per_block)
    return 8 * (plan + passes + stats + solver) + 16 * n


def memory_layout(d: Sequence[int], structure: Any = None) -> dict[str, Any]:
    """``levels``, ``continuous`` and ``structured_dense`` of :func:`fit_memory_bytes`.

    ``d`` are the sizes of the random components; ``structure`` the
    :class:`~scflashmm._core.structure.CovarianceStructure` of lme4-style terms, whose
    effects other than the intercept (slopes) are not indicator columns.
    """
    if structure is None:
        return {"levels": [int(x) for x in d], "continuous": 0}
    from .structured.driver import choose_structured_kernel

    terms = structure.terms
    levels = [int(t.n_levels) for t in terms]
    indicators = sum(int(t.n_levels) for t in terms if "(Intercept)" in tuple(t.effects))
    q = int(sum(d))
    # the dense structured solver: slopes and more than one grouping factor (one factor gives
    # a block-diagonal Z'Z, the block solver), unless a large scalar term goes to the Schur path
    dense = (
        any(len(t.effects) > 1 for t in terms)
        and len({t.group for t in terms}) > 1
        and choose_structured_kernel(structure) == "dense"
    )
    return {"levels": levels, "continuous": q - indicators, "structured_dense": dense}


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
    n: int,
    p: int,
    q: int,
    m: int,
    k: int,
    *,
    n_jobs: int,
    available: int | None = None,
    levels: Sequence[int] | None = None,
    continuous: int = 0,
    structured_dense: bool = False,
) -> None:
    """Raise MemoryError before any work if a fit would need more memory than is available.

    ``levels``, ``continuous`` and ``structured_dense`` as :func:`fit_memory_bytes` (see
    :func:`memory_layout`).
    """
    if available is None:
        available = available_memory_bytes()
    if available is None:
        return
    layout = {"levels": levels, "continuous": continuous, "structured_dense": structured_dense}
    need = fit_memory_bytes(n, p, q, m, k, n_jobs=n_jobs, **layout)
    if need <= available:
        return
    gb = 1024**3
    helps = []
    if k > 1 and n_jobs > 1 and fit_memory_bytes(n, p, q, m, k, n_jobs=1, **layout) <= available:
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
