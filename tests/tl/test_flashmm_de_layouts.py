"""tl.flashmm_de: every data layout (dense, CSR, CSC, chunked, Dask, backed, layers) gives the
same fit as in-memory CSR (the session fixture ``fitted_b``), and the results survive h5ad."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _reference import assert_same_results, case_adata, fit_case
from scipy import sparse

import scflashmm as sfm


@pytest.mark.parametrize(
    ("layout", "chunk_size"),
    [("csr", None), ("csr", 97), ("csc", None), ("csc", 97), ("dense", None), ("dense", 97)],
)
def test_layouts_and_chunking_agree(fitted_b, layout, chunk_size):
    adata, _, _ = fit_case(
        "b_simu_reml_counts", adata=case_adata("b", layout=layout), chunk_size=chunk_size
    )
    assert_same_results(adata, fitted_b)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_dask_agrees_with_in_memory(fitted_b, kind):
    da = pytest.importorskip("dask.array")
    adata = case_adata("b", layout=kind)
    adata.X = da.from_array(adata.X, chunks=(300, 50))
    fit_case("b_simu_reml_counts", adata=adata, chunk_size=128)
    assert_same_results(adata, fitted_b)


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_backed_agrees_with_in_memory(fitted_b, tmp_path, layout):
    path = tmp_path / f"b_{layout}.h5ad"
    case_adata("b", layout=layout).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        fit_case("b_simu_reml_counts", adata=backed, chunk_size=128)
        assert backed.isbacked
        assert_same_results(backed, fitted_b)
    finally:
        backed.file.close()


def test_layer_of_backed_agrees_with_in_memory(fitted_b, tmp_path):
    adata = case_adata("b")
    adata.layers["counts"] = adata.X.copy()
    adata.X = sparse.csr_matrix(adata.shape)
    path = tmp_path / "b_layer.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        fit_case("b_simu_reml_counts", adata=backed, layer="counts", chunk_size=128)
        assert_same_results(backed, fitted_b)
    finally:
        backed.file.close()


def test_layer_and_integer_dtype(fitted_b):
    adata = case_adata("b")
    adata.layers["counts"] = adata.X.astype(np.int32)
    adata.X = sparse.csr_matrix(adata.shape)
    fit_case("b_simu_reml_counts", adata=adata, layer="counts")
    assert_same_results(adata, fitted_b)
    assert adata.uns["flashmm"]["params"]["layer"] == "counts"


def test_h5ad_round_trip(fitted_b, tmp_path):
    path = tmp_path / "fit.h5ad"
    fitted_b.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert_same_results(back, fitted_b, atol=0)
    info, info0 = back.uns["flashmm"], fitted_b.uns["flashmm"]
    assert set(info) == set(info0)
    assert list(info["x_columns"]) == info0["x_columns"]
    assert set(info["params"]) == set(info0["params"])
    for k, v in info0["params"].items():  # lists come back as arrays
        assert (list(info["params"][k]) if isinstance(v, list) else info["params"][k]) == v
    pd.testing.assert_frame_equal(info["contrast_matrix"], info0["contrast_matrix"])
    for kw in ({}, {"contrast": "BvsA", "alternative": "less"}):
        expected = sfm.get.flashmm_df(fitted_b, **kw)
        pd.testing.assert_frame_equal(sfm.get.flashmm_df(back, **kw), expected)
