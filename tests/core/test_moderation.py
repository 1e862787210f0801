"""Empirical-Bayes moderation of the between-sample variance (scflashmm._core.moderation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose
from scipy import optimize, special, stats

from scflashmm import lmm, summary_stats
from scflashmm._core.moderation import (
    between_sample_variance,
    fit_f_dist,
    gls_at,
    mixture_moderate,
    moderate,
    natural_spline_basis,
    penalized_tau,
    squeeze_var,
    trigamma_inverse,
)
from scflashmm._design import make_design


def test_trigamma_inverse_against_root_finding():
    x = np.array([1e-4, 0.01, 0.3, 1.0, 5.0, 100.0, 1e4])
    expected = [optimize.brentq(lambda y, v=v: special.polygamma(1, y) - v, 1e-8, 1e8) for v in x]
    assert_allclose(trigamma_inverse(x), expected, rtol=1e-7)


def test_fit_f_dist_solves_the_moment_equations():
    rng = np.random.default_rng(0)
    s2 = rng.lognormal(0.0, 1.5, 500)  # spread well beyond chi-square noise: finite df2
    df1 = rng.integers(2, 10, 500).astype(float)
    scale, df2 = fit_f_dist(s2, df1)
    assert np.isfinite(df2)
    e = np.log(s2) - special.digamma(df1 / 2) + np.log(df1 / 2)
    # mean: E e = log(scale) - digamma(df2 / 2) + log(df2 / 2)
    assert_allclose(e.mean(), np.log(scale) - special.digamma(df2 / 2) + np.log(df2 / 2))
    # variance: var e = mean trigamma(df1 / 2) + trigamma(df2 / 2)
    assert_allclose(
        e.var(ddof=1), special.polygamma(1, df1 / 2).mean() + special.polygamma(1, df2 / 2)
    )


@pytest.mark.parametrize(("df1", "df2", "scale"), [(4, 6.0, 0.2), (4, 20.0, 3.0), (10, 3.0, 1.0)])
def test_fit_f_dist_recovers_a_simulated_prior(df1, df2, scale):
    # true variances from the scaled inverse chi-square prior, estimates chi-square on df1 df
    rng = np.random.default_rng(1)
    m = 20_000
    sigma2 = df2 * scale / rng.chisquare(df2, m)
    s2 = sigma2 * rng.chisquare(df1, m) / df1
    est_scale, est_df2 = fit_f_dist(s2, df1)
    assert est_scale == pytest.approx(scale, rel=0.05)
    assert est_df2 == pytest.approx(df2, rel=0.15)

    # and the independent check: the F likelihood is (nearly) maximal at the moment estimates
    def nll(par):
        return -stats.f.logpdf(s2 / np.exp(par[0]), df1, np.exp(par[1])).sum() + m * par[0]

    mle = optimize.minimize(nll, [np.log(scale), np.log(df2)], method="Nelder-Mead").x
    assert np.exp(mle[0]) == pytest.approx(est_scale, rel=0.05)
    assert np.exp(mle[1]) == pytest.approx(est_df2, rel=0.15)


def test_natural_spline_basis_spans_lines_and_curves():
    x = np.linspace(-2.0, 5.0, 200)
    basis = natural_spline_basis(x, 4)
    assert basis.shape == (200, 4)
    for target in (np.ones_like(x), 3 * x - 1):
        coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
        assert_allclose(basis @ coef, target, atol=1e-10)
    # a smooth curve is fit much better than by a line
    curve = np.sin(x)
    line = natural_spline_basis(x, 2)
    rss = [np.linalg.lstsq(b, curve, rcond=None)[1][0] for b in (basis, line)]
    assert rss[0] < 0.15 * rss[1]
    assert natural_spline_basis(np.zeros(5), 4).shape == (5, 2)


def test_fit_f_dist_recovers_a_trend():
    rng = np.random.default_rng(4)
    m, df1, df2 = 20_000, 6, 8.0
    x = rng.uniform(0, 3, m)
    scale = np.exp(-3 + 0.8 * x)  # prior scale grows with the covariate
    s2 = df2 * scale / rng.chisquare(df2, m) * rng.chisquare(df1, m) / df1
    est_scale, est_df2 = fit_f_dist(s2, df1, covariate=x)
    assert est_df2 == pytest.approx(df2, rel=0.15)
    assert_allclose(est_scale, scale, rtol=0.1)
    # without the trend the spread of the scales looks like prior variance: fewer prior df
    assert fit_f_dist(s2, df1)[1] < 0.6 * est_df2
    with pytest.raises(ValueError, match="one value per gene"):
        fit_f_dist(s2, df1, covariate=x[:10])


def test_fit_f_dist_full_pooling_and_robust():
    s2 = np.full(100, 0.5)  # no spread beyond sampling noise at all
    # the scale is then exp(mean(e)), the bias-corrected geometric mean (as limma)
    expected = 0.5 * np.exp(np.log(2) - special.digamma(2))
    assert fit_f_dist(s2, 4) == (pytest.approx(expected), np.inf)
    post, prior, d0 = squeeze_var(s2, 4)
    assert d0 == np.inf
    assert_allclose(post, prior)
    rng = np.random.default_rng(2)
    s2 = 0.3 * rng.chisquare(4, 2000) / 4
    s2[:20] *= 1e4  # a few outlying genes
    assert fit_f_dist(s2, 4, robust=True)[1] > fit_f_dist(s2, 4)[1]
    with pytest.raises(ValueError, match="at least two"):
        fit_f_dist([1.0], 4)


def _fixture(paired: bool):
    rng = np.random.default_rng(3)
    n, m = 1200, 60
    donor = rng.integers(0, 6, n)
    obs = pd.DataFrame(
        {
            "sam": [f"S{i}" for i in donor],
            "cls": rng.choice(["a", "b"], n),
            "trt": rng.choice(["A", "B"], n) if paired else np.where(donor < 3, "A", "B"),
        }
    )
    design = make_design(obs, "~0+cls+cls:trt", "sam")
    tau = rng.gamma(2.0, 0.1, m)
    Y = (
        design.Z.toarray() @ (rng.standard_normal((6, m)) * np.sqrt(tau))
        + rng.standard_normal((n, m))
        + 3
    )
    return design, summary_stats(design.X, Y, design.Z)


def test_no_moderation_is_the_reml_fit():
    design, st = _fixture(paired=False)
    fit = lmm(st, df="satterthwaite")
    args = (st.XX, st.XY, st.ZX, st.ZY, st.ZZ, st.n, fit.theta)
    res = moderate(*args, df_prior=0)
    assert res["d"] == 4  # 6 samples - (intercept, treatment)
    assert_allclose(res["coef"], fit.coef, rtol=1e-8, atol=1e-10)
    assert_allclose(res["cov"], fit.cov, rtol=1e-8, atol=1e-14)
    assert_allclose(res["t"], fit.t, rtol=1e-8)
    # the between-sample coefficients (cls:trt) are tested on about d df, as Satterthwaite's
    inter = [j for j, c in enumerate(design.x_columns) if ":trt" in c]
    assert_allclose(res["df"][:, inter], fit.df_satterthwaite[:, inter], rtol=0.1)
    # and d0 -> 0 is continuous
    near = moderate(*args, df_prior=1e-9)
    assert_allclose(near["t"], res["t"], rtol=1e-6)


def test_moderation_shrinks_towards_the_prior():
    _, st = _fixture(paired=False)
    fit = lmm(st)
    args = (st.XX, st.XY, st.ZX, st.ZY, st.ZZ, st.n, fit.theta)
    res = moderate(*args)
    assert 0 < res["df_prior"] < np.inf
    tau, tau_post, prior = res["tau"], res["tau_post"], res["var_prior"]
    # the posterior lies between the gene's estimate and the prior, at the weights of squeezeVar
    w = res["d"] / (res["d"] + res["df_prior"])
    assert_allclose(tau_post, w * tau + (1 - w) * prior, rtol=1e-10)
    full = moderate(*args, df_prior=np.inf)
    assert_allclose(full["tau_post"], full["var_prior"])
    assert np.isfinite(full["p"]).all()
    with pytest.raises(ValueError, match="estimator must be"):
        moderate(*args, estimator="median")
    with pytest.raises(ValueError, match="df_prior must be >= 0"):
        moderate(*args, df_prior=-1)
    trend = moderate(*args, covariate=st.ZY.sum(axis=0) / st.n)
    assert trend["var_prior"].shape == tau.shape
    w = res["d"] / (res["d"] + trend["df_prior"])
    assert_allclose(trend["tau_post"], w * tau + (1 - w) * trend["var_prior"], rtol=1e-10)


def test_within_sample_coefficients_are_untouched():
    design, st = _fixture(paired=True)  # treatment within donors
    fit = lmm(st)
    res = moderate(st.XX, st.XY, st.ZX, st.ZY, st.ZZ, st.n, fit.theta)
    inter = [j for j, c in enumerate(design.x_columns) if ":trt" in c]
    assert res["d"] == 5
    assert_allclose(res["se"][:, inter], fit.se[:, inter], rtol=1e-3)
    assert (res["df"][:, inter] > 0.9 * (st.n - st.XX.shape[0] - 5)).all()


def test_gls_covariance_derivative_is_numerical():
    _, st = _fixture(paired=False)
    theta = np.array([[0.2, 1.1], [0.05, 0.9]])
    _, _, dcov = gls_at(st.XX, st.XY[:, :2], st.ZX, st.ZY[:, :2], st.ZZ, theta)
    for k in range(2):
        h = np.zeros(2)
        h[k] = 1e-6
        up = gls_at(st.XX, st.XY[:, :2], st.ZX, st.ZY[:, :2], st.ZZ, theta + h)[1]
        down = gls_at(st.XX, st.XY[:, :2], st.ZX, st.ZY[:, :2], st.ZZ, theta - h)[1]
        assert_allclose(dcov[:, k], (up - down) / 2e-6, rtol=1e-5, atol=1e-8)  # entries ~1e-3
    with pytest.raises(ValueError, match="confounded"):
        between_sample_variance(np.zeros((3, 3)), theta)


def test_penalized_tau_is_the_posterior_mode():
    rng = np.random.default_rng(5)
    lam = np.array([150.0, 180.0, 200.0, 260.0])
    s_e = rng.uniform(0.5, 1.5, 5)
    a = (s_e[:, None] + rng.gamma(1.0, 0.05, (5, 1)) * lam) * rng.chisquare(1, (5, 4))
    tau0, d0 = 0.08, 6.0
    bar = lam.size / np.sum(1 / lam)
    tau, var_tau = penalized_tau(lam, a, s_e, tau0, d0)
    for g in range(5):

        def neg(sb, g=g):
            v = s_e[g] + sb * lam
            t = sb + s_e[g] / bar
            ll = -0.5 * np.sum(np.log(v) + a[g] / v)
            return -(ll - (d0 / 2 + 1) * np.log(t) - d0 * tau0 / (2 * t))

        best = optimize.minimize_scalar(
            neg, bounds=(0, 10), method="bounded", options={"xatol": 1e-10}
        )
        assert tau[g] - s_e[g] / bar == pytest.approx(max(best.x, 0), rel=1e-3, abs=1e-6)
        h = 1e-4 * tau[g]
        sb = tau[g] - s_e[g] / bar
        info = (neg(sb + h) - 2 * neg(sb) + neg(sb - h)) / h**2
        assert var_tau[g] == pytest.approx(1 / info, rel=1e-2)


def test_mixture_prior_one_point_and_a_grid():
    _, st = _fixture(paired=False)
    fit = lmm(st)
    args = (st.XX, st.XY, st.ZX, st.ZY, st.ZZ, st.n, fit.theta)
    # one grid point: every gene is tested at the common center, a normal-theory GLS test
    one = mixture_moderate(*args, multipliers=[1.0])
    assert_allclose(one["weights"], [1.0])
    center = fit_f_dist(one["tau"], one["d"])[0]
    sb = np.maximum(
        center
        - fit.theta[:, 1]
        / between_sample_variance(st.ZZ - st.ZX @ np.linalg.solve(st.XX, st.ZX.T), fit.theta)[2],
        0,
    )
    coef, cov, _ = gls_at(st.XX, st.XY, st.ZX, st.ZY, st.ZZ, np.column_stack([sb, fit.theta[:, 1]]))
    z = coef / np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    assert_allclose(one["p"], 2 * stats.t.sf(np.abs(z), st.n - st.XX.shape[0]), rtol=1e-8)
    # the default grid: a proper prior, p-values in [0, 1], posterior means inside the grid
    res = mixture_moderate(*args)
    assert res["weights"].sum() == pytest.approx(1.0)
    assert ((res["p"] >= 0) & (res["p"] <= 1)).all()
    assert (res["tau_post"] > 0).all()


def test_gls_at_products_and_a_gene_without_residual_variance():
    _, st = _fixture(paired=False)
    fit = lmm(st)
    theta = fit.theta.copy()
    # the matrix products equal the definition: X'V^-1X with V = s_e I + s_b Z Z' (from Z'Z)
    coef, cov, _ = gls_at(st.XX, st.XY, st.ZX, st.ZY, st.ZZ, theta, derivatives=False)
    g = 0
    sb, se = theta[g]
    W = np.linalg.inv(np.eye(st.ZZ.shape[0]) + sb / se * st.ZZ) * sb / se
    P = (st.XX - st.ZX.T @ W @ st.ZX) / se
    assert_allclose(cov[g], np.linalg.inv(P), rtol=1e-10)
    rhs = (st.XY[:, g] - st.ZX.T @ W @ st.ZY[:, g]) / se
    assert_allclose(coef[g], np.linalg.solve(P, rhs), rtol=1e-10)
    # a gene whose residual variance is ~0 (all variance between samples) is NaN in the
    # moderated tests, and the other genes are unaffected
    theta[1] = [theta[1, 0] + theta[1, 1], 1e-19 * theta[1, 1]]
    theta[2, 1] = 0.0
    args = (st.XX, st.XY, st.ZX, st.ZY, st.ZZ, st.n)
    res = mixture_moderate(*args, theta)
    assert np.isnan(res["p"][1:3]).all()
    assert np.isfinite(res["p"][3:]).all()
    cov = gls_at(st.XX, st.XY[:, :2], st.ZX, st.ZY[:, :2], st.ZZ, theta[:2])[1]
    assert np.isnan(cov[1]).all()
    assert np.isfinite(cov[0]).all()
