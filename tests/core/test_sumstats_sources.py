"""Summary statistics from every source (dense, CSR/CSC, chunked, threads, backed h5ad, h5py
groups), the design plan (pattern groups vs product), save/load of SummaryStats.

All sources must give the statistics of a plain dense computation to rtol 1e-12 (the same sums
in another order). Dask sources are in test_sumstats_dask.py.
"""

from __future__ import annotations

import dataclasses

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from anndata.io import sparse_dataset

import scflashmm
import scflashmm._core._accumulate as acc
import scflashmm._core.blocks as blocks
import scflashmm._core.plan as plan_module
from scflashmm import SummaryStats, summary_stats
from scflashmm._core.sumstats import ARRAY_FIELDS, DesignPlan, NonFiniteError

RTOL = 1e-12  # same products summed in a different order


def make_design(n: int, rng: np.random.Generator, n_cls: int = 5, n_sam: int = 8):
    """``~0 + log(libsize) + cls + cls:trt`` and ``~0 + sam`` (trt nested in sam)."""
    sam = rng.integers(0, n_sam, n)
    cls = rng.integers(0, n_cls, n)
    trt = sam % 2
    onehot = np.eye(n_cls)[cls]
    X = np.column_stack([np.log(rng.gamma(5, 400, n)), onehot, onehot * trt[:, None]])
    Z = np.eye(n_sam)[sam]
    return X, Z


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    n, m = 611, 23
    X, Z = make_design(n, rng)
    counts = rng.negative_binomial(1, 0.55, size=(n, m)).astype(np.float32)
    counts[:, 4] = 0  # an all-zero gene
    counts[10] = 0  # a cell without counts
    counts[rng.random((n, m)) < 0.4] = 0
    return X, counts, Z


def expected(X, Y, Z, is_counts):
    Y = np.log2(1 + Y.astype(np.float64)) if is_counts else Y.astype(np.float64)
    return {
        "XX": X.T @ X,
        "XY": X.T @ Y,
        "ZX": Z.T @ X,
        "ZY": Z.T @ Y,
        "ZZ": Z.T @ Z,
        "Ynorm": (Y**2).sum(0),
    }


def check(stats, ref, n):
    for key, value in ref.items():
        np.testing.assert_allclose(getattr(stats, key), value, rtol=RTOL, atol=1e-9, err_msg=key)
    assert stats.n == n


IN_MEMORY = {
    "dense": lambda Y: Y,
    "dense_fortran": np.asfortranarray,
    "dense_float64": lambda Y: Y.astype(np.float64),
    "dense_int32": lambda Y: Y.astype(np.int32),
    "csr_matrix": sp.csr_matrix,
    "csr_array": sp.csr_array,
    "csc_matrix": sp.csc_matrix,
    "csc_array": sp.csc_array,
    "coo_array": sp.coo_array,
    "csr_int64_indices": lambda Y: _int64_indices(sp.csr_matrix(Y)),
    "csr_int32_counts": lambda Y: sp.csr_matrix(Y.astype(np.int32)),
}


def _int64_indices(A):
    A.indices = A.indices.astype(np.int64)
    A.indptr = A.indptr.astype(np.int64)
    return A


@pytest.mark.parametrize("is_counts", [False, True])
@pytest.mark.parametrize("layout", list(IN_MEMORY))
@pytest.mark.parametrize(("chunk_size", "n_jobs"), [(None, 1), (1, 1), (50, 2), (200, 3)])
def test_in_memory_layouts_chunks_threads_agree(data, layout, chunk_size, n_jobs, is_counts):
    X, Y, Z = data
    stats = summary_stats(
        X, IN_MEMORY[layout](Y), Z, chunk_size=chunk_size, is_counts=is_counts, n_jobs=n_jobs
    )
    check(stats, expected(X, Y, Z, is_counts), X.shape[0])


@pytest.mark.parametrize("piece", [1, 37, 1 << 17])
@pytest.mark.parametrize("layout", ["dense", "csr_matrix", "csc_matrix"])
def test_pieces_within_a_block(data, layout, piece, monkeypatch):
    """A block is worked through in pieces of about _PIECE stored values (one row at least)."""
    monkeypatch.setattr(blocks, "_PIECE", piece)
    X, Y, Z = data
    stats = summary_stats(X, IN_MEMORY[layout](Y), Z, is_counts=True, n_jobs=1)
    check(stats, expected(X, Y, Z, True), X.shape[0])


@pytest.mark.parametrize("layout", ["dense", "csr_matrix", "csc_matrix"])
def test_public_api_kernels_agree(data, layout, monkeypatch):
    """The fallback used when scipy's compiled kernels are unavailable gives the same numbers."""
    assert acc.COMPILED  # this scipy passes the self-test
    for name in ("scatter_add", "csc_matmul_add", "csr_matmul_add"):
        monkeypatch.setattr(blocks, name, getattr(acc, f"_public_{name}"))
    monkeypatch.setattr(blocks, "_PIECE", 101)
    X, Y, Z = data
    stats = summary_stats(X, IN_MEMORY[layout](Y), Z, is_counts=True, chunk_size=97)
    check(stats, expected(X, Y, Z, True), X.shape[0])


def test_sparse_design_inputs(data):
    X, Y, Z = data
    stats = summary_stats(sp.csr_matrix(X), sp.csr_matrix(Y), sp.csr_array(Z), is_counts=True)
    check(stats, expected(X, Y, Z, True), X.shape[0])


# ------------------------------------------------------------------------------------------
# design plan: which columns are summed by pattern, which multiplied
# ------------------------------------------------------------------------------------------


def test_plan_groups_indicator_columns(data):
    X, Y, Z = data
    plan = DesignPlan(X, sp.csc_matrix(Z), Y.shape[1])
    # cls, cls:trt and sam combine into one group of patterns (cls x sam, trt nested in sam)
    assert [columns.tolist() for columns, _ in plan.groups] == [
        list(range(1, X.shape[1] + Z.shape[1]))
    ]
    assert plan.groups[0][1] == len(np.unique(np.column_stack([X[:, 1:], Z]), axis=0))
    assert plan.continuous.tolist() == [0]  # log(libsize)


def test_plan_splits_groups_at_the_pattern_bound(data, monkeypatch):
    X, _Y, Z = data
    m_large = 1 << 22  # many genes: the bound is 4 (p + q) patterns
    plan = DesignPlan(X, Z, m_large)
    assert len(plan.groups) == 1
    monkeypatch.setattr(plan_module, "_MIN_GROUP_COLUMNS", 1)
    small = DesignPlan(X[:, :1], Z, m_large)  # only sam: 8 patterns, bound 36
    assert [U for _, U in small.groups] == [8]
    # with 2 * 40 levels of two crossed factors the 1600 combinations exceed 4 * 80 patterns
    rng = np.random.default_rng(0)
    A, B = np.eye(40)[rng.integers(0, 40, 5000)], np.eye(40)[rng.integers(0, 40, 5000)]
    plan = DesignPlan(A, B, m_large)
    assert [U for _, U in plan.groups] == [40, 40]


def test_plan_without_indicator_columns():
    rng = np.random.default_rng(1)
    X, Z = rng.normal(size=(300, 3)), rng.normal(size=(300, 2))
    Y = sp.random(300, 11, density=0.3, random_state=1, format="csr")
    plan = DesignPlan(X, Z, 11)
    assert plan.groups == [] and plan.continuous.tolist() == list(range(5))
    check(summary_stats(X, Y, Z), expected(X, Y.toarray(), Z, False), 300)


def test_plan_small_groups_use_the_product(data):
    """An intercept and one indicator (2 columns) are cheaper as a product than as a group."""
    X, Y, _Z = data
    rng = np.random.default_rng(2)
    X2 = np.column_stack(
        [np.ones(X.shape[0]), rng.random(X.shape[0]) < 0.5, rng.normal(size=X.shape[0])]
    )
    Z2 = np.column_stack([rng.random(X.shape[0]) < 0.3, rng.normal(size=X.shape[0])])
    plan = DesignPlan(X2, Z2, Y.shape[1])
    assert plan.groups == []
    check(summary_stats(X2, Y, Z2, is_counts=True), expected(X2, Y, Z2, True), X.shape[0])


def test_two_random_components_and_values_other_than_one(data):
    X, Y, Z = data
    rng = np.random.default_rng(3)
    Z2 = np.hstack([Z * 2.5, np.eye(6)[rng.integers(0, 6, X.shape[0])]])  # indicator values 2.5
    X2 = X.copy()
    X2[:, 1:] *= -0.5
    check(
        summary_stats(X2, sp.csr_matrix(Y), Z2, is_counts=True),
        expected(X2, Y, Z2, True),
        X.shape[0],
    )


# ------------------------------------------------------------------------------------------
# backed h5ad and h5py groups
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def h5ad_files(data, tmp_path_factory):
    _X, Y, _Z = data
    folder = tmp_path_factory.mktemp("backed")
    files = {}
    for name, matrix in {"dense": Y, "csr": sp.csr_matrix(Y), "csc": sp.csc_matrix(Y)}.items():
        adata = ad.AnnData(X=matrix, layers={"counts": sp.csr_matrix(Y), "dense": Y.copy()})
        files[name] = folder / f"{name}.h5ad"
        adata.write_h5ad(files[name])
    return files


@pytest.mark.parametrize("is_counts", [False, True])
@pytest.mark.parametrize("kind", ["dense", "csr", "csc"])
@pytest.mark.parametrize(("chunk_size", "n_jobs"), [(None, 2), (64, 1), (64, 2)])
def test_backed_h5ad_X(data, h5ad_files, kind, chunk_size, n_jobs, is_counts):
    X, Y, Z = data
    adata = ad.read_h5ad(h5ad_files[kind], backed="r")
    try:
        stats = summary_stats(
            X, adata.X, Z, chunk_size=chunk_size, n_jobs=n_jobs, is_counts=is_counts
        )
    finally:
        adata.file.close()
    check(stats, expected(X, Y, Z, is_counts), X.shape[0])


@pytest.mark.parametrize(
    "element",
    [
        lambda f: f["layers/counts"],  # an h5py group in AnnData's sparse encoding
        lambda f: sparse_dataset(f["layers/counts"]),  # anndata's backed sparse dataset
        lambda f: f["layers/dense"],  # a dense h5py dataset
        lambda f: f["X"],
    ],
    ids=["h5py_group", "sparse_dataset", "h5py_dataset", "X_csc_group"],
)
def test_backed_layers_through_h5py(data, h5ad_files, element):
    X, Y, Z = data
    with h5py.File(h5ad_files["csc"], "r") as f:
        stats = summary_stats(X, element(f), Z, chunk_size=100, is_counts=True)
    check(stats, expected(X, Y, Z, True), X.shape[0])


def test_backed_nonfinite_value_names_the_cells(data, tmp_path):
    X, Y, Z = data
    bad = sp.csr_matrix(Y)
    bad[300, 2] = np.nan
    path = tmp_path / "bad.h5ad"
    ad.AnnData(X=bad).write_h5ad(path)
    with h5py.File(path, "r") as f, pytest.raises(NonFiniteError, match="NaN or infinite") as info:
        summary_stats(X, f["X"], Z, chunk_size=100)
    assert info.value.start <= 300 < info.value.stop


def test_nonfinite_value_in_column_blocks_names_the_genes(data):
    X, Y, Z = data
    bad = sp.lil_matrix(Y, dtype=float)
    bad[300, 17] = np.nan
    with pytest.raises(NonFiniteError, match=r"genes \d+\.\.\d+") as info:
        summary_stats(X, bad.tocsc(), Z, chunk_size=100)
    assert info.value.axis == 1
    assert info.value.start <= 17 < info.value.stop


# ------------------------------------------------------------------------------------------
# progress, options, errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "total"), [("csr_matrix", 611), ("csc_matrix", 23), ("dense", 611)]
)
def test_progress_reports_done_and_total(data, layout, total):
    X, Y, Z = data
    calls = []
    summary_stats(
        X,
        IN_MEMORY[layout](Y),
        Z,
        chunk_size=100,
        n_jobs=2,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert len(calls) > 1
    assert [t for _, t in calls] == [total] * len(calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total


@pytest.mark.parametrize("n_jobs", [0, -1, 1.5, True])
def test_n_jobs_must_be_positive_integer(data, n_jobs):
    with pytest.raises(ValueError, match="n_jobs"):
        summary_stats(*data, n_jobs=n_jobs)


def test_results_do_not_depend_on_threads(data):
    X, Y, Z = data
    one = summary_stats(X, sp.csr_matrix(Y), Z, chunk_size=40, n_jobs=1, is_counts=True)
    two = summary_stats(X, sp.csr_matrix(Y), Z, chunk_size=40, n_jobs=2, is_counts=True)
    for key in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(one, key), getattr(two, key))


def test_error_in_a_thread_is_raised(data):
    X, Y, Z = data
    bad = Y.copy()
    bad[500, 1] = np.inf
    with pytest.raises(NonFiniteError, match=r"cells \d+\.\.\d+"):
        summary_stats(X, sp.csr_matrix(bad), Z, chunk_size=50, n_jobs=2)


def test_empty_blocks(data):
    """Blocks without stored values (all-zero cells or genes) are skipped."""
    X, Y, Z = data
    Y0 = Y.copy()
    Y0[:200] = 0
    Y0[:, :5] = 0
    for layout in ("csr_matrix", "csc_matrix"):
        stats = summary_stats(X, IN_MEMORY[layout](Y0), Z, chunk_size=50, is_counts=True)
        check(stats, expected(X, Y0, Z, True), X.shape[0])


# ------------------------------------------------------------------------------------------
# SummaryStats metadata, save and load
# ------------------------------------------------------------------------------------------


def named(stats: SummaryStats, m: int) -> SummaryStats:
    p, q = stats.XX.shape[0], stats.ZZ.shape[0]
    return dataclasses.replace(
        stats,
        feature_names=[f"gene{i}" for i in range(m)],
        covariate_names=["log(libsize)", *(f"x{i}" for i in range(p - 1))],
        z_names=[f"sam[{i}]" for i in range(q)],
        d=[q],
        component_names=["sam"],
    )


def test_save_load_round_trip_and_refit(data, tmp_path):
    X, Y, Z = data
    stats = named(summary_stats(X, sp.csr_matrix(Y), Z, is_counts=True), Y.shape[1])
    path = tmp_path / "stats.npz"
    stats.save(path)
    loaded = SummaryStats.load(path)
    for key in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(loaded, key), getattr(stats, key))
    assert loaded.n == stats.n
    for key in ("feature_names", "covariate_names", "z_names", "d", "component_names"):
        assert getattr(loaded, key) == getattr(stats, key)
    with pytest.warns(scflashmm.DegenerateFeatureWarning):
        fit = scflashmm.lmm(stats)
    with pytest.warns(scflashmm.DegenerateFeatureWarning):
        refit = scflashmm.lmm(loaded)
    for key in ("coef", "se", "t", "p", "theta", "se_theta", "logLik", "dlogL"):
        np.testing.assert_array_equal(getattr(refit, key), getattr(fit, key), err_msg=key)
    # names travel to the fit; other settings re-fit without the cells
    assert refit.feature_names == list(stats.feature_names)
    assert refit.covariate_names == list(stats.covariate_names)
    assert refit.component_names == ["sam"]
    with pytest.warns(scflashmm.DegenerateFeatureWarning):
        tight = scflashmm.lmm(loaded, epsilon=1e-9, max_iter=100)
    assert tight.epsilon == 1e-9


def test_save_load_without_metadata_and_any_suffix(data, tmp_path):
    stats = summary_stats(*data)
    path = tmp_path / "stats.bin"  # written where asked, no ".npz" added
    stats.save(path)
    assert path.exists()
    loaded = SummaryStats.load(path)
    assert loaded.feature_names is None and loaded.d is None
    np.testing.assert_array_equal(loaded.ZY, stats.ZY)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a SummaryStats file"):
        SummaryStats.load(path)


def test_stored_d_is_the_default_of_lmm(data):
    X, Y, Z = data
    rng = np.random.default_rng(5)
    Z2 = np.hstack([Z, np.eye(3)[rng.integers(0, 3, X.shape[0])]])
    stats = summary_stats(X, Y, Z2, is_counts=True)
    with (
        pytest.warns(scflashmm.DegenerateFeatureWarning),
        pytest.warns(scflashmm.ConvergenceWarning),
    ):
        explicit = scflashmm.lmm(stats, d=[8, 3], max_iter=3)
    with (
        pytest.warns(scflashmm.DegenerateFeatureWarning),
        pytest.warns(scflashmm.ConvergenceWarning),
    ):
        stored = scflashmm.lmm(dataclasses.replace(stats, d=(8, 3)), max_iter=3)
    np.testing.assert_array_equal(stored.theta, explicit.theta)
    assert stored.theta.shape[1] == 3


def test_construction_positional_and_addition_keep_working(data):
    X, Y, Z = data
    s = summary_stats(X, Y, Z)
    plain = SummaryStats(s.XX, s.XY, s.ZX, s.ZY, s.ZZ, s.Ynorm, s.n)
    total = plain + plain
    assert total.n == 2 * s.n and total.feature_names is None
    a = named(summary_stats(X[:300], Y[:300], Z[:300]), Y.shape[1])
    b = summary_stats(X[300:], Y[300:], Z[300:])
    both = a + b  # names from the side that has them
    assert both.feature_names == a.feature_names
    np.testing.assert_allclose(both.ZY, s.ZY, rtol=RTOL)
    other = dataclasses.replace(a, feature_names=[f"g{i}" for i in range(Y.shape[1])])
    with pytest.raises(ValueError, match="different feature_names"):
        a + other


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature_names": ["a"]}, "feature_names has 1 names, expected 23"),
        ({"covariate_names": ["a", "b"]}, "covariate_names has 2 names"),
        ({"z_names": ["a"]}, "z_names has 1 names"),
        ({"d": [3, 3]}, "summing to q = 8"),
        ({"component_names": ["a", "b"]}, "one per random component"),
    ],
)
def test_metadata_is_checked(data, kwargs, match):
    s = summary_stats(*data)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(s, **kwargs)
