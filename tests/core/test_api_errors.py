"""Clear errors for bad input to lmm, lmm_test and contrast_matrix; contrast parsing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import scflashmm


@pytest.fixture(scope="module")
def stats():
    rng = np.random.default_rng(2)
    n = 300
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.eye(6)[rng.integers(0, 6, n)]
    Y = X @ rng.normal(size=(2, 4)) + Z @ rng.normal(size=(6, 4)) + rng.normal(size=(n, 4))
    return scflashmm.summary_stats(X, Y, Z)


@pytest.fixture(scope="module")
def fit(stats):
    return scflashmm.lmm(
        stats, covariate_names=["(Intercept)", "log(libsize)"], feature_names=list("abcd")
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d": [2, 3]}, r"add up to ncol\(Z\) = 6"),
        ({"d": [0, 6]}, "positive component sizes"),
        ({"theta0": [1.0]}, "theta0 must have k \\+ 1 = 2"),
        ({"method": "REML-FS"}, "method must be"),
        ({"max_iter": 0}, "max_iter"),
        ({"epsilon": 0}, "epsilon"),
        ({"covariate_names": ["a"]}, "covariate_names has 1"),
        ({"kernel": "sparse"}, "kernel must be one of 'auto', 'eigen', 'dense'"),
        ({"d": [2, 4], "kernel": "eigen"}, "eigen kernel fits one random component"),
        ({"theta0": [0.1, 0.0]}, "residual variance .* must be positive"),
        ({"theta0": [np.nan, 1.0]}, "theta0 must be finite"),
    ],
)
def test_lmm_bad_arguments(stats, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scflashmm.lmm(stats, **kwargs)


def test_rank_deficient_design_names_columns():
    rng = np.random.default_rng(0)
    n = 100
    a = rng.normal(size=n)
    X = np.column_stack([np.ones(n), a, 2 * a + 1, rng.normal(size=n)])
    Z = np.eye(4)[rng.integers(0, 4, n)]
    with pytest.raises(ValueError, match=r"rank deficient.*\['icpt', 'a', 'b'\]"):
        scflashmm.lmm_fit(rng.normal(size=(n, 2)), X, Z, covariate_names=["icpt", "a", "b", "c"])


def test_stats_must_be_summary_stats():
    with pytest.raises(TypeError, match="SummaryStats"):
        scflashmm.lmm({"XX": 1})


def test_lmm_test_index_by_name_and_position(fit):
    by_name = scflashmm.lmm_test(fit, index=["log(libsize)"])
    by_pos = scflashmm.lmm_test(fit, index=1)
    pd.testing.assert_frame_equal(by_name, by_pos)
    assert list(by_name.columns) == ["log(libsize)_coef", "log(libsize)_t", "log(libsize)_p"]
    with pytest.raises(ValueError, match="Unknown covariate 'age'"):
        scflashmm.lmm_test(fit, index="age")


def test_lmm_test_alternatives_are_tails(fit):
    two = scflashmm.lmm_test(fit, contrast={"d": "log(libsize)"})["d_p"]
    less = scflashmm.lmm_test(fit, contrast={"d": "log(libsize)"}, alternative="less")["d_p"]
    greater = scflashmm.lmm_test(fit, contrast={"d": "log(libsize)"}, alternative="greater")["d_p"]
    np.testing.assert_allclose(less + greater, 1)
    np.testing.assert_allclose(two, 2 * np.minimum(less, greater))
    with pytest.raises(ValueError, match="alternative must be"):
        scflashmm.lmm_test(fit, alternative="bigger")


def test_lmm_test_contrast_array_and_frame_agree(fit):
    frame = scflashmm.contrast_matrix({"c": "log(libsize) - (Intercept)"}, fit.covariate_names)
    a = scflashmm.lmm_test(fit, contrast=frame)
    b = scflashmm.lmm_test(fit, contrast=np.array([-1.0, 1.0]))
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy())


def test_contrast_needs_cov(stats):
    fit = scflashmm.lmm(stats, output_cov=False)
    assert fit.cov is None
    with pytest.raises(ValueError, match="output_cov=True"):
        scflashmm.lmm_test(fit, contrast=np.array([1.0, 0.0]))


NAMES = ["A", "B", "C", "D", "cls[1]:trt[T.B]", "cls[2]:trt[T.B]", "log(libsize)", "cls1", "cls10"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("B-A", {"A": -1, "B": 1}),
        ("A-(B+C+D)/3", {"A": 1, "B": -1 / 3, "C": -1 / 3, "D": -1 / 3}),
        ("cls[1]:trt[T.B] - cls[2]:trt[T.B]", {"cls[1]:trt[T.B]": 1, "cls[2]:trt[T.B]": -1}),
        ("2*log(libsize)", {"log(libsize)": 2}),
        ("-0.5 * (cls10 - cls1)", {"cls10": -0.5, "cls1": 0.5}),
        ("1e-1*A", {"A": 0.1}),
    ],
)
def test_contrast_parsing(expr, expected):
    matrix = scflashmm.contrast_matrix([expr], NAMES)
    want = pd.Series(0.0, index=NAMES)
    for name, value in expected.items():
        want[name] = value
    np.testing.assert_allclose(matrix[expr].to_numpy(), want.to_numpy())


@pytest.mark.parametrize(
    ("expr", "match"),
    [
        ("B - E", "Unknown name 'E'"),
        ("B -", "unexpected end"),
        ("(A + B", "missing"),
        ("A * B", "not linear"),
        ("A / B", "not linear"),
        ("A + 1", "constant"),
        ("2", "names no design column"),
        ("A / 0", "division by zero"),
        ("__import__('os')", "Unknown name"),
        ("", "non-empty"),
    ],
)
def test_contrast_errors(expr, match):
    with pytest.raises(ValueError, match=match):
        scflashmm.contrast_matrix({"x": expr}, NAMES)


@pytest.mark.parametrize("n_jobs", [float("nan"), float("inf"), "2", 1.5, 0])
def test_n_jobs_bad_values_are_named(n_jobs):
    from scflashmm._core._threads import check_n_jobs

    with pytest.raises(ValueError, match="n_jobs must be a positive integer"):
        check_n_jobs(n_jobs)


def test_lmm_fit_refuses_a_random_component_confounded_with_x():
    rng = np.random.default_rng(0)
    sam = np.repeat(np.arange(4), 25)
    Z = np.eye(4)[sam]
    X = np.column_stack([np.ones(100), Z[:, 1:]])  # the samples are fixed effects too
    Y = rng.normal(size=(100, 3))
    with pytest.raises(ValueError, match=r"Random component 1 .* confounded with the fixed"):
        scflashmm.lmm_fit(Y, X, Z)
    with pytest.raises(ValueError, match="'sam' is confounded"):
        scflashmm.lmm_fit(Y, X, Z, component_names=["sam"])
    with pytest.raises(ValueError, match="zero for every cell"):
        scflashmm.lmm_fit(Y, X[:, :1], np.zeros((100, 2)))
