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
