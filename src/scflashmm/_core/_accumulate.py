"""In-place accumulating sparse kernels for the pass over the cells.

``scatter_add(out, rows, cols, values)``: ``out[rows, cols] += values`` (repeated positions add up).
``csc_matmul_add(out, indptr, indices, data, dense)``: ``out += A @ dense`` for a CSC ``A``.
``csr_matmul_add(out, indptr, indices, data, dense)``: ``out += A @ dense`` for a CSR ``A``.

They accumulate into a preallocated output, so the pass can work through a block of cells in
cache-sized pieces without a temporary per piece. They call scipy's compiled kernels
(``scipy.sparse._sparsetools``; they release the GIL) when those behave as expected on a
small self-test, and otherwise the slower public scipy.sparse API (same results).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _public_scatter_add(out: np.ndarray, rows, cols, values) -> None:
    out += sp.coo_matrix((values, (rows, cols)), shape=out.shape).toarray()


def _public_csc_matmul_add(out: np.ndarray, indptr, indices, data, dense: np.ndarray) -> None:
    A = sp.csc_matrix((data, indices, indptr), shape=(out.shape[0], dense.shape[0]))
    out += (A @ dense).reshape(out.shape)


def _public_csr_matmul_add(out: np.ndarray, indptr, indices, data, dense: np.ndarray) -> None:
    A = sp.csr_matrix((data, indices, indptr), shape=(out.shape[0], dense.shape[0]))
    out += (A @ dense).reshape(out.shape)


def _compiled():
    from scipy.sparse import _sparsetools as st

    def scatter_add(out: np.ndarray, rows, cols, values) -> None:
        M, N = out.shape
        st.coo_todense(M, N, len(values), rows, cols, values, out.ravel(), 0)

    def matmul_add(matvec, matvecs):
        """``out += A @ dense`` with A given by its compressed arrays (CSR or CSC kernels)."""

        def add(out: np.ndarray, indptr, indices, data, dense: np.ndarray) -> None:
            n_out, n_in = out.shape[0], dense.shape[0]
            if dense.ndim == 1:
                matvec(n_out, n_in, indptr, indices, data, dense, out)
            else:
                matvecs(
                    n_out, n_in, dense.shape[1], indptr, indices, data, dense.ravel(), out.ravel()
                )

        return add

    csc_matmul_add = matmul_add(st.csc_matvec, st.csc_matvecs)
    csr_matmul_add = matmul_add(st.csr_matvec, st.csr_matvecs)
    return scatter_add, csc_matmul_add, csr_matmul_add


def _self_test(kernels) -> bool:
    """Check that the compiled kernels agree with the public API on a small example."""
    scatter_add, csc_add, csr_add = kernels
    rng = np.random.default_rng(0)
    indptr = np.array([0, 2, 2, 5], dtype=np.int64)  # 3 columns (CSC) or 3 rows (CSR)
    indices = np.array([0, 3, 1, 3, 2], dtype=np.int32)  # over 4 rows (CSC) or columns (CSR)
    data = rng.random(5)
    ok = True
    cases = ((csc_add, _public_csc_matmul_add, 4, 3), (csr_add, _public_csr_matmul_add, 3, 4))
    for fast, slow, n_out, n_in in cases:
        for dense in (rng.random(n_in), rng.random((n_in, 2))):
            a = np.ones((n_out, *dense.shape[1:]))
            b = a.copy()
            fast(a, indptr, indices, data, dense)
            slow(b, indptr, indices, data, dense)
            ok = ok and np.allclose(a, b, rtol=1e-14, atol=0)
    a, b = np.ones((2, 4)), np.ones((2, 4))
    rows, cols = np.array([0, 1, 0, 0], np.int32), np.array([3, 1, 3, 0], np.int32)
    scatter_add(a, rows, cols, data[:4])
    _public_scatter_add(b, rows, cols, data[:4])
    return bool(ok and np.allclose(a, b, rtol=1e-14, atol=0))


def _select():
    try:
        kernels = _compiled()
        if _self_test(kernels):
            return (*kernels, True)
    except Exception:  # any failure of the private API: use the public one
        pass
    return _public_scatter_add, _public_csc_matmul_add, _public_csr_matmul_add, False


scatter_add, csc_matmul_add, csr_matmul_add, COMPILED = _select()
