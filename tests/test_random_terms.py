"""lme4-style random-effects terms: parsing, Z against lme4's getME(m, "Z"), and errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scflashmm._random_terms import RandomTerm, parse_random_terms, random_design

DATA = Path(__file__).parent / "data" / "lme4"
ICPT = "(Intercept)"


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("(1|sam)", [(("sam",), (ICPT,))]),
        ("(1|sam) + (1|batch)", [(("sam",), (ICPT,)), (("batch",), (ICPT,))]),
        ("(1|donor/sample)", [(("donor",), (ICPT,)), (("donor", "sample"), (ICPT,))]),
        ("(1|dept:service)", [(("dept", "service"), (ICPT,))]),
        ("(1 + time|donor)", [(("donor",), (ICPT, "time"))]),
        ("(time|donor)", [(("donor",), (ICPT, "time"))]),
        ("(1 + time||donor)", [(("donor",), (ICPT,)), (("donor",), ("time",))]),
        ("(0 + time|donor)", [(("donor",), ("time",))]),
        ("(-1 + time + dose | donor)", [(("donor",), ("time", "dose"))]),
        ("~ (1 | `cell type`)", [(("cell type",), (ICPT,))]),
        ("(1|a/b/c)", [(("a",), (ICPT,)), (("a", "b"), (ICPT,)), (("a", "b", "c"), (ICPT,))]),
    ],
)
def test_parse(formula, expected):
    terms = parse_random_terms(formula)
    assert [(t.group, t.effects) for t in terms] == expected
    assert all(isinstance(t, RandomTerm) and t.correlated for t in terms)


@pytest.mark.parametrize(
    ("formula", "match"),
    [
        ("1|sam", r"'1\|sam'"),
        ("(1|sam) + batch", r"'batch'"),
        ("(1|)", r"\(1\|\)"),
        ("(2|g)", "'2' is not 0 or 1"),
        ("(0|g)", "no effect"),
        ("(1 + x - y|g)", "removing a slope"),
        ("(x y|g)", r"'\(x y\|g\)'"),
        ("(1|||g)", "exactly one"),
        ("(1|g", "Unbalanced"),
        ("(1|g + h)", r"'g \+ h'"),
        ("", "Empty"),
    ],
)
def test_parse_errors_name_the_term(formula, match):
    with pytest.raises(ValueError, match=match):
        parse_random_terms(formula)


def test_parse_does_not_eval():
    with pytest.raises(ValueError, match="Cannot parse"):
        parse_random_terms("(__import__('os').getcwd() | g)")


def _cells() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 40
    return pd.DataFrame(
        {
            "donor": np.repeat(["d2", "d1", "d3", "d4"], n // 4),
            "celltype": pd.Categorical(np.tile(["T", "B"], n // 2), categories=["T", "B", "NK"]),
            "time": rng.normal(size=n),
            "label": np.tile(["x", "y"], n // 2),
            "one": "a",
        }
    )


def test_z_layout_and_names():
    cells = _cells()
    rd = random_design("(1 + time | donor) + (1 | donor:celltype)", cells)
    assert rd.Z.format == "csc"
    assert rd.Z.shape == (40, 4 * 2 + 8)
    # Level-major: d1 intercept, d1 time, d2 intercept, ... ; unused category NK dropped;
    # categorical levels keep their category order (T before B).
    assert rd.z_names[:4] == (
        "donor[d1]:(Intercept)",
        "donor[d1]:time",
        "donor[d2]:(Intercept)",
        "donor[d2]:time",
    )
    assert rd.levels[1][:2] == ("d1:T", "d1:B")
    Z = rd.Z.toarray()
    first = cells["donor"] == "d1"
    np.testing.assert_array_equal(Z[:, 0], first.astype(float))
    np.testing.assert_allclose(Z[:, 1], np.where(first, cells["time"], 0.0))
    np.testing.assert_array_equal(Z[:, 8:].sum(axis=1), np.ones(40))
    st = rd.structure
    assert [t.group for t in st.terms] == ["donor", "donor:celltype"]
    assert st.varcorr_names() == [
        "donor: (Intercept)",
        "donor: corr((Intercept), time)",
        "donor: time",
        "donor:celltype: (Intercept)",
    ]


@pytest.mark.parametrize(
    ("formula", "exc", "match"),
    [
        ("(1 | nowhere)", KeyError, "'nowhere' of random term"),
        ("(1 + dose | donor)", KeyError, "'dose'"),
        ("(1 + label | donor)", ValueError, "not numeric.*factor slopes are not supported"),
        ("(1 | one)", ValueError, "'one'.*1 level"),
        ("(1 + time | donor:time)", ValueError, "at least as many as observations"),
    ],
)
def test_design_errors(formula, exc, match):
    with pytest.raises(exc, match=match):
        random_design(formula, _cells())


def _lme4_z(fit: dict, n: int) -> np.ndarray:
    t = fit["z_triplets"]
    return sp.coo_matrix((t["x"], (t["i"], t["j"])), shape=(n, fit["q"])).toarray()


@pytest.mark.parametrize(
    ("case", "key", "formula"),
    [
        ("sleepstudy", "correlated", "(Days | Subject)"),
        ("sleepstudy", "uncorrelated", "(Days || Subject)"),
        ("penicillin", "crossed", "(1 | plate) + (1 | sample)"),
    ],
)
def test_z_equals_lme4(case, key, formula):
    data = pd.read_csv(DATA / case / "data.csv")
    fit = json.loads((DATA / case / "results.json").read_text())[key]
    rd = random_design(formula, data)
    # lme4's Z (getME(m, "Z")) column for column, in the same order.
    np.testing.assert_array_equal(rd.Z.toarray(), _lme4_z(fit, len(data)))
    assert [n.split("[")[1].split("]")[0] for n in rd.z_names] == fit["z_colnames"]


def test_nested_z_equals_lme4_up_to_term_order():
    data = pd.read_csv(DATA / "pastes" / "data.csv")
    fit = json.loads((DATA / "pastes" / "results.json").read_text())["nested"]
    rd = random_design("(1 | batch/cask)", data)
    # lme4 writes batch/cask as cask:batch + batch and sorts terms by decreasing levels.
    names = [n.split(":(Intercept)")[0] for n in rd.z_names]
    lme4_names = [
        f"batch:cask[{c.split(':')[1]}:{c.split(':')[0]}]" if ":" in c else f"batch[{c}]"
        for c in fit["z_colnames"]
    ]
    order = [names.index(n) for n in lme4_names]
    np.testing.assert_array_equal(rd.Z.toarray()[:, order], _lme4_z(fit, len(data)))
