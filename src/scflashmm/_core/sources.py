"""Read a cells x genes matrix in blocks, whatever holds it.

A *source* cuts the matrix into blocks along one axis and reads them one at a time:

- row blocks (``axis = 0``, blocks of cells, all genes) for numpy arrays, CSR matrices and
  arrays, backed dense datasets (h5py/zarr) and backed CSR groups;
- column blocks (``axis = 1``, blocks of genes, all cells) for CSC matrices and backed CSC
  groups, whose row slices would read the whole matrix each time.

In-memory CSR/CSC blocks are zero-copy views of the stored arrays. Backed sparse matrices are
read straight from their ``data``/``indices``/``indptr`` datasets (the AnnData on-disk
encoding), so a block costs one contiguous read of its stored values. Nothing here imports
h5py, zarr or anndata: those objects are recognised by what they offer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp

from .checks import check_indptr


def is_dask_array(Y: Any) -> bool:
    """Whether ``Y`` is a :class:`dask.array.Array` (without importing dask)."""
    return type(Y).__module__.split(".")[0] == "dask" and hasattr(Y, "chunks")


def shape2(Y: Any) -> tuple[int, int]:
    """``(cells, genes)`` of a 2-D matrix-like object (or of an encoded sparse group)."""
    if _encoded_sparse(Y) is not None:
        shape = tuple(int(s) for s in Y.attrs["shape"])
    else:
        shape = getattr(Y, "shape", None)
        if shape is None:
            shape = np.asarray(Y).shape
    if len(shape) != 2:
        msg = f"Y must be a 2-D cells x genes matrix, got shape {tuple(shape)}."
        raise ValueError(msg)
    return int(shape[0]), int(shape[1])


class Source:
    """Blocks of a matrix along ``axis``; subclasses implement :meth:`read`."""

    axis: int = 0
    #: `` in file 'path'`` for a matrix read from a file (for error messages)
    label: str = ""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape

    def spans(self, chunk_size: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of the blocks.

        Row blocks hold ``chunk_size`` cells; column blocks hold about as many entries as
        ``chunk_size`` cells would.
        """
        n, m = self.shape
        if self.axis == 0:
            step, total = chunk_size, n
        else:
            step, total = max(1, (chunk_size * m) // max(n, 1)), m
        for start in range(0, total, step):
            yield start, min(start + step, total)

    def read(self, start: int, stop: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class _Sliced(Source):
    """Anything whose row slices ``Y[start:stop]`` give a numpy array or scipy sparse matrix."""

    def __init__(self, Y: Any, shape: tuple[int, int]):
        super().__init__(shape)
        self.Y = Y

    def read(self, start: int, stop: int) -> Any:
        return self.Y[start:stop]


class _ColumnSliced(_Sliced):
    """A CSC-like object read by column slices ``Y[:, start:stop]``."""

    axis = 1

    def read(self, start: int, stop: int) -> Any:
        return self.Y[:, start:stop]


class _Compressed(Source):
    """CSR (row blocks) or CSC (column blocks) from ``data``/``indices``/``indptr`` arrays.

    The arrays are numpy arrays (blocks are views) or on-disk datasets (blocks are one
    contiguous read each); ``indptr`` is held in memory.
    """

    def __init__(self, data: Any, indices: Any, indptr: Any, shape: tuple[int, int], fmt: str):
        super().__init__(shape)
        self.axis = 0 if fmt == "csr" else 1
        self.data, self.indices = data, indices
        self.indptr = np.asarray(indptr[:])
        self.fmt = fmt
        self.label = _file_label(data)
        n_major = shape[0] if fmt == "csr" else shape[1]
        nnz = min(int(data.shape[0]), int(indices.shape[0]))
        check_indptr(self.indptr, n_major, nnz, what=f"Y{self.label}")

    def read(self, start: int, stop: int) -> CompressedBlock:
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        indptr = self.indptr[start : stop + 1] - lo
        data, indices = self.data[lo:hi], self.indices[lo:hi]
        n, m = self.shape
        shape = (stop - start, m) if self.fmt == "csr" else (n, stop - start)
        return CompressedBlock(np.asarray(data), np.asarray(indices), indptr, shape, self.fmt)


def _file_label(dataset: Any) -> str:
    """`` in file 'path'`` for an h5py/zarr dataset, else empty."""
    file = getattr(dataset, "file", None)
    name = getattr(file, "filename", None) or getattr(getattr(dataset, "store", None), "path", None)
    return f" in file {str(name)!r}" if name else ""


class CompressedBlock:
    """A CSR/CSC block as its three arrays (views for in-memory matrices).

    scipy's constructors copy arrays that are views of much larger ones, so blocks of an
    in-memory matrix are passed around as this lightweight triple instead.
    """

    def __init__(self, data, indices, indptr, shape: tuple[int, int], fmt: str):
        self.data, self.indices, self.indptr = data, indices, indptr
        self.shape, self.format = shape, fmt

    def to_scipy(self) -> sp.csr_matrix | sp.csc_matrix:
        """Return the block as a scipy sparse matrix (copies the arrays)."""
        cls = sp.csr_matrix if self.format == "csr" else sp.csc_matrix
        return cls((self.data, self.indices, self.indptr), shape=self.shape)


def _encoded_sparse(group: Any) -> str | None:
    """``"csr"``/``"csc"`` for an h5py/zarr group in AnnData's sparse encoding, else None."""
    attrs = getattr(group, "attrs", None)
    if attrs is None or isinstance(group, np.ndarray) or not hasattr(group, "keys"):
        return None
    encoding = attrs.get("encoding-type", None)
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    fmt = {"csr_matrix": "csr", "csc_matrix": "csc"}.get(encoding)
    if fmt is None or not {"data", "indices", "indptr"} <= set(group.keys()):
        return None
    return fmt


def open_source(Y: Any) -> Source:
    """Open a :class:`Source` over the cells x genes matrix ``Y`` (not a Dask array)."""
    if sp.issparse(Y):
        fmt = Y.format
        if fmt not in ("csr", "csc"):
            Y = sp.csr_matrix(Y)
            fmt = "csr"
        return _Compressed(Y.data, Y.indices, Y.indptr, Y.shape, fmt)
    fmt = _encoded_sparse(Y)
    if fmt is not None:  # an h5py/zarr group, e.g. h5py.File(path)["layers/counts"]
        return _Compressed(Y["data"], Y["indices"], Y["indptr"], shape2(Y), fmt)
    group = getattr(Y, "group", None)
    fmt = _encoded_sparse(group) if group is not None else None
    if fmt is not None and tuple(int(s) for s in group.attrs["shape"]) == shape2(Y):
        # anndata's backed sparse dataset (adata.X of read_h5ad(backed="r"), sparse_dataset)
        return _Compressed(group["data"], group["indices"], group["indptr"], shape2(Y), fmt)
    if getattr(Y, "format", None) == "csc":
        return _ColumnSliced(Y, shape2(Y))
    if hasattr(Y, "shape") and hasattr(Y, "__getitem__"):
        return _Sliced(Y, shape2(Y))
    Y = np.asarray(Y)
    return _Sliced(Y, shape2(Y))
