"""tl.flashmm_de(groupby=...): each group's fit equals flashmm_de on the group's cells, for every
layout and option; skipped groups, bad input, storage, the getter and the plots."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scflashmm as sfm
from scflashmm._core.inference import bh_adjust

FIXED = "~log(libsize)+trt"
TABLES = ("coef", "se", "t", "p", "theta", "se_theta", "cov")


def _data(n_cells: int = 1500, n_genes: int = 24, seed: int = 3) -> ad.AnnData:
    adata = sfm.datasets.simulate_rnaseq(
        n_genes=n_genes, n_cells=n_cells, n_clusters=3, n_samples=12, seed=seed
    )
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "b1", "b2")
    return adata


@pytest.fixture(scope="module")
def data() -> ad.AnnData:
    return _data()


def _assert_group_equals_subset(adata, key, group, sub, sub_key="flashmm", rtol=1e-10):
    """Every table of the group's fit equals that of the subset's fit (relative 1e-10)."""
    gk = f"{key}:{group}"
    keys = [k[len(sub_key) :] for k in sub.varm if k.startswith(f"{sub_key}_")]
    assert sorted(keys) == sorted(k[len(gk) :] for k in adata.varm if k.startswith(f"{gk}_"))
    for suffix in keys:
        a, b = adata.varm[gk + suffix], sub.varm[sub_key + suffix]
        if isinstance(b, pd.DataFrame):
            assert list(a.columns) == list(b.columns)
            if "max_abs_dlogL" in b:  # a score near 0 at convergence: absolute
                np.testing.assert_allclose(a.pop("max_abs_dlogL"), b["max_abs_dlogL"], atol=1e-9)
                b = b.drop(columns="max_abs_dlogL")
            a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        # relative to each entry, and for entries near 0 (a coefficient of 1e-6 where the
        # column is of order 0.1) to 1e-12 of their column's largest value: sums taken in
        # another order differ by rounding
        finite = np.where(np.isnan(b), 0.0, np.abs(b))  # NaN columns (log2fc of a covariate)
        scale = finite.max(axis=0, keepdims=True) if b.ndim > 1 else finite
        ok = np.abs(a - b) <= rtol * np.abs(b) + 1e-12 * scale
        ok |= np.isnan(a) & np.isnan(b)
        assert ok.all(), (suffix, np.nanmax(np.abs(a - b) / np.abs(b)))
    info, ref = adata.uns[gk], sub.uns[sub_key]
    for field in ("x_columns", "z_columns", "d", "df", "n_cells", "contrast_names"):
        assert info[field] == ref[field], field


def _fit_subsets(adata, fixed=FIXED, **kwargs):
    out = {}
    for g in adata.obs["cls"].cat.categories:
        sub = adata[adata.obs["cls"] == g].copy()
        sfm.tl.flashmm_de(sub, fixed, "sam", **kwargs)
        out[str(g)] = sub
    return out


@pytest.fixture(scope="module")
def subsets(data):
    return _fit_subsets(data, is_counts=True, contrasts={"B-A": "trt[T.B]"})


@pytest.mark.parametrize("layout", ["csr", "csc", "dense", "dask", "backed"])
def test_each_group_equals_flashmm_de_on_its_cells(data, subsets, layout, tmp_path):
    adata = data.copy()
    if layout == "csc":
        adata.X = sparse.csc_matrix(adata.X)
    elif layout == "dense":
        adata.X = adata.X.toarray()
    elif layout == "dask":
        da = pytest.importorskip("dask.array")
        adata.X = da.from_array(adata.X, chunks=(400, 24))
    elif layout == "backed":
        adata.write_h5ad(tmp_path / "g.h5ad")
        adata = ad.read_h5ad(tmp_path / "g.h5ad", backed="r")
    try:
        sfm.tl.flashmm_de(
            adata, FIXED, "sam", groupby="cls", is_counts=True, contrasts={"B-A": "trt[T.B]"},
            chunk_size=333,
        )  # fmt: skip
        assert adata.uns["flashmm"]["groups"] == ["1", "2", "3"]
        for g, sub in subsets.items():
            _assert_group_equals_subset(adata, "flashmm", g, sub)
    finally:
        if layout == "backed":
            adata.file.close()


@pytest.mark.parametrize(
    "options",
    [
        {"method": "ML"},
        {"df": "satterthwaite", "contrasts": {"B vs A": "trt[T.B]"}},
        {"layer": "logged"},
        {"effect_size": True, "library_size": "libsize"},
        {"n_jobs": 1},
    ],
)
def test_options_reach_every_group(data, options):
    adata = data.copy()
    adata.layers["logged"] = adata.X.copy()
    adata.layers["logged"].data = np.log2(1 + adata.layers["logged"].data)
    is_counts = "layer" not in options
    sfm.tl.flashmm_de(adata, FIXED, "sam", groupby="cls", is_counts=is_counts, **options)
    for g, sub in _fit_subsets(adata, is_counts=is_counts, **options).items():
        _assert_group_equals_subset(adata, "flashmm", g, sub)


def test_warnings_of_the_groups_fit_in_threads_name_their_group_in_order(data):
    adata = data.copy()
    with pytest.warns(UserWarning) as record:  # ConvergenceWarning subclasses UserWarning
        sfm.tl.flashmm_de(adata, FIXED, "sam", groupby="cls", is_counts=True, max_iter=1, n_jobs=2)
    converge = [str(w.message) for w in record if "did not converge" in str(w.message)]
    assert [m.split(":")[0] for m in converge] == ["cls = '1'", "cls = '2'", "cls = '3'"]


def test_absent_factor_level_drops_out_of_the_group(data):
    adata = data.copy()
    # group "1" has no cells of batch b1: its design has no batch column
    adata = adata[~((adata.obs["cls"] == "1") & (adata.obs["batch"] == "b1"))].copy()
    fixed = "~log(libsize)+batch+trt"
    sfm.tl.flashmm_de(adata, fixed, "sam", groupby="cls", is_counts=True)
    assert "batch[T.b2]" not in adata.uns["flashmm:1"]["x_columns"]
    assert "batch[T.b2]" in adata.uns["flashmm:2"]["x_columns"]
    for g, sub in _fit_subsets(adata, fixed=fixed, is_counts=True).items():
        _assert_group_equals_subset(adata, "flashmm", g, sub)
    table = sfm.get.flashmm_df(adata, term="batch")  # groups without the column are left out
    assert list(table["group"].unique()) == ["2", "3"]


def test_groups_that_cannot_be_fit_are_skipped_and_reported(data):
    adata = data[data.obs["cls"] != "3"].copy()
    adata.obs["cls"] = pd.Categorical(adata.obs["cls"], categories=["1", "2", "3", "4"])
    one_donor = adata.obs_names[(adata.obs["sam"] == adata.obs["sam"].iloc[0])][:50]
    adata.obs["cls"] = adata.obs["cls"].cat.rename_categories({"4": "solo"})
    adata.obs.loc[one_donor, "cls"] = "solo"
    with pytest.warns(
        UserWarning, match=r"2 group\(s\) of 'cls' not fit: '3' \(no cells\); 'solo'"
    ):
        sfm.tl.flashmm_de(adata, FIXED, "sam", groupby="cls", is_counts=True)
    info = adata.uns["flashmm"]
    assert info["groups"] == ["1", "2"]
    assert info["skipped"] == ["3", "solo"]
    assert info["skipped_reasons"][0] == "no cells"
    assert "single level" in info["skipped_reasons"][1]
    with pytest.raises(ValueError, match="'solo' of 'cls' was not fit"):
        sfm.get.flashmm_df(adata, group="solo")


@pytest.mark.parametrize(
    ("groupby", "fixed", "match"),
    [
        ("nope", FIXED, "groupby='nope' is not a column of adata.obs"),
        ("with_nan", FIXED, r"adata.obs\['with_nan'\] \(groupby\) has 1 missing"),
        ("trt", FIXED, "groupby='trt' is also used in the model formulas"),
        ("sam", FIXED, "groupby='sam' is also used"),
        (["cls"], FIXED, "groupby must be the name of a column"),
    ],
)
def test_bad_groupby_fails_before_the_pass(data, monkeypatch, groupby, fixed, match):
    import scflashmm.tl._groupby as grouped

    def no_pass(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError

    monkeypatch.setattr(grouped, "grouped_summary_stats", no_pass)
    adata = data.copy()
    adata.obs["with_nan"] = adata.obs["cls"].astype(object)
    adata.obs.iloc[5, adata.obs.columns.get_loc("with_nan")] = np.nan
    error = TypeError if isinstance(groupby, list) else ValueError
    with pytest.raises(error, match=match):
        sfm.tl.flashmm_de(adata, fixed, "sam", groupby=groupby, is_counts=True)
    assert "flashmm" not in adata.uns


def test_storage_round_trip_getter_and_plots(data, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    adata = data.copy()
    sfm.tl.flashmm_de(adata, FIXED, "sam", groupby="cls", is_counts=True)
    adata.write_h5ad(tmp_path / "r.h5ad")
    back = ad.read_h5ad(tmp_path / "r.h5ad")
    table = sfm.get.flashmm_df(back, term="trt[T.B]")
    pd.testing.assert_frame_equal(table, sfm.get.flashmm_df(adata, term="trt[T.B]"))
    assert list(table.columns[:2]) == ["group", "variable"]
    assert table["group"].value_counts().to_dict() == {"1": 24, "2": 24, "3": 24}
    for g, part in table.groupby("group", observed=True):
        np.testing.assert_allclose(part["adj_p_value"], bh_adjust(part["p_value"].to_numpy()))
        one = sfm.get.flashmm_df(back, key=f"flashmm:{g}", term="trt[T.B]")
        np.testing.assert_array_equal(part["p_value"], one["p_value"])
    assert set(sfm.get.flashmm_df(back, group=["2"])["group"]) == {"2"}
    ax = sfm.pl.volcano(back, "trt[T.B]", group="2", show=False)
    assert "trt B vs A" in ax.get_title()  # the readable title of trt[T.B]
    assert sfm.pl.qq(back, "trt[T.B]", group="1", show=False) is not None
    with pytest.raises(ValueError, match="pass group= one of"):
        sfm.pl.volcano(back, "trt[T.B]", show=False)
    with pytest.raises(ValueError, match="is not a group of 'cls'"):
        sfm.get.flashmm_df(back, group="9")
    # an ungrouped fit under the same key replaces every group's tables
    sfm.tl.flashmm_de(back, FIXED, "sam", is_counts=True)
    assert not [k for k in back.varm if k.startswith("flashmm:")]
    with pytest.raises(ValueError, match="is not grouped"):
        sfm.get.flashmm_df(back, group="1")


def test_dask_progress_in_process_and_on_a_local_cluster():
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(0)
    n = 2000
    Y = sparse.random(n, 20, density=0.3, random_state=1, format="csr") * 10
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Z = np.eye(8)[rng.integers(0, 8, n)]
    Yd = da.from_array(Y.toarray(), chunks=(500, 20))
    ref = sfm.summary_stats(X, Y, Z)
    calls: list[tuple[int, int]] = []
    stats = sfm.summary_stats(X, Yd, Z, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (n, n) and len(calls) == 4
    np.testing.assert_allclose(stats.ZY, ref.ZY, rtol=1e-12)
    with (
        distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as c,
        distributed.Client(c),
    ):
        calls.clear()
        stats = sfm.summary_stats(X, Yd, Z, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (n, n)
    np.testing.assert_allclose(stats.XY, ref.XY, rtol=1e-12)
