"""Calibration and power of the LMM on data from simulate_rnaseq (small and fast).

The full study, with a cell-level test and pseudobulk side by side, is
``benchmarks/calibration.py``; a tiny run of it is tested here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
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


# ---------------------------------------------------------------------------------------
# benchmarks/calibration.py, tiny
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration():
    path = Path(__file__).parents[1] / "benchmarks" / "calibration.py"
    spec = importlib.util.spec_from_file_location("_calibration_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_ranking_power_by_hand(calibration):
    truth = np.array([True, True, False, True, False, False, True])
    p = np.array([0.001, 0.002, 0.003, 0.004, 0.5, 0.6, 0.7])
    # cuts: 1 (FDP 0), 2 (0), 3 (1/3), 4 (1/4), ...: the deepest with FDP <= 5 % is 2 of 4
    assert calibration.ranking_power(p, truth) == 0.5
    # with FDP <= 30 %, the cut after 4 (FDP 1/4) finds 3 of 4
    assert calibration.ranking_power(p, truth, fdp=0.3) == 0.75
    # ties are taken together: a true and a false pair tied at the top give FDP 1/2
    assert calibration.ranking_power(np.array([0.1, 0.1, 0.2]), np.array([True, False, True])) == 0
    assert np.isnan(calibration.ranking_power(p, np.zeros(7, dtype=bool)))
    m = calibration.metrics(p[:, None], truth[:, None])
    assert m["fpr"] == pytest.approx(1 / 3)  # of the null pairs, only 0.003 is below 0.05
    # BH at 5 %: the four smallest are called (adjusted 0.007), three of them true
    assert m["power"] == 0.75
    assert m["fdp"] == 0.25


def test_benchmark_null_with_heterogeneous_variances(calibration):
    # null, 5 vs 5 samples with a 10x range of cells per sample, gamma donor variances (CV 1):
    # 300 genes x 4 cell types = 1200 null pairs; Satterthwaite keeps FPR near 0.05
    # (measured 0.043-0.059 over seeds 0-3), n - p df is more liberal (0.064-0.088)
    results, ranking = calibration.run(
        [calibration.SCENARIOS["null10x"]],
        ["LMM, Satterthwaite", "LMM, n - p df"],
        repeats=1,
        n_genes=300,
        n_cells=3000,
        seed=0,
        variances=("heterogeneous",),
    )
    fpr = results.set_index("method")["fpr"]
    assert 0.02 < fpr["LMM, Satterthwaite"] < 0.09
    assert fpr["LMM, n - p df"] >= fpr["LMM, Satterthwaite"]
    assert ranking["ranking_power"].isna().all()  # no DE pairs in a null scenario
    table = calibration.table(results, ranking)
    assert "| null, 5 vs 5, 10x range of cells | heterogeneous | LMM, Satterthwaite |" in table
