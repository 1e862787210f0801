"""The batched solver against a plain per-gene implementation, derivatives and statsmodels."""

from __future__ import annotations

import numpy as np
import pytest

import scflashmm
from scflashmm._core import fit as core_fit
from scflashmm._core.kernels import DenseKernel, EigenKernel, select_kernel


def plain_lmm(stats, d, method="REML", max_iter=50, epsilon=1e-5):
    """docs/model.md (Fisher scoring), gene by gene with explicit inverses (the test oracle)."""
    n, p, q, m = stats.shape
    k = len(d)
    A = np.linalg.inv(stats.XX)
    zrz = stats.ZZ - stats.ZX @ A @ stats.ZX.T
    ZR, pres = (zrz, p) if method == "REML" else (stats.ZZ, 0)
    blocks = [np.arange(a, b) for a, b in zip(np.cumsum([0, *d])[:-1], np.cumsum(d), strict=True)]
    out = {key: [] for key in ("theta", "coef", "se", "dlogL", "niter", "logLik")}
    for g in range(m):
        zry = stats.ZY[:, g] - stats.ZX @ A @ stats.XY[:, g]
        yry = stats.Ynorm[g] - stats.XY[:, g] @ A @ stats.XY[:, g]
        s = np.r_[np.zeros(k), yry / (n - p)]

        def parts(s):
            D = np.diag(np.repeat(s[:k] / s[k], d))
            M = np.linalg.inv(D @ zrz + np.eye(q))
            M0 = M if method == "REML" else np.linalg.inv(D @ stats.ZZ + np.eye(q))
            return D, M, M0

        def score(s, zry, yry):
            D, M, M0 = parts(s)
            s0 = s[k]
            u = zry @ M
            ZVZ = ZR @ M0
            ZV2Z = ZVZ @ M0
            dl, F = np.zeros(k + 1), np.zeros((k + 1, k + 1))
            for i, Ii in enumerate(blocks):
                dl[i] = (u[Ii] @ u[Ii] / s0**2 - np.trace(ZVZ[np.ix_(Ii, Ii)]) / s0) / 2
                for j, Ij in enumerate(blocks[: i + 1]):
                    F[i, j] = F[j, i] = np.sum(ZVZ[np.ix_(Ij, Ii)] ** 2) / s0**2 / 2
                F[i, k] = F[k, i] = np.trace(ZV2Z[np.ix_(Ii, Ii)]) / s0**2 / 2
            F[k, k] = (n - pres - q + np.trace(M0 @ M0)) / s0**2 / 2
            yR2y = yry - np.sum(((M.T + np.eye(q)) @ zry) * (M @ (D @ zry)))
            dl[k] = (yR2y / s0**2 - (n - pres - q + np.trace(M0)) / s0) / 2
            return dl, F

        it, dl = 0, np.full(k + 1, np.inf)
        while np.max(np.abs(dl)) > epsilon and it < max_iter:
            dl, F = score(s, zry, yry)
            s = s + np.linalg.pinv(F) @ dl
            it += 1
        D, M, M0 = parts(s)
        s[k] = (yry - zry @ M @ D @ zry) / (n - pres)
        dl, F = score(s, zry, yry)
        D, M, M0 = parts(s)
        W = np.linalg.inv(D @ stats.ZZ + np.eye(q)) @ D
        C = np.linalg.inv(stats.XX - stats.ZX.T @ W @ stats.ZX)
        beta = C @ (stats.XY[:, g] - stats.ZX.T @ W @ stats.ZY[:, g])
        logdet = np.log(abs(np.linalg.det(M0)))
        out["theta"].append(s)
        out["coef"].append(beta)
        out["se"].append(np.sqrt(np.diag(C) * s[k]))
        out["dlogL"].append(dl)
        out["niter"].append(it)
        out["logLik"].append(-(n - pres) * (1 + np.log(2 * np.pi * s[k])) / 2 + logdet / 2)
    return {key: np.array(value) for key, value in out.items()}


def simulate(d, n=400, m=12, p=3, seed=0, sigma=(0.5, 0.3, 0.2)):
    """Gaussian data from a k-component model with crossed random factors."""
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    Z = np.hstack([np.eye(q)[rng.integers(0, q, n)] for q in d])
    b = np.vstack([rng.normal(0, s, size=(q, m)) for q, s in zip(d, sigma[: len(d)], strict=True)])
    Y = X @ rng.normal(size=(p, m)) + Z @ b + rng.normal(size=(n, m))
    return X, Y, Z


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("d", [(10,), (10, 6), (10, 6, 4)])
def test_batched_equals_plain(d, method):
    X, Y, Z = simulate(d)
    stats = scflashmm.summary_stats(X, Y, Z)
    fit = scflashmm.lmm(stats, d, method=method)
    ref = plain_lmm(stats, d, method)
    for key in ("theta", "coef", "se", "logLik", "dlogL"):
        np.testing.assert_allclose(getattr(fit, key), ref[key], rtol=1e-8, atol=1e-9, err_msg=key)
    np.testing.assert_array_equal(fit.niter, ref["niter"])


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_eigen_path_equals_dense_path(method):
    X, Y, Z = simulate((15,), m=30, seed=3)
    stats = scflashmm.summary_stats(X, Y, Z)
    fast = scflashmm.lmm(stats, method=method, output_re=True, output_fim=True, kernel="eigen")
    dense = scflashmm.lmm(stats, method=method, output_re=True, output_fim=True, kernel="dense")
    for key in (
        "theta",
        "coef",
        "se",
        "cov",
        "logLik",
        "dlogL",
        "re",
        "fim_beta",
        "fim_theta",
        "se_theta",
    ):
        np.testing.assert_allclose(
            getattr(fast, key), getattr(dense, key), rtol=1e-9, atol=1e-10, err_msg=key
        )
    np.testing.assert_array_equal(fast.niter, dense.niter)


@pytest.mark.parametrize(
    ("d", "choice", "expected"),
    [
        ((15,), "auto", EigenKernel),
        ((15,), "eigen", EigenKernel),
        ((15,), "dense", DenseKernel),
        ((10, 5), "auto", DenseKernel),
        ((10, 5), "dense", DenseKernel),
    ],
)
def test_select_kernel(d, choice, expected):
    X, Y, Z = simulate(d, m=2)
    stats = scflashmm.summary_stats(X, Y, Z)
    zrz = stats.ZZ - stats.ZX @ np.linalg.solve(stats.XX, stats.ZX.T)
    kernel = select_kernel(stats, d, zrz, "REML", kernel=choice)
    assert type(kernel) is expected
    assert kernel.k == len(d)


def loglik(theta, X, y, Z, d, method):
    """REML / ML log-likelihood from the cell-level data (up to a constant)."""
    n = len(y)
    V = theta[-1] * np.eye(n)
    start = 0
    for s, q in zip(theta[:-1], d, strict=True):
        Zi = Z[:, start : start + q]
        V += s * Zi @ Zi.T
        start += q
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    P = Vi - Vi @ X @ np.linalg.solve(XVX, X.T @ Vi)
    ll = -0.5 * (np.linalg.slogdet(V)[1])
    if method == "REML":
        ll -= 0.5 * np.linalg.slogdet(XVX)[1]
        return ll - 0.5 * y @ P @ y
    beta = np.linalg.solve(XVX, X.T @ Vi @ y)
    r = y - X @ beta
    return ll - 0.5 * r @ Vi @ r


@pytest.mark.parametrize("method", ["REML"])
@pytest.mark.parametrize("d", [(8,), (8, 5)])
def test_score_is_derivative_of_loglik(d, method):
    """The analytic REML score (both kernels) equals the numerical gradient of the loglik."""
    X, Y, Z = simulate(d, n=150, m=3, seed=5)
    stats = scflashmm.summary_stats(X, Y, Z)
    theta = np.array([*[0.3, 0.2, 0.1][: len(d)], 0.9])
    m = stats.shape[3]
    A = np.linalg.inv(stats.XX)
    zrz = stats.ZZ - stats.ZX @ A @ stats.ZX.T
    zry = (stats.ZY - stats.ZX @ A @ stats.XY).T
    yry = stats.Ynorm - np.einsum("pm,pm->m", stats.XY, A @ stats.XY)
    for choice in ["eigen", "dense"] if len(d) == 1 else ["dense"]:
        kernel = select_kernel(stats, d, zrz, method, kernel=choice)
        state = kernel.prepare(zry, yry)
        dl, _ = kernel.score_information(state, np.tile(theta, (m, 1)))
        for g in range(m):
            h = 1e-6
            numeric = [
                (
                    loglik(theta + h * e, X, Y[:, g], Z, d, method)
                    - loglik(theta - h * e, X, Y[:, g], Z, d, method)
                )
                / (2 * h)
                for e in np.eye(len(theta))
            ]
            np.testing.assert_allclose(dl[g], numeric, rtol=1e-5, atol=1e-6)


def test_statsmodels_mixedlm_agrees():
    """Independent oracle: statsmodels MixedLM (REML, one grouping factor)."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(11)
    n, groups = 600, 12
    g = rng.integers(0, groups, n)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.eye(groups)[g]
    Y = np.column_stack(
        [X @ [1.0, 0.5] + rng.normal(0, 0.7, groups)[g] + rng.normal(size=n) for _ in range(3)]
    )
    fit = scflashmm.lmm_fit(Y, X, Z)
    for j in range(Y.shape[1]):
        res = sm.MixedLM(Y[:, j], X, groups=g).fit(reml=True)
        np.testing.assert_allclose(fit.coef[j], res.fe_params, rtol=1e-5)
        np.testing.assert_allclose(fit.se[j], res.bse_fe, rtol=1e-4)
        np.testing.assert_allclose(
            fit.theta[j], [np.asarray(res.cov_re)[0, 0], res.scale], rtol=1e-4
        )


def test_nonconvergence_is_a_warning_and_a_flag():
    X, Y, Z = simulate((10,), m=5)
    with pytest.warns(scflashmm.ConvergenceWarning, match="5 feature"):
        fit = scflashmm.lmm_fit(Y, X, Z, max_iter=1)
    assert not fit.converged.any()
    assert (fit.niter == 1).all()


def test_to_frame():
    X, Y, Z = simulate((10,), m=4)
    fit = scflashmm.lmm_fit(
        Y,
        X,
        Z,
        feature_names=list("abcd"),
        covariate_names=["icpt", "x1", "x2"],
        component_names=["sam"],
    )
    frame = fit.to_frame()
    assert list(frame.index) == list("abcd")
    assert {"x1_coef", "x1_se", "x1_t", "x1_p", "theta_sam", "theta_residual", "converged"} <= set(
        frame.columns
    )
    np.testing.assert_array_equal(frame["x1_coef"], fit.coef[:, 1])


@pytest.mark.parametrize("d", [(10,), (10, 6)])
def test_threads_do_not_change_results(d, monkeypatch):
    """Blocks of genes fit in threads give the same numbers as one thread, bit for bit."""
    X, Y, Z = simulate(d, m=40, seed=7)
    stats = scflashmm.summary_stats(X, Y, Z)
    monkeypatch.setattr(core_fit, "_block_size", lambda q, p, k: 7)  # six blocks of genes
    one = scflashmm.lmm(stats, d, n_jobs=1, df="satterthwaite")
    two = scflashmm.lmm(stats, d, n_jobs=2, df="satterthwaite")
    for key in ("coef", "se", "p", "theta", "logLik", "df_satterthwaite"):
        np.testing.assert_array_equal(getattr(one, key), getattr(two, key), err_msg=key)
    with pytest.raises(ValueError, match="n_jobs"):
        scflashmm.lmm(stats, d, n_jobs=0)
