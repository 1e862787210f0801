"""tl.flashmm_refit: refits from the stored summary statistics equal fresh fits of the cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _reference import CONTRASTS_B, FIXED_B, case_adata

import scflashmm as sfm

NEW = {"diff32": "cls[3]:trt[T.B] - cls[2]:trt[T.B]"}
TABLES = ["coef", "se", "t", "p", "theta", "se_theta", "df", "moderation"]
TABLES += ["contrast_coef", "contrast_se", "contrast_t", "contrast_p", "contrast_df"]


def _assert_same(a, b, key_a="flashmm", key_b="flashmm"):
    # same summary statistics, same solver: equal to rounding (1e-10)
    names_a = {k[len(key_a) :] for k in a.varm if k.startswith(f"{key_a}_")}
    names_b = {k[len(key_b) :] for k in b.varm if k.startswith(f"{key_b}_")}
    assert names_a == names_b
    for suffix in TABLES:
        if f"{key_a}_{suffix}" in a.varm:
            pd.testing.assert_frame_equal(
                a.varm[f"{key_a}_{suffix}"], b.varm[f"{key_b}_{suffix}"], rtol=1e-10, atol=1e-12
            )
    if f"{key_a}_cov" in a.varm:  # stored only with store_cov=True (names compared above)
        np.testing.assert_allclose(
            a.varm[f"{key_a}_cov"], b.varm[f"{key_b}_cov"], rtol=1e-10, atol=1e-14
        )
    diag_a, diag_b = a.varm[f"{key_a}_diag"], b.varm[f"{key_b}_diag"]
    pd.testing.assert_frame_equal(
        diag_a.drop(columns="max_abs_dlogL"), diag_b.drop(columns="max_abs_dlogL")
    )


@pytest.fixture(scope="module")
def fitted():
    adata = case_adata("b")
    sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, contrasts=CONTRASTS_B)
    return adata


@pytest.mark.parametrize(
    "options",
    [
        {"moderate": False, "df": "satterthwaite"},
        {"moderate": False, "df": "residual", "method": "ML"},
        {"moderate": True},
    ],
)
def test_refit_equals_a_fresh_fit(fitted, options):
    refit = sfm.tl.flashmm_refit(fitted, contrasts=NEW, key_added="re", copy=True, **options)
    fresh = case_adata("b")
    sfm.tl.flashmm_de(fresh, FIXED_B, "sam", is_counts=True, contrasts=NEW, **options)
    _assert_same(refit, fresh, "re", "flashmm")
    params = refit.uns["re"]["params"]
    assert params["moderate"] == options.get("moderate", False)
    assert params["method"] == options.get("method", "REML")
    # the refit did not touch the original fit
    assert fitted.uns["flashmm"]["contrast_names"] == list(CONTRASTS_B)


def test_satterthwaite_fit_tests_a_new_contrast_after_the_fit():
    # a Satterthwaite fit could not test a new contrast from varm: a refit can, exactly
    adata = case_adata("b")
    sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, moderate=False)
    with pytest.raises(ValueError, match="flashmm_refit"):
        sfm.get.flashmm_df(adata, contrast=NEW["diff32"])
    sfm.tl.flashmm_refit(adata, contrasts=NEW)
    table = sfm.get.flashmm_df(adata, contrast="diff32")
    assert (table["df"] < adata.uns["flashmm"]["df"]).all()
    fresh = case_adata("b")
    sfm.tl.flashmm_de(fresh, FIXED_B, "sam", is_counts=True, moderate=False, contrasts=NEW)
    pd.testing.assert_frame_equal(table, sfm.get.flashmm_df(fresh, contrast="diff32"), rtol=1e-10)


def test_refit_keeps_the_fit_settings_and_contrasts(fitted):
    refit = sfm.tl.flashmm_refit(fitted, copy=True)
    _assert_same(refit, fitted)
    assert refit.uns["flashmm"]["contrast_names"] == list(CONTRASTS_B)


def test_refit_after_subsetting_and_h5ad_round_trip(fitted, tmp_path):
    genes = list(fitted.var_names[[2, 5, 11, 30]])
    path = tmp_path / "fit.h5ad"
    fitted[:, genes].copy().write_h5ad(path)
    sub = ad.read_h5ad(path)
    sfm.tl.flashmm_refit(sub, moderate=False, df="residual", contrasts=NEW)
    fresh = case_adata("b")[:, genes].copy()
    sfm.tl.flashmm_de(
        fresh, FIXED_B, "sam", is_counts=True, moderate=False, df="residual", contrasts=NEW
    )
    _assert_same(sub, fresh)


def test_stored_statistics_and_their_size(fitted):
    info = fitted.uns["flashmm"]
    p, q = len(info["x_columns"]), len(info["z_columns"])
    assert fitted.varm["flashmm_stats_xy"].shape == (fitted.n_vars, p)
    assert fitted.varm["flashmm_stats_zy"].shape == (fitted.n_vars, q)
    assert list(fitted.varm["flashmm_stats_yy"].columns) == ["yy"]
    assert {k: np.shape(v) for k, v in info["stats"].items()} == {
        "XX": (p, p), "ZX": (q, p), "ZZ": (q, q), "x_sum": (p,), "n": (),
    }  # fmt: skip
    assert info["stats"]["n"] == fitted.n_obs
    np.testing.assert_allclose(info["stats"]["ZZ"].sum(), fitted.n_obs)  # sample indicators


def test_errors():
    adata = case_adata("b")
    with pytest.raises(KeyError, match=r"run scflashmm\.tl\.flashmm_de"):
        sfm.tl.flashmm_refit(adata)
    sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, store_stats=False)
    assert not [k for k in adata.varm if "stats" in k]
    assert "stats" not in adata.uns["flashmm"]
    with pytest.raises(KeyError, match="store_stats=True"):
        sfm.tl.flashmm_refit(adata)
    with pytest.raises(TypeError, match="store_stats must be True or False"):
        sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, store_stats="yes")
