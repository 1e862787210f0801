"""Fixtures shared by the test modules: fits of reference case b through the AnnData front end.

They are session-scoped and shared, so treat them as read-only (``adata[...].copy()`` first).
Constants (models, contrasts, expected column names) and helpers live in ``tests/_reference.py``.
"""

from __future__ import annotations

import pytest
from _reference import CONTRASTS_B, FIXED_B, FLASHMM_SETTINGS, case_adata

import scflashmm as sfm


@pytest.fixture(scope="session")
def fitted_b():
    """Case b fit by ``tl.flashmm_de`` as FLASHMM fit it, with FLASHMM's three contrasts.

    The covariance is stored (``store_cov=True``) so that new contrasts can be tested.
    """
    adata = case_adata("b")
    sfm.tl.flashmm_de(
        adata,
        FIXED_B,
        "sam",
        is_counts=True,
        contrasts=CONTRASTS_B,
        store_cov=True,  # getter tests compute new contrasts from it
        **FLASHMM_SETTINGS,
    )
    return adata


@pytest.fixture(scope="session")
def fitted_b_satterthwaite():
    """Case b with ``df="satterthwaite"`` and the contrast BvsA (lmerTest's reference)."""
    adata = case_adata("b")
    sfm.tl.flashmm_de(
        adata,
        FIXED_B,
        "sam",
        is_counts=True,
        df="satterthwaite",
        moderate=False,
        contrasts={"BvsA": CONTRASTS_B["BvsA"]},
    )
    return adata


@pytest.fixture(scope="session")
def b_h5ad(tmp_path_factory):
    """Case b written to an h5ad file (raw counts in a CSR ``X``)."""
    path = tmp_path_factory.mktemp("h5ad") / "b.h5ad"
    case_adata("b").write_h5ad(path)
    return path
