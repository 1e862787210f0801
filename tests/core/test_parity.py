"""Parity with FLASHMM 1.3.0 on the eight reference cases (tests/data/reference).

Tolerances (per quantity, FLASHMM output compared):
- summary statistics (ss_*.csv): rtol 1e-12 -- the same sums, only the summation order differs;
- coef/se/t/theta/se_theta/logLik/cov/RE/FIM (coef.csv ... FIM_theta.csv): rtol 1e-7, atol 1e-10
  for values near 0 (our estimates agree to ~1e-11 relative; the budget covers BLAS differences);
- p (p.csv, test_*.csv): -log10(p) with atol 1e-8;
- dlogL (dlogL.csv): atol 1e-6 (scores near the 1e-5 tolerance are round-off dominated);
- niter (niter.csv): equal; non-converged genes equal to spec.json["nonconverged_genes"].
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pandas as pd
import pytest
from _reference import (
    ALTERNATIVES,
    CASES,
    comparable_genes,
    genes_first,
    lmm_fit_case,
    load_case,
)

import scflashmm
from scflashmm import ConvergenceWarning, DegenerateFeatureWarning

RTOL, ATOL = 1e-7, 1e-10


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def assert_same_test_table(ours: pd.DataFrame, theirs: pd.DataFrame, keep: np.ndarray) -> None:
    """An lmm_test table equals FLASHMM's lmmtest: columns, estimates and t, -log10 p."""
    assert list(ours.columns) == list(theirs.columns)
    stat = [c for c in ours.columns if not c.endswith("_p")]
    close(ours[stat].to_numpy()[keep], theirs[stat].to_numpy()[keep])
    pcols = [c for c in ours.columns if c.endswith("_p")]
    close(
        -np.log10(ours[pcols].to_numpy()[keep]),
        -np.log10(theirs[pcols].to_numpy()[keep]),
        rtol=0,
        atol=1e-8,
    )


def expected_warnings(case: dict):
    spec = case["spec"]
    if spec["na_genes"] or case["name"].startswith("f_"):
        return pytest.warns(DegenerateFeatureWarning)
    if spec["nonconverged_genes"]:
        return pytest.warns(ConvergenceWarning, match=f"{len(spec['nonconverged_genes'])} feature")
    return contextlib.nullcontext()  # any warning fails: pytest turns warnings into errors


@functools.cache
def fitted_case(name: str) -> tuple[dict, scflashmm.LMMFit]:
    case = load_case(name)
    with expected_warnings(case):
        fit = lmm_fit_case(case)
    return case, fit


@pytest.fixture(params=CASES)
def fitted(request):
    return fitted_case(request.param)


CONTRAST_CASES = [name for name in CASES if load_case(name)["spec"]["contrasts"]]


@pytest.mark.parametrize("name", CASES)
def test_summary_stats_match_sslmm(name):
    case = load_case(name)
    stats = scflashmm.summary_stats(
        case["X"].to_numpy(), case["Y"], case["Z"].to_numpy(), is_counts=case["spec"]["is_counts"]
    )
    ss = case["ss"]
    for field in ("XX", "XY", "ZX", "ZY", "ZZ"):
        expected = ss[field].to_numpy()
        # Sums of centred covariates (case e's age) are round-off: atol relative to the scale.
        close(getattr(stats, field), expected, rtol=1e-12, atol=1e-13 * np.abs(expected).max())
    close(stats.Ynorm, ss["Ynorm"].to_numpy(), rtol=1e-12, atol=0)
    assert stats.n == ss["n"]


def test_estimates(fitted):
    case, fit = fitted
    keep = comparable_genes(case)
    for ours, theirs in (
        ("coef", "coef"),
        ("se", "se"),
        ("t", "t"),
        ("theta", "theta"),
        ("se_theta", "se_theta"),
    ):
        close(getattr(fit, ours)[keep], genes_first(case[theirs])[keep])
    close(fit.logLik[keep], case["logLik"].to_numpy()[keep])
    close(fit.cov[keep], case["cov"][keep])
    np.testing.assert_allclose(fit.dlogL[keep], genes_first(case["dlogL"])[keep], rtol=0, atol=1e-6)
    close(-np.log10(fit.p[keep]), -np.log10(genes_first(case["p"])[keep]), rtol=0, atol=1e-8)
    assert fit.df == case["df"]


def test_iterations_and_convergence(fitted):
    case, fit = fitted
    keep = comparable_genes(case)
    np.testing.assert_array_equal(fit.niter[keep], case["niter"].to_numpy()[keep])
    genes = np.array(case["genes"])
    expected = set(case["spec"]["nonconverged_genes"]) & set(genes[keep])
    assert set(genes[keep & ~fit.converged]) == expected


def test_re_and_fisher_information():
    case = load_case("c_simu_ml_re_fim")
    fit = lmm_fit_case(case)
    close(fit.re, genes_first(case["RE"]))
    close(fit.fim_beta, case["FIM_beta"])
    close(fit.fim_theta, case["FIM_theta"])


def test_degenerate_genes_are_nan_with_warnings():
    case = load_case("f_zero_and_constant_genes")
    with pytest.warns(DegenerateFeatureWarning) as record:
        fit = lmm_fit_case(case)
    messages = [str(w.message) for w in record]
    assert any("1 feature(s) with only zero counts" in m for m in messages)
    assert any("Gene2" in m and "exactly explained" in m for m in messages)
    for gene in (0, 1):  # Gene1 all zero, Gene2 constant
        assert np.isnan(fit.coef[gene]).all() and np.isnan(fit.theta[gene]).all()
        assert not fit.converged[gene]
    assert np.isfinite(fit.coef[2:]).all()  # Gene3 (a single non-zero) is fit


def test_lmm_test_default(fitted):
    case, fit = fitted
    keep = comparable_genes(case)
    ours = scflashmm.lmm_test(fit)
    assert list(ours.index) == case["genes"]
    assert_same_test_table(ours, case["test_default"], keep)


@pytest.mark.parametrize("alternative", list(ALTERNATIVES))
@pytest.mark.parametrize("name", CONTRAST_CASES)
def test_lmm_test_contrasts(name, alternative):
    case, fit = fitted_case(name)
    keep = comparable_genes(case)
    spec_contrasts = case["spec"]["contrasts"]
    # Unnamed R contrasts (keys "1", "2", ...) are named by their expression text.
    named = {(expr if key.isdigit() else key): expr for key, expr in spec_contrasts.items()}
    C = scflashmm.contrast_matrix(named, fit.covariate_names)
    close(C.to_numpy(), case["contrast"].to_numpy(), rtol=0, atol=0)
    assert list(C.columns) == list(case["contrast"].columns)
    ours = scflashmm.lmm_test(fit, contrast=C, alternative=alternative)
    assert_same_test_table(ours, case["test_contrast"][alternative], keep)


def test_lmm_on_summary_stats_equals_lmm_fit():
    case = load_case("b_simu_reml_counts")
    stats = scflashmm.summary_stats(
        case["X"].to_numpy(), case["Y"], case["Z"].to_numpy(), is_counts=True
    )
    a = scflashmm.lmm(stats, [25])
    b = lmm_fit_case(case)
    np.testing.assert_array_equal(a.coef, b.coef)
    np.testing.assert_array_equal(a.theta, b.theta)
