"""The formula layer: formulaic designs over obs == R model.matrix of the FLASHMM reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _reference import CASES, load_case, match_r_columns, r_column_name

from scflashmm._design import (
    fixed_design,
    make_design,
    random_design,
)


@pytest.mark.parametrize("name", CASES)
def test_design_matches_r_model_matrix(name):
    case = load_case(name)
    spec = case["spec"]
    design = make_design(case["obs"], spec["fixed"], spec["random"])
    r_x, r_z = case["X"], case["Z"]
    # same columns by name; for these formulas R and formulaic also agree on the order
    assert [r_column_name(c) for c in design.x_columns] == list(r_x.columns)
    assert [r_column_name(c) for c in design.z_columns] == list(r_z.columns)
    ix = match_r_columns(design.x_columns, list(r_x.columns))
    iz = match_r_columns(design.z_columns, list(r_z.columns))
    # X.csv is written with 17 significant digits: log() differs by a few ulp
    np.testing.assert_allclose(design.X[:, ix], r_x.to_numpy(), rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(design.Z.toarray()[:, iz], r_z.to_numpy())
    assert design.d == spec["d"]
    assert sum(design.d) == design.Z.shape[1]
    assert design.X.dtype == np.float64
    assert design.X.flags.c_contiguous
    assert design.Z.format == "csr"
    assert len(design.random_terms) == len(spec["random"])


@pytest.mark.parametrize(
    ("name", "r_name"),
    [
        ("Intercept", "(Intercept)"),
        ("trt[T.B]", "trtB"),
        ("trt[A]", "trtA"),
        ("cls[1]", "cls1"),
        ("cls[1]:trt[T.B]", "cls1:trtB"),
        ("log(libsize)", "log(libsize)"),
        ("age", "age"),
        ("age:trt[T.B]", "age:trtB"),
        ("sam[A1]", "samA1"),
        ("C(a)[T.y]", "C(a)y"),
        ("`sample id`[x]", "sample idx"),
    ],
)
def test_r_column_name(name, r_name):
    assert r_column_name(name) == r_name


def _toy_obs(n=24, seed=0):
    rng = np.random.default_rng(seed)
    sam = np.repeat([f"S{i}" for i in (1, 2, 10, 11, 3, 4)], n // 6)
    trt = np.where(np.isin(sam, ["S1", "S2", "S10"]), "A", "B")
    return pd.DataFrame(
        {
            "sam": sam,
            "trt": trt,
            "cls": np.tile(["1", "2", "3"], n // 3),
            "libsize": rng.integers(50, 500, n).astype(float),
            "age": rng.normal(size=n),
            "batch": np.tile([1, 2], n // 2),
        },
        index=[f"c{i}" for i in range(n)],
    )


def test_interaction_names_matched_as_sets():
    # R: model.matrix(~trt + cls:trt) -> (Intercept) trtB trtA:cls2 trtB:cls2 trtA:cls3 trtB:cls3
    obs = _toy_obs()
    X, names = fixed_design("~trt+cls:trt", obs)
    r_names = ["(Intercept)", "trtB", "trtA:cls2", "trtB:cls2", "trtA:cls3", "trtB:cls3"]
    idx = match_r_columns(names, r_names)
    assert [names[i] for i in idx] == [
        "Intercept",
        "trt[T.B]",
        "cls[T.2]:trt[A]",
        "cls[T.2]:trt[B]",
        "cls[T.3]:trt[A]",
        "cls[T.3]:trt[B]",
    ]
    trt_a = (obs["trt"] == "A").to_numpy()
    cls2 = (obs["cls"] == "2").to_numpy()
    np.testing.assert_array_equal(X[:, idx[2]], (trt_a & cls2).astype(float))


def test_match_r_columns_errors():
    with pytest.raises(ValueError, match="no formulaic counterpart"):
        match_r_columns(["a", "b"], ["a", "c"])
    with pytest.raises(ValueError, match="R columns"):
        match_r_columns(["a", "b"], ["a"])


def test_level_order_strings_sorted_codepoint():
    obs = _toy_obs()
    _, d, terms, cols, formulas = random_design("sam", obs)
    # C-locale order: S1 S10 S11 S2 S3 S4 (as R's factor() under LC_COLLATE=C)
    assert cols == [f"sam[{s}]" for s in ("S1", "S10", "S11", "S2", "S3", "S4")]
    assert d == [6]
    assert terms == ["sam"]
    assert formulas == ["~0+sam"]


def test_level_order_categorical_kept_and_unused_dropped():
    obs = _toy_obs()
    obs["trt"] = pd.Categorical(obs["trt"], categories=["B", "A", "unused"])
    _, names = fixed_design("~0+trt", obs)
    assert names == ["trt[B]", "trt[A]"]


def test_bare_numeric_random_is_a_factor():
    obs = _toy_obs()
    Z, d, terms, cols, _ = random_design(["sam", "batch"], obs)
    assert d == [6, 2]
    assert terms == ["sam", "batch"]
    assert cols[-2:] == ["batch[1]", "batch[2]"]
    np.testing.assert_array_equal(np.asarray(Z.sum(axis=1)).ravel(), 2.0)


def test_random_formula_and_name_equivalent():
    obs = _toy_obs()
    a = random_design("sam", obs)
    b = random_design(["~0+sam"], obs)
    assert (a[0] != b[0]).nnz == 0
    assert a[1:4] == b[1:4]


def test_random_formula_with_intercept_warns():
    obs = _toy_obs()
    with pytest.warns(UserWarning, match="intercept"):
        _, d, *_ = random_design("~sam", obs)
    assert d == [6]


@pytest.mark.parametrize(
    ("fixed", "random", "edit", "match"),
    [
        ("~0+trt+lib", "sam", None, r"no column 'lib' \(in the fixed formula\)"),
        ("~0+trt", "donor", None, "'donor' is not a column of adata.obs"),
        ("~0+trt", "~0+donor", None, r"no column 'donor'"),
        ("~0+trt+age", "sam", "nan_age", r"adata.obs\['age'\].*1 missing value.*'c3'"),
        ("~0+trt", "sam", "nan_sam", r"adata.obs\['sam'\].*missing"),
        ("~0+trt", "sam", "one_sam", "single level"),
        ("~0+trt", "~0+libsize", None, "encodes to 1 column"),
        ("~trt+cls+sam", "~0+cls", None, r"rank deficient.*'trt\[T.B\]'.*'sam\[T.S11\]'"),
        ("~0+trt+trt2", "sam", "dup_trt", r"rank 2 < 3.*'trt\[B\]', 'trt2\[T.B\]' are linear"),
        ("~0+trt+zero", "sam", "zero", "'zero' are zero for every cell"),
        ("~0+trt+", "sam", None, r"Cannot parse the fixed formula '~0\+trt\+'.*Operator `\+`"),
        ("~0+trt cls", "sam", None, "Cannot parse.*Missing operator"),
        ("~0+trt", "~0+sam+", None, "Cannot parse the random formula"),
        ("y~0+trt", "sam", None, "must be one-sided"),
        ("~0+log(lib0)", "sam", "lib0", r"'log\(lib0\)'.*non-finite"),
        ("~0+cls+sam", "sam", None, "confounded with the fixed effects"),
        ("~0+trt", "cell", "cell", "one level per cell"),
        ("~0+trt", [], None, "at least one random term"),
        ("~0+trt", ["sam", "~0+sam"], None, "given twice"),
        ("~0", "sam", None, "no columns"),
    ],
)
def test_design_errors(fixed, random, edit, match):
    obs = _toy_obs()
    if edit == "nan_age":
        obs.loc["c3", "age"] = np.nan
    elif edit == "nan_sam":
        obs.loc["c5", "sam"] = None
    elif edit == "one_sam":
        obs["sam"] = "S1"
    elif edit == "dup_trt":
        obs["trt2"] = obs["trt"]
    elif edit == "zero":
        obs["zero"] = 0.0
    elif edit == "lib0":
        obs["lib0"] = obs["libsize"]
        obs.loc["c0", "lib0"] = 0.0
    elif edit == "cell":
        obs["cell"] = obs.index
    with pytest.raises(ValueError, match=match):
        make_design(obs, fixed, random)


def test_empty_obs():
    with pytest.raises(ValueError, match="no cells"):
        make_design(_toy_obs().iloc[:0], "~0+trt", "sam")


def test_syntax_error_message_is_one_line_without_colour_codes():
    with pytest.raises(ValueError) as info:
        make_design(_toy_obs(), "~0+trt+", "sam")
    text = str(info.value)
    assert "\n" not in text
    assert "\x1b" not in text
