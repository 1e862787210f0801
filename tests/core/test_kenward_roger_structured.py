"""Kenward-Roger for lme4-style terms (random slopes, ``||``, crossed) against pbkrtest.

Oracle: tests/data/lme4/kenward_roger (``make.R`` there; lme4 1.1-31, pbkrtest 0.5.2,
lmerTest 3.1-3): pbkrtest's ``vcovAdj`` and ``Lb_ddf`` on sleepstudy ``(Days | Subject)`` and
``(Days || Subject)``, on six simulated single-cell genes ``(1 + x | donor)`` (three of them
singular fits) and on three of them with a crossed factor, ``(1 + x | donor) + (1 | ct)`` (the
dense path), and lmerTest's Satterthwaite df of the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import scflashmm
from scflashmm._core.kenward_roger import kenward_roger
from scflashmm._core.structure import CovarianceStructure
from scflashmm._core.structured import zz_blocks
from scflashmm._core.sumstats import summary_stats
from scflashmm._random_terms import random_design

DATA = Path(__file__).parents[1] / "data" / "lme4"
RESULTS = json.loads((DATA / "kenward_roger" / "results.json").read_text())


def _lme4_theta(ref: dict, structure: CovarianceStructure) -> np.ndarray:
    """lme4's VarCorr variances and covariances in the structure's order, then sigma^2."""
    vc = ref["varcorr"]
    values = {
        (grp.split(".")[0], v1, v2): x
        for grp, v1, v2, x in zip(vc["grp"], vc["var1"], vc["var2"], vc["vcov"], strict=True)
    }
    keys = [
        (t.group, t.effects[a], "") if a == b else (t.group, t.effects[b], t.effects[a])
        for t in structure.terms
        for a, b in t.entries
    ]
    return np.array([values[k] for k in keys] + [ref["sigma2"]])


def _case(name: str):
    """Summary statistics, structure, fixed-effect names and pbkrtest's results of a case."""
    if name.startswith("sleepstudy"):
        data = pd.read_csv(DATA / "sleepstudy" / "data.csv")
        key = name.split("/")[1]
        formula = {"correlated": "(Days | Subject)", "uncorrelated": "(Days || Subject)"}[key]
        fixed, responses, refs = ["Days"], ["Reaction"], [RESULTS["sleepstudy"][key]]
    else:
        data = pd.read_csv(DATA / "simulated_sc" / "data.csv")
        data["groupB"] = (data["group"] == "B").astype(float)
        data["ct"] = np.array(["a", "b", "c"])[np.arange(len(data)) % 3]  # as make.R
        formula, fixed = "(1 + x | donor)", ["x", "groupB"]
        if name == "crossed":
            formula += " + (1 | ct)"
        responses = list(RESULTS[name])
        refs = [RESULTS[name][g] for g in responses]
    rd = random_design(formula, data)
    X = np.column_stack([np.ones(len(data)), *(data[c].to_numpy(float) for c in fixed)])
    stats = summary_stats(X, data[responses].to_numpy(float), rd.Z)
    return stats, rd.structure, ["(Intercept)", *fixed], refs


def _expected(refs: list[dict]) -> dict[str, np.ndarray]:
    return {
        "se": np.array([list(r["se_kr"].values()) for r in refs]),
        "df": np.array([list(r["df_kr"].values()) for r in refs]),
        "contrast": np.array(refs[0]["contrast"], dtype=float)[:, None],
        "contrast_se": np.array([r["contrast_se_kr"] for r in refs]),
        "contrast_df": np.array([r["contrast_df_kr"] for r in refs]),
    }


CASES = ["sleepstudy/correlated", "sleepstudy/uncorrelated", "simulated_sc", "crossed"]


@pytest.mark.parametrize(
    ("case", "blocks"),
    [(c, False) for c in CASES] + [(c, True) for c in CASES[:3]],
    ids=[f"{c}-dense" for c in CASES] + [f"{c}-block" for c in CASES[:3]],
)
def test_at_lme4_variances_equals_pbkrtest(case, blocks):
    """The formulas at lme4's (co)variances reproduce pbkrtest to rounding (singular fits too)."""
    stats, structure, _, refs = _case(case)
    theta = np.array([_lme4_theta(r, structure) for r in refs])
    labels = zz_blocks(stats, structure) if blocks else None
    # one block per subject / donor, except with the crossed factor (one block: dense)
    assert (labels is not None) == blocks
    kr = kenward_roger(stats.XX, stats.ZX, stats.ZZ, stats.n, structure, theta, labels=labels)
    ref = _expected(refs)
    # pbkrtest sqrt(diag(vcovAdj)) and Lb_ddf, at the same variances: 1e-10 relative
    np.testing.assert_allclose(kr.se(), ref["se"], rtol=1e-10)
    np.testing.assert_allclose(kr.df(), ref["df"], rtol=1e-10)
    np.testing.assert_allclose(kr.se(ref["contrast"])[:, 0], ref["contrast_se"], rtol=1e-10)
    np.testing.assert_allclose(kr.df(ref["contrast"])[:, 0], ref["contrast_df"], rtol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_fit_with_kenward_roger_df_equals_pbkrtest(case):
    """lmm(structure=..., df="kenward-roger") after our own REML fit, coefficients and contrasts."""
    stats, structure, names, refs = _case(case)
    fit = scflashmm.lmm(
        stats, structure=structure, df="kenward-roger", covariate_names=names, criterion="relative"
    )
    ref = _expected(refs)
    # pbkrtest's adjusted se and KR df (1e-4 relative asked; ~1e-7 reached: the REML optima
    # of lme4's tight refit and ours differ by ~1e-7 in the variances). The scale-free
    # convergence test (tl's default) converges the `||` case, fit by the component kernels
    # over variances >= 0, to ~1e-9; FLASHMM's absolute one stops at ~1e-5 there.
    np.testing.assert_allclose(fit.se, ref["se"], rtol=1e-6)
    np.testing.assert_allclose(fit.df_kenward_roger, ref["df"], rtol=1e-6)
    table = scflashmm.lmm_test(fit, contrast=ref["contrast"])
    est = np.array([r["contrast_estimate"] for r in refs])
    np.testing.assert_allclose(table.iloc[:, 0], est, rtol=1e-6)
    np.testing.assert_allclose(table.iloc[:, 0] / table.iloc[:, 1], ref["contrast_se"], rtol=1e-6)
    np.testing.assert_allclose(table.iloc[:, 3], ref["contrast_df"], rtol=1e-6)
    # the unadjusted covariance is kept (lme4's vcov), the p-values use the KR df
    np.testing.assert_allclose(
        np.sqrt(np.diagonal(fit.cov, axis1=1, axis2=2)),
        [list(r["se"].values()) for r in refs],
        rtol=1e-6,
    )
    np.testing.assert_allclose(fit.t, fit.coef / fit.se)
    # the solver's covariance and information are those of kenward_roger at its estimate
    alone = kenward_roger(stats.XX, stats.ZX, stats.ZZ, stats.n, structure, fit.theta)
    np.testing.assert_allclose(alone.se(), fit.se, rtol=1e-10)
    np.testing.assert_allclose(alone.df(), fit.df_kenward_roger, rtol=1e-10)


@pytest.mark.parametrize("case", ["simulated_sc", "crossed"])
def test_satterthwaite_random_slopes_equals_lmertest(case):
    """lmerTest's Satterthwaite df on the simulated random-slope designs, singular fits included.

    lmerTest differentiates on lme4's Cholesky scale, where a singular fit (g4 to g6: a
    correlation of +-1, no donor variance; crossed g2, g3: no ct variance) is still a
    stationary point; so does our observed information (docs/model.md, Random-effects
    structures).
    """
    stats, structure, names, refs = _case(case)
    fit = scflashmm.lmm(stats, structure=structure, df="satterthwaite", covariate_names=names)
    assert sum(r["singular"] for r in refs) >= 2
    expected = np.array([list(r["df_satterthwaite"].values()) for r in refs])
    # numerical derivatives on both sides (lmerTest: numDeriv's Richardson extrapolation)
    np.testing.assert_allclose(fit.df_satterthwaite, expected, rtol=1e-5)
    contrast = np.array(refs[0]["contrast"], dtype=float)[:, None]
    table = scflashmm.lmm_test(fit, contrast=contrast)
    np.testing.assert_allclose(
        table.iloc[:, 3], [r["contrast_df_satterthwaite"] for r in refs], rtol=1e-5
    )


def test_components_as_structure_equal_components():
    """FLASHMM's components given as d, as a structure, and block by block: one algorithm."""
    rng = np.random.default_rng(3)
    donor = np.repeat(np.arange(6), 30)
    ct = rng.integers(0, 3, donor.size)
    obs = pd.DataFrame({"donor": donor.astype(str), "ct": ct.astype(str)})
    rd = random_design("(1 | donor/ct)", obs)
    X = np.column_stack([np.ones(donor.size), rng.normal(size=donor.size), donor % 2])
    stats = summary_stats(X, rng.normal(size=(donor.size, 2)), rd.Z)
    structure = rd.structure
    assert structure.d is not None and len(structure.d) == 2
    labels = zz_blocks(stats, structure)
    assert labels is not None and labels.max() == 5
    theta = np.array([[0.3, 0.1, 1.0], [0.0, 0.2, 0.8], [0.05, 0.0, 1.2]])
    args = (stats.XX, stats.ZX, stats.ZZ, stats.n)
    ref = kenward_roger(*args, structure.d, theta)
    for other in (
        kenward_roger(*args, structure, theta),
        kenward_roger(*args, structure, theta, labels=labels),
    ):
        for key in ("cov", "cov_adjusted", "dprec", "W"):
            np.testing.assert_allclose(
                getattr(other, key), getattr(ref, key), rtol=1e-10, atol=1e-14, err_msg=key
            )


def test_bad_input_and_schur_path():
    stats, structure, _, _ = _case("sleepstudy/correlated")
    theta = np.ones((1, 4))
    args = (stats.XX, stats.ZX, stats.ZZ, stats.n, structure)
    with pytest.raises(ValueError, match="k \\+ 1 = 4 columns"):
        kenward_roger(*args, theta[:, :3])
    with pytest.raises(ValueError, match="single random component"):
        kenward_roger(*args, theta, eigen=True)
    with pytest.raises(ValueError, match="couples columns of different blocks"):
        kenward_roger(*args, theta, labels=np.arange(structure.q))
    with pytest.raises(ValueError, match="q = 36 columns; Z'Z has 3"):
        kenward_roger(stats.XX, stats.ZX[:3], np.eye(3), stats.n, structure, theta)
    with pytest.raises(ValueError, match="needs method='REML'"):
        scflashmm.lmm(stats, structure=structure, method="ML", df="kenward-roger")
    crossed, crossed_structure, _, _ = _case("crossed")  # (1 + x | donor) + (1 | ct)
    with pytest.raises(ValueError, match="df='kenward-roger' is not available on the Schur"):
        scflashmm.lmm(crossed, structure=crossed_structure, df="kenward-roger", kernel="schur")


def test_dense_problem_uses_its_information_consistently():
    """Crossed terms (one block of Z'Z, the dense problem): the fit's KR == the formulas alone."""
    data = pd.read_csv(DATA / "simulated_sc" / "data.csv")
    data["ct"] = np.array(["a", "b", "c"])[np.arange(len(data)) % 3]  # crosses the donors
    rd = random_design("(1 + x | donor) + (1 | ct)", data)
    X = np.column_stack([np.ones(len(data)), data["x"].to_numpy(float)])
    stats = summary_stats(X, data[["g1", "g2", "g3"]].to_numpy(float), rd.Z)
    assert zz_blocks(stats, rd.structure) is None
    fit = scflashmm.lmm(stats, structure=rd.structure, df="kenward-roger")
    assert fit.kernel == "dense"
    alone = kenward_roger(stats.XX, stats.ZX, stats.ZZ, stats.n, rd.structure, fit.theta)
    np.testing.assert_allclose(fit.se, alone.se(), rtol=1e-10)
    np.testing.assert_allclose(fit.df_kenward_roger, alone.df(), rtol=1e-10)
    np.testing.assert_allclose(fit.cov_adjusted, alone.cov_adjusted, rtol=1e-10)
