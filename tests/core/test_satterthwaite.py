"""Satterthwaite df: analytic derivatives against numerical ones from cell-level data, and lmerTest.

Tolerances against lmerTest 3.1-3 (tests/data/reference_satterthwaite, case b; lmer's optimiser
and lmerTest's numerical Hessian and Jacobian limit the agreement, we see ~2e-7 relative):
- df of every coefficient and of the contrast (satterthwaite_*.csv "df"): rtol 1e-4, well
  inside a 1 % tolerance;
- t (column "t"): rtol 1e-5 (lme4's and FLASHMM's estimates agree to ~1e-9, docs/model.md);
- p (column "p"): -log10(p) with atol 1e-4 (p changes with df and t as above).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _reference import REFERENCE, load_case
from test_reml import loglik, simulate

import scflashmm
from scflashmm._core import satterthwaite
from scflashmm._core.kernels import select_kernel

SATT = REFERENCE.parent / "reference_satterthwaite" / "b_simu_reml_counts"


def _read(name: str) -> pd.DataFrame:
    table = pd.read_csv(SATT / name)
    for col in ("estimate", "se", "df", "t", "p"):
        table[col] = table[col].astype(str).str.strip().astype(float)  # some have leading spaces
    return table


def _kernel_parts(d, method, kernel, theta, n=150, m=3, seed=5):
    """Minus the Hessian (quadratic term - Fisher information) and d(X'V^-1X)/ds_i at theta."""
    X, Y, Z = simulate(d, n=n, m=m, seed=seed)
    stats = scflashmm.summary_stats(X, Y, Z)
    A = np.linalg.inv(stats.XX)
    zrz = stats.ZZ - stats.ZX @ A @ stats.ZX.T
    zry = (stats.ZY - stats.ZX @ A @ stats.XY).T
    yry = stats.Ynorm - np.einsum("pm,pm->m", stats.XY, A @ stats.XY)
    solver = select_kernel(stats, d, zrz, method, kernel=kernel)
    state = solver.prepare(zry, yry)
    s = np.tile(theta, (m, 1))
    _, fim = solver.score_information(state, s)
    quad, dfim = solver.satterthwaite_parts(state, s)
    return X, Y, Z, quad - fim, dfim


def _cell_cov(theta, X, Z, d):
    """(X'V^-1X)^-1 from cell-level data."""
    V = theta[-1] * np.eye(len(X))
    start = 0
    for s, q in zip(theta[:-1], d, strict=True):
        V += s * Z[:, start : start + q] @ Z[:, start : start + q].T
        start += q
    return np.linalg.inv(X.T @ np.linalg.solve(V, X))


CASES = [((8,), "eigen"), ((8,), "dense"), ((8, 5), "dense")]


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize(("d", "kernel"), CASES)
def test_observed_information_is_minus_hessian_of_loglik(d, kernel, method):
    theta = np.array([*[0.3, 0.2][: len(d)], 0.9])
    X, Y, Z, observed, _ = _kernel_parts(d, method, kernel, theta)
    h = 1e-4
    E = np.eye(len(theta)) * h
    for g in range(Y.shape[1]):

        def ll(t, g=g):
            return loglik(t, X, Y[:, g], Z, d, method)

        def second(a, b):
            return ll(theta + a + b) - ll(theta + a - b) - ll(theta - a + b) + ll(theta - a - b)

        # central second differences: truncation error O(h^2), measured ~1e-7 relative
        numeric = np.array([[second(a, b) for b in E] for a in E]) / (4 * h * h)
        np.testing.assert_allclose(observed[g], -numeric, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("d", "kernel"), CASES)
def test_covariance_jacobian_is_derivative_of_cov(d, kernel):
    theta = np.array([*[0.3, 0.2][: len(d)], 0.9])
    X, _, Z, _, dfim = _kernel_parts(d, "REML", kernel, theta)
    m, p = dfim.shape[0], X.shape[1]
    cov = np.ascontiguousarray(np.broadcast_to(_cell_cov(theta, X, Z, d), (m, p, p)))
    jac = satterthwaite.covariance_jacobian(cov, dfim, np.tile(theta, (m, 1)))
    h = 1e-6
    for j, e in enumerate(np.eye(len(theta))):
        numeric = (_cell_cov(theta + h * e, X, Z, d) - _cell_cov(theta - h * e, X, Z, d)) / (2 * h)
        for g in range(jac.shape[0]):
            np.testing.assert_allclose(jac[g, j], numeric, rtol=1e-6, atol=1e-10)
    # V is linear and homogeneous in theta, so sum_j theta_j dC/dtheta_j = C
    np.testing.assert_allclose(np.einsum("j,gjpr->gpr", theta, jac), cov, rtol=1e-10)


def test_lmertest_coefficients():
    case = load_case("b")
    X, Z = case["X"], case["Z"]
    fit = scflashmm.lmm_fit(
        case["Y"], X.to_numpy(), Z.to_numpy(), is_counts=True, df="satterthwaite",
        feature_names=case["genes"], covariate_names=list(X.columns),
    )  # fmt: skip
    ref = _read("satterthwaite_coef.csv")
    g = [case["genes"].index(x) for x in ref["gene"]]
    j = [list(X.columns).index(x) for x in ref["term"]]
    np.testing.assert_allclose(fit.df_satterthwaite[g, j], ref["df"], rtol=1e-4)
    np.testing.assert_allclose(fit.t[g, j], ref["t"], rtol=1e-5)
    np.testing.assert_allclose(-np.log10(fit.p[g, j]), -np.log10(ref["p"]), atol=1e-4)
    assert fit.df == case["df"]  # the residual df n - p is kept

    table = scflashmm.lmm_test(fit)  # the fit's df by default
    cols = [table.columns.get_loc(f"{t}_df") for t in ref["term"]]
    np.testing.assert_allclose(table.to_numpy()[g, cols], ref["df"], rtol=1e-4)


def test_lmertest_contrast():
    case = load_case("b")
    X, Z = case["X"], case["Z"]
    L = pd.read_csv(SATT / "contrast_vector.csv", index_col=0)["L"]
    fit = scflashmm.lmm_fit(
        case["Y"], X.to_numpy(), Z.to_numpy(), is_counts=True, df="satterthwaite",
        feature_names=case["genes"], covariate_names=list(X.columns),
    )  # fmt: skip
    table = scflashmm.lmm_test(fit, contrast=pd.DataFrame({"BvsA": L}))
    ref = _read("satterthwaite_contrast.csv").set_index("gene")
    got = table.loc[ref.index]
    np.testing.assert_allclose(got["BvsA_coef"], ref["estimate"], rtol=1e-6)
    np.testing.assert_allclose(got["BvsA_df"], ref["df"], rtol=1e-4)
    np.testing.assert_allclose(got["BvsA_t"], ref["t"], rtol=1e-5)
    np.testing.assert_allclose(-np.log10(got["BvsA_p"]), -np.log10(ref["p"]), atol=1e-4)
    # a contrast that is one coefficient has that coefficient's df
    unit = scflashmm.lmm_test(fit, contrast=np.eye(X.shape[1])[:, [5]])
    np.testing.assert_allclose(unit["contrast1_df"], fit.df_satterthwaite[:, 5], rtol=1e-12)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_eigen_path_equals_dense_path(method):
    X, Y, Z = simulate((15,), m=30, seed=3)
    fast = scflashmm.lmm_fit(Y, X, Z, method=method, df="satterthwaite", kernel="eigen")
    dense = scflashmm.lmm_fit(Y, X, Z, method=method, df="satterthwaite", kernel="dense")
    for key in ("df_satterthwaite", "vcov_theta", "dfim_beta", "p"):
        np.testing.assert_allclose(
            getattr(fast, key), getattr(dense, key), rtol=1e-8, atol=1e-12, err_msg=key
        )


def test_nested_design_gives_sample_level_df():
    # 3 vs 3 samples nested in treatment: the treatment df is about samples - 2 = 4, not n - p.
    rng = np.random.default_rng(7)
    n, m = 600, 20
    sam = rng.integers(0, 6, n)
    X = np.column_stack([np.ones(n), sam >= 3])
    Z = np.eye(6)[sam]
    Y = Z @ rng.normal(0, 0.5, (6, m)) + rng.normal(size=(n, m))
    fit = scflashmm.lmm_fit(Y, X, Z, df="satterthwaite", output_cov=False)
    assert fit.dfim_beta is None
    assert np.median(fit.df_satterthwaite[:, 1]) == pytest.approx(4, rel=0.1)
    assert fit.df == n - 2
    residual = scflashmm.lmm_test(fit, df="residual")
    plain = scflashmm.lmm_test(scflashmm.lmm_fit(Y, X, Z))
    np.testing.assert_array_equal(residual.to_numpy(), plain.to_numpy())
    assert (fit.p[:, 1] > residual["x2_p"]).all()  # fewer df, larger p
    assert "x2_df" in fit.to_frame()


def test_errors():
    X, Y, Z = simulate((6,), n=100, m=2)
    with pytest.raises(ValueError, match="df must be one of 'residual', 'satterthwaite'"):
        scflashmm.lmm_fit(Y, X, Z, df="kenward_roger")
    fit = scflashmm.lmm_fit(Y, X, Z)
    with pytest.raises(ValueError, match="fit with df='satterthwaite'"):
        scflashmm.lmm_test(fit, df="satterthwaite")
    with pytest.raises(ValueError, match="df must be"):
        scflashmm.lmm_test(fit, df="n-p")
    no_cov = scflashmm.lmm_fit(Y, X, Z, df="satterthwaite", output_cov=False)
    with pytest.raises(ValueError, match="output_cov=True"):
        scflashmm.lmm_test(no_cov, contrast=[0, 1, -1])
