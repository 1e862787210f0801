"""scflashmm.datasets.simulate_rnaseq: structure, R conventions, the model's moments, errors."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from scflashmm import lmm_fit
from scflashmm._design import make_design
from scflashmm.datasets import VarianceDistribution, simulate_rnaseq


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    # the call of FLASHMM's example (and of reference case b), in Python names
    return simulate_rnaseq(
        n_genes=50, n_cells=1000, n_samples=25, n_clusters=4, n_de_genes=6, seed=2412
    )


def _dense(adata: ad.AnnData) -> np.ndarray:
    return adata.X.toarray()


# ---------------------------------------------------------------------------------------
# structure and conventions
# ---------------------------------------------------------------------------------------


def test_structure(small):
    a = small
    assert a.shape == (1000, 50)
    assert isinstance(a.X, sp.csr_matrix)
    assert a.X.dtype == np.int32
    assert a.X.has_canonical_format
    assert a.X.data.min() > 0
    assert list(a.obs.columns) == ["sam", "cls", "trt", "libsize"]
    for col in ("sam", "cls", "trt"):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype)
    assert a.obs["libsize"].dtype == np.float64
    assert list(a.var.columns) == [
        "is_de",
        "beta",
        "de_cluster",
        "mu",
        "dispersion",
        "size",
        "reference_gene",
        "var_random_effect",
    ]
    np.testing.assert_array_equal(a.var["var_random_effect"], 0.1)  # the default, every gene
    assert a.var_names[0] == "Gene1"
    assert a.obs_names[0] == "Cell1"
    np.testing.assert_allclose(a.var["dispersion"], 1 / a.var["size"])
    uns = a.uns["simulate_rnaseq"]
    assert uns["treatment"] == "B"
    assert uns["params"]["seed"] == 2412
    assert uns["params"]["n_de_genes"] == 6
    assert sum(uns["n_de_genes_per_cluster"].values()) == 6


def test_r_labels_and_nesting(small):
    obs = small.obs
    assert list(obs["cls"].cat.categories) == ["1", "2", "3", "4"]
    assert list(obs["trt"].cat.categories) == ["A", "B"]
    sams = list(obs["sam"].cat.categories)
    assert sams == sorted(sams)  # R's factor order under the C locale: "A1", "A10", "A2", ...
    # nested: every sample in one treatment, named by it
    per_sample = obs.groupby("sam", observed=True)["trt"].nunique()
    assert (per_sample == 1).all()
    first_trt = obs.groupby("sam", observed=True)["trt"].first()
    assert all(s[0] == t for s, t in first_trt.items())
    assert len(sams) <= 25
    assert obs.groupby("trt", observed=True)["sam"].nunique().min() >= 1


def test_not_nested_samples_are_crossed():
    a = simulate_rnaseq(
        n_genes=5, n_cells=2000, n_samples=6, n_clusters=3, samples_nested=False, seed=1
    )
    assert set(a.obs["sam"].cat.categories) == {f"S{i}" for i in range(1, 7)}
    assert (a.obs.groupby("sam", observed=True)["trt"].nunique() == 2).all()


def test_many_clusters_sorted_as_strings():
    a = simulate_rnaseq(n_genes=12, n_cells=3000, n_clusters=11, seed=3)
    assert list(a.obs["cls"].cat.categories) == sorted(str(k) for k in range(1, 12))
    assert a.uns["simulate_rnaseq"]["params"]["n_de_genes"] == 11  # default: n_clusters


def test_de_genes(small):
    var = small.var
    n_de = 6
    assert var["is_de"].sum() == n_de
    assert var["is_de"].iloc[-n_de:].all()  # as in R: the last genes are DE
    de = var[var["is_de"]]
    assert ((de["beta"].abs() >= 0.25) & (de["beta"].abs() <= 1.0)).all()
    assert (var.loc[~var["is_de"], "beta"] == 0).all()
    assert var.loc[~var["is_de"], "de_cluster"].isna().all()
    # grouped by cluster in label order, matching the per-cluster numbers
    counts = small.uns["simulate_rnaseq"]["n_de_genes_per_cluster"]
    expected = [c for c, k in counts.items() for _ in range(k)]
    assert list(de["de_cluster"].astype(str)) == expected


@pytest.mark.parametrize(
    ("direction", "bounds", "sign"),
    [("up", (0.5, 1.0), 1), ("down", (-1.0, -0.5), -1), ("both", (-1.0, -0.5), 0)],
)
def test_direction(direction, bounds, sign):
    a = simulate_rnaseq(
        n_genes=40,
        n_cells=200,
        n_clusters=2,
        n_de_genes=30,
        direction=direction,
        minbeta=bounds[0],
        maxbeta=bounds[1],
        seed=5,
    )
    beta = a.var.loc[a.var["is_de"], "beta"].to_numpy()
    assert beta.size == 30
    assert ((np.abs(beta) >= 0.5) & (np.abs(beta) <= 1.0)).all()
    if sign:
        assert (np.sign(beta) == sign).all()
    else:
        assert (beta > 0).any() and (beta < 0).any()


def test_n_de_genes_per_cluster_sequence_and_mapping():
    kw = {"n_genes": 30, "n_cells": 500, "n_clusters": 3, "seed": 0}
    a = simulate_rnaseq(**kw, n_de_genes_per_cluster=[2, 0, 3])
    assert a.uns["simulate_rnaseq"]["n_de_genes_per_cluster"] == {"1": 2, "2": 0, "3": 3}
    de = a.var.loc[a.var["is_de"], "de_cluster"].astype(str).tolist()
    assert de == ["1", "1", "3", "3", "3"]
    b = simulate_rnaseq(**kw, n_de_genes_per_cluster={"2": 4})
    assert b.var.loc[b.var["is_de"], "de_cluster"].astype(str).tolist() == ["2"] * 4


def test_p_de_genes_per_cluster_zero_gets_none():
    a = simulate_rnaseq(
        n_genes=60,
        n_cells=500,
        n_clusters=3,
        n_de_genes=40,
        p_de_genes_per_cluster=[0, 1, 3],
        seed=0,
    )
    per = a.uns["simulate_rnaseq"]["n_de_genes_per_cluster"]
    assert per["1"] == 0
    assert per["2"] + per["3"] == 40
    params = a.uns["simulate_rnaseq"]["params"]
    assert params["p_de_genes_per_cluster"] == {"1": 0.0, "2": 0.25, "3": 0.75}


def test_no_de_genes():
    a = simulate_rnaseq(n_genes=10, n_cells=100, n_de_genes=0, seed=0)
    assert not a.var["is_de"].any()
    assert a.var["de_cluster"].isna().all()


def test_treatment_argument():
    a = simulate_rnaseq(n_genes=10, n_cells=300, n_treatments=3, n_samples=9, treatment="A", seed=0)
    assert a.uns["simulate_rnaseq"]["treatment"] == "A"
    assert list(a.obs["trt"].cat.categories) == ["A", "B", "C"]
    b = simulate_rnaseq(n_genes=10, n_cells=300, n_treatments=3, n_samples=9, seed=0)
    assert b.uns["simulate_rnaseq"]["treatment"] == "C"  # the last level, as in R


# ---------------------------------------------------------------------------------------
# reproducibility
# ---------------------------------------------------------------------------------------


def _same(a: ad.AnnData, b: ad.AnnData) -> bool:
    return (
        (a.X != b.X).nnz == 0
        and a.obs.equals(b.obs)
        and a.var.equals(b.var)
        and a.uns["simulate_rnaseq"] == b.uns["simulate_rnaseq"]
    )


def test_same_seed_same_anndata_whatever_threads():
    kw = {"n_genes": 600, "n_cells": 8_000, "n_clusters": 3, "seed": 7}  # 3 chunks of 2^21
    a = simulate_rnaseq(**kw, n_jobs=1)
    b = simulate_rnaseq(**kw, n_jobs=2)
    c = simulate_rnaseq(**kw, n_jobs=4)
    assert _same(a, b)
    assert _same(a, c)
    d = simulate_rnaseq(**{**kw, "seed": 8})
    assert (a.X != d.X).nnz > 0


_VAR_COLUMNS = ["is_de", "beta", "de_cluster", "mu", "dispersion", "size", "reference_gene"]


def _digest(a: ad.AnnData) -> str:
    h = hashlib.sha256()
    for arr in (a.X.indptr, a.X.indices, a.X.data):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(pd.util.hash_pandas_object(a.obs, index=True).to_numpy().tobytes())
    h.update(pd.util.hash_pandas_object(a.var[_VAR_COLUMNS], index=True).to_numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("kwargs", "digest"),
    [
        (
            {"n_genes": 600, "n_cells": 4000, "n_clusters": 3, "n_de_genes": 20, "seed": 7},
            "ed675881c07cce95",
        ),
        (
            {
                "n_genes": 50,
                "n_cells": 1000,
                "samples_nested": False,
                "n_samples": 6,
                "var_random_effects": 0.3,
                "seed": 1,
            },
            "4d88c0b5a77dbb44",
        ),
        ({"n_genes": 30, "n_cells": 500, "seed": 3, "reference": True}, "1371fa5339f7b1aa"),
    ],
)
def test_same_outputs_as_before_the_per_gene_variances(kwargs, digest):
    # digests of X, obs and the other var columns computed with the version before per-gene
    # variances (commit 6ad8dbe): a common variance draws the same random numbers as before
    kwargs = dict(kwargs)
    if kwargs.pop("reference", False):
        kwargs["counts"] = np.random.default_rng(42).negative_binomial(1.5, 0.5, (300, 40))
    assert _digest(simulate_rnaseq(**kwargs)) == digest


def test_generator_seed():
    a = simulate_rnaseq(n_genes=20, n_cells=100, seed=np.random.default_rng(3))
    b = simulate_rnaseq(n_genes=20, n_cells=100, seed=np.random.default_rng(3))
    assert _same(a, b)
    assert "seed" not in a.uns["simulate_rnaseq"]["params"]


# ---------------------------------------------------------------------------------------
# the model: moments of the counts
# ---------------------------------------------------------------------------------------


def test_nb_mean_and_variance_without_effects():
    # no random effects, constant library size, no DE: y_ig ~ NB(mu_g, size_g) i.i.d. over cells
    n = 40_000
    a = simulate_rnaseq(
        n_genes=30,
        n_cells=n,
        n_de_genes=0,
        var_random_effects=0.0,
        adjust_library_size=False,
        seed=11,
    )
    assert a.obs["libsize"].nunique() == 1
    y = _dense(a).astype(np.float64)
    mu = a.var["mu"].to_numpy()
    size = a.var["size"].to_numpy()
    var = mu + mu**2 / size
    # standard errors of the sample mean and variance (NB fourth moment bounded crudely)
    z_mean = (y.mean(0) - mu) / np.sqrt(var / n)
    assert np.abs(z_mean).max() < 5
    rel_var = y.var(0, ddof=1) / var - 1
    assert np.abs(rel_var).max() < 0.1


def test_generated_library_sizes():
    a = simulate_rnaseq(n_genes=200, n_cells=5000, seed=2)
    mu = a.var["mu"].to_numpy()
    size = a.var["size"].to_numpy()
    lib = a.obs["libsize"].to_numpy()
    assert abs(lib.mean() / mu.sum() - 1) < 0.01
    assert abs(lib.var() / (mu + mu**2 / size).sum() - 1) < 0.1
    # library size enters the mean with slope 1 on the log scale: totals follow it
    totals = np.asarray(a.X.sum(1)).ravel()
    slope = np.polyfit(np.log(lib), np.log(totals), 1)[0]
    assert 0.8 < slope < 1.2


def test_treatment_effect_in_one_cell_type():
    a = simulate_rnaseq(
        n_genes=6,
        n_cells=60_000,
        n_clusters=2,
        n_de_genes_per_cluster=[0, 3],
        direction="up",
        minbeta=1.0,
        maxbeta=1.5,
        var_random_effects=0.0,
        adjust_library_size=False,
        seed=4,
    )
    y = _dense(a).astype(np.float64)
    obs = a.obs
    treated = (obs["trt"] == "B").to_numpy()
    for cls, expect_de in [("1", False), ("2", True)]:
        in_cls = (obs["cls"] == cls).to_numpy()
        lfc = np.log(y[in_cls & treated].mean(0) / y[in_cls & ~treated].mean(0))
        expected = a.var["beta"].to_numpy() if expect_de else np.zeros(6)
        np.testing.assert_allclose(lfc, expected, atol=0.06)  # ~7,500 cells per group


def test_random_effect_variance():
    # large means, many cells per sample: log sample means scatter with sd sqrt(var_random_effects)
    ref = np.random.default_rng(0).negative_binomial(50, 50 / (50 + 200.0), size=(400, 50))
    a = simulate_rnaseq(
        ref,
        n_cells=40_000,
        n_samples=40,
        n_de_genes=0,
        var_random_effects=0.3,
        adjust_library_size=False,
        seed=9,
    )
    y = pd.DataFrame(_dense(a), index=a.obs_names)
    log_means = np.log(y.groupby(a.obs["sam"].to_numpy()).mean())
    v = log_means.var(ddof=1).to_numpy()  # per gene, over ~40 samples
    assert abs(np.median(v) - 0.3) < 0.06


# ---------------------------------------------------------------------------------------
# donor variances that differ between genes
# ---------------------------------------------------------------------------------------


def test_per_gene_variances_recorded_and_honoured():
    # as test_random_effect_variance, with two blocks of genes of different donor variance
    ref = np.random.default_rng(0).negative_binomial(50, 50 / (50 + 200.0), size=(400, 60))
    given = np.repeat([0.05, 0.5], 30)
    a = simulate_rnaseq(
        ref,
        n_cells=40_000,
        n_samples=40,
        n_de_genes=0,
        var_random_effects=given,
        adjust_library_size=False,
        seed=9,
    )
    np.testing.assert_array_equal(a.var["var_random_effect"], given)
    assert a.uns["simulate_rnaseq"]["params"]["var_random_effects"].startswith("per gene")
    y = pd.DataFrame(_dense(a), index=a.obs_names)
    v = np.log(y.groupby(a.obs["sam"].to_numpy()).mean()).var(ddof=1).to_numpy()
    assert abs(np.median(v[:30]) - 0.05) < 0.02
    assert abs(np.median(v[30:]) - 0.5) < 0.1


@pytest.mark.parametrize("distribution", ["gamma", "lognormal"])
def test_variance_distribution_mean_and_cv(distribution):
    a = simulate_rnaseq(
        n_genes=20_000,
        n_cells=20,
        n_samples=2,
        n_de_genes=0,
        var_random_effects=(distribution, 0.2, 1.5),
        seed=1,
    )
    v = a.var["var_random_effect"].to_numpy()
    assert (v > 0).all()
    assert abs(v.mean() / 0.2 - 1) < 0.05
    assert abs(v.std() / v.mean() / 1.5 - 1) < 0.15  # heavy tails: the sample sd is noisy
    params = a.uns["simulate_rnaseq"]["params"]["var_random_effects"]
    assert params == {"distribution": distribution, "mean": 0.2, "cv": 1.5}


def test_variance_distribution_forms_seed_and_threads():
    kw = {"n_genes": 600, "n_cells": 8_000, "n_clusters": 3, "seed": 7}  # 3 chunks of 2^21
    a = simulate_rnaseq(**kw, var_random_effects=("gamma", 0.1, 1.0), n_jobs=1)
    b = simulate_rnaseq(
        **kw, var_random_effects=VarianceDistribution("gamma", mean=0.1, cv=1.0), n_jobs=2
    )
    assert _same(a, b)
    c = simulate_rnaseq(**kw, var_random_effects=a.var["var_random_effect"].to_numpy())
    assert not _same(a, c)  # an array draws no variances, so the counts differ ...
    np.testing.assert_array_equal(a.var["var_random_effect"], c.var["var_random_effect"])
    # ... and a cv of 0 is the common variance
    d = simulate_rnaseq(**kw, var_random_effects=("lognormal", 0.1, 0.0))
    np.testing.assert_array_equal(d.var["var_random_effect"], 0.1)


def test_recovered_donor_variances_follow_the_given_ones():
    # fit one donor variance per gene (log2(1 + y) ~ log(libsize), random ~sam): the REML
    # estimates must rank genes as the simulated variances do. With one common variance the
    # rank correlation would be ~0 (measured 0.90-0.91 over seeds 0-2 with this design).
    a = simulate_rnaseq(
        n_genes=300,
        n_cells=3000,
        n_samples=30,
        n_clusters=1,
        n_de_genes=0,
        var_random_effects=("gamma", 0.2, 1.0),
        seed=0,
    )
    design = make_design(a.obs, "~log(libsize)", "sam")
    fit = lmm_fit(a.X, design.X, design.Z, design.d, is_counts=True)
    assert fit.converged.all()
    rho = stats.spearmanr(fit.theta[:, 0], a.var["var_random_effect"]).statistic
    assert rho > 0.7


# ---------------------------------------------------------------------------------------
# reference counts and metadata
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    rng = np.random.default_rng(42)
    mu = rng.gamma(1.0, 1.0, 40)
    ref = rng.negative_binomial(1.5, 1.5 / (1.5 + mu), size=(600, 40))
    ref[:, 3] = 0  # zero mean: dropped
    ref[:, 4] = 1  # variance 0 <= mean: dropped
    ref[0, 4] = 2
    return ref


def test_reference_moments_and_gene_filter(reference):
    mu = reference.mean(0)
    var = reference.var(0, ddof=1)
    usable = (var > mu) & (mu > 0)
    assert not usable[3] and not usable[4]
    a = simulate_rnaseq(reference, n_genes=int(usable.sum()), seed=0)
    # no sampling when exactly the usable genes are asked for: reference order is kept
    expected = [f"Gene{j + 1}" for j in np.flatnonzero(usable)]
    assert list(a.var["reference_gene"]) == expected
    np.testing.assert_allclose(a.var["mu"], mu[usable], rtol=1e-12)
    size = mu[usable] ** 2 / (var[usable] - mu[usable])
    np.testing.assert_allclose(a.var["size"], size, rtol=1e-10)


def test_reference_defaults_and_library_sizes(reference):
    a = simulate_rnaseq(reference, seed=0)
    assert a.shape == reference.shape  # n_genes = all reference genes (R: nrow(counts))
    assert a.var_names.is_unique  # 37 usable genes sampled with replacement to 40
    assert set(a.var["reference_gene"]) <= {f"Gene{j}" for j in range(1, 41)} - {"Gene4", "Gene5"}
    totals = reference.sum(1).astype(float)
    np.testing.assert_array_equal(a.obs["libsize"], totals)  # same cells, same order
    b = simulate_rnaseq(reference, n_cells=1500, seed=0)
    assert b.n_obs == 1500
    assert set(b.obs["libsize"]) <= set(totals)
    c = simulate_rnaseq(reference, adjust_library_size=False, seed=0)
    np.testing.assert_allclose(c.obs["libsize"], totals.mean())


def test_reference_dense_sparse_anndata_agree(reference):
    kw = {"n_genes": 25, "n_cells": 700, "seed": 3}
    dense = simulate_rnaseq(reference, **kw)
    csr = sp.csr_matrix(reference)
    for other in (csr, sp.csc_matrix(reference), ad.AnnData(csr)):
        b = simulate_rnaseq(other, **kw)
        assert (dense.X != b.X).nnz == 0
        np.testing.assert_allclose(dense.var["size"], b.var["size"], rtol=1e-12)


def test_anndata_reference_names_and_obs(reference):
    ref = ad.AnnData(
        sp.csr_matrix(reference),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(600)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(40)]),
    )
    rng = np.random.default_rng(0)
    meta = pd.DataFrame(
        {
            "sam": rng.choice(["P1", "P2", "P3", "P4"], 600),
            "cls": rng.choice([1, 2], 600),  # ints become strings
            "trt": rng.choice(["ctrl", "stim"], 600),
            "batch": "x",
        },
        index=ref.obs_names,
    )
    a = simulate_rnaseq(ref, obs=meta, seed=0)
    assert a.var["reference_gene"].str.startswith("g").all()
    assert list(a.obs_names) == list(ref.obs_names)
    assert list(a.obs.columns) == ["sam", "cls", "trt", "batch", "libsize"]
    assert list(a.obs["cls"].cat.categories) == ["1", "2"]
    assert a.uns["simulate_rnaseq"]["treatment"] == "stim"
    assert a.var["de_cluster"].cat.categories.tolist() == ["1", "2"]


def test_obs_without_counts():
    obs = pd.DataFrame({"sam": ["s1", "s2"] * 50, "cls": ["a"] * 100, "trt": ["A", "B"] * 50})
    a = simulate_rnaseq(n_genes=8, obs=obs, n_de_genes=2, seed=0)
    assert a.n_obs == 100
    assert a.uns["simulate_rnaseq"]["n_de_genes_per_cluster"] == {"a": 2}


def test_h5ad_round_trip(small, tmp_path):
    path = tmp_path / "sim.h5ad"
    small.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.X != small.X).nnz == 0
    pd.testing.assert_frame_equal(back.obs, small.obs)
    pd.testing.assert_frame_equal(back.var, small.var)
    assert back.uns["simulate_rnaseq"]["treatment"] == "B"
    assert back.uns["simulate_rnaseq"]["params"]["n_de_genes"] == 6


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------

_OK = {"n_genes": 10, "n_cells": 500, "seed": 0}  # 500 cells: all 10 cell types present


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"minbeta": 1.0, "maxbeta": 1.0}, "minbeta must be smaller than maxbeta"),
        ({"minbeta": 2.0, "maxbeta": 1.0}, "minbeta must be smaller than maxbeta"),
        ({"minbeta": -0.5, "maxbeta": 1.0}, "same sign"),
        ({"direction": "up", "minbeta": -1.0, "maxbeta": 1.0}, "needs minbeta > 0"),
        ({"direction": "down"}, "needs maxbeta < 0"),
        ({"direction": "sideways"}, "direction must be"),
        ({"minbeta": np.nan}, "finite"),
        ({"var_random_effects": -0.1}, "var_random_effects must be finite and >= 0"),
        ({"var_random_effects": np.nan}, "var_random_effects must be finite and >= 0"),
        ({"var_random_effects": [0.1] * 9 + [-0.1]}, "var_random_effects must be finite"),
        ({"var_random_effects": [0.1] * 9 + [np.inf]}, "var_random_effects must be finite"),
        ({"var_random_effects": [0.1] * 9}, "has 9 values but 10 genes"),
        ({"var_random_effects": np.ones((2, 5))}, "one value per gene"),
        ({"var_random_effects": ("normal", 0.1, 1.0)}, "Unknown distribution"),
        ({"var_random_effects": ("gamma", 0.1, -1.0)}, "cv of var_random_effects must be finite"),
        ({"var_random_effects": ("gamma", -0.1, 1.0)}, "mean of var_random_effects must be"),
        ({"var_random_effects": ("gamma", np.nan, 1.0)}, "mean of var_random_effects must be"),
        ({"var_random_effects": ("gamma", "0.1", 1.0)}, "mean of var_random_effects must be a"),
        ({"var_random_effects": ("gamma", 0.1)}, "is \\(distribution, mean, cv\\)"),
        ({"var_random_effects": "gamma"}, "give a distribution as"),
        ({"var_random_effects": {"a": 1}}, "a number, an array or a distribution"),
        ({"n_de_genes": 11}, "11 DE genes requested but only 10"),
        ({"n_de_genes_per_cluster": [5] * 10}, "50 DE genes requested"),
        ({"n_clusters": 2, "n_de_genes_per_cluster": [1, 2, 3]}, "one value per cell type"),
        ({"n_clusters": 2, "n_de_genes_per_cluster": {"7": 1}}, "not cell types"),
        ({"n_clusters": 2, "n_de_genes_per_cluster": [1.5, 1]}, "integers"),
        ({"n_clusters": 2, "n_de_genes": 3, "n_de_genes_per_cluster": [1, 1]}, "sums to 2"),
        ({"n_clusters": 2, "p_de_genes_per_cluster": [0.5]}, "one value per cell type"),
        ({"n_clusters": 2, "p_de_genes_per_cluster": [0, 0]}, "positive sum"),
        ({"n_clusters": 2, "p_de_genes_per_cluster": [-1, 2]}, "non-negative"),
        ({"p_de_genes_per_cluster": [0.1] * 10, "n_de_genes_per_cluster": [1] * 10}, "at most one"),
        ({"treatment": "Z"}, "not a level of trt"),
        ({"n_treatments": 27}, "at most 26"),
        ({"n_treatments": 0}, "n_treatments must be an integer >= 1"),
        ({"n_samples": 1}, "n_samples \\(1\\) must be >= n_treatments"),
        ({"n_genes": 0}, "n_genes must be an integer >= 1"),
        ({"n_cells": 2.5}, "n_cells must be an integer"),
        ({"n_de_genes": -1}, "n_de_genes must be an integer >= 0"),
        ({"n_jobs": 0}, "n_jobs"),
        ({"n_genes": None}, "n_genes is required"),
        ({"n_cells": None}, "n_cells \\(or obs\\) is required"),
        ({"obs": pd.DataFrame({"sam": ["a"], "cls": ["1"]})}, "missing \\['trt'\\]"),
        ({"obs": pd.DataFrame({"sam": [None], "cls": ["1"], "trt": ["A"]})}, "missing values"),
        ({"obs": {"sam": ["a"]}}, "pandas DataFrame"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_rnaseq(**{**_OK, **kwargs})


@pytest.mark.parametrize(
    ("counts", "kwargs", "match"),
    [
        (np.zeros((5, 3)), {}, "No reference gene"),
        (np.ones((1, 3)), {}, "at least 2 cells"),
        (-np.ones((5, 3)), {}, "non-negative"),
        (np.ones(5), {}, "2-D"),
        (np.array([[0, 3], [0, 0], [0, 1], [0, 0]]), {}, "no counts"),
        (
            np.array([[1, 3], [1, 0], [1, 0], [2, 1]]),
            {"obs": pd.DataFrame({"sam": 1, "cls": 1, "trt": 1}, index=[0])},
            "obs has 1 rows",
        ),
    ],
)
def test_reference_errors(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_rnaseq(counts, **kwargs)


def test_anndata_obs_index_must_match(reference):
    ref = ad.AnnData(reference.astype(np.float32))
    obs = pd.DataFrame({"sam": "s", "cls": "1", "trt": "A"}, index=[f"x{i}" for i in range(600)])
    with pytest.raises(ValueError, match="index of obs"):
        simulate_rnaseq(ref, obs=obs)
