"""get.flashmm_df's effect sizes, gene symbols and filters; get.flashmm_matrix for decoupler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _reference import FLASHMM_SETTINGS

import scflashmm as sfm

FIXED = "~0+log(libsize)+cls+cls:trt"


@pytest.fixture(scope="module")
def fitted():
    adata = sfm.datasets.simulate_rnaseq(
        n_genes=40, n_cells=800, n_clusters=3, n_de_genes=6, seed=4
    )
    adata.var["symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    named = sfm.tl.contrasts_within(adata, "trt", "A", "cls")
    sfm.tl.flashmm_de(
        adata, FIXED, "sam", is_counts=True, contrasts=named, store_cov=True, **FLASHMM_SETTINGS
    )
    return adata


def test_effect_size_column(fitted):
    lfc = fitted.varm["flashmm_log2fc"]
    df = sfm.get.flashmm_df(fitted, term="cls[2]:trt[T.B]").set_index("variable")
    np.testing.assert_allclose(
        df.loc[lfc.index, "log2fc_means"], lfc["cls[2]:trt[T.B]"], rtol=1e-12
    )
    df = sfm.get.flashmm_df(fitted, term="log(libsize)")
    assert df["log2fc_means"].isna().all()  # a numeric covariate has none
    # a stored contrast and a new expression apply their coefficients to the effect sizes
    stored = sfm.get.flashmm_df(fitted, contrast="B vs A in cls 3").set_index("variable")
    np.testing.assert_allclose(
        stored.loc[lfc.index, "log2fc_means"], lfc["cls[3]:trt[T.B]"], rtol=1e-12
    )
    new = sfm.get.flashmm_df(fitted, contrast="cls[1]:trt[T.B] - cls[3]:trt[T.B]").set_index(
        "variable"
    )
    expected = lfc["cls[1]:trt[T.B]"] - lfc["cls[3]:trt[T.B]"]
    np.testing.assert_allclose(new.loc[lfc.index, "log2fc_means"], expected, rtol=1e-12)


def test_gene_symbols_and_filters(fitted):
    full = sfm.get.flashmm_df(fitted, term=":trt", gene_symbols="symbol")
    assert (
        full["symbol"] == "SYM" + full["variable"].map(fitted.var_names.get_loc).astype(str)
    ).all()
    # the filters keep the rows of the full table, adjusted p-values unchanged
    cut = sfm.get.flashmm_df(fitted, term=":trt", pval_cutoff=0.05, log2fc_min=0.5)
    expected = full[(full["adj_p_value"] < 0.05) & (full["log2fc_means"] > 0.5)]
    pd.testing.assert_frame_equal(cut, expected.drop(columns="symbol").reset_index(drop=True))
    low = sfm.get.flashmm_df(fitted, term=":trt", log2fc_max=-0.5)
    assert (low["log2fc_means"] < -0.5).all() and len(low) == (full["log2fc_means"] < -0.5).sum()


def test_filters_without_effect_sizes_use_log_fc(fitted):
    adata = fitted.copy()
    del adata.varm["flashmm_log2fc"]
    df = sfm.get.flashmm_df(adata, term=":trt", log2fc_min=0.2)
    assert "log2fc_means" not in df.columns and (df["log_fc"] > 0.2).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gene_symbols": "nope"}, ValueError, "not a column of adata.var"),
        ({"pval_cutoff": "0.05"}, TypeError, "pval_cutoff must be a number"),
        ({"log2fc_min": np.nan}, ValueError, "log2fc_min must be finite"),
    ],
)
def test_errors(fitted, kwargs, error, match):
    with pytest.raises(error, match=match):
        sfm.get.flashmm_df(fitted, **kwargs)


def test_new_contrast_without_covariance_says_how():
    adata = sfm.datasets.simulate_rnaseq(
        n_genes=10, n_cells=300, n_clusters=2, n_de_genes=2, seed=2
    )
    sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, **FLASHMM_SETTINGS)
    assert "flashmm_cov" not in adata.varm
    with pytest.raises(KeyError, match=r"store_cov=True"):
        sfm.get.flashmm_df(adata, contrast="cls[1]:trt[T.B] - cls[2]:trt[T.B]")
    sfm.get.flashmm_df(adata, term=":trt")  # the stored tests need no covariance


def test_matrix_for_decoupler(fitted):
    mat = sfm.get.flashmm_matrix(fitted)  # default: the stored contrasts
    names = list(fitted.uns["flashmm"]["contrast_names"])
    assert list(mat.index) == names and list(mat.columns) == list(fitted.var_names)
    pd.testing.assert_frame_equal(
        mat.T, fitted.varm["flashmm_contrast_t"][names], check_names=False, rtol=1e-12
    )
    lfc = sfm.get.flashmm_matrix(fitted, values="log2fc", term=["cls[2]:trt[T.B]", "cls[1]"])
    assert list(lfc.index) == ["cls[2]:trt[T.B]", "cls[1]"]
    np.testing.assert_allclose(lfc.T, fitted.varm["flashmm_log2fc"][["cls[2]:trt[T.B]", "cls[1]"]])
    named = sfm.get.flashmm_matrix(
        fitted, values="log_fc", contrast={"d13": "cls[1]:trt[T.B] - cls[3]:trt[T.B]"}
    )
    assert list(named.index) == ["d13"]
    with pytest.raises(ValueError, match="values must be one of"):
        sfm.get.flashmm_matrix(fitted, values="nope")
