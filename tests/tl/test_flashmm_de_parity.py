"""tl.flashmm_de: parity with FLASHMM 1.3.0 through the AnnData front end, every case."""

from __future__ import annotations

import numpy as np
import pytest
from _reference import CASES, comparable_genes, fit_case


def _neglog10(p):
    return -np.log10(np.asarray(p, dtype=float))


@pytest.mark.parametrize("name", CASES)
def test_parity_with_flashmm(name):
    adata, case, mapping = fit_case(name)
    spec = case["spec"]
    keep = comparable_genes(case)
    r_cols = list(case["X"].columns)
    ours_cols = [mapping[c] for c in r_cols]

    def ours(table, cols=ours_cols):
        return adata.varm[f"flashmm_{table}"][cols].to_numpy()[keep].T

    def ref(table):
        return case[table].to_numpy()[:, keep]

    # coef/se/t (FLASHMM's coef.csv, se.csv, t.csv): well conditioned, 1e-6 relative;
    # the atol covers coefficients that are ~0 (case e)
    for table in ("coef", "se", "t"):
        np.testing.assert_allclose(ours(table), ref(table), rtol=1e-6, atol=1e-9, err_msg=table)
    # p.csv on the -log10 scale
    np.testing.assert_allclose(_neglog10(ours("p")), _neglog10(ref("p")), rtol=1e-6, atol=1e-9)
    # theta.csv / se_theta.csv: rows var1..vark, var0 == our random terms then "residual"
    for table in ("theta", "se_theta"):
        np.testing.assert_allclose(
            adata.varm[f"flashmm_{table}"].to_numpy()[keep].T, ref(table), rtol=1e-6, atol=1e-10
        )
    assert list(adata.varm["flashmm_theta"].columns) == [
        *adata.uns["flashmm"]["random_terms"],
        "residual",
    ]
    diag = adata.varm["flashmm_diag"]
    # logLik.csv: same definition (lme4's REML logLik + log det(X'X)/2)
    np.testing.assert_allclose(diag["logLik"].to_numpy()[keep], case["logLik"][keep], rtol=1e-9)
    # niter.csv exactly, and the non-converged genes of spec.json
    np.testing.assert_array_equal(diag["niter"].to_numpy()[keep], case["niter"][keep])
    nonconv = set(adata.var_names[keep & ~diag["converged"].to_numpy()])
    assert nonconv == set(spec["nonconverged_genes"]) - {"Gene2"} - set(spec["na_genes"])
    # max |dlogL| of genes far from convergence (dlogL.csv; below epsilon it is round-off)
    big = keep & (np.abs(case["dlogL"].to_numpy()).max(axis=0) > 1e-3)
    np.testing.assert_allclose(
        diag["max_abs_dlogL"].to_numpy()[big],
        np.abs(case["dlogL"].to_numpy()).max(axis=0)[big],
        rtol=1e-4,
    )
    # cov.csv, in R's X column order
    perm = [adata.uns["flashmm"]["x_columns"].index(c) for c in ours_cols]
    cov = adata.varm["flashmm_cov"][keep][:, perm][:, :, perm]
    np.testing.assert_allclose(cov, case["cov"][keep], rtol=1e-6, atol=1e-12)
    assert adata.uns["flashmm"]["df"] == case["df"]
    assert adata.uns["flashmm"]["d"] == spec["d"]
    assert adata.uns["flashmm"]["n_cells"] == spec["n_cells"]
    # test_contrast_two.sided.csv: estimate, t, p of each contrast
    if "contrast" in case:
        ref_tab = case["test_contrast"]["two-sided"]
        for col in spec["contrast_columns"]:
            for what, ref_col in (("coef", "coef"), ("t", "t")):
                np.testing.assert_allclose(
                    adata.varm[f"flashmm_contrast_{what}"][col].to_numpy()[keep],
                    ref_tab[f"{col}_{ref_col}"].to_numpy()[keep],
                    rtol=1e-6,
                    atol=1e-9,
                )
            np.testing.assert_allclose(
                _neglog10(adata.varm["flashmm_contrast_p"][col].to_numpy()[keep]),
                _neglog10(ref_tab[f"{col}_p"].to_numpy()[keep]),
                rtol=1e-6,
                atol=1e-9,
            )
            se = ref_tab[f"{col}_coef"] / ref_tab[f"{col}_t"]
            np.testing.assert_allclose(
                adata.varm["flashmm_contrast_se"][col].to_numpy()[keep],
                se.to_numpy()[keep],
                rtol=1e-6,
            )


def test_degenerate_genes_are_nan_and_counted():
    adata, _, _ = fit_case("f_zero_and_constant_genes")
    info = adata.uns["flashmm"]
    for gene in ("Gene1", "Gene2"):  # all-zero; constant (exactly explained by X)
        assert adata.varm["flashmm_coef"].loc[gene].isna().all()
        assert not adata.varm["flashmm_diag"].loc[gene, "converged"]
    assert info["n_degenerate"] == 2
    assert info["n_nonconverged"] == 0
