"""The Schur path (large q): its algebra against the dense one, and lmerTest on q = 420."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scflashmm import lmm
from scflashmm._core.structured import _Problem
from scflashmm._core.structured.schur import _SchurProblem, schur_term
from scflashmm._core.sumstats import summary_stats
from scflashmm._random_terms import random_design

DATA = Path(__file__).parents[1] / "data" / "lme4"


def _stats(data, formula, fixed, responses):
    rd = random_design(formula, data)
    X = np.column_stack([np.ones(len(data)), *(data[c].to_numpy(float) for c in fixed)])
    Y = data[responses].to_numpy(float)
    return summary_stats(X, Y, rd.Z), rd.structure


def _crossed_sc():
    """simulated_sc with a crossed 60-level factor and a 7-level one (not nested in donor)."""
    data = pd.read_csv(DATA / "simulated_sc" / "data.csv")
    rng = np.random.default_rng(1)
    data["ct"] = np.array(list("abcdefg"))[rng.integers(0, 7, len(data))]
    data["cell"] = np.array([f"c{i}" for i in rng.integers(0, 60, len(data))])
    data["groupB"] = (data["group"] == "B").astype(float)
    data["sub"] = data["donor"] + ":" + data["cell"].str[-1]  # nested in donor
    data["sub3"] = data["donor"] + ":" + (data["cell"].str[-1].astype(int) % 3).astype(str)
    return data


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize(
    "formula",
    [
        "(1 | cell) + (1 | donor)",
        "(1 + x | donor) + (1 | cell)",
        "(1 | donor) + (1 | cell) + (1 | ct)",
        "(1 + x || donor) + (0 + x | cell)",
        "(1 | sub3) + (1 | donor)",  # nested: C~ diagonal
    ],
)
def test_schur_problem_equals_dense_problem(formula, method):
    data = _crossed_sc()
    stats, structure = _stats(data, formula, ["x", "groupB"], ["g1", "g2", "g3", "g4"])
    term = schur_term(stats, structure, "schur")
    dense, schur = _Problem(stats, structure, method), _SchurProblem(stats, structure, method, term)
    nested = "sub3" in formula
    assert structure.terms[term].group == ("sub3" if nested else "cell")
    assert schur.nested == nested
    rng = np.random.default_rng(2)
    diag = np.array([a == b for t in structure.terms for a, b in t.entries])
    gamma = np.where(diag, rng.uniform(0.1, 0.5, (4, diag.size)), 0.01)
    s0 = rng.uniform(0.8, 1.2, 4)
    rows = np.arange(4)
    for g in (gamma, np.where(np.arange(diag.size) == schur.j1, 0.0, gamma)):  # and d1 = 0
        np.testing.assert_allclose(schur.loglik(rows, g, s0), dense.loglik(rows, g, s0), rtol=1e-12)
        for a, b in zip(
            schur.score_information(rows, g, s0), dense.score_information(rows, g, s0), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10 * np.abs(b).max())
        for a, b in zip(
            schur.fixed_effects(stats, g, s0), dense.fixed_effects(stats, g, s0), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_schur_term_choice():
    data = _crossed_sc()
    stats, structure = _stats(data, "(1 + x | donor)", ["x"], ["g1"])
    with pytest.raises(ValueError, match="scalar random term"):
        schur_term(stats, structure, "schur")
    stats, structure = _stats(data, "(1 | cell) + (1 | donor)", ["x"], ["g1"])
    assert schur_term(stats, structure, "auto") is None  # q = 72: dense algebra
    assert schur_term(stats, structure, "dense") is None
    # nested (each sub in one donor; q = 12 + 117): the Schur algebra stays diagonal
    stats, structure = _stats(data, "(1 | donor) + (1 | sub)", ["x"], ["g1"])
    assert structure.q >= 100 and schur_term(stats, structure, "auto") == 1


@pytest.mark.parametrize("gene", ["g1", "g2", "g3"])
def test_schur_satterthwaite_against_lmertest(gene):
    # tests/data/lme4/crossed_wells: 400 wells crossed with 20 batches, treat constant per batch
    data = pd.read_csv(DATA / "crossed_wells" / "data.csv.gz")
    ref = json.loads((DATA / "crossed_wells" / "results.json").read_text())[gene]
    stats, structure = _stats(data, "(1 | well) + (1 | batch)", ["x", "treat"], [gene])
    fit = lmm(stats, structure=structure, df="satterthwaite", epsilon=1e-10)
    assert fit.kernel == "schur" and structure.q == 420
    # lme4 fixef / sqrt(diag(vcov)) (tight refit)
    np.testing.assert_allclose(fit.coef[0], list(ref["coef"].values()), rtol=1e-5)
    np.testing.assert_allclose(fit.se[0], list(ref["se"].values()), rtol=1e-4)
    # VarCorr (well, batch, residual); g3's batch variance is 0.1% of the residual
    vc = dict(zip(ref["varcorr"]["grp"], ref["varcorr"]["vcov"], strict=True))
    want = [vc["well"], vc["batch"], vc["Residual"]]
    np.testing.assert_allclose(fit.theta[0], want, rtol=1e-4, atol=1e-6 * vc["Residual"])
    # lmerTest's Satterthwaite df (numerical derivatives on both sides)
    np.testing.assert_allclose(
        fit.df_satterthwaite[0], list(ref["satterthwaite_df"].values()), rtol=1e-5
    )
    assert np.all(np.isfinite(fit.se_theta[0])) and np.all(fit.se_theta[0] > 0)


def test_schur_se_of_variances_equal_dense():
    # the expected information of the Schur algebra is that of the dense one
    data = pd.read_csv(DATA / "crossed_wells" / "data.csv.gz")
    stats, structure = _stats(data, "(1 | well) + (1 | batch)", ["x", "treat"], ["g1", "g2"])
    a = lmm(stats, structure=structure, kernel="schur", df="satterthwaite")
    b = lmm(stats, structure=structure, kernel="dense", df="satterthwaite")  # components
    assert a.kernel == "schur"
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-6)
    np.testing.assert_allclose(a.df_satterthwaite, b.df_satterthwaite, rtol=1e-4)


def test_schur_memory_guard(monkeypatch):
    from scflashmm._core.structured import check_memory, driver

    data = pd.read_csv(DATA / "crossed_wells" / "data.csv.gz")
    structure = random_design("(1 | well) + (1 | batch)", data).structure
    assert driver.choose_structured_kernel(structure) == "schur"
    # q2 = 20 besides the 400 wells: far less than the dense q x q work per gene
    assert check_memory(structure, 3) > check_memory(structure, 3, "dense")
    monkeypatch.setattr(driver, "MEMORY_BUDGET", 20_000)
    with pytest.raises(MemoryError, match="20 of them besides its largest scalar term"):
        driver.schur_genes_per_block(structure, 3)


def test_results_do_not_depend_on_n_jobs(monkeypatch):
    """Blocks of genes are the same for any n_jobs, so the fits are equal to the last bit."""
    from scflashmm._core.structured import driver

    data = pd.read_csv(DATA / "crossed_wells" / "data.csv.gz")
    genes = [c for c in data.columns if c.startswith("g")]
    stats, structure = _stats(data, "(1 | well) + (1 | batch)", ["x", "treat"], genes)
    monkeypatch.setattr(driver, "MEMORY_BUDGET", 2_000_000)  # a few genes per block
    assert driver.schur_genes_per_block(structure, 3) < len(genes)
    one = lmm(stats, structure=structure, df="satterthwaite", n_jobs=1)
    two = lmm(stats, structure=structure, df="satterthwaite", n_jobs=2)
    for name in ("coef", "se", "theta", "df_satterthwaite", "niter"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name), err_msg=name)
