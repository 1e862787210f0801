"""tl.flashmm_de / get.flashmm_df with df="satterthwaite": lmerTest 3.1-3 through AnnData.

Tolerances as tests/core/test_satterthwaite.py: df rtol 1e-4 (we see ~2e-7), -log10(p) atol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _reference import (
    BVSA_B,
    FIXED_B,
    FLASHMM_SETTINGS,
    REFERENCE,
    case_adata,
    load_case,
    match_r_columns,
)
from scipy import stats

import scflashmm as sfm

SATT = REFERENCE.parent / "reference_satterthwaite" / "b_simu_reml_counts"
FIXED, BVSA = FIXED_B, BVSA_B


def _read(name: str) -> pd.DataFrame:
    table = pd.read_csv(SATT / name)
    for col in ("estimate", "df", "t", "p"):
        table[col] = table[col].astype(str).str.strip().astype(float)
    return table


def test_tables_match_lmertest(fitted_b_satterthwaite):
    info = fitted_b_satterthwaite.uns["flashmm"]
    assert info["params"]["df"] == "satterthwaite"
    assert info["df"] == load_case("b")["df"]  # the residual n - p is kept
    names = info["x_columns"]
    r_names = list(load_case("b")["X"].columns)
    mapping = dict(zip(r_names, [names[i] for i in match_r_columns(names, r_names)], strict=True))

    ref = _read("satterthwaite_coef.csv")
    ours = fitted_b_satterthwaite.varm["flashmm_df"]
    got = [ours.loc[g, mapping[t]] for g, t in zip(ref["gene"], ref["term"], strict=True)]
    np.testing.assert_allclose(got, ref["df"], rtol=1e-4)
    p = [
        fitted_b_satterthwaite.varm["flashmm_p"].loc[g, mapping[t]]
        for g, t in zip(ref["gene"], ref["term"], strict=True)
    ]
    np.testing.assert_allclose(-np.log10(p), -np.log10(ref["p"]), atol=1e-4)

    ref_c = _read("satterthwaite_contrast.csv").set_index("gene")
    np.testing.assert_allclose(
        fitted_b_satterthwaite.varm["flashmm_contrast_df"].loc[ref_c.index, "BvsA"],
        ref_c["df"],
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        -np.log10(fitted_b_satterthwaite.varm["flashmm_contrast_p"].loc[ref_c.index, "BvsA"]),
        -np.log10(ref_c["p"]),
        atol=1e-4,
    )


def test_getter_reports_df(fitted_b_satterthwaite):
    table = sfm.get.flashmm_df(
        fitted_b_satterthwaite, term=":trt", contrast="BvsA", alternative="greater"
    )
    row = table[(table["contrast"] == "BvsA") & (table["variable"] == "Gene3")].iloc[0]
    assert row["df"] == fitted_b_satterthwaite.varm["flashmm_contrast_df"].loc["Gene3", "BvsA"]
    t = table["t_value"].to_numpy()
    np.testing.assert_allclose(table["p_value"], stats.t.sf(t, table["df"]), rtol=1e-10)
    with pytest.raises(ValueError, match=r"need a refit: scflashmm.tl.flashmm_refit"):
        sfm.get.flashmm_df(fitted_b_satterthwaite, contrast="cls[1]:trt[T.B] - cls[2]:trt[T.B]")


def test_residual_df_and_bad_value():
    adata = case_adata("b")
    sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, **FLASHMM_SETTINGS)
    assert adata.uns["flashmm"]["params"]["df"] == "residual"
    assert "flashmm_df" not in adata.varm
    assert (sfm.get.flashmm_df(adata)["df"] == adata.uns["flashmm"]["df"]).all()
    with pytest.raises(ValueError, match="df must be"):
        sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, df="kr")
