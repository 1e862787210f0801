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
