"""tl.flashmm_de(moderate=...): the front end's moderated tests equal the core estimator's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _reference import CONTRASTS_B, FIXED_B, FLASHMM_SETTINGS, case_adata

import scflashmm as sfm
from scflashmm import lmm, summary_stats
from scflashmm._core.moderation import mixture_moderate
from scflashmm._design import make_design
from scflashmm.tl._moderate import mean_covariate


@pytest.fixture(scope="module")
def moderated():
    adata = case_adata("b")
    sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, contrasts=CONTRASTS_B)
    return adata


def test_default_moderates_one_component_and_matches_the_core(moderated):
    info = moderated.uns["flashmm"]
    assert info["params"]["moderate"] is True
    assert info["moderation"]["d"] == len(info["z_columns"]) - 2  # samples nested in 2 arms
    # oracle: the core estimator on the same statistics, with the mean log expression (Z are
    # sample indicators, so Z'y summed is the gene's total) as the trend covariate
    adata = case_adata("b")
    design = make_design(adata.obs, FIXED_B, "sam")
    st = summary_stats(design.X, adata.X, design.Z, is_counts=True)
    np.testing.assert_allclose(
        mean_covariate(st, design.X.sum(axis=0)), st.ZY.sum(axis=0) / st.n, rtol=1e-10
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = lmm(st, criterion="relative")  # tl.flashmm_de's default criterion
    cmat = moderated.uns["flashmm"]["contrast_matrix"].to_numpy()
    C = np.hstack([np.eye(st.XX.shape[0]), cmat])
    ref = mixture_moderate(
        st.XX, st.XY, st.ZX, st.ZY, st.ZZ, st.n, fit.theta,
        contrast=C, covariate=st.ZY.sum(axis=0) / st.n,
    )  # fmt: skip
    p = st.XX.shape[0]
    ok = np.isfinite(ref["p"][:, 0])
    np.testing.assert_allclose(
        moderated.varm["flashmm_p"].to_numpy()[ok], ref["p"][ok, :p], rtol=1e-10
    )
    np.testing.assert_allclose(
        moderated.varm["flashmm_contrast_p"].to_numpy()[ok], ref["p"][ok, p:], rtol=1e-10
    )
    np.testing.assert_allclose(
        moderated.varm["flashmm_se"].to_numpy()[ok], ref["se"][ok, :p], rtol=1e-8
    )
    np.testing.assert_allclose(
        moderated.varm["flashmm_moderation"]["tau_moderated"].to_numpy()[ok],
        ref["tau_post"][ok],
        rtol=1e-10,
    )
    # the estimates and variance components are the fit's; no df table (p is posterior-predictive)
    np.testing.assert_allclose(moderated.varm["flashmm_coef"].to_numpy(), fit.coef, rtol=1e-12)
    np.testing.assert_allclose(moderated.varm["flashmm_theta"].to_numpy(), fit.theta, rtol=1e-12)
    assert "flashmm_df" not in moderated.varm
    assert "flashmm_contrast_df" not in moderated.varm


def test_getter_on_moderated_tests(moderated):
    two = sfm.get.flashmm_df(moderated, term="cls[1]:trt[T.B]").set_index("variable")
    up = sfm.get.flashmm_df(moderated, term="cls[1]:trt[T.B]", alternative="greater")
    up = up.set_index("variable").loc[two.index]
    assert two["df"].isna().all()
    p = moderated.varm["flashmm_p"]["cls[1]:trt[T.B]"]
    np.testing.assert_allclose(two["p_value"], p.loc[two.index], rtol=1e-12)
    expected = np.where(two["t_value"] > 0, two["p_value"] / 2, 1 - two["p_value"] / 2)
    np.testing.assert_allclose(up["p_value"], expected, rtol=1e-12)
    table = sfm.get.flashmm_df(moderated, contrast="BvsA")
    assert table["p_value"].notna().sum() > 0
    with pytest.raises(ValueError, match=r"moderated tests .*flashmm_refit"):
        sfm.get.flashmm_df(moderated, contrast="cls[2]:trt[T.B] - cls[1]:trt[T.B]")


def test_two_components():
    adata = case_adata("d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sfm.tl.flashmm_de(adata, FIXED_B, ["sam", "~0+loc"], is_counts=True)
    assert adata.uns["flashmm"]["params"]["moderate"] is False  # default: not moderated
    assert "flashmm_df" in adata.varm  # Satterthwaite df by default
    with pytest.raises(ValueError, match="moderate=True needs exactly one random component"):
        sfm.tl.flashmm_de(adata, FIXED_B, ["sam", "~0+loc"], is_counts=True, moderate=True)
    with pytest.raises(TypeError, match="moderate must be True, False or None"):
        sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, moderate="yes")


def test_flashmm_settings_one_keyword_away():
    adata = case_adata("b")
    sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, **FLASHMM_SETTINGS)
    fit = sfm.lmm_fit(
        adata.X, *(lambda d: (d.X, d.Z, d.d))(make_design(adata.obs, FIXED_B, "sam")),
        is_counts=True,
    )  # fmt: skip
    np.testing.assert_allclose(adata.varm["flashmm_p"].to_numpy(), fit.p, rtol=1e-12)


def test_nonnegative_reaches_the_fit_and_flags_singular_genes():
    adata = case_adata("b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sfm.tl.flashmm_de(adata, FIXED_B, "sam", is_counts=True, nonnegative=True, moderate=False)
    theta = adata.varm["flashmm_theta"]["sam"].to_numpy()
    singular = adata.varm["flashmm_diag"]["singular"].to_numpy()
    assert (theta[np.isfinite(theta)] >= 0).all()
    np.testing.assert_array_equal(singular, theta == 0)
    assert adata.uns["flashmm"]["n_singular"] == singular.sum()
    table = sfm.get.flashmm_df(adata, term="cls[1]:trt[T.B]").set_index("variable")
    np.testing.assert_array_equal(table.loc[adata.var_names, "singular"], singular)
