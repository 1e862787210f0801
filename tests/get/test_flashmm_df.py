"""get.flashmm_df: tidy pertpy-style table, term selection, BH, alternatives vs FLASHMM lmmtest."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from _reference import CONTRASTS_B, TIDY_COLUMNS_COUNTS, case_adata, load_case
from scipy import stats

import scflashmm as sfm

CONTRASTS = CONTRASTS_B


def test_schema_and_default_terms(fitted_b):
    df = sfm.get.flashmm_df(fitted_b)
    assert list(df.columns) == TIDY_COLUMNS_COUNTS
    terms = list(fitted_b.uns["flashmm"]["x_columns"])
    assert list(df["contrast"].unique()) == terms  # design order
    assert len(df) == len(terms) * fitted_b.n_vars
    assert isinstance(df.index, pd.RangeIndex)
    assert df["converged"].dtype == bool
    row = df[(df["contrast"] == "cls[2]:trt[T.B]") & (df["variable"] == "Gene7")].iloc[0]
    assert row["log_fc"] == fitted_b.varm["flashmm_coef"].loc["Gene7", "cls[2]:trt[T.B]"]
    assert row["sd"] == fitted_b.varm["flashmm_se"].loc["Gene7", "cls[2]:trt[T.B]"]
    assert row["p_value"] == pytest.approx(
        fitted_b.varm["flashmm_p"].loc["Gene7", "cls[2]:trt[T.B]"], rel=1e-12
    )


def test_sorted_and_bh_within_term(fitted_b):
    df = sfm.get.flashmm_df(fitted_b)
    for _, block in df.groupby("contrast", sort=False):
        p = block["p_value"].to_numpy()
        assert (np.diff(p) >= 0).all()
        np.testing.assert_allclose(
            block["adj_p_value"], stats.false_discovery_control(p, method="bh"), rtol=1e-12
        )


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("cls[1]", ["cls[1]"]),  # exact name wins over the substring match of cls[1]:trt[T.B]
        (":trt", [f"cls[{i}]:trt[T.B]" for i in range(1, 5)]),
        (r"^cls\[\d\]$", [f"cls[{i}]" for i in range(1, 5)]),
        (["log(libsize)", "cls[4]:trt[T.B]"], ["log(libsize)", "cls[4]:trt[T.B]"]),
    ],
)
def test_term_selection(fitted_b, term, expected):
    df = sfm.get.flashmm_df(fitted_b, term=term)
    assert list(df["contrast"].unique()) == expected


def test_term_without_match(fitted_b):
    with pytest.raises(ValueError, match="No design column matches term 'donor'"):
        sfm.get.flashmm_df(fitted_b, term="donor")


@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_contrasts_match_flashmm_lmmtest(fitted_b, alternative):
    # test_contrast_<alt>.csv of FLASHMM: lmmtest(fit, contrast = C, alternative = alt)
    ref = load_case("b")["test_contrast"][alternative]
    df = sfm.get.flashmm_df(fitted_b, contrast=list(CONTRASTS), alternative=alternative)
    assert list(df["contrast"].unique()) == list(CONTRASTS)
    for name in CONTRASTS:
        block = df[df["contrast"] == name].set_index("variable").loc[ref.index]
        np.testing.assert_allclose(block["log_fc"], ref[f"{name}_coef"], rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(block["t_value"], ref[f"{name}_t"], rtol=1e-6, atol=1e-9)
        # p on the -log10 scale (p of "greater" for libsize_effect is ~1 - 1e-10)
        np.testing.assert_allclose(
            -np.log10(block["p_value"]), -np.log10(ref[f"{name}_p"]), rtol=1e-6, atol=1e-9
        )


def test_alternatives_relations(fitted_b):
    def p_of(alternative):
        df = sfm.get.flashmm_df(fitted_b, term="cls[3]:trt[T.B]", alternative=alternative)
        return df.set_index("variable")["p_value"].loc[fitted_b.var_names]

    less, greater, two = p_of("less"), p_of("greater"), p_of("two-sided")
    np.testing.assert_allclose(less + greater, 1.0, rtol=1e-12)
    np.testing.assert_allclose(two, 2 * np.minimum(less, greater), rtol=1e-10)
    pd.testing.assert_series_equal(p_of("two.sided"), two)  # R's spelling is accepted
    with pytest.raises(ValueError, match="alternative must be one of"):
        sfm.get.flashmm_df(fitted_b, alternative="both")


def test_new_contrast_expression_from_stored_cov(fitted_b):
    stored = sfm.get.flashmm_df(fitted_b, contrast="BvsA")
    # the same combination, written differently and not stored: computed from varm cov
    again = sfm.get.flashmm_df(
        fitted_b,
        contrast="0.25*cls[1]:trt[T.B] + 0.25*cls[2]:trt[T.B]"
        " + 0.25*(cls[3]:trt[T.B] + cls[4]:trt[T.B])",
    )
    cols = ["variable", "log_fc", "sd", "t_value", "p_value", "adj_p_value"]
    pd.testing.assert_frame_equal(again[cols], stored[cols], rtol=1e-10)
    with pytest.raises(ValueError, match="neither a stored contrast nor a valid expression"):
        sfm.get.flashmm_df(fitted_b, contrast="nonsense")


def test_terms_and_contrasts_together(fitted_b):
    df = sfm.get.flashmm_df(fitted_b, term=":trt", contrast="BvsA")
    assert list(df["contrast"].unique()) == [*[f"cls[{i}]:trt[T.B]" for i in range(1, 5)], "BvsA"]


def test_nan_genes_last_and_not_counted():
    adata = case_adata("f")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sfm.DegenerateFeatureWarning)
        sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    df = sfm.get.flashmm_df(adata, term="cls[1]:trt[T.B]")
    assert list(df["variable"].iloc[-2:]) == ["Gene1", "Gene2"]
    assert df["adj_p_value"].iloc[-2:].isna().all()
    p = df["p_value"].iloc[:-2].to_numpy()
    np.testing.assert_allclose(
        df["adj_p_value"].iloc[:-2], stats.false_discovery_control(p), rtol=1e-12
    )


def test_missing_key(fitted_b):
    with pytest.raises(KeyError, match="No flashmm results under key 'other'"):
        sfm.get.flashmm_df(fitted_b, key="other")
