"""tl.flashmm_de's default convergence criterion: t and p do not depend on the units of y."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _reference import FIXED_B, case_adata

import scflashmm as sfm


@pytest.mark.parametrize("options", [{"moderate": False, "df": "satterthwaite"}, {}])
def test_p_values_do_not_depend_on_the_units(options):
    base = case_adata("b")
    base.X = np.log2(1 + base.X.toarray() if hasattr(base.X, "toarray") else 1 + base.X)
    p = {}
    for scale in (1.0, 1e5, 1e-6):
        adata = base.copy()
        adata.X = base.X * scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # genes that do not converge warn alike
            sfm.tl.flashmm_de(adata, FIXED_B, "sam", **options)
        p[scale] = adata.varm["flashmm_p"].to_numpy()
    ok = np.isfinite(p[1.0])
    assert ok.mean() > 0.9
    for scale in (1e5, 1e-6):
        np.testing.assert_allclose(p[scale][ok], p[1.0][ok], rtol=1e-6)


@pytest.mark.parametrize("options", [{"moderate": False, "df": "satterthwaite"}, {}])
def test_p_values_do_not_depend_on_an_offset(options):
    """``y + 1e5``: the indicators of cls carry the constant; the other p-values do not move."""
    base = case_adata("b", layout="dense")
    base.X = np.log2(1 + base.X)
    fits = {}
    for offset in (0.0, 1e5):
        adata = base.copy()
        adata.X = base.X + offset
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sfm.tl.flashmm_de(adata, FIXED_B, "sam", **options)
        fits[offset] = adata
    coef = {k: a.varm["flashmm_coef"] for k, a in fits.items()}
    p = {k: a.varm["flashmm_p"] for k, a in fits.items()}
    moved = [c for c in coef[0.0].columns if c.startswith("cls[") and ":" not in c]
    kept = [c for c in coef[0.0].columns if c not in moved]
    ok = np.isfinite(p[0.0][kept].to_numpy())
    assert ok.mean() > 0.9 and np.isfinite(p[1e5][kept].to_numpy()[ok]).all()
    np.testing.assert_allclose(p[1e5][kept].to_numpy()[ok], p[0.0][kept].to_numpy()[ok], rtol=1e-6)
    np.testing.assert_allclose(coef[1e5][moved], coef[0.0][moved] + 1e5, rtol=1e-12)
    np.testing.assert_allclose(
        fits[1e5].varm["flashmm_theta"], fits[0.0].varm["flashmm_theta"], rtol=1e-8
    )
