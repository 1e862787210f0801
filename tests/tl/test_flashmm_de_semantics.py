"""tl.flashmm_de: copy, key_added and refits, subsetting after the fit, views, the raw-counts
warning and the progress bar."""

from __future__ import annotations

import warnings

import anndata as ad
import pandas as pd
import pytest
from _reference import assert_same_results, case_adata, fit_case, load_case

import scflashmm as sfm


def test_copy_semantics():
    adata = case_adata("b")
    x_before = adata.X.copy()
    spec = load_case("b")["spec"]
    out = sfm.tl.flashmm_de(adata, spec["fixed"], "sam", is_counts=True, copy=True)
    assert isinstance(out, ad.AnnData)
    assert out is not adata
    assert "flashmm" not in adata.uns
    assert len(adata.varm) == 0
    assert (adata.X != x_before).nnz == 0  # log2(1 + y) never touches the input
    assert "flashmm_coef" in out.varm
    assert sfm.tl.flashmm_de(adata, spec["fixed"], "sam", is_counts=True) is None
    assert (adata.X != x_before).nnz == 0
    assert_same_results(adata, out)


def test_key_added_and_refit_replaces_old_contrasts():
    adata = case_adata("b")
    spec = load_case("b")["spec"]
    sfm.tl.flashmm_de(
        adata, spec["fixed"], "sam", is_counts=True, contrasts={"x": "cls[1]"}, key_added="m1"
    )
    assert "m1_contrast_p" in adata.varm
    sfm.tl.flashmm_de(adata, spec["fixed"], "sam", is_counts=True, key_added="m1")
    assert "m1_contrast_p" not in adata.varm
    assert "flashmm" not in adata.uns
    assert adata.uns["m1"]["contrast_names"] == []


def test_subsetting_genes_after_fit(fitted_b):
    genes = list(fitted_b.var_names[[3, 17, 44, 49]])
    sub = fitted_b[:, genes].copy()
    full = sfm.get.flashmm_df(fitted_b, term="cls[3]:trt[T.B]").set_index("variable").loc[genes]
    part = sfm.get.flashmm_df(sub, term="cls[3]:trt[T.B]").set_index("variable").loc[genes]
    cols = ["log_fc", "sd", "t_value", "p_value", "converged"]
    pd.testing.assert_frame_equal(part[cols], full[cols])
    # genes are fit independently: refitting the subset gives the same rows
    refit, _, _ = fit_case("b_simu_reml_counts", adata=case_adata("b")[:, genes].copy())
    # (not the effect sizes: their default library sizes are sums over the genes present)
    assert_same_results(refit, sub, effect_sizes=False)


def test_fit_on_a_view_of_cells():
    adata = case_adata("b")
    view = adata[adata.obs["cls"] != "4"]
    assert view.is_view
    sfm.tl.flashmm_de(view, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    assert list(view.uns["flashmm"]["x_columns"]) == [  # unused level '4' dropped
        "log(libsize)",
        "cls[1]",
        "cls[2]",
        "cls[3]",
        "cls[1]:trt[T.B]",
        "cls[2]:trt[T.B]",
        "cls[3]:trt[T.B]",
    ]
    assert "flashmm" not in adata.uns


def test_raw_counts_warning():
    adata = case_adata("b")
    with pytest.warns(UserWarning, match=r"adata.X looks like raw counts"):
        sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam")
    adata.X = adata.X.log1p()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam")


def test_progress_bar(capsys):
    adata = case_adata("a")
    sfm.tl.flashmm_de(adata, "~0+trt", "sam", chunk_size=100, progress=True)
    assert "flashmm pass" in capsys.readouterr().err
    sfm.tl.flashmm_de(adata, "~0+trt", "sam", chunk_size=100)  # not a TTY: silent
    assert capsys.readouterr().err == ""
