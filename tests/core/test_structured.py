"""Structured covariances (lme4's family): the structure object and the solver vs lme4."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scflashmm._core.structure import CovarianceStructure, RandomTermStructure
from scflashmm._core.structured import _Problem, fit_structured
from scflashmm._core.sumstats import SummaryStats, summary_stats
from scflashmm._random_terms import random_design

DATA = Path(__file__).parents[1] / "data" / "lme4"


def _case(case: str):
    data = pd.read_csv(DATA / case / "data.csv")
    return data, json.loads((DATA / case / "results.json").read_text())


def _stats(data, formula, fixed, responses):
    rd = random_design(formula, data)
    X = np.column_stack([np.ones(len(data)), *(data[c].to_numpy(float) for c in fixed)])
    Y = data[responses].to_numpy(float)
    return summary_stats(X, Y, rd.Z), rd.structure


def _genes(stats, idx):
    return SummaryStats(
        stats.XX, stats.XY[:, idx], stats.ZX, stats.ZY[:, idx], stats.ZZ, stats.Ynorm[idx], stats.n
    )


def _lme4_vcov(fit, structure):
    """lme4's VarCorr variances and covariances in the structure's order."""
    vc = fit["varcorr"]
    out = {}
    for grp, v1, v2, vcov in zip(vc["grp"], vc["var1"], vc["var2"], vc["vcov"], strict=True):
        out[(grp.split(".")[0], v1, v2)] = vcov
    keys = []
    for t in structure.terms:
        grp = "cask:batch" if t.group == "batch:cask" else t.group  # lme4's name of batch/cask
        for a, b in t.entries:
            ea, eb = t.effects[a], t.effects[b]
            keys.append((grp, ea, "") if a == b else (grp, eb, ea))
    return np.array([out[k] for k in keys]), out[("Residual", "", "")]


def _check(fit, gene, ref, structure):
    coef = np.array(list(ref["coef"].values()))
    se = np.array(list(ref["se"].values()))
    # lme4 fixef / sqrt(diag(vcov)) from refits with tight optimiser tolerances.
    np.testing.assert_allclose(fit.coef[gene], coef, rtol=1e-5)
    np.testing.assert_allclose(fit.se[gene], se, rtol=1e-4)
    gamma, sigma2 = _lme4_vcov(ref, structure)
    # VarCorr: relative 1e-5, with an absolute floor for (co)variances at or near the boundary.
    scale = sigma2
    np.testing.assert_allclose(fit.gamma[gene], gamma, rtol=1e-5, atol=1e-7 * scale)
    np.testing.assert_allclose(fit.sigma2[gene], sigma2, rtol=1e-5)
    if structure.theta_names() == ref["theta_names"]:  # lme4 reorders some terms (Pastes)
        np.testing.assert_allclose(fit.theta[gene], ref["theta"], rtol=1e-4, atol=1e-5)
    # lme4's logLik (REML criterion): ours may only be higher, and not by much.
    assert fit.logLik[gene] == pytest.approx(ref["logLik"], abs=1e-6)
    assert bool(fit.singular[gene]) == ref["singular"]
    assert fit.converged[gene]


@pytest.mark.parametrize(
    ("case", "key", "formula", "fixed", "response"),
    [
        ("sleepstudy", "correlated", "(Days | Subject)", ["Days"], "Reaction"),
        ("sleepstudy", "uncorrelated", "(Days || Subject)", ["Days"], "Reaction"),
        ("sleepstudy", "correlated_ml", "(Days | Subject)", ["Days"], "Reaction"),
        ("penicillin", "crossed", "(1 | plate) + (1 | sample)", [], "diameter"),
        ("pastes", "nested", "(1 | batch/cask)", [], "strength"),
    ],
)
def test_lme4_datasets(case, key, formula, fixed, response):
    data, res = _case(case)
    ref = res[key]
    stats, structure = _stats(data, formula, fixed, [response])
    fit = fit_structured(stats, structure, method="REML" if ref["REML"] else "ML")
    _check(fit, 0, ref, structure)


def test_simulated_single_cell_genes_with_singular_fits():
    data, res = _case("simulated_sc")
    data["groupB"] = (data["group"] == "B").astype(float)
    genes = list(res["genes"])
    stats, structure = _stats(data, "(1 + x | donor)", ["x", "groupB"], genes)
    fit = fit_structured(stats, structure)
    assert sum(res["genes"][g]["singular"] for g in genes) >= 2
    for i, g in enumerate(genes):
        _check(fit, i, res["genes"][g], structure)
    # One batched fit == gene by gene (to the convergence tolerance: LAPACK's batched and
    # single calls round differently, and scoring stops at a relative change of 1e-9).
    for i in (0, 5):
        one = fit_structured(_genes(stats, [i]), structure)
        np.testing.assert_allclose(one.coef[0], fit.coef[i], rtol=1e-6, atol=1e-9)
        # theta of the singular gene 5 is flat along its boundary: 1e-6 absolute (relative sd)
        np.testing.assert_allclose(one.theta[0], fit.theta[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_score_is_derivative_of_loglik(method):
    data, _ = _case("simulated_sc")
    stats, structure = _stats(data, "(1 + x | donor) + (1 | group)", ["x"], ["g1", "g2"])
    prob = _Problem(stats, structure, method)
    rows = np.arange(2)
    gamma = np.array([[0.08, 0.02, 0.05, 0.01], [0.04, -0.01, 0.03, 0.02]])
    s0 = np.array([0.2, 0.19])
    dl, _ = prob.score_information(rows, gamma, s0)
    h = 1e-6
    for j in range(5):
        e = np.zeros(5)
        e[j] = h
        up = prob.loglik(rows, gamma + e[:4], s0 + e[4])
        dn = prob.loglik(rows, gamma - e[:4], s0 - e[4])
        np.testing.assert_allclose(dl[:, j], (up - dn) / (2 * h), rtol=1e-6, atol=1e-6)


def test_structure_conversions():
    st = CovarianceStructure(
        (
            RandomTermStructure("donor", 3, ("(Intercept)", "time")),
            RandomTermStructure("donor", 3, ("(Intercept)", "dose", "time"), correlated=False),
            RandomTermStructure("batch", 2, ("(Intercept)",)),
        )
    )
    assert (st.q, st.n_theta) == (6 + 9 + 2, 3 + 3 + 1)
    assert st.theta_names()[:3] == ["donor.(Intercept)", "donor.time.(Intercept)", "donor.time"]
    np.testing.assert_array_equal(st.lower_bounds()[:3], [0, -np.inf, 0])
    theta = np.array([[1.0, 0.5, 2.0, 0.1, 0.2, 0.3, 1.5]])
    blocks = st.covariance_blocks(theta, np.array([2.0]))
    np.testing.assert_allclose(blocks[0][0], 2 * np.array([[1.0, 0.5], [0.5, 4.25]]))
    np.testing.assert_allclose(blocks[1][0], 2 * np.diag([0.01, 0.04, 0.09]))
    gamma = st.gamma_from_blocks(blocks)
    np.testing.assert_allclose(st.theta_from_gamma(gamma, np.array([2.0])), theta)
    vc = st.varcorr(theta, np.array([2.0]))
    np.testing.assert_allclose(vc[0, :3], [2.0, 0.5 / np.sqrt(4.25), 8.5])
    assert st.varcorr_names()[:3] == [
        "donor: (Intercept)",
        "donor: corr((Intercept), time)",
        "donor: time",
    ]
    D = st.relative_covariance(theta[0])
    assert D.shape == (17, 17)
    np.testing.assert_allclose(D[2:4, 2:4], [[1.0, 0.5], [0.5, 4.25]])
    # A singular block: the Cholesky factor has a zero diagonal, lme4's boundary.
    sing = st.theta_from_gamma(np.array([1.0, 2.0, 4.0, 1, 1, 1, 1]), 1.0)
    np.testing.assert_allclose(sing[:3], [1.0, 2.0, 0.0], atol=1e-7)


def test_from_d_is_flashmm_components():
    st = CovarianceStructure.from_d((3, 4), names=("sam", "batch"))
    assert st.d == (3, 4)
    assert st.varcorr_names() == ["sam: (Intercept)", "batch: (Intercept)"]
    np.testing.assert_allclose(
        st.relative_covariance(np.array([2.0, 3.0])).diagonal(), [4, 4, 4, 9, 9, 9, 9]
    )


def test_schur_chem97_large_q():
    data = pd.read_csv(DATA / "chem97" / "data.csv.gz")
    ref = json.loads((DATA / "chem97" / "results.json").read_text())["crossed"]
    stats, structure = _stats(data, "(1 | school) + (1 | lea)", ["gcsecnt"], ["score"])
    assert structure.q == 2541
    fit = fit_structured(stats, structure)  # the Schur path, chosen automatically
    np.testing.assert_allclose(fit.coef[0], list(ref["coef"].values()), rtol=1e-5)
    np.testing.assert_allclose(fit.se[0], list(ref["se"].values()), rtol=1e-4)
    gamma, sigma2 = _lme4_vcov(ref, structure)
    # The lea variance is weakly determined (131 levels, 1% of the school variance).
    np.testing.assert_allclose(fit.gamma[0], gamma, rtol=1e-4)
    np.testing.assert_allclose(fit.sigma2[0], sigma2, rtol=1e-6)
    assert fit.logLik[0] == pytest.approx(ref["logLik"], abs=1e-6)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize(
    "formula", ["(1 + x | donor)", "(1 | donor) + (1 | donor:ct)", "(1 + x || donor)"]
)
def test_block_problem_equals_dense_problem(formula, method):
    from scflashmm._core.structured.block import _BlockProblem, zz_blocks

    data, _ = _case("simulated_sc")
    data["ct"] = np.array(["a", "b", "c"])[np.arange(len(data)) % 3]
    data["groupB"] = (data["group"] == "B").astype(float)
    stats, structure = _stats(data, formula, ["x", "groupB"], ["g1", "g2", "g3"])
    labels = zz_blocks(stats, structure)
    assert labels is not None
    dense, block = (
        _Problem(stats, structure, method),
        _BlockProblem(stats, structure, method, labels),
    )
    rng = np.random.default_rng(1)
    gamma = np.abs(rng.normal(0.05, 0.02, (3, structure.n_theta)))
    if structure.n_theta == 3 and structure.terms[0].correlated and len(structure.terms) == 1:
        gamma[:, 1] = 0.01  # a covariance
    s0, rows = np.array([0.2, 0.19, 0.21]), np.arange(3)
    np.testing.assert_allclose(block.loglik(rows, gamma, s0), dense.loglik(rows, gamma, s0))
    for a, b in zip(
        block.score_information(rows, gamma, s0),
        dense.score_information(rows, gamma, s0),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())
    fixed = block.fixed_effects(stats, gamma, s0), dense.fixed_effects(stats, gamma, s0)
    for a, b in zip(*fixed, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize(
    "formula", ["(1 | donor) + (1 | donor:ct)", "(1 | donor:ct) + (1 | donor)", "(1 | donor/ct)"]
)
def test_nested_closed_forms_equal_dense_problem(formula, method):
    """(1 | a) + (1 | a:b): the closed forms, the general block path and dense q x q agree.

    Blocks are ragged (one donor has one cell type), so the block path takes its general
    (per-block pattern) branch.
    """
    from scflashmm._core.structured.block import _BlockProblem, zz_blocks
    from scflashmm._core.structured.nested import _NestedProblem
    from scflashmm._core.structured.scoring import make_problem

    data, _ = _case("simulated_sc")
    rng = np.random.default_rng(0)
    data["ct"] = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, len(data))]
    data.loc[data["donor"] == data["donor"].iloc[0], "ct"] = "a"
    data["groupB"] = (data["group"] == "B").astype(float)
    stats, structure = _stats(data, formula, ["x", "groupB"], ["g1", "g2", "g3"])
    nested = make_problem(stats, structure, method)
    assert isinstance(nested, _NestedProblem)
    block = _BlockProblem(stats, structure, method, zz_blocks(stats, structure))
    assert not block.uniform
    dense = _Problem(stats, structure, method)
    gamma = np.array([[0.05, 0.03], [0.02, 0.08], [0.0, 0.04]])  # the last on the boundary
    s0, rows = np.array([0.2, 0.19, 0.21]), np.arange(3)
    want_ll = dense.loglik(rows, gamma, s0)
    want = (*dense.score_information(rows, gamma, s0), *dense.fixed_effects(stats, gamma, s0))
    for prob in (nested, block):
        ll, dl, fim = prob.loglik_score(rows, gamma, s0)
        np.testing.assert_allclose(ll, want_ll, rtol=1e-12)
        got = (dl, fim, *prob.fixed_effects(stats, gamma, s0))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())
