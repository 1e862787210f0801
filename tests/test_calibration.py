"""Calibration and power of the LMM on data from simulate_rnaseq (small and fast).

The full study, with a cell-level test that ignores samples side by side, is
``benchmarks/calibration.py``.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from scflashmm import lmm_fit
from scflashmm._design import make_design
from scflashmm.datasets import simulate_rnaseq


def _fit_interactions(adata):
    """FLASHMM's example model ~0+log(libsize)+cls+cls:trt, random ~0+sam, on log2(1 + y)."""
    design = make_design(adata.obs, "~0+log(libsize)+cls+cls:trt", "sam")
    fit = lmm_fit(adata.X, design.X, design.Z, design.d, is_counts=True)
    interactions = [j for j, name in enumerate(design.x_columns) if ":trt" in name]
    return fit, fit.coef[:, interactions], fit.p[:, interactions]


def test_null_p_values_are_uniform():
    # no DE: the cls:trt p-values (300 genes x 2 cell types) should be ~Uniform(0, 1).
    # With few samples per arm the t test on n - p df is liberal (see benchmarks/calibration.py),
    # so use 40 samples.
    adata = simulate_rnaseq(
        n_genes=300, n_cells=3000, n_samples=40, n_clusters=2, n_de_genes=0, seed=101
    )
    fit, _, p = _fit_interactions(adata)
    assert fit.converged.all()
    p = p.ravel()
    assert stats.kstest(p, "uniform").pvalue > 1e-3
    assert 0.02 < (p < 0.05).mean() < 0.09


def test_strong_de_genes_are_recovered():
    adata = simulate_rnaseq(
        n_genes=100,
        n_cells=3000,
        n_samples=40,
        n_clusters=2,
        n_de_genes=10,
        minbeta=1.0,
        maxbeta=2.0,
        seed=102,
    )
    var = adata.var
    _, coef, p = _fit_interactions(adata)
    truth = np.zeros(p.shape, dtype=bool)
    de = np.flatnonzero(var["is_de"])
    truth[de, var["de_cluster"].cat.codes.to_numpy()[de]] = True
    assert truth.sum() == 10
    assert p[truth].max() < 1e-6
    assert p[truth].max() < p[~truth].min()  # the true pairs are the 10 smallest p-values
    assert (np.sign(coef[truth]) == np.sign(var["beta"].to_numpy()[de])).all()
