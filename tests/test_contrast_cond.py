"""Contrasts as analysts write them: cond(...) on the design, backticks, contrasts_within."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _reference import FLASHMM_SETTINGS

import scflashmm as sfm
from scflashmm._contrast import DesignConditions, contrasts_within, parse_contrast


@pytest.fixture(scope="module")
def obs():
    rng = np.random.default_rng(0)
    n = 60
    return pd.DataFrame(
        {
            "cls": pd.Categorical(rng.choice(["a", "b", "c"], n)),
            "trt": pd.Categorical(rng.choice(["A", "B"], n)),
            "libsize": rng.uniform(100, 1000, n),
            "age": rng.uniform(20, 60, n),
        }
    )


def vector(obs, fixed, expression):
    names = sfm._design.fixed_design(fixed, obs)[1]
    return pd.Series(
        parse_contrast(expression, names, cond=DesignConditions(obs, fixed, names)), index=names
    )


def test_cond_difference_within_a_level(obs):
    v = vector(
        obs, "~0+log(libsize)+cls+cls:trt", 'cond(trt="B", cls="b") - cond(trt="A", cls="b")'
    )
    assert v["cls[b]:trt[T.B]"] == 1 and v.drop("cls[b]:trt[T.B]").eq(0).all()


def test_cond_averages_unspecified_factors(obs):
    v = vector(obs, "~0+log(libsize)+cls+cls:trt", 'cond(trt="B") - cond(trt="A")')
    inter = [c for c in v.index if ":" in c]
    np.testing.assert_allclose(v[inter], 1 / 3)
    np.testing.assert_allclose(v.drop(inter), 0, atol=1e-15)  # log(libsize) at its mean cancels


def test_cond_with_intercept_and_numeric(obs):
    fixed = "~age+cls+trt"
    v = vector(obs, fixed, "cond(trt=B) - cond(trt=A)")  # bare levels work too
    assert v["trt[T.B]"] == 1 and v.drop("trt[T.B]").eq(0).all()
    v = vector(obs, fixed, "cond(age=40) - cond(age=30)")
    assert v["age"] == pytest.approx(10) and v.drop("age").abs().max() < 1e-12
    row = vector(obs, fixed, "cond()")  # everything averaged
    assert row["Intercept"] == 1 and row["age"] == pytest.approx(obs["age"].mean())
    assert row["cls[T.b]"] == pytest.approx(1 / 3)


def test_backticks_as_formulaic_constraints(obs):
    fixed = "~0+cls+cls:trt"
    a = vector(obs, fixed, "(`cls[a]:trt[T.B]` + `cls[b]:trt[T.B]`)/2")
    b = vector(obs, fixed, "(cls[a]:trt[T.B] + cls[b]:trt[T.B])/2")
    pd.testing.assert_series_equal(a, b)


@pytest.mark.parametrize(
    ("expression", "match"),
    [
        ('cond(trt="C") - cond(trt="A")', r"'C' is not a level of 'trt'; its levels: \['A', 'B'\]"),
        ('cond(tr="B")', "'tr' is not a variable of the fixed formula"),
        ('cond(trt="B"', r"missing '\)'"),
        ("cond(trt)", r"write cond\(variable=\"level\""),
        ('cond(trt="B", trt="A")', "gives 'trt' twice"),
        ('cond(libsize="x")', "'libsize' is numeric: give a number"),
        ('cond(trt="A") - cond(trt="A")', "is zero for every design column"),
        ("`nope` + 1", "Unknown name '`nope`'"),
        ("cls[a] * cls[b]", "product of two design columns"),
    ],
)
def test_errors_name_the_bad_part(obs, expression, match):
    with pytest.raises(ValueError, match=match):
        vector(obs, "~0+log(libsize)+cls+cls:trt", expression)


def test_cond_needs_the_design():
    with pytest.raises(ValueError, match=r"needs the cell metadata and the fixed formula"):
        sfm.contrast_matrix('cond(trt="B")', ["trt[A]", "trt[B]"])


def test_contrasts_within(obs):
    named = contrasts_within(obs, "trt", "A", "cls")
    assert list(named) == ["B vs A in cls a", "B vs A in cls b", "B vs A in cls c"]
    assert named["B vs A in cls c"] == 'cond(trt="B", cls="c") - cond(trt="A", cls="c")'
    assert contrasts_within(obs, "trt", "A") == {"B vs A": 'cond(trt="B") - cond(trt="A")'}
    three = contrasts_within(obs, "cls", "a", levels=["c"])
    assert list(three) == ["c vs a"]
    for kwargs, match in [
        ({"factor": "nope", "reference": "A"}, "not a column"),
        ({"factor": "trt", "reference": "Z"}, "reference 'Z' is not a level"),
        ({"factor": "trt", "reference": "A", "levels": ["A"]}, "not levels of 'trt' other than"),
    ]:
        with pytest.raises(ValueError, match=match):
            contrasts_within(obs, **kwargs)
    with pytest.raises(TypeError, match="AnnData or a DataFrame"):
        contrasts_within([1, 2], "trt", "A")


def test_through_flashmm_de_and_the_getter():
    adata = sfm.datasets.simulate_rnaseq(
        n_genes=20, n_cells=600, n_clusters=3, n_de_genes=3, seed=2
    )
    fixed = "~0+log(libsize)+cls+cls:trt"
    named = sfm.tl.contrasts_within(adata, "trt", "A", "cls")
    sfm.tl.flashmm_de(
        adata, fixed, "sam", is_counts=True, contrasts=named, store_cov=True, **FLASHMM_SETTINGS
    )
    est = adata.varm["flashmm_contrast_coef"]
    for level in ("1", "2", "3"):
        np.testing.assert_allclose(
            est[f"B vs A in cls {level}"],
            adata.varm["flashmm_coef"][f"cls[{level}]:trt[T.B]"],
            rtol=1e-12,
        )
    # a new cond() contrast in the getter, from the stored covariance
    mean = sfm.get.flashmm_df(adata, contrast='cond(trt="B") - cond(trt="A")').set_index("variable")
    expected = adata.varm["flashmm_coef"][[f"cls[{c}]:trt[T.B]" for c in "123"]].mean(axis=1)
    np.testing.assert_allclose(mean.loc[adata.var_names, "log_fc"], expected, rtol=1e-10)


def test_cli_contrast_with_cond_needs_no_name():
    from scflashmm.cli import _parse_contrasts

    expr = 'cond(trt="B") - cond(trt="A")'
    assert _parse_contrasts([expr, f"BvsA={expr}"]) == {expr: expr, "BvsA": expr}
