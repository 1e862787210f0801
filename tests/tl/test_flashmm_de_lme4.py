"""lme4-style random terms end to end: tl.flashmm_de and lmm(structure=...) against lme4.

The oracles are in tests/data/lme4 (one folder per case, with the R script that made them):
lme4's ``fixef`` and ``sqrt(diag(vcov))`` from refits with tight optimiser tolerances, its
``VarCorr``, and lmerTest's Satterthwaite df where stored.
"""

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scflashmm as sfm
from scflashmm._core.fit import lmm
from scflashmm._core.structured import StructuredLMMFit
from scflashmm._core.structured import driver as structured_driver
from scflashmm._core.sumstats import summary_stats
from scflashmm._random_terms import random_design

DATA = Path(__file__).parents[1] / "data" / "lme4"


def _case(case: str):
    path = DATA / case / "data.csv"
    data = pd.read_csv(path if path.exists() else DATA / case / "data.csv.gz")
    return data, json.loads((DATA / case / "results.json").read_text())


def _adata(data: pd.DataFrame, responses: list[str]) -> ad.AnnData:
    obs = data.drop(columns=responses)
    obs.index = obs.index.astype(str)
    for c in obs.columns:
        if not pd.api.types.is_numeric_dtype(obs[c]):
            obs[c] = obs[c].astype("category")
    adata = ad.AnnData(data[responses].to_numpy(float), obs=obs)
    adata.var_names = responses
    return adata


def _lme4_varcorr(ref: dict) -> dict[str, float]:
    """lme4's VarCorr as ``{"grp: var1": variance, "grp: corr(var1, var2)": r}``."""
    vc = ref["varcorr"]
    out = {}
    for grp, v1, v2, vcov, sdcor in zip(
        vc["grp"], vc["var1"], vc["var2"], vc["vcov"], vc["sdcor"], strict=True
    ):
        grp = grp.split(".")[0]
        if grp == "Residual":
            out["residual"] = vcov
        elif not v2:
            out[f"{grp}: {v1}"] = vcov
        else:
            out[f"{grp}: corr({v1}, {v2})"] = sdcor
    return out


def _check(adata: ad.AnnData, gene: str, ref: dict, *, corr_atol: float = 1e-4) -> None:
    coef = adata.varm["flashmm_coef"].loc[gene].to_numpy()
    se = adata.varm["flashmm_se"].loc[gene].to_numpy()
    # lme4 fixef and sqrt(diag(vcov)) (tight refits): coef 1e-5 and se 1e-4 relative.
    np.testing.assert_allclose(coef, list(ref["coef"].values()), rtol=1e-5)
    np.testing.assert_allclose(se, list(ref["se"].values()), rtol=1e-4)
    theta = adata.varm["flashmm_theta"].loc[gene]
    scale = ref["sigma2"]
    for name, value in _lme4_varcorr(ref).items():
        name = name.replace("cask:batch", "batch:cask")  # lme4's name of the inner pastes term
        if ": corr(" in name:
            # correlations at +-1 (singular fits) and well inside
            assert theta[name] == pytest.approx(value, abs=corr_atol), name
        else:
            # VarCorr variances: relative 1e-5, absolute floor near the boundary
            assert theta[name] == pytest.approx(value, rel=1e-5, abs=1e-7 * scale), name


def test_simulated_single_cell_with_singular_fits():
    data, res = _case("simulated_sc")
    genes = list(res["genes"])
    adata = _adata(data, genes)
    sfm.tl.flashmm_de(adata, "~x+group", "(1 + x | donor)")
    theta = adata.varm["flashmm_theta"]
    assert list(theta.columns) == [
        "donor: (Intercept)",
        "donor: corr((Intercept), x)",
        "donor: x",
        "residual",
    ]
    assert sum(res["genes"][g]["singular"] for g in genes) >= 2
    for g in genes:
        _check(adata, g, res["genes"][g])
    assert adata.varm["flashmm_se_theta"]["donor: corr((Intercept), x)"].isna().all()
    uns = adata.uns["flashmm"]
    assert uns["random_structure"]["0"]["effects"] == ["(Intercept)", "x"]
    assert uns["solver"] == "block"


@pytest.mark.parametrize(
    ("key", "random", "method"),
    [
        ("correlated", "(Days | Subject)", "REML"),
        ("uncorrelated", "(Days || Subject)", "REML"),
        ("correlated_ml", "(1 + Days | Subject)", "ML"),
    ],
)
def test_sleepstudy_random_slopes(key, random, method):
    data, res = _case("sleepstudy")
    adata = _adata(data, ["Reaction"])
    df = "satterthwaite" if "satterthwaite_df" in res[key] else "residual"
    sfm.tl.flashmm_de(adata, "~Days", random, method=method, df=df)
    _check(adata, "Reaction", res[key])
    if df == "satterthwaite":
        # lmerTest's Satterthwaite df (contest1D): numerical derivatives on both sides
        np.testing.assert_allclose(
            adata.varm["flashmm_df"].loc["Reaction"].to_numpy(),
            list(res[key]["satterthwaite_df"].values()),
            rtol=1e-5,
        )


@pytest.mark.parametrize(
    ("case", "key", "fixed", "random", "response"),
    [
        ("penicillin", "crossed", "~1", "(1 | plate) + (1 | sample)", "diameter"),
        ("pastes", "nested", "~1", "(1 | batch/cask)", "strength"),
        ("pastes", "nested", "~1", ["(1 | batch)", "(1 | batch:cask)"], "strength"),
    ],
)
@pytest.mark.filterwarnings("ignore:adata.X looks like raw counts")
def test_independent_terms_use_component_kernels(case, key, fixed, random, response):
    data, res = _case(case)
    adata = _adata(data, [response])
    sfm.tl.flashmm_de(adata, fixed, random, epsilon=1e-10)
    _check(adata, response, res[key])
    assert adata.uns["flashmm"]["solver"] == "components"


def test_chem97_large_q_schur_through_lmm():
    data, res = _case("chem97")
    ref = res["crossed"]
    rd = random_design("(1 | school) + (1 | lea)", data)
    X = np.column_stack([np.ones(len(data)), data["gcsecnt"].to_numpy(float)])
    stats = summary_stats(X, data[["score"]].to_numpy(float), rd.Z)
    fit = lmm(stats, structure=rd.structure, covariate_names=["(Intercept)", "gcsecnt"])
    assert isinstance(fit, StructuredLMMFit)
    assert fit.kernel == "schur" and rd.structure.q == 2541
    np.testing.assert_allclose(fit.coef[0], list(ref["coef"].values()), rtol=1e-5)
    np.testing.assert_allclose(fit.se[0], list(ref["se"].values()), rtol=1e-4)
    vc = _lme4_varcorr(ref)
    got = dict(zip([*fit.component_names, "residual"], fit.theta[0], strict=True))
    for name in ("school: (Intercept)", "residual"):
        assert got[name] == pytest.approx(vc[name], rel=1e-5)
    # the lea variance is weakly determined (131 levels, 1% of the school variance)
    assert got["lea: (Intercept)"] == pytest.approx(vc["lea: (Intercept)"], rel=1e-4)


def test_lmm_structure_scalar_equals_d():
    data, _ = _case("penicillin")
    rd = random_design("(1 | plate) + (1 | sample)", data)
    stats = summary_stats(np.ones((len(data), 1)), data[["diameter"]].to_numpy(float), rd.Z)
    a = lmm(stats, structure=rd.structure)  # lme4's boundary by default for lme4-style terms
    b = lmm(stats, rd.structure.d, nonnegative=True)
    np.testing.assert_array_equal(a.coef, b.coef)
    assert a.nonnegative and not lmm(stats, rd.structure.d).nonnegative
    assert a.component_names == ["plate: (Intercept)", "sample: (Intercept)"]
    # forced structured solver (lme4's parameterisation) agrees at the optimum
    c = lmm(stats, structure=rd.structure, kernel="schur")
    np.testing.assert_allclose(c.coef, a.coef, rtol=1e-6)
    with pytest.raises(ValueError, match="either d or structure"):
        lmm(stats, rd.structure.d, structure=rd.structure)
    with pytest.raises(TypeError, match="CovarianceStructure"):
        lmm(stats, structure="(1 | plate)")


@pytest.mark.filterwarnings("ignore:adata.X looks like raw counts")
def test_structured_options_and_memory_guard(monkeypatch):
    data, _ = _case("sleepstudy")
    rd = random_design("(Days | Subject)", data)
    X = np.column_stack([np.ones(len(data)), data["Days"].to_numpy(float)])
    stats = summary_stats(X, data[["Reaction"]].to_numpy(float), rd.Z)
    with pytest.raises(ValueError, match="theta0"):
        lmm(stats, structure=rd.structure, theta0=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="eigen"):
        lmm(stats, structure=rd.structure, kernel="eigen")
    monkeypatch.setattr(structured_driver, "MEMORY_BUDGET", 1000)
    with pytest.raises(MemoryError, match="q = 36"):
        lmm(stats, structure=rd.structure)
    adata = _adata(data, ["Reaction"])
    with pytest.raises(MemoryError, match="q = 36"):
        sfm.tl.flashmm_de(adata, "~Days", "(Days | Subject)")
    assert "flashmm" not in adata.uns


def _errors_obs() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 40
    return pd.DataFrame(
        {
            "donor": pd.Categorical(np.repeat([f"d{i}" for i in range(4)], 10)),
            "one": pd.Categorical(["a"] * n),
            "label": pd.Categorical(rng.choice(["u", "v"], n)),
            "time": rng.normal(size=n),
            "cell": pd.Categorical([f"c{i}" for i in range(n)]),
        },
        index=[f"c{i}" for i in range(n)],
    )


@pytest.mark.parametrize(
    ("fixed", "random", "error", "match"),
    [
        ("~time", "(1 + time | donor", ValueError, "Unbalanced"),
        ("~time", "(1 | donor) + donor", ValueError, "Cannot parse random-effects term 'donor'"),
        ("~time", "(1 | nosuch)", ValueError, "'nosuch'"),
        ("~time", "(0 + nosuch | donor)", ValueError, "'nosuch'"),
        ("~time", "(1 + label | donor)", ValueError, "not numeric"),
        ("~time", "(1 | one)", ValueError, "1 level"),
        ("~donor", "(1 | donor)", ValueError, "collinear with the fixed design"),
        ("~time", "(1 + time | cell)", ValueError, "cannot be identified"),
        ("~time", ["(1 | donor)", "label"], ValueError, "mixes lme4-style"),
    ],
)
def test_errors_before_the_pass(fixed, random, error, match):
    obs = _errors_obs()
    adata = ad.AnnData(np.ones((len(obs), 2)), obs=obs)
    with pytest.raises(error, match=match):
        sfm.tl.flashmm_de(adata, fixed, random)
    assert "flashmm" not in adata.uns


def test_variance_components_plot_shows_correlations():
    pytest.importorskip("matplotlib")
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    data, res = _case("simulated_sc")
    adata = _adata(data, list(res["genes"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sfm.tl.flashmm_de(adata, "~x+group", "(1 + x | donor)")
    ax = sfm.pl.variance_components(adata, show=False)
    fig = ax.figure
    assert len(fig.axes) == 2
    assert "correlation" in fig.axes[1].get_xlabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lab.startswith("donor: x") for lab in labels)
    plt.close(fig)
