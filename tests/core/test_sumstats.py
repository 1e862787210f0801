"""Summary statistics: identical from every layout and chunking, additive, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import scflashmm
from scflashmm import SummaryStats, summary_stats


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    n, m = 503, 17
    counts = rng.negative_binomial(1, 0.6, size=(n, m)).astype(np.float64)
    counts[:, 3] = 0  # an all-zero gene
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.eye(7)[rng.integers(0, 7, n)]
    return X, counts, Z


LAYOUTS = {
    "dense": lambda Y: Y,
    "csr_matrix": sp.csr_matrix,
    "csc_matrix": sp.csc_matrix,
    "csr_array": sp.csr_array,
    "csc_array": sp.csc_array,
    "coo_array": sp.coo_array,
}


@pytest.mark.parametrize("is_counts", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("chunk_size", [None, 1, 64])
def test_layouts_and_chunks_agree(data, layout, chunk_size, is_counts):
    X, counts, Z = data
    Y = np.log2(1 + counts) if is_counts else counts
    expected = {
        "XX": X.T @ X,
        "XY": X.T @ Y,
        "ZX": Z.T @ X,
        "ZY": Z.T @ Y,
        "ZZ": Z.T @ Z,
        "Ynorm": (Y**2).sum(0),
    }
    stats = summary_stats(X, LAYOUTS[layout](counts), Z, chunk_size=chunk_size, is_counts=is_counts)
    for key, value in expected.items():
        np.testing.assert_allclose(getattr(stats, key), value, rtol=1e-12, err_msg=key)
    assert stats.n == X.shape[0]


def test_input_is_not_modified(data):
    X, counts, Z = data
    Y = sp.csr_array(counts)
    before = Y.data.copy()
    summary_stats(X, Y, Z, is_counts=True)
    np.testing.assert_array_equal(Y.data, before)


def test_statistics_of_disjoint_cells_add_up(data):
    X, Y, Z = data
    whole = summary_stats(X, Y, Z)
    parts = summary_stats(X[:200], Y[:200], Z[:200]) + summary_stats(X[200:], Y[200:], Z[200:])
    for key in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm"):
        np.testing.assert_allclose(getattr(parts, key), getattr(whole, key), rtol=1e-12)
    assert parts.n == whole.n
    with pytest.warns(scflashmm.DegenerateFeatureWarning, match="1 feature"):
        fit_whole, fit_parts = scflashmm.lmm(whole), scflashmm.lmm(parts)
    np.testing.assert_allclose(fit_parts.coef, fit_whole.coef, rtol=1e-10)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda X, Y, Z: (X[:-1], Y, Z), "one row per cell"),
        (lambda X, Y, Z: (X, Y, Z[:-1]), "one row per cell"),
        (
            lambda X, Y, Z: (X, np.where(np.arange(Y.size).reshape(Y.shape) == 5, np.nan, Y), Z),
            "NaN or infinite",
        ),
        (
            lambda X, Y, Z: (X, sp.csr_array(np.where(Y == Y.max(), np.inf, Y)), Z),
            "NaN or infinite",
        ),
        (lambda X, Y, Z: (np.where(X == X.max(), np.nan, X), Y, Z), "X contains NaN"),
        (lambda X, Y, Z: (X, Y[:, 0], Z), "2-D"),
        (lambda X, Y, Z: (X, Y.astype(str), Z), "numeric"),
    ],
)
def test_bad_input(data, make, match):
    X, Y, Z = make(*data)
    with pytest.raises(ValueError, match=match):
        summary_stats(X, Y, Z)


def test_negative_values_with_counts(data):
    X, Y, Z = data
    with pytest.raises(ValueError, match="negative values"):
        summary_stats(X, -Y, Z, is_counts=True)


def test_chunk_size_must_be_positive(data):
    with pytest.raises(ValueError, match="chunk_size"):
        summary_stats(*data, chunk_size=0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="XX has shape"):
        SummaryStats(
            XX=np.eye(3),
            XY=np.zeros((2, 4)),
            ZX=np.zeros((5, 2)),
            ZY=np.zeros((5, 4)),
            ZZ=np.eye(5),
            Ynorm=np.zeros(4),
            n=10,
        )


def test_adding_incompatible_statistics_fails(data):
    X, Y, Z = data
    with pytest.raises(ValueError, match="Cannot add"):
        summary_stats(X, Y, Z) + summary_stats(X, Y[:, :5], Z)
