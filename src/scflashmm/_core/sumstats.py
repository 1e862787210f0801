"""The entry point :func:`summary_stats`: summary statistics in one pass over the cells.

The statistics are defined in :mod:`scflashmm._core.stats`; the pass is planned by
:mod:`scflashmm._core.plan` (which design columns are summed by pattern), run by
:mod:`scflashmm._core.passes` (threads or Dask) over the block kernels of
:mod:`scflashmm._core.blocks`, with the input checks of :mod:`scflashmm._core.checks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._threads import check_n_jobs, single_threaded_blas
from .blocks import block_stats
from .checks import DEFAULT_CHUNK_SIZE, NonFiniteError, _as_design, _check_chunk_size
from .passes import _dask_pass, _local_pass
from .plan import _LN2, DesignPlan
from .sources import is_dask_array, open_source, shape2
from .stats import ARRAY_FIELDS, Shifted, SummaryStats

__all__ = [
    "ARRAY_FIELDS",
    "DEFAULT_CHUNK_SIZE",
    "DesignPlan",
    "NonFiniteError",
    "SummaryStats",
    "block_stats",
    "summary_stats",
]


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
    c = None
    if source is None:
        packed = _dask_pass(Y, plan, is_counts=is_counts, progress=progress)
    else:
        packed, c = _local_pass(
            source,
            plan,
            is_counts=is_counts,
            size=size,
            n_jobs=jobs,
            progress=progress,
            shift=True,
        )
    XZY, Ynorm = plan.unpack(packed, is_counts=is_counts)
    if c is None:
        return SummaryStats(XX=XX, XY=XZY[:p], ZX=ZX, ZY=XZY[p:], ZZ=ZZ, Ynorm=Ynorm, n=n)
    # the pass summed y - c (docs/model.md, Offsets): the statistics of y follow
    Ysum = plan.unpack_sums(packed, is_counts=is_counts)
    if is_counts:
        c = c / _LN2
    X1 = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    Z1 = np.asarray(Z.sum(axis=0), dtype=np.float64).ravel()
    shifted = Shifted(c=c, XY=XZY[:p], ZY=XZY[p:], Ynorm=Ynorm, Ysum=Ysum, X1=X1, Z1=Z1)
    with np.errstate(over="ignore", invalid="ignore"):
        return SummaryStats(
            XX=XX,
            XY=XZY[:p] + np.outer(X1, c),
            ZX=ZX,
            ZY=XZY[p:] + np.outer(Z1, c),
            ZZ=ZZ,
            Ynorm=Ynorm + c * (2 * Ysum + n * c),
            n=n,
            shifted=shifted,
        )
