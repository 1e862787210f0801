"""Reliability of the Python API: names h5ad cannot store, backed views, memory guard,
option types, n_jobs, and warnings on mismatched is_counts (docs/guarantees.md)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scflashmm as sfm
from scflashmm._core.checks import check_fit_memory, fit_memory_bytes

FIXED = "~0+cls"


@pytest.fixture(scope="module")
def data():
    return sfm.datasets.simulate_rnaseq(
        n_genes=10, n_cells=300, n_samples=4, n_clusters=2, n_de_genes=1, seed=3
    )


@pytest.fixture(scope="module")
def fitted(data):
    adata = data.copy()
    sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True)
    return adata


@pytest.mark.parametrize("name", ["", "_index", "a\x00b", "a/b"])
def test_key_added_must_be_an_h5ad_key(data, name):
    with pytest.raises(ValueError, match="key_added"):
        sfm.tl.flashmm_de(data.copy(), FIXED, "sam", is_counts=True, key_added=name)


@pytest.mark.parametrize("name", ["_index", "a\x00b", "cls[1]"])
def test_contrast_names_checked(data, name):
    adata = data.copy()
    with pytest.raises(ValueError, match="contrast name"):
        sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, contrasts={name: "cls[1]-cls[2]"})
    assert "flashmm" not in adata.uns


@pytest.mark.parametrize("select", [np.s_[:100], np.s_[:, :5]])
def test_backed_view_refused_before_work(data, tmp_path, monkeypatch, select):
    path = tmp_path / "d.h5ad"
    data.write_h5ad(path)
    bk = ad.read_h5ad(path, backed="r")
    try:

        def no_pass(*args, **kwargs):
            raise AssertionError("the pass started")

        monkeypatch.setattr(sfm.tl._flashmm_de, "summary_stats", no_pass)
        with pytest.raises(ValueError, match=r"view of a backed AnnData.*to_memory"):
            sfm.tl.flashmm_de(bk[select], FIXED, "sam", is_counts=True)
    finally:
        bk.file.close()


def test_memory_guard_message():
    need = fit_memory_bytes(30_000, 2, 15_000, 1000, 1, n_jobs=2)
    assert need > 6 * 8 * 15_000**2  # q^2 dominates
    with pytest.raises(MemoryError, match=r"q = 15,000.*fewer random-effect levels"):
        check_fit_memory(30_000, 2, 15_000, 1000, 1, n_jobs=2, available=2 * 1024**3)
    with pytest.raises(MemoryError, match="n_jobs=1"):
        big = fit_memory_bytes(30_000, 2, 3000, 100, 2, n_jobs=8)
        small = fit_memory_bytes(30_000, 2, 3000, 100, 2, n_jobs=1)
        check_fit_memory(30_000, 2, 3000, 100, 2, n_jobs=8, available=(big + small) // 2)
    check_fit_memory(300, 2, 4, 10, 1, n_jobs=2, available=10**9)  # fits: no error


def test_memory_guard_in_flashmm_de(data, monkeypatch):
    monkeypatch.setattr(sfm._core.checks, "available_memory_bytes", lambda: 1000)
    adata = data.copy()
    with pytest.raises(MemoryError, match="This fit needs about"):
        sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True)
    assert "flashmm" not in adata.uns


def test_n_jobs_same_results(data, fitted):
    adata = data.copy()
    sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, n_jobs=1, chunk_size=50)
    pd.testing.assert_frame_equal(adata.varm["flashmm_p"], fitted.varm["flashmm_p"])
    with pytest.raises(ValueError, match="n_jobs"):
        sfm.tl.flashmm_de(data.copy(), FIXED, "sam", n_jobs=0)


def test_is_counts_on_non_integers_warns(data):
    adata = data.copy()
    adata.X = adata.X.astype(np.float64) * 0.5
    with pytest.warns(UserWarning, match="non-integer values, but is_counts=True"):
        sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True)


def test_option_types(fitted):
    with pytest.raises(TypeError, match="term must be a string"):
        sfm.get.flashmm_df(fitted, term=5)
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        sfm.get.flashmm_df(fitted.varm["flashmm_coef"])
    with pytest.raises(ValueError, match="bins must be at most"):
        sfm.pl.variance_components(fitted, bins=10**6, show=False)


def test_lmm_test_float_index():
    rng = np.random.default_rng(0)
    n = 40
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.eye(4)[rng.integers(0, 4, n)]
    fit = sfm.lmm(sfm.summary_stats(X, rng.normal(size=(n, 3)), Z), [4])
    with pytest.raises(ValueError, match="index must hold covariate names"):
        sfm.lmm_test(fit, index=1.0)
