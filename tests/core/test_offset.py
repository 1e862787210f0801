"""A constant offset (``y + 1e5``) with the constant in the span of X (docs/model.md, Offsets).

For dense input the pass keeps the statistics of ``y - c`` (``SummaryStats.shifted``), and the
fit uses them: variance components, t and p are those of ``y``; only the coefficients that
carry the constant move, by exactly the offset.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from test_reml import simulate

import scflashmm
from scflashmm import SummaryStats, summary_stats
from scflashmm._core.blocks import block_stats
from scflashmm._core.stats import Shifted

OFFSET = 1e5


@pytest.fixture(scope="module")
def data():
    X, Y, Z = simulate((8, 5), n=300, m=10, seed=4)
    return X, Y, Z


def test_dense_input_keeps_shifted_statistics(data):
    X, Y, Z = data
    stats = summary_stats(X, Y + OFFSET, Z, chunk_size=70)
    sh = stats.shifted
    assert sh is not None
    # the shift is each gene's mean over the first block of cells
    np.testing.assert_allclose(sh.c, (Y[:70] + OFFSET).mean(axis=0), rtol=1e-15)
    Ys = Y + OFFSET - sh.c
    # the shifted statistics are those of y - c (to the rounding of y + 1e5, about 1e-11)
    np.testing.assert_allclose(sh.XY, X.T @ Ys, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sh.ZY, Z.T @ Ys, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sh.Ynorm, (Ys * Ys).sum(0), rtol=1e-8)
    np.testing.assert_allclose(sh.Ysum, Ys.sum(0), atol=1e-8)
    np.testing.assert_array_equal(sh.X1, X.sum(0))
    # the public fields keep their meaning: the statistics of y itself
    Yo = Y + OFFSET
    np.testing.assert_allclose(stats.XY, X.T @ Yo, rtol=1e-13)
    np.testing.assert_allclose(stats.ZY, Z.T @ Yo, rtol=1e-13)
    np.testing.assert_allclose(stats.Ynorm, (Yo * Yo).sum(0), rtol=1e-13)


@pytest.mark.parametrize("is_counts", [False, True])
def test_dense_equals_sparse(is_counts):
    rng = np.random.default_rng(1)
    X, _, Z = simulate((6,), n=200, m=5, seed=2)
    # counts of a million: log2(1 + y) has a mean of 20 and a spread of 0.001
    Y = rng.poisson(1e6 if is_counts else 3.0, size=(200, 5)).astype(np.float64)
    Y = Y if is_counts else Y + OFFSET
    dense = summary_stats(X, Y, Z, chunk_size=64, is_counts=is_counts)
    csr = summary_stats(X, sp.csr_matrix(Y), Z, chunk_size=64, is_counts=is_counts)
    assert dense.shifted is not None and csr.shifted is None
    for name in ("XY", "ZY", "Ynorm"):
        np.testing.assert_allclose(getattr(dense, name), getattr(csr, name), rtol=1e-13)
    expected = np.log2(1 + Y[:64]).mean(0) if is_counts else Y[:64].mean(0)
    np.testing.assert_allclose(dense.shifted.c, expected, rtol=1e-14)


def test_typical_data_are_not_shifted(data):
    """A shift only where a mean is over 100 standard deviations (more than 4 digits lost)."""
    X, Y, Z = data
    assert summary_stats(X, Y + 10, Z).shifted is None
    Y = Y.copy()
    Y[:, 2] += OFFSET  # one gene is enough; every gene is shifted by its mean
    sh = summary_stats(X, Y, Z).shifted
    np.testing.assert_allclose(sh.c, Y[:1024].mean(0), rtol=1e-14)


def test_statistics_of_disjoint_cells_add_up(data):
    X, Y, Z = data
    Y = Y + OFFSET
    whole = summary_stats(X, Y, Z)
    a = summary_stats(X[:120], Y[:120], Z[:120])
    b = summary_stats(X[120:], Y[120:], Z[120:])
    total = a + b
    assert not np.allclose(a.shifted.c, b.shifted.c, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(total.shifted.c, a.shifted.c)
    for name in ("XY", "ZY", "Ynorm"):
        np.testing.assert_allclose(getattr(total, name), getattr(whole, name), rtol=1e-12)
    centred, offset = total.centred()
    np.testing.assert_allclose(offset[:, 0], a.shifted.c, rtol=1e-14)  # X a = 1: a = e_1
    Ys = Y - a.shifted.c
    np.testing.assert_allclose(centred.Ynorm, (Ys * Ys).sum(0), rtol=1e-9)
    np.testing.assert_allclose(centred.ZY, Z.T @ Ys, rtol=1e-9, atol=1e-7)
    fit, fit_ref = scflashmm.lmm(total, (8, 5)), scflashmm.lmm(whole, (8, 5))
    np.testing.assert_allclose(fit.p, fit_ref.p, rtol=1e-8)
    # with statistics that have no shifted part (sparse input) the sum has none
    c = summary_stats(X[120:], sp.csr_matrix(Y[120:]), Z[120:])
    assert (a + c).shifted is None
    np.testing.assert_allclose((a + c).Ynorm, whole.Ynorm, rtol=1e-12)


def test_save_and_load_keep_shifted_statistics(data, tmp_path):
    X, Y, Z = data
    stats = summary_stats(X, Y + OFFSET, Z)
    stats.save(tmp_path / "s.npz")
    back = SummaryStats.load(tmp_path / "s.npz")
    for name in ("c", "XY", "ZY", "Ynorm", "Ysum", "X1", "Z1"):
        np.testing.assert_array_equal(getattr(back.shifted, name), getattr(stats.shifted, name))
    # a file of format version 1 (no shifted statistics) still loads
    arrays = {n: getattr(stats, n) for n in ("XX", "XY", "ZX", "ZY", "ZZ", "Ynorm")}
    np.savez(tmp_path / "v1.npz", **arrays, n=stats.n, format_version=1)
    old = SummaryStats.load(tmp_path / "v1.npz")
    assert old.shifted is None
    np.testing.assert_array_equal(old.XY, stats.XY)
    payload = dict(np.load(tmp_path / "s.npz"))
    del payload["shifted_Ysum"]
    np.savez(tmp_path / "partial.npz", **payload)
    with pytest.raises(ValueError, match="incomplete shifted statistics"):
        SummaryStats.load(tmp_path / "partial.npz")


def test_stale_shifted_statistics_are_refused(data):
    X, Y, Z = data
    stats = summary_stats(X, Y + OFFSET, Z)
    with pytest.raises(ValueError, match="shifted does not match XY"):
        dataclasses.replace(stats, XY=stats.XY * 2)
    with pytest.raises(ValueError, match="shifted does not match Ynorm"):
        dataclasses.replace(stats, Ynorm=stats.Ynorm * 1.001)
    with pytest.raises(ValueError, match=r"shifted\.Z1 has shape"):
        dataclasses.replace(stats, shifted=dataclasses.replace(stats.shifted, Z1=np.ones(2)))
    plain = dataclasses.replace(stats, XY=stats.XY * 2, shifted=None)
    assert plain.shifted is None


def _fit(X, Y, Z, d, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scflashmm.lmm(summary_stats(X, Y, Z), d, **options)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"criterion": "flashmm"},
        {"df": "satterthwaite"},
        {"df": "kenward-roger", "nonnegative": True},
        {"method": "ML"},
    ],
    ids=lambda o: "-".join(map(str, o.values())) or "default",
)
def test_offset_moves_only_the_constant(data, options):
    X, Y, Z = data
    d = (8, 5)
    base = _fit(X, Y, Z, d, **options)
    fit = _fit(X, Y + OFFSET, Z, d, **options)
    assert base.converged.all()
    np.testing.assert_allclose(fit.p[:, 1:], base.p[:, 1:], rtol=1e-6)
    np.testing.assert_allclose(fit.t[:, 1:], base.t[:, 1:], rtol=1e-8)
    np.testing.assert_allclose(fit.coef[:, 1:], base.coef[:, 1:], rtol=1e-8)
    np.testing.assert_allclose(fit.coef[:, 0], base.coef[:, 0] + OFFSET, rtol=1e-14)
    np.testing.assert_allclose(fit.se, base.se, rtol=1e-8)
    np.testing.assert_allclose(fit.theta, base.theta, rtol=1e-8)
    np.testing.assert_allclose(fit.logLik, base.logLik, rtol=1e-10)


def test_factor_indicators_carry_the_constant():
    """No intercept: the indicators of a factor sum to one; their coefficients move."""
    X, Y, Z = simulate((8,), n=300, m=10, seed=7)
    rng = np.random.default_rng(3)
    level = rng.integers(0, 3, size=300)
    X = np.column_stack([np.eye(3)[level], X[:, 1:]])
    base = _fit(X, Y, Z, (8,), df="satterthwaite")
    fit = _fit(X, Y + OFFSET, Z, (8,), df="satterthwaite")
    np.testing.assert_allclose(fit.coef[:, :3], base.coef[:, :3] + OFFSET, rtol=1e-14)
    np.testing.assert_allclose(fit.p[:, 3:], base.p[:, 3:], rtol=1e-6)
    np.testing.assert_allclose(fit.theta, base.theta, rtol=1e-8)


def test_without_the_constant_in_the_span_statistics_of_y_are_fit(data):
    X, Y, Z = data
    X = X[:, 1:]  # no intercept: an offset is a real change of the model
    stats = summary_stats(X, Y + OFFSET, Z)
    fit_stats, offset = stats.centred()
    assert offset is None and fit_stats is stats
    dense = _fit(X, Y + OFFSET, Z, (8, 5))
    sparse = _fit(X, sp.csr_matrix(Y + OFFSET), Z, (8, 5))
    np.testing.assert_allclose(dense.p, sparse.p, rtol=1e-6)


def test_a_constant_gene_is_degenerate_not_zero(data):
    X, Y, Z = data
    Y = Y + OFFSET
    Y[:, 3] = OFFSET
    with pytest.warns(scflashmm.DegenerateFeatureWarning, match="exactly explained") as record:
        fit = scflashmm.lmm(summary_stats(X, Y, Z), (8, 5))
    assert not any("only zero" in str(w.message) for w in record)
    assert np.isnan(fit.p[3]).all() and np.isfinite(fit.p[[0, 1, 2, 4]]).all()


def test_shift_is_for_dense_rows_only():
    Y = sp.csr_matrix(np.ones((4, 2)))
    codes, cont = np.zeros((0, 4), dtype=np.int32), np.ones((4, 1))
    with pytest.raises(ValueError, match="dense blocks of cells"):
        block_stats(Y, codes, cont, [], is_counts=False, shift=np.ones(2))
    out = block_stats(Y.toarray(), codes, cont, [], is_counts=False, shift=np.ones(2))
    np.testing.assert_array_equal(out, np.zeros((3, 2)))  # y - 1 = 0: products, norms, sums


def test_shifted_type_is_checked(data):
    X, Y, Z = data
    stats = summary_stats(X, Y + OFFSET, Z)
    with pytest.raises(TypeError, match="must be a Shifted"):
        dataclasses.replace(stats, shifted={"c": 1})
    assert isinstance(stats.shifted, Shifted)


def test_structured_path_moves_only_the_constant():
    import pandas as pd

    from scflashmm._random_terms import random_design

    rng = np.random.default_rng(5)
    n = 400
    obs = pd.DataFrame({"donor": rng.integers(0, 8, n).astype(str), "x": rng.normal(size=n)})
    rd = random_design("(1 + x | donor)", obs)
    X = np.column_stack([np.ones(n), obs["x"], rng.normal(size=n)])
    b = rng.normal(0, 0.5, size=(rd.Z.shape[1], 6))
    Y = X @ rng.normal(size=(3, 6)) + rd.Z @ b + rng.normal(size=(n, 6))
    base = scflashmm.lmm(summary_stats(X, Y, rd.Z), structure=rd.structure)
    fit = scflashmm.lmm(summary_stats(X, Y + OFFSET, rd.Z), structure=rd.structure)
    np.testing.assert_allclose(fit.coef[:, 0], base.coef[:, 0] + OFFSET, rtol=1e-14)
    np.testing.assert_allclose(fit.p[:, 1:], base.p[:, 1:], rtol=1e-6)
    np.testing.assert_allclose(fit.theta, base.theta, rtol=1e-6)
