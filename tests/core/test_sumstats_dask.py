"""Summary statistics of Dask arrays: dense and sparse blocks, lazily read h5ad elements, and a
``dask.distributed`` LocalCluster of two worker processes (the same graph, run remotely).

Dask is an optional extra of scflashmm and part of the ``test`` extra: these tests run in CI.
"""

from __future__ import annotations

import anndata as ad
import dask
import dask.array as da
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from anndata.experimental import read_elem_lazy
from distributed import Client, LocalCluster
from test_sumstats_sources import check, expected, make_design

from scflashmm import summary_stats
from scflashmm._core.sumstats import NonFiniteError


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    n, m = 1500, 40
    X, Z = make_design(n, rng, n_cls=4, n_sam=6)
    counts = rng.negative_binomial(1, 0.6, size=(n, m)).astype(np.float32)
    counts[rng.random((n, m)) < 0.5] = 0
    return X, counts, Z


@pytest.fixture(scope="module")
def h5ad_path(data, tmp_path_factory):
    _X, Y, _Z = data
    path = tmp_path_factory.mktemp("lazy") / "data.h5ad"
    ad.AnnData(X=sp.csr_matrix(Y), layers={"dense": Y}).write_h5ad(path)
    return path


@pytest.mark.parametrize("is_counts", [False, True])
@pytest.mark.parametrize(
    "chunks",
    [(400, 40), (400, 15), (1500, 7), (250, -1)],
    ids=["rows", "rows_genes", "genes", "small"],
)
def test_dask_dense_blocks(data, chunks, is_counts):
    X, Y, Z = data
    with dask.config.set(scheduler="threads"):
        stats = summary_stats(X, da.from_array(Y, chunks=chunks), Z, is_counts=is_counts)
    check(stats, expected(X, Y, Z, is_counts), X.shape[0])


@pytest.mark.parametrize("fmt", [sp.csr_matrix, sp.csr_array, sp.csc_matrix])
def test_dask_sparse_blocks(data, fmt):
    X, Y, Z = data
    Yd = da.from_array(fmt(Y), chunks=(300, 40), asarray=False)
    stats = summary_stats(X, Yd, Z, is_counts=True)
    check(stats, expected(X, Y, Z, True), X.shape[0])


@pytest.mark.parametrize("element", ["X", "layers/dense"])
def test_lazily_read_h5ad_elements(data, h5ad_path, element):
    X, Y, Z = data
    with h5py.File(h5ad_path, "r") as f:
        lazy = read_elem_lazy(f[element], chunks=(350, 40))
        assert isinstance(lazy, da.Array)
        stats = summary_stats(X, lazy, Z, is_counts=True)
    check(stats, expected(X, Y, Z, True), X.shape[0])


def test_dask_unknown_block_sizes(data):
    X, Y, Z = data
    Yd = da.from_array(Y, chunks=(400, 40))
    Yd = Yd[da.ones(Y.shape[0], dtype=bool, chunks=400)]  # row blocks of unknown size
    assert np.isnan(Yd.chunks[0][0])
    check(summary_stats(X, Yd, Z, is_counts=True), expected(X, Y, Z, True), X.shape[0])


def test_dask_errors(data):
    X, Y, Z = data
    bad = Y.copy()
    bad[700, 3] = np.nan
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        summary_stats(X, da.from_array(bad, chunks=(500, 40)), Z)
    with pytest.raises(ValueError, match="negative"):
        summary_stats(X, da.from_array(-Y, chunks=(500, 40)), Z, is_counts=True)
    with pytest.raises(ValueError, match="numeric"):
        summary_stats(X, da.from_array(Y.astype(str), chunks=(500, 40)), Z)


def test_local_cluster_of_two_processes(data, h5ad_path):
    """Blocks are read and reduced by the workers (the file is opened where the task runs)."""
    X, Y, Z = data
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster),
        h5py.File(h5ad_path, "r") as f,
    ):
        lazy = read_elem_lazy(f["X"], chunks=(200, 40))
        stats = summary_stats(X, lazy, Z, is_counts=True)
    check(stats, expected(X, Y, Z, True), X.shape[0])
