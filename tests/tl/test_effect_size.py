"""Effect sizes: log2 fold changes of normalised means, against direct computations."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scflashmm as sfm
from scflashmm.tl._effect_size import PRIOR_COUNT, factor_patterns, pattern_sums

FIXED = "~0+log(libsize)+cls+cls:trt"


def small_adata(seed: int = 0, n: int = 240, m: int = 12) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "cls": pd.Categorical(rng.choice(["1", "2"], n)),
            "trt": pd.Categorical(rng.choice(["A", "B"], n)),
            "sam": pd.Categorical(rng.choice([f"s{i}" for i in range(6)], n)),
            "libsize": rng.uniform(500, 2000, n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    mu = rng.uniform(0.05, 5, m) * (obs["libsize"].to_numpy()[:, None] / 1000)
    counts = rng.poisson(mu).astype(np.float64)
    counts[:, 0] = 0  # no counts at all: every fold change is 0
    counts[obs["cls"].to_numpy() == "1", 1] = 0  # none in cell type 1 only
    return ad.AnnData(
        sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(m)])
    )


def direct_means(adata: ad.AnnData, library: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Normalised mean (with the prior) of each cell type x treatment, from the dense matrix."""
    Y = adata.X.toarray()
    groups = adata.obs.groupby(["cls", "trt"], observed=True).indices
    lib = {key: library[idx].sum() for key, idx in groups.items()}
    lbar = np.mean(list(lib.values()))
    return {key: Y[idx].sum(axis=0) / lib[key] + PRIOR_COUNT / lbar for key, idx in groups.items()}


def fit(adata: ad.AnnData, fixed: str = FIXED, **kwargs) -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sfm.DegenerateFeatureWarning)
        warnings.simplefilter("ignore", sfm.ConvergenceWarning)
        return sfm.tl.flashmm_de(adata, fixed, "sam", is_counts=True, copy=True, **kwargs)


def test_saturated_design_is_ratio_of_normalised_means():
    adata = small_adata()
    out = fit(adata)
    lfc = out.varm["flashmm_log2fc"]
    means = direct_means(adata, adata.X.sum(axis=1).A1)
    for c in ("1", "2"):
        expected = np.log2(means[(c, "B")] / means[(c, "A")])
        np.testing.assert_allclose(lfc[f"cls[{c}]:trt[T.B]"], expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lfc[f"cls[{c}]"], np.log2(means[(c, "A")]), rtol=1e-10)
    assert lfc["log(libsize)"].isna().all()  # not an indicator column
    # no counts: fold changes 0 (atol: rounding of the least-squares solve)
    np.testing.assert_allclose(lfc.loc["g0", ["cls[1]:trt[T.B]", "cls[2]:trt[T.B]"]], 0, atol=1e-12)
    assert np.isfinite(lfc.loc["g1", "cls[1]:trt[T.B]"])  # the prior keeps it finite
    assert out.uns["flashmm"]["params"]["transform"] == "log2(1 + y)"


def test_library_size_column():
    adata = small_adata(1)
    out = fit(adata, library_size="libsize")
    means = direct_means(adata, adata.obs["libsize"].to_numpy())
    expected = np.log2(means[("2", "B")] / means[("2", "A")])
    got = out.varm["flashmm_log2fc"]["cls[2]:trt[T.B]"]
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)  # atol: gene g0, 0


def test_additive_design_is_cell_weighted_least_squares():
    adata = small_adata(2)
    out = fit(adata, "~log(libsize)+cls+trt")
    lfc = out.varm["flashmm_log2fc"]
    # oracle: ordinary least squares over the cells of log2 of their pattern's mean
    means = direct_means(adata, adata.X.sum(axis=1).A1)
    logm = np.log2(
        np.stack([means[(c, t)] for c, t in zip(adata.obs["cls"], adata.obs["trt"], strict=True)])
    )
    Xf = np.column_stack(
        [np.ones(adata.n_obs), adata.obs["cls"] == "2", adata.obs["trt"] == "B"]
    ).astype(float)
    beta = np.linalg.lstsq(Xf, logm, rcond=None)[0].T
    np.testing.assert_allclose(
        lfc[["Intercept", "cls[T.2]", "trt[T.B]"]], beta, rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("layout", ["dense", "csr", "csc"])
def test_pattern_sums_layouts(layout):
    adata = small_adata(3)
    Y = adata.X.toarray()
    cols, codes, patterns, counts = factor_patterns(
        np.column_stack([np.ones(adata.n_obs), adata.obs["trt"] == "B"])
    )
    assert list(cols) == [0, 1] and patterns.shape == (2, 2) and counts.sum() == adata.n_obs
    expected = np.stack([Y[codes == k].sum(axis=0) for k in range(2)])
    given = {"dense": Y, "csr": sparse.csr_matrix(Y), "csc": sparse.csc_matrix(Y)}[layout]
    np.testing.assert_allclose(pattern_sums(given, codes, 2, chunk_size=37), expected)


def test_simulated_truth_is_recovered():
    adata = sfm.datasets.simulate_rnaseq(n_genes=200, n_cells=6000, n_de_genes=40, seed=5)
    sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True)
    de = adata.var[adata.var["is_de"]]
    truth = de["beta"].to_numpy() / np.log(2)
    cols = [f"cls[{c}]:trt[T.B]" for c in de["de_cluster"]]
    lfc = np.array(
        [adata.varm["flashmm_log2fc"].loc[g, c] for g, c in zip(de.index, cols, strict=True)]
    )
    coef = np.array(
        [adata.varm["flashmm_coef"].loc[g, c] for g, c in zip(de.index, cols, strict=True)]
    )
    # donor noise and the prior count move single genes; the median ratio is close to 1
    assert 0.8 < np.median(lfc / truth) < 1.2
    assert np.median(coef / truth) < 0.7  # the log2(1 + y) coefficient is not a fold change


def test_defaults_store_cov_and_round_trip(tmp_path):
    adata = small_adata(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # looks like raw counts
        plain = sfm.tl.flashmm_de(adata, FIXED, "sam", copy=True)
    assert "flashmm_log2fc" not in plain.varm  # not counts: no effect sizes by default
    assert "flashmm_cov" not in plain.varm
    assert plain.uns["flashmm"]["params"]["transform"] == "identity"
    out = fit(adata, store_cov=True, contrasts={"BvsA": 'cond(trt="B") - cond(trt="A")'})
    assert out.varm["flashmm_cov"].shape == (adata.n_vars, 5, 5)
    out.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    pd.testing.assert_frame_equal(back.varm["flashmm_log2fc"], out.varm["flashmm_log2fc"])
    a = sfm.get.flashmm_df(out, contrast="BvsA")
    b = sfm.get.flashmm_df(back, contrast="BvsA")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"effect_size": "yes"}, TypeError, "effect_size must be True"),
        ({"library_size": "nope"}, ValueError, "not a column of adata.obs"),
        ({"library_size": "libsize", "effect_size": False}, ValueError, "only used with"),
        ({"library_size": "neg"}, ValueError, "positive finite"),
    ],
)
def test_errors(kwargs, error, match):
    adata = small_adata(5)
    adata.obs["neg"] = -1.0
    with pytest.raises(error, match=match):
        fit(adata, **kwargs)
    assert "flashmm" not in adata.uns


def test_negative_values_with_effect_size():
    adata = small_adata(6)
    adata.X = adata.X.toarray() - 1.0
    with pytest.raises(ValueError, match="linear scale"):  # found before the genes are fit
        sfm.tl.flashmm_de(adata, FIXED, "sam", effect_size=True)


def test_too_many_patterns(monkeypatch):
    from scflashmm.tl import _effect_size

    monkeypatch.setattr(_effect_size, "_MAX_SUMS", 10)
    with pytest.raises(ValueError, match="too many to hold; pass effect_size=False"):
        fit(small_adata(7))
