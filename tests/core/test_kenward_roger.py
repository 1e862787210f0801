"""Kenward-Roger from summary statistics against pbkrtest (via lmerTest) and a dense transcription.

Oracles:
- tests/data/reference_kenward_roger (lme4 1.1-31, lmerTest 3.1-3, pbkrtest 0.5.2; one random
  intercept per sample): b_simu_reml_counts (no singular fit) and fewdonor_3v3 (15 of 30 genes
  singular); tests/data/lme4_boundary: two crossed components, 17 of 24 genes singular.
- pbkrtest's vcovAdj / Lb_ddf transcribed with n x n matrices (below), on a small random design.

Tolerances. Evaluated at lme4's variance estimates the reduced formulas reproduce lmerTest's
adjusted se and df to ~1e-10 relative (the accuracy asked of Kenward-Roger here is 1e-3 for se and
1 % for df): we assert 1e-7,
room for BLAS differences. After our own nonnegative fit the variances differ from lme4's by its
optimiser tolerance (see test_nonnegative.py), so there we assert those 1e-3 and 1 % (we
see ~6e-5 for se, ~1e-5 for df).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _reference import REFERENCE, load_case
from test_nonnegative import CASES, fewdonor, lme4_coef
from test_reml import simulate

import scflashmm
from scflashmm._core.kenward_roger import kenward_roger, kenward_roger_df

CASE_B = REFERENCE.parent / "reference_kenward_roger" / "b_simu_reml_counts"


def _case_b() -> dict:
    ref = load_case("b")
    ss = ref["ss"]
    co = pd.read_csv(CASE_B / "kr_coef.csv")
    ct = pd.read_csv(CASE_B / "kr_contrast.csv")
    weights = pd.read_csv(CASE_B / "contrast_vector.csv")
    terms = list(ref["X"].columns)
    assert list(weights["term"]) == terms
    p = len(terms)
    return {
        "stats": (ss["XX"], ss["ZX"], ss["ZZ"], int(ss["n"])),
        "d": (ss["ZZ"].shape[0],),
        "theta": pd.read_csv(CASE_B / "lme4_variances.csv")[["var_sam", "var_res"]].to_numpy(),
        "contrast": weights["weight"].to_numpy(dtype=float)[:, None],
        "se": co["se_kr"].to_numpy().reshape(-1, p),
        "df": co["df_kr"].to_numpy().reshape(-1, p),
        "contrast_se": ct["se_kr"].to_numpy(),
        "contrast_df": ct["df_kr"].to_numpy(),
    }


def _lme4_case(name: str) -> dict:
    case = CASES[name]()
    st = case["stats"]
    table = case["contrast_table"]
    table = table[table["ddf"] == "Kenward-Roger"]
    return {
        "stats": (st.XX, st.ZX, st.ZZ, st.n),
        "d": case["d"],
        "theta": case["variances"][case["var_columns"]].to_numpy(),
        "contrast": case["contrast"],
        "se": lme4_coef(case, "Kenward-Roger", "se"),
        "df": lme4_coef(case, "Kenward-Roger", "df"),
        "contrast_se": table["se"].to_numpy(dtype=float),
        "contrast_df": table["df"].to_numpy(dtype=float),
    }


REFERENCES = {
    "b_simu_reml_counts": _case_b,
    "fewdonor_3v3": lambda: _lme4_case("fewdonor_3v3"),
    "lme4_boundary": lambda: _lme4_case("lme4_boundary"),
}


@pytest.mark.parametrize("eigen", [None, False])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_matches_pbkrtest_at_lme4_variances(name, eigen):
    """Adjusted se and df of every coefficient and the contrast, singular fits included."""
    ref = REFERENCES[name]()
    kr = kenward_roger(*ref["stats"], ref["d"], ref["theta"], eigen=eigen)
    np.testing.assert_allclose(kr.se(), ref["se"], rtol=1e-7)
    np.testing.assert_allclose(kr.df(), ref["df"], rtol=1e-7)
    np.testing.assert_allclose(kr.se(ref["contrast"])[:, 0], ref["contrast_se"], rtol=1e-7)
    np.testing.assert_allclose(kr.df(ref["contrast"])[:, 0], ref["contrast_df"], rtol=1e-7)


@pytest.mark.parametrize("kernel", ["auto", "dense"])
@pytest.mark.parametrize("name", list(CASES))
def test_lmm_kenward_roger_matches_pbkrtest(name, kernel):
    """The whole path: lmm(nonnegative=True, df="kenward-roger"), coefficients and contrasts."""
    case = CASES[name]()
    ref = _lme4_case(name)
    fit = scflashmm.lmm(
        case["stats"],
        case["d"],
        nonnegative=True,
        df="kenward-roger",
        epsilon=1e-8,
        kernel=kernel,
        covariate_names=case["terms"],
    )
    assert fit.df_method == "kenward-roger" and fit.converged.all()
    np.testing.assert_array_equal(fit.singular, case["variances"]["singular"])
    kr = kenward_roger(*ref["stats"], ref["d"], fit.theta)
    np.testing.assert_allclose(kr.cov, fit.cov, rtol=1e-10, atol=1e-14)  # same Phi as the fit
    np.testing.assert_allclose(fit.se, ref["se"], rtol=1e-3)  # adjusted se, as lmerTest
    np.testing.assert_allclose(fit.df_kenward_roger, ref["df"], rtol=1e-2)
    np.testing.assert_allclose(fit.t, fit.coef / fit.se, rtol=1e-12)
    _, se, df = fit.contrast_estimates(ref["contrast"])
    np.testing.assert_allclose(se[:, 0], ref["contrast_se"], rtol=1e-3)
    np.testing.assert_allclose(df[:, 0], ref["contrast_df"], rtol=1e-2)
    table = scflashmm.lmm_test(fit, contrast=ref["contrast"])
    np.testing.assert_allclose(table["contrast1_df"], ref["contrast_df"], rtol=1e-2)
    lme4 = case["contrast_table"]
    lme4 = lme4[lme4["ddf"] == "Kenward-Roger"]
    np.testing.assert_allclose(table["contrast1_t"], lme4["t"].to_numpy(float), rtol=1e-3)
    coefficients = scflashmm.lmm_test(fit)
    np.testing.assert_allclose(coefficients.filter(like="_p").to_numpy(), fit.p, rtol=1e-12)
    # the unadjusted residual-df test of the same fit uses the unadjusted se
    residual = scflashmm.lmm_test(fit, df="residual")
    np.testing.assert_allclose(
        residual.filter(like="_t").to_numpy(), fit.coef / np.sqrt(np.diagonal(fit.cov, 0, 1, 2))
    )


def test_lmm_boundary_df_as_lmertest():
    """Through lmm: at singular fits Satterthwaite gives n - p, Kenward-Roger donor-scale df."""
    case = fewdonor()
    singular = case["variances"]["singular"].to_numpy()
    n, p = case["stats"].n, len(case["terms"])
    trt = [j for j, t in enumerate(case["terms"]) if t.endswith(":trtB")]
    fits = {
        df: scflashmm.lmm(case["stats"], case["d"], nonnegative=True, df=df, epsilon=1e-8)
        for df in ("satterthwaite", "kenward-roger")
    }
    satt = fits["satterthwaite"].df_satterthwaite
    np.testing.assert_allclose(satt[singular], n - p, rtol=1e-12)
    np.testing.assert_allclose(satt, lme4_coef(case, "Satterthwaite", "df"), rtol=1e-3)
    kr = fits["kenward-roger"].df_kenward_roger[singular][:, trt]
    assert np.all((kr > 2) & (kr < 10))
    lme4 = case["contrast_table"]
    lme4 = lme4[lme4["ddf"] == "Satterthwaite"]
    _, se, df = fits["satterthwaite"].contrast_estimates(case["contrast"])
    np.testing.assert_allclose(df[:, 0], lme4["df"].to_numpy(float), rtol=1e-3)
    np.testing.assert_allclose(se[:, 0], lme4["se"].to_numpy(float), rtol=1e-4)


def test_boundary_keeps_donor_scale_df():
    """At a singular fit lmerTest's Satterthwaite gives n - p; Kenward-Roger keeps small df."""
    case = fewdonor()
    ref = _lme4_case("fewdonor_3v3")
    singular = case["variances"]["singular"].to_numpy()
    assert np.all(case["variances"]["var_sam"][singular] < 1e-14)
    n, p = case["stats"].n, len(case["terms"])
    trt = [j for j, t in enumerate(case["terms"]) if t.endswith(":trtB")]
    satterthwaite = lme4_coef(case, "Satterthwaite", "df")
    np.testing.assert_allclose(satterthwaite[singular][:, trt], n - p, rtol=1e-8)
    theta = ref["theta"].copy()
    theta[singular, 0] = 0.0  # exactly at the boundary
    kr = kenward_roger(*ref["stats"], ref["d"], theta)
    df = kr.df()[singular][:, trt]
    assert np.all(np.isfinite(kr.W[singular])) and np.all((df > 2) & (df < 10))
    assert np.all(kr.se()[singular] > np.sqrt(np.diagonal(kr.cov[singular], axis1=1, axis2=2)))
    np.testing.assert_allclose(df, ref["df"][singular][:, trt], rtol=1e-7)


# --------------------------------------------------------------------------- dense transcription


def pbkrtest_dense(X, Z, d, theta, L):
    """pbkrtest 0.5.2's vcovAdj_internal and ddf_Lb, one gene, with n x n matrices."""
    n = X.shape[0]
    G = []
    start = 0
    for q in d:
        Zi = Z[:, start : start + q]
        G.append(Zi @ Zi.T)
        start += q
    G.append(np.eye(n))
    Sigma = sum(t * g for t, g in zip(theta, G, strict=True))
    SigmaInv = np.linalg.inv(Sigma)
    Phi = np.linalg.inv(X.T @ SigmaInv @ X)
    m = len(G)
    TT = SigmaInv @ X
    HH = [g @ SigmaInv for g in G]
    OO = [h @ X for h in HH]
    PP = [-(o.T @ TT) for o in OO]
    QQ = {(r, s): OO[r].T @ SigmaInv @ OO[s] for r in range(m) for s in range(m)}
    K = np.array([[np.sum(HH[r].T * HH[s]) for s in range(m)] for r in range(m)])
    IE2 = np.array(
        [
            [
                K[i, j] - 2 * np.sum(Phi * QQ[i, j]) + np.sum((Phi @ PP[i]) * (PP[j] @ Phi))
                for j in range(m)
            ]
            for i in range(m)
        ]
    )
    WW = 2 * np.linalg.inv(IE2)
    UU = sum(WW[i, j] * (QQ[i, j] - PP[i] @ Phi @ PP[j]) for i in range(m) for j in range(m))
    PhiA = Phi + 2 * Phi @ UU @ Phi
    # ddf_Lb, general formula (l = 1)
    vlb = L @ Phi @ L
    Theta = np.outer(L, L) / vlb
    A1 = A2 = 0.0
    for i in range(m):
        for j in range(i, m):
            e = 1 if i == j else 2
            ui = Theta @ Phi @ PP[i] @ Phi
            uj = Theta @ Phi @ PP[j] @ Phi
            A1 += e * WW[i, j] * np.trace(ui) * np.trace(uj)
            A2 += e * WW[i, j] * np.sum(ui * uj.T)
    B = (A1 + 6 * A2) / 2
    g = (2 * A1 - 5 * A2) / (3 * A2)
    c1, c2, c3 = g / (5 - 2 * g), (1 - g) / (5 - 2 * g), (3 - g) / (5 - 2 * g)
    rho = ((1 - A2) / (1 - c2 * B)) ** 2 * (1 + c1 * B) / (1 - c3 * B)
    return PhiA, 4 + 3 / (rho - 1)


@pytest.mark.parametrize(
    "theta",
    [(0.3, 0.2, 1.1), (0.0, 0.25, 0.9), (0.0, 0.0, 1.3)],
    ids=["interior", "one-at-zero", "both-at-zero"],
)
def test_two_components_equal_dense_pbkrtest(theta):
    d = (7, 4)
    X, _, Z = simulate(d, n=90, m=1, p=3, seed=4)
    L = np.array([0.0, 1.0, -1.0])
    theta = np.array(theta)
    kr = kenward_roger(X.T @ X, Z.T @ X, Z.T @ Z, X.shape[0], d, theta[None])
    for j, contrast in enumerate([*np.eye(3), L]):
        cov_adj, df = pbkrtest_dense(X, Z, d, theta, contrast)
        if j == 0:
            np.testing.assert_allclose(kr.cov_adjusted[0], cov_adj, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(kr.df(contrast[:, None])[0, 0], df, rtol=1e-8)
    np.testing.assert_allclose(kr.df()[0], [kr.df(e[:, None])[0, 0] for e in np.eye(3)])


def test_one_component_eigen_equals_dense():
    d = (12,)
    X, _, Z = simulate(d, n=120, m=1, p=4, seed=8)
    rng = np.random.default_rng(1)
    theta = np.column_stack([rng.uniform(0, 0.5, 20), rng.uniform(0.5, 2, 20)])
    theta[:5, 0] = 0
    args = (X.T @ X, Z.T @ X, Z.T @ Z, X.shape[0], d, theta)
    eig, dense = kenward_roger(*args), kenward_roger(*args, eigen=False)
    for key in ("cov", "cov_adjusted", "dprec", "dcov", "W"):
        np.testing.assert_allclose(
            getattr(eig, key), getattr(dense, key), rtol=1e-9, atol=1e-13, err_msg=key
        )
    contrast = rng.normal(size=(4, 3))
    np.testing.assert_allclose(
        kenward_roger_df(eig.cov, eig.dprec, eig.W, contrast), dense.df(contrast), rtol=1e-9
    )


@pytest.mark.parametrize(
    ("d", "theta", "eigen", "match"),
    [
        ((3,), np.ones((2, 3)), None, "k \\+ 1 = 2 columns"),
        ((2, 1), np.ones((2, 3)), True, "single random component"),
    ],
)
def test_bad_input(d, theta, eigen, match):
    X = np.eye(3)
    with pytest.raises(ValueError, match=match):
        kenward_roger(X, np.ones((3, 3)), np.eye(3), 10, d, theta, eigen=eigen)


@pytest.mark.parametrize("eigen", [None, False])
def test_genes_without_estimate_stay_nan(eigen):
    """Genes the fit leaves as NaN give NaN, without warnings, and do not change the others."""
    d = (5,)
    X, _, Z = simulate(d, n=50, m=1, p=3, seed=2)
    theta = np.array([[0.1, 1.0], [np.nan, np.nan], [0.0, 1.0]])
    args = (X.T @ X, Z.T @ X, Z.T @ Z, 50, d)
    kr = kenward_roger(*args, theta, eigen=eigen)
    assert np.isnan(kr.se()[1]).all() and np.isnan(kr.df()[1]).all()
    alone = kenward_roger(*args, theta[[0, 2]], eigen=eigen)
    np.testing.assert_allclose(kr.se()[[0, 2]], alone.se(), rtol=1e-12)
    np.testing.assert_allclose(kr.df()[[0, 2]], alone.df(), rtol=1e-12)


# two genes of this case diverge without the constraint (FLASHMM's behaviour)
@pytest.mark.filterwarnings("ignore::scflashmm.ConvergenceWarning")
def test_errors_and_negative_components():
    """KR needs REML; nonnegative needs theta0 >= 0; KR at a negative component is NaN + warning."""
    case = fewdonor()
    stats, d = case["stats"], case["d"]
    with pytest.raises(ValueError, match="needs method='REML'"):
        scflashmm.lmm(stats, d, method="ML", df="kenward-roger")
    with pytest.raises(ValueError, match="must be >= 0 with nonnegative=True"):
        scflashmm.lmm(stats, d, nonnegative=True, theta0=[-0.1, 1.0])
    with pytest.raises(ValueError, match="criterion must be"):
        scflashmm.lmm(stats, d, criterion="absolute")
    with pytest.warns(UserWarning, match="negative variance component") as record:
        fit = scflashmm.lmm(stats, d, df="kenward-roger")  # unconstrained: some s_1 < 0
    negative = fit.theta[:, 0] < 0
    assert negative.any() and not negative.all()
    assert not any("SVD" in str(w.message) for w in record)
    assert np.isnan(fit.df_kenward_roger[negative]).all() and np.isnan(fit.p[negative]).all()
    assert np.isfinite(fit.p[~negative]).all() and np.isfinite(fit.coef).all()
    assert not fit.singular.any()
    # each df method needs a fit with it
    plain = scflashmm.lmm(stats, d)
    for df in ("satterthwaite", "kenward-roger"):
        with pytest.raises(ValueError, match=f"fit with df='{df}'"):
            plain.contrast_estimates(case["contrast"], df=df)
        with pytest.raises(ValueError, match=f"fit with df='{df}'"):
            scflashmm.lmm_test(plain, df=df)
    no_cov = scflashmm.lmm(stats, d, nonnegative=True, df="kenward-roger", output_cov=False)
    assert no_cov.cov_adjusted is None and no_cov.df_kenward_roger is not None
    with pytest.raises(ValueError, match="output_cov=True"):
        no_cov.contrast_estimates(case["contrast"])
    with pytest.raises(ValueError, match="criterion must be"):
        scflashmm.lmm_fit(np.ones((3, 1)), np.ones((3, 1)), np.eye(3), criterion=1)
