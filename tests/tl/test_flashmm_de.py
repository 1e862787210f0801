"""tl.flashmm_de: parity with FLASHMM 1.3.0 through the AnnData front end, data layouts, h5ad,
copy semantics, subsetting, and a clear error for each bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _reference import CASES, case_adata, load_case, r_to_formulaic_expr
from scipy import sparse

import scflashmm as sfm
from scflashmm import ConvergenceWarning, DegenerateFeatureWarning
from scflashmm._design import match_r_columns

TABLES = ["coef", "se", "t", "p", "theta", "se_theta", "diag"]


def fit_case(name: str, **kwargs) -> tuple[ad.AnnData, dict, dict[str, str]]:
    """Fit a reference case through flashmm_de; return (adata, case, R name -> formulaic name)."""
    case = load_case(name)
    spec = case["spec"]
    adata = kwargs.pop("adata", None) or case_adata(name)
    names = sfm._design.make_design(adata.obs, spec["fixed"], spec["random"]).x_columns
    r_names = list(case["X"].columns)
    mapping = {r: names[i] for r, i in zip(r_names, match_r_columns(names, r_names), strict=True)}
    contrasts = None
    if "contrast" in case:
        # FLASHMM's contrasts are written over R names: rewrite them over formulaic names and
        # name each by FLASHMM's column name (the expression text for unnamed ones)
        exprs = spec["contrasts"].values()
        contrasts = {
            col: r_to_formulaic_expr(expr, mapping)
            for col, expr in zip(spec["contrast_columns"], exprs, strict=True)
        }
    expected = []
    if spec["na_genes"] or name.startswith("f_"):
        expected.append(DegenerateFeatureWarning)
    if spec["nonconverged_genes"] and not name.startswith("f_"):
        expected.append(ConvergenceWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sfm.tl.flashmm_de(
            adata,
            spec["fixed"],
            spec["random"],
            is_counts=spec["is_counts"],
            method=spec["method"],
            theta0=spec["theta0"],
            max_iter=spec["max_iter"],
            epsilon=spec["epsilon"],
            contrasts=contrasts,
            **kwargs,
        )
    assert sorted({w.category.__name__ for w in caught}) == sorted(e.__name__ for e in expected)
    return (out if out is not None else adata), case, mapping


def _fittable(case) -> np.ndarray:
    """Genes compared with FLASHMM: not all-zero and not case f's constant Gene2 (noise there;
    scflashmm leaves it NaN as degenerate)."""
    keep = ~case["coef"].isna().all(axis=0).to_numpy()
    if case["name"].startswith("f_"):
        keep &= np.array(case["genes"]) != "Gene2"
    return keep


def _neglog10(p):
    return -np.log10(np.asarray(p, dtype=float))


@pytest.mark.parametrize("name", CASES)
def test_parity_with_flashmm(name):
    adata, case, mapping = fit_case(name)
    spec = case["spec"]
    keep = _fittable(case)
    r_cols = list(case["X"].columns)
    ours_cols = [mapping[c] for c in r_cols]

    def ours(table, cols=ours_cols):
        return adata.varm[f"flashmm_{table}"][cols].to_numpy()[keep].T

    def ref(table):
        return case[table].to_numpy()[:, keep]

    # coef/se/t (FLASHMM's coef.csv, se.csv, t.csv): well conditioned, 1e-6 relative;
    # the atol covers coefficients that are ~0 (case e)
    for table in ("coef", "se", "t"):
        np.testing.assert_allclose(ours(table), ref(table), rtol=1e-6, atol=1e-9, err_msg=table)
    # p.csv on the -log10 scale
    np.testing.assert_allclose(_neglog10(ours("p")), _neglog10(ref("p")), rtol=1e-6, atol=1e-9)
    # theta.csv / se_theta.csv: rows var1..vark, var0 == our random terms then "residual"
    for table in ("theta", "se_theta"):
        np.testing.assert_allclose(
            adata.varm[f"flashmm_{table}"].to_numpy()[keep].T, ref(table), rtol=1e-6, atol=1e-10
        )
    assert list(adata.varm["flashmm_theta"].columns) == [
        *adata.uns["flashmm"]["random_terms"],
        "residual",
    ]
    diag = adata.varm["flashmm_diag"]
    # logLik.csv: same definition (lme4's REML logLik + log det(X'X)/2)
    np.testing.assert_allclose(diag["logLik"].to_numpy()[keep], case["logLik"][keep], rtol=1e-9)
    # niter.csv exactly, and the non-converged genes of spec.json
    np.testing.assert_array_equal(diag["niter"].to_numpy()[keep], case["niter"][keep])
    nonconv = set(adata.var_names[keep & ~diag["converged"].to_numpy()])
    assert nonconv == set(spec["nonconverged_genes"]) - {"Gene2"} - set(spec["na_genes"])
    # max |dlogL| of genes far from convergence (dlogL.csv; below epsilon it is round-off)
    big = keep & (np.abs(case["dlogL"].to_numpy()).max(axis=0) > 1e-3)
    np.testing.assert_allclose(
        diag["max_abs_dlogL"].to_numpy()[big],
        np.abs(case["dlogL"].to_numpy()).max(axis=0)[big],
        rtol=1e-4,
    )
    # cov.csv, in R's X column order
    perm = [adata.uns["flashmm"]["x_columns"].index(c) for c in ours_cols]
    cov = adata.varm["flashmm_cov"][keep][:, perm][:, :, perm]
    np.testing.assert_allclose(cov, case["cov"][keep], rtol=1e-6, atol=1e-12)
    assert adata.uns["flashmm"]["df"] == case["df"]
    assert adata.uns["flashmm"]["d"] == spec["d"]
    assert adata.uns["flashmm"]["n_cells"] == spec["n_cells"]
    # test_contrast_two.sided.csv: estimate, t, p of each contrast
    if "contrast" in case:
        ref_tab = case["test_contrast"]["two-sided"]
        for col in spec["contrast_columns"]:
            for what, ref_col in (("coef", "coef"), ("t", "t")):
                np.testing.assert_allclose(
                    adata.varm[f"flashmm_contrast_{what}"][col].to_numpy()[keep],
                    ref_tab[f"{col}_{ref_col}"].to_numpy()[keep],
                    rtol=1e-6,
                    atol=1e-9,
                )
            np.testing.assert_allclose(
                _neglog10(adata.varm["flashmm_contrast_p"][col].to_numpy()[keep]),
                _neglog10(ref_tab[f"{col}_p"].to_numpy()[keep]),
                rtol=1e-6,
                atol=1e-9,
            )
            se = ref_tab[f"{col}_coef"] / ref_tab[f"{col}_t"]
            np.testing.assert_allclose(
                adata.varm["flashmm_contrast_se"][col].to_numpy()[keep],
                se.to_numpy()[keep],
                rtol=1e-6,
            )


def test_degenerate_genes_are_nan_and_counted():
    adata, _, _ = fit_case("f_zero_and_constant_genes")
    info = adata.uns["flashmm"]
    for gene in ("Gene1", "Gene2"):  # all-zero; constant (exactly explained by X)
        assert adata.varm["flashmm_coef"].loc[gene].isna().all()
        assert not adata.varm["flashmm_diag"].loc[gene, "converged"]
    assert info["n_degenerate"] == 2
    assert info["n_nonconverged"] == 0


# ---------------------------------------------------------------------------- layouts


def _assert_same_results(a: ad.AnnData, b: ad.AnnData, key="flashmm", atol=1e-10):
    for suffix in [*TABLES, "contrast_coef", "contrast_se", "contrast_t", "contrast_p"]:
        name = f"{key}_{suffix}"
        if name in a.varm or name in b.varm:
            pd.testing.assert_frame_equal(a.varm[name], b.varm[name], atol=atol, rtol=1e-9)
    np.testing.assert_allclose(a.varm[f"{key}_cov"], b.varm[f"{key}_cov"], atol=atol, rtol=1e-9)


@pytest.fixture(scope="module")
def fitted_b():
    adata, _, _ = fit_case("b_simu_reml_counts")
    return adata


@pytest.mark.parametrize(
    ("layout", "chunk_size"),
    [("csr", None), ("csr", 97), ("csc", None), ("csc", 97), ("dense", None), ("dense", 97)],
)
def test_layouts_and_chunking_agree(fitted_b, layout, chunk_size):
    adata, _, _ = fit_case(
        "b_simu_reml_counts", adata=case_adata("b", layout=layout), chunk_size=chunk_size
    )
    _assert_same_results(adata, fitted_b)


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_dask_agrees_with_in_memory(fitted_b, kind):
    da = pytest.importorskip("dask.array")
    adata = case_adata("b", layout=kind)
    adata.X = da.from_array(adata.X, chunks=(300, 50))
    fit_case("b_simu_reml_counts", adata=adata, chunk_size=128)
    _assert_same_results(adata, fitted_b)


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_backed_agrees_with_in_memory(fitted_b, tmp_path, layout):
    path = tmp_path / f"b_{layout}.h5ad"
    case_adata("b", layout=layout).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        fit_case("b_simu_reml_counts", adata=backed, chunk_size=128)
        assert backed.isbacked
        _assert_same_results(backed, fitted_b)
    finally:
        backed.file.close()


def test_layer_of_backed_agrees_with_in_memory(fitted_b, tmp_path):
    adata = case_adata("b")
    adata.layers["counts"] = adata.X.copy()
    adata.X = sparse.csr_matrix(adata.shape)
    path = tmp_path / "b_layer.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        fit_case("b_simu_reml_counts", adata=backed, layer="counts", chunk_size=128)
        _assert_same_results(backed, fitted_b)
    finally:
        backed.file.close()


def test_layer_and_integer_dtype(fitted_b):
    adata = case_adata("b")
    adata.layers["counts"] = adata.X.astype(np.int32)
    adata.X = sparse.csr_matrix(adata.shape)
    fit_case("b_simu_reml_counts", adata=adata, layer="counts")
    _assert_same_results(adata, fitted_b)
    assert adata.uns["flashmm"]["params"]["layer"] == "counts"


def test_h5ad_round_trip(fitted_b, tmp_path):
    path = tmp_path / "fit.h5ad"
    fitted_b.write_h5ad(path)
    back = ad.read_h5ad(path)
    _assert_same_results(back, fitted_b, atol=0)
    info, info0 = back.uns["flashmm"], fitted_b.uns["flashmm"]
    assert set(info) == set(info0)
    assert list(info["x_columns"]) == info0["x_columns"]
    assert set(info["params"]) == set(info0["params"])
    for k, v in info0["params"].items():  # lists come back as arrays
        assert (list(info["params"][k]) if isinstance(v, list) else info["params"][k]) == v
    pd.testing.assert_frame_equal(info["contrast_matrix"], info0["contrast_matrix"])
    for kw in ({}, {"contrast": "BvsA", "alternative": "less"}):
        expected = sfm.get.flashmm_df(fitted_b, **kw)
        pd.testing.assert_frame_equal(sfm.get.flashmm_df(back, **kw), expected)


# ---------------------------------------------------------------------------- semantics


def test_copy_semantics():
    adata = case_adata("b")
    x_before = adata.X.copy()
    spec = load_case("b")["spec"]
    out = sfm.tl.flashmm_de(adata, spec["fixed"], "sam", is_counts=True, copy=True)
    assert isinstance(out, ad.AnnData)
    assert out is not adata
    assert "flashmm" not in adata.uns
    assert len(adata.varm) == 0
    assert (adata.X != x_before).nnz == 0  # log2(1 + y) never touches the input
    assert "flashmm_coef" in out.varm
    assert sfm.tl.flashmm_de(adata, spec["fixed"], "sam", is_counts=True) is None
    assert (adata.X != x_before).nnz == 0
    _assert_same_results(adata, out)


def test_key_added_and_refit_replaces_old_contrasts():
    adata = case_adata("b")
    spec = load_case("b")["spec"]
    sfm.tl.flashmm_de(
        adata, spec["fixed"], "sam", is_counts=True, contrasts={"x": "cls[1]"}, key_added="m1"
    )
    assert "m1_contrast_p" in adata.varm
    sfm.tl.flashmm_de(adata, spec["fixed"], "sam", is_counts=True, key_added="m1")
    assert "m1_contrast_p" not in adata.varm
    assert "flashmm" not in adata.uns
    assert adata.uns["m1"]["contrast_names"] == []


def test_subsetting_genes_after_fit(fitted_b):
    genes = list(fitted_b.var_names[[3, 17, 44, 49]])
    sub = fitted_b[:, genes].copy()
    full = sfm.get.flashmm_df(fitted_b, term="cls[3]:trt[T.B]").set_index("variable").loc[genes]
    part = sfm.get.flashmm_df(sub, term="cls[3]:trt[T.B]").set_index("variable").loc[genes]
    cols = ["log_fc", "sd", "t_value", "p_value", "converged"]
    pd.testing.assert_frame_equal(part[cols], full[cols])
    # genes are fit independently: refitting the subset gives the same rows
    refit, _, _ = fit_case("b_simu_reml_counts", adata=case_adata("b")[:, genes].copy())
    _assert_same_results(refit, sub)


def test_fit_on_a_view_of_cells():
    adata = case_adata("b")
    view = adata[adata.obs["cls"] != "4"]
    assert view.is_view
    sfm.tl.flashmm_de(view, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True)
    assert list(view.uns["flashmm"]["x_columns"]) == [  # unused level '4' dropped
        "log(libsize)",
        "cls[1]",
        "cls[2]",
        "cls[3]",
        "cls[1]:trt[T.B]",
        "cls[2]:trt[T.B]",
        "cls[3]:trt[T.B]",
    ]
    assert "flashmm" not in adata.uns


def test_raw_counts_warning():
    adata = case_adata("b")
    with pytest.warns(UserWarning, match=r"adata.X looks like raw counts"):
        sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam")
    adata.X = adata.X.log1p()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sfm.tl.flashmm_de(adata, "~0+log(libsize)+cls+cls:trt", "sam")


def test_progress_bar(capsys):
    adata = case_adata("a")
    sfm.tl.flashmm_de(adata, "~0+trt", "sam", chunk_size=100, progress=True)
    assert "flashmm pass" in capsys.readouterr().err
    sfm.tl.flashmm_de(adata, "~0+trt", "sam", chunk_size=100)  # not a TTY: silent
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------- errors


def _bad(kind: str):
    """(adata, args, kwargs) for one kind of bad input."""
    adata = case_adata("b")
    fixed, random, kw = "~0+log(libsize)+cls+cls:trt", "sam", {"is_counts": True}
    if kind == "missing_column":
        fixed = "~0+log(libsize)+cluster"
    elif kind == "nan_obs":
        adata.obs["libsize"] = adata.obs["libsize"].astype(float)
        adata.obs.iloc[7, adata.obs.columns.get_loc("libsize")] = np.nan
    elif kind == "nan_data":
        adata.X = adata.X.toarray()
        adata.X[11, 4] = np.nan
    elif kind in ("nan_data_csr", "nan_data_csc"):
        bad = sparse.lil_matrix(adata.X, dtype=float)
        bad[11, 4] = np.inf
        adata.X = bad.asformat(kind[-3:])
        kw["chunk_size"] = 97
    elif kind == "negative_counts":
        adata.X = adata.X.copy()
        adata.X.data[0] = -1
    elif kind == "one_level":
        adata.obs["one"] = "s1"
        random = "one"
    elif kind == "rank_deficient":
        fixed = "~log(libsize)+cls+trt+sam"
        random = "~0+cls"
    elif kind == "no_cells":
        adata = adata[:0].copy()
    elif kind == "no_genes":
        adata = adata[:, []].copy()
    elif kind == "syntax":
        fixed = "~0+log(libsize)+cls+"
    elif kind == "confounded":
        fixed = "~0+sam"
    elif kind == "layer":
        kw["layer"] = "counts"
    elif kind == "method":
        kw["method"] = "reml"
    elif kind == "theta0":
        kw["theta0"] = [1.0]
    elif kind == "contrast":
        kw["contrasts"] = {"x": "cls[1] - clsX"}
    elif kind == "contrast_slash":
        kw["contrasts"] = ["(cls[1] + cls[2])/2"]
    elif kind == "chunk_size":
        kw["chunk_size"] = 0
    return adata, (fixed, random), kw


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing_column", r"adata.obs has no column 'cluster' \(in the fixed formula\)"),
        ("nan_obs", r"adata.obs\['libsize'\].*1 missing value.*'Cell8'"),
        ("nan_data", r"adata.X contains NaN.*cell 'Cell12', gene 'Gene5'"),
        ("nan_data_csr", r"adata.X contains NaN.*cell 'Cell12', gene 'Gene5'"),
        ("nan_data_csc", r"adata.X contains NaN.*cell 'Cell12', gene 'Gene5'"),
        ("negative_counts", r"adata.X: .*negative values"),
        ("one_level", r"random term 'one' has a single level"),
        ("rank_deficient", r"rank deficient.*'trt\[T.B\]', 'sam\[T.B1\]'.*linearly dependent"),
        ("no_cells", "no cells"),
        ("no_genes", "zero genes selected"),
        ("syntax", r"Cannot parse the fixed formula '~0\+log\(libsize\)\+cls\+'"),
        ("confounded", "'sam' is confounded with the fixed effects"),
        ("layer", "no layer 'counts'"),
        ("method", "method must be one of .REML., .ML."),
        ("theta0", r"theta0 must have k \+ 1 = 2 values"),
        ("contrast", "Unknown name 'clsX' in contrast"),
        ("contrast_slash", "cannot contain '/'"),
        ("chunk_size", "chunk_size must be a positive integer"),
    ],
)
def test_errors_leave_input_untouched(kind, match):
    adata, args, kw = _bad(kind)
    # an earlier fit under the same key must survive a failed refit
    adata.uns["flashmm"] = {"marker": 1}
    obs_before = adata.obs.copy()
    with pytest.raises(ValueError, match=match):
        sfm.tl.flashmm_de(adata, *args, **kw)
    assert adata.uns["flashmm"] == {"marker": 1}
    assert len(adata.varm) == 0
    pd.testing.assert_frame_equal(adata.obs, obs_before)


def test_copy_of_backed_is_refused(tmp_path):
    path = tmp_path / "a.h5ad"
    case_adata("a").write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(ValueError, match="copy=True is not supported for a backed"):
            sfm.tl.flashmm_de(backed, "~0+trt", "sam", copy=True)
    finally:
        backed.file.close()


def test_not_anndata():
    with pytest.raises(TypeError, match="must be an AnnData"):
        sfm.tl.flashmm_de(np.zeros((3, 3)), "~1", "sam")
