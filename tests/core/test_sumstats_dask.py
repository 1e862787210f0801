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
from scflashmm._core import passes
from scflashmm._core.passes import CELLS_PER_RESULT_ROW, _runs
from scflashmm._core.plan import DesignPlan
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
    """Blocks are read and reduced by the workers (the file is opened where the task runs).

    The blocks of 200 cells are stacked 3 per task; the sum is the in-process one, bit for bit,
    with or without progress.
    """
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
        calls: list[tuple[int, int]] = []
        again = summary_stats(
            X, lazy, Z, is_counts=True, progress=lambda d, t: calls.append((d, t))
        )
        with dask.config.set(scheduler="threads"):
            local = summary_stats(X, lazy, Z, is_counts=True)
    check(stats, expected(X, Y, Z, True), X.shape[0])
    assert calls[-1] == (X.shape[0], X.shape[0])
    for key in ("XY", "ZY", "Ynorm"):  # the same tree, run by the workers or in process
        np.testing.assert_array_equal(getattr(stats, key), getattr(local, key), err_msg=key)
        np.testing.assert_array_equal(getattr(again, key), getattr(local, key), err_msg=key)


@pytest.mark.parametrize(
    ("cells", "target", "runs"),
    [
        ((5, 5, 5, 5), 10, [(0, 2), (2, 4)]),
        ((5, 5, 5), 10, [(0, 2), (2, 3)]),
        ((30, 3, 4), 10, [(0, 1), (1, 3)]),
        ((30, 40), 10, [(0, 1), (1, 2)]),
        ((0,), 10, [(0, 1)]),
    ],
)
def test_runs_of_blocks(cells, target, runs):
    assert _runs(cells, target) == runs


@pytest.mark.parametrize("piece", [None, 120], ids=["one_piece", "pieces"])
@pytest.mark.parametrize("fmt", [np.asarray, sp.csr_matrix, sp.csc_matrix])
@pytest.mark.parametrize("chunks", [(50, 40), (60, 15)], ids=["rows", "rows_genes"])
def test_small_blocks_are_stacked_per_task(data, fmt, chunks, piece, monkeypatch):
    """Blocks far smaller than the result are stacked, a few per task: the same statistics.

    With ``piece``, a task stacks its blocks into pieces of at most that many cells.
    """
    X, Y, Z = data
    if piece is not None:
        monkeypatch.setattr(passes, "DEFAULT_CHUNK_SIZE", piece)
    Yd = da.from_array(fmt(Y), chunks=chunks, asarray=False)
    rows = DesignPlan(X, Z, Y.shape[1]).rows
    assert len(_runs(Yd.chunks[0], CELLS_PER_RESULT_ROW * rows)) < len(Yd.chunks[0]) / 3
    check(summary_stats(X, Yd, Z, is_counts=True), expected(X, Y, Z, True), X.shape[0])


def test_dask_sum_does_not_depend_on_the_scheduler_or_progress(data):
    """The tree adds the task results in cell order: the same bits whatever runs it."""
    X, Y, Z = data
    Yd = da.from_array(sp.csr_matrix(Y), chunks=(30, 40), asarray=False)
    with dask.config.set(scheduler="threads"):
        ref = summary_stats(X, Yd, Z, is_counts=True)
    calls: list[tuple[int, int]] = []
    with dask.config.set(scheduler="synchronous"):
        stats = summary_stats(X, Yd, Z, is_counts=True, progress=lambda d, t: calls.append((d, t)))
    for key in ("XY", "ZY", "Ynorm"):
        np.testing.assert_array_equal(getattr(stats, key), getattr(ref, key), err_msg=key)
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (X.shape[0], X.shape[0])


def test_dask_error_names_the_cells_of_a_stacked_block(data):
    X, Y, Z = data
    bad = Y.copy()
    bad[707, 3] = np.inf
    with pytest.raises(NonFiniteError, match="NaN or infinite") as info:
        summary_stats(X, da.from_array(bad, chunks=(25, 40)), Z)
    assert info.value.axis == 0 and info.value.start <= 707 < info.value.stop
