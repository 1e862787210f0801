"""tl.flashmm_refit (and ``scflashmm refit``) of fits with lme4-style random terms.

A refit rebuilds the covariance structure from ``uns[key]["random_structure"]`` and must equal a
fresh :func:`scflashmm.tl.flashmm_de` with the same options (same statistics, same solver:
1e-10). Kenward-Roger's numbers themselves are checked against pbkrtest in
tests/core/test_kenward_roger_structured.py; here the refit's against pbkrtest's once more.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scflashmm as sfm
from scflashmm.cli import main

DATA = Path(__file__).parents[1] / "data" / "lme4"
KR = json.loads((DATA / "kenward_roger" / "results.json").read_text())["simulated_sc"]
GENES = list(KR)
FIXED = "~x+group"
CONTRASTS = {"x_vs_group": "x - group[T.B]"}
NEW = {"sum": "x + group[T.B]"}
TABLES = ["coef", "se", "t", "p", "theta", "se_theta", "df"]
TABLES += ["contrast_coef", "contrast_se", "contrast_t", "contrast_p", "contrast_df"]


def _adata() -> ad.AnnData:
    data = pd.read_csv(DATA / "simulated_sc" / "data.csv")
    obs = data.drop(columns=GENES)
    obs["ct"] = np.array(["a", "b", "c"])[np.arange(len(obs)) % 3]  # cell types in donors
    obs.index = obs.index.astype(str)
    for c in ("donor", "group", "ct"):
        obs[c] = obs[c].astype("category")
    adata = ad.AnnData(data[GENES].to_numpy(float), obs=obs)
    adata.var_names = GENES
    return adata


def _assert_same(a: ad.AnnData, b: ad.AnnData, key_a: str = "flashmm") -> None:
    # same summary statistics and structure, same solver: equal to rounding (1e-10)
    names_a = {k[len(key_a) :] for k in a.varm if k.startswith(f"{key_a}_")}
    names_b = {k[len("flashmm") :] for k in b.varm if k.startswith("flashmm_")}
    assert names_a == names_b
    for suffix in TABLES:
        if f"{key_a}_{suffix}" in a.varm:
            pd.testing.assert_frame_equal(
                a.varm[f"{key_a}_{suffix}"], b.varm[f"flashmm_{suffix}"], rtol=1e-10, atol=1e-12
            )
    if f"{key_a}_cov" in a.varm:  # stored only with store_cov=True (names compared above)
        np.testing.assert_allclose(a.varm[f"{key_a}_cov"], b.varm["flashmm_cov"], rtol=1e-10)
    ua, ub = a.uns[key_a], b.uns["flashmm"]
    assert ua["solver"] == ub["solver"]
    assert ua["random_structure"] == ub["random_structure"]


RANDOM = ["(1 + x | donor)", "(1 + x || donor)", "(1 | donor/ct)"]


@pytest.fixture(scope="module", params=RANDOM)
def fitted(request):
    adata = _adata()
    # nonnegative: lme4's boundary for the scalar terms too (Kenward-Roger needs it there)
    sfm.tl.flashmm_de(adata, FIXED, request.param, contrasts=CONTRASTS, nonnegative=True)
    return adata, request.param


@pytest.mark.parametrize(
    "options",
    [
        {"df": "kenward-roger"},
        {"df": "satterthwaite"},
        {"df": "residual", "method": "ML"},
    ],
)
def test_refit_equals_a_fresh_fit(fitted, options):
    adata, random = fitted
    refit = sfm.tl.flashmm_refit(adata, contrasts=NEW, key_added="re", copy=True, **options)
    fresh = _adata()
    sfm.tl.flashmm_de(fresh, FIXED, random, contrasts=NEW, nonnegative=True, **options)
    _assert_same(refit, fresh, "re")
    assert list(refit.uns["re"]["params"]["random"]) == [random]
    assert refit.uns["re"]["params"]["df"] == options["df"]
    assert "re" not in adata.uns  # the fit itself is untouched (copy=True)


def test_kenward_roger_refit_equals_pbkrtest(tmp_path):
    adata = _adata()
    sfm.tl.flashmm_de(adata, FIXED, "(1 + x | donor)")
    path = tmp_path / "fit.h5ad"
    adata.write_h5ad(path)
    sub = ad.read_h5ad(path)[:, GENES[::-1]].copy()  # h5ad round trip, genes reordered
    sfm.tl.flashmm_refit(sub, df="kenward-roger", contrasts=CONTRASTS)
    for g in GENES:
        ref = KR[g]
        # pbkrtest's adjusted se and KR df, after our own fit (see the core tests)
        np.testing.assert_allclose(sub.varm["flashmm_se"].loc[g], list(ref["se_kr"].values()), 1e-6)
        np.testing.assert_allclose(sub.varm["flashmm_df"].loc[g], list(ref["df_kr"].values()), 1e-6)
        se = sub.varm["flashmm_contrast_se"].loc[g, "x_vs_group"]
        assert se == pytest.approx(ref["contrast_se_kr"], rel=1e-6)
        df = sub.varm["flashmm_contrast_df"].loc[g, "x_vs_group"]
        assert df == pytest.approx(ref["contrast_df_kr"], rel=1e-6)


def test_refit_refuses_what_the_structure_cannot_take(fitted):
    adata, _ = fitted
    with pytest.raises(ValueError, match="moderat"):
        sfm.tl.flashmm_refit(adata, moderate=True, copy=True)


def test_refit_checks_the_stored_structure(fitted):
    adata, _ = fitted
    broken = adata.copy()
    record = dict(broken.uns["flashmm"]["random_structure"])
    record["0"] = {**record["0"], "n_levels": int(record["0"]["n_levels"]) + 1}
    broken.uns["flashmm"]["random_structure"] = record
    with pytest.raises(ValueError, match="stored Z'Z has"):
        sfm.tl.flashmm_refit(broken)


def test_cli_refit_of_random_slopes(tmp_path):
    path, fitted, out = tmp_path / "sc.h5ad", tmp_path / "fit.h5ad", tmp_path / "refit.csv"
    _adata().write_h5ad(path)
    argv = ["de", str(path), "--fixed", FIXED, "--random", "(1 + x | donor)", "--no-moderate"]
    argv += ["--df", "residual"]
    assert main([*argv, "--out", str(tmp_path / "fit.csv"), "--write-h5ad", str(fitted)]) == 0
    argv = ["refit", str(fitted), "--contrast", "d=x - group[T.B]", "--df", "kenward-roger"]
    assert main([*argv, "--out", str(out)]) == 0
    adata = _adata()
    sfm.tl.flashmm_de(
        adata, FIXED, "(1 + x | donor)", df="kenward-roger", contrasts={"d": "x - group[T.B]"}
    )
    terms = list(adata.uns["flashmm"]["x_columns"])
    expected = sfm.get.flashmm_df(adata, term=terms, contrast="d")
    pd.testing.assert_frame_equal(pd.read_csv(out), expected, rtol=1e-10, check_dtype=False)
