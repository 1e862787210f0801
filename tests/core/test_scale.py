"""Scale invariance of ``criterion="relative"`` (docs/model.md, Convergence).

Fisher scoring is equivariant under ``y -> a y`` except for its stopping rule; with
``criterion="relative"`` the rule is applied to ``y / c`` (``c^2 = y'Ry / (n - p)``), so t, p and df
do not depend on the units of ``y``, and tiny or huge data are fit without under- or overflow.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_reml import simulate

import scflashmm
from scflashmm import SummaryStats

OPTIONS = [
    {"df": "residual"},
    {"df": "satterthwaite"},
    {"df": "satterthwaite", "nonnegative": True},
    {"df": "kenward-roger", "nonnegative": True},
]


def stats_of(X, Y, Z, dtype=np.float64) -> SummaryStats:
    """Statistics accumulated in ``dtype`` (np.longdouble: accurate sums), stored in float64."""
    X, Y, Z = (np.asarray(a, dtype=dtype) for a in (X, Y, Z))
    parts = (X.T @ X, X.T @ Y, Z.T @ X, Z.T @ Y, Z.T @ Z, (Y * Y).sum(0))
    return SummaryStats(*(np.asarray(a, dtype=np.float64) for a in parts), n=X.shape[0])


def null_data(d):
    """Data with real random effects and no effect of the two tested covariates (moderate p)."""
    X, Y, Z = simulate(d, n=300, m=24, seed=5, sigma=(0.4, 0.3))
    rng = np.random.default_rng(0)
    Y = Y - X[:, 1:] @ np.linalg.lstsq(X[:, 1:], Y, rcond=None)[0] + 0.1 * rng.normal(size=Y.shape)
    return X, Y, Z


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("d", [(10,), (10, 6)])
def test_p_values_do_not_depend_on_units(d, options):
    X, Y, Z = null_data(d)
    base = scflashmm.lmm(stats_of(X, Y, Z), d, criterion="relative", **options)
    assert base.converged.all()
    for factor in (1e5, 1e-6):
        fit = scflashmm.lmm(stats_of(X, Y * factor, Z), d, criterion="relative", **options)
        np.testing.assert_allclose(fit.p, base.p, rtol=1e-6)
        np.testing.assert_allclose(fit.t, base.t, rtol=1e-6)
        np.testing.assert_allclose(fit.theta, base.theta * factor**2, rtol=1e-6)
        np.testing.assert_allclose(fit.coef, base.coef * factor, rtol=1e-6, atol=1e-9 * factor)
        np.testing.assert_allclose(fit.se, base.se * factor, rtol=1e-6)
        n_res = stats_of(X, Y, Z).n - X.shape[1]
        np.testing.assert_allclose(fit.logLik, base.logLik - n_res * np.log(factor), rtol=1e-9)
        np.testing.assert_array_equal(fit.niter, base.niter)
        np.testing.assert_array_equal(fit.singular, base.singular)
        if options["df"] != "residual":
            key = "df_" + options["df"].replace("-", "_")
            np.testing.assert_allclose(getattr(fit, key), getattr(base, key), rtol=1e-6)


@pytest.mark.parametrize("d", [(10,), (10, 6)])
def test_offset_with_accurate_statistics(d):
    """``y + 1e5`` with an intercept: the same p-values for the covariates.

    The statistics are summed in extended precision and stored in float64: the reduction
    ``y'y - y'X (X'X)^-1 X'y`` then loses ``log10(y'y / y'Ry) ~ 10`` of float64's 16 digits,
    which bounds the agreement (we see ~2e-6 relative; 1e-4 asserted).
    """
    X, Y, Z = null_data(d)
    options = {"df": "kenward-roger", "nonnegative": True, "criterion": "relative"}
    base = scflashmm.lmm(stats_of(X, Y, Z, np.longdouble), d, **options)
    fit = scflashmm.lmm(stats_of(X, Y + 1e5, Z, np.longdouble), d, **options)
    assert fit.converged.all()
    np.testing.assert_allclose(fit.p[:, 1:], base.p[:, 1:], rtol=1e-4)
    np.testing.assert_allclose(fit.theta, base.theta, rtol=1e-4, atol=1e-6)


def test_tiny_and_huge_data_are_fit():
    """``y * 1e-160`` (whose squares are subnormal) and ``y * 1e150`` converge, finite.

    At 1e-160 ``y'y`` keeps ~5 digits in float64 (subnormal), which bounds the agreement.
    """
    d = (10, 6)
    X, Y, Z = null_data(d)
    options = {"df": "satterthwaite", "nonnegative": True, "criterion": "relative"}
    base = scflashmm.lmm(stats_of(X, Y, Z), d, **options)
    for factor, rtol in ((1e-160, 1e-2), (1e150, 1e-6)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow or convergence warnings
            fit = scflashmm.lmm(stats_of(X, Y * factor, Z), d, **options)
        assert fit.converged.all()
        np.testing.assert_allclose(fit.p, base.p, rtol=rtol)


def test_flashmm_criterion_is_the_default_and_unchanged():
    """``criterion="flashmm"`` is the default; on unit-scale data both criteria agree closely."""
    d = (10,)
    X, Y, Z = null_data(d)
    stats = stats_of(X, Y, Z)
    default = scflashmm.lmm(stats, d)
    assert default.criterion == "flashmm"
    flashmm = scflashmm.lmm(stats, d, criterion="flashmm")
    np.testing.assert_array_equal(default.p, flashmm.p)
    relative = scflashmm.lmm(stats, d, criterion="relative", epsilon=1e-8)
    np.testing.assert_allclose(relative.p, scflashmm.lmm(stats, d, epsilon=1e-10).p, rtol=1e-6)


def test_flashmm_criterion_on_tiny_data_does_not_crash():
    """FLASHMM's absolute criterion cannot converge on ``y * 1e-160``: flagged, no LinAlgError."""
    d = (10, 6)
    X, Y, Z = null_data(d)
    with pytest.warns(scflashmm.ConvergenceWarning):
        fit = scflashmm.lmm(stats_of(X, Y * 1e-160, Z), d, df="satterthwaite", max_iter=5)
    assert not fit.converged.any()


def test_theta0_is_in_the_units_of_y():
    """With ``criterion="relative"`` a given ``theta0`` is scaled with the data."""
    d = (10,)
    X, Y, Z = null_data(d)
    base = scflashmm.lmm(stats_of(X, Y, Z), d, criterion="relative", theta0=[0.1, 1.0])
    fit = scflashmm.lmm(stats_of(X, Y * 1e3, Z), d, criterion="relative", theta0=[1e5, 1e6])
    np.testing.assert_array_equal(fit.niter, base.niter)
    np.testing.assert_allclose(fit.p, base.p, rtol=1e-8)
