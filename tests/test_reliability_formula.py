"""Reliability: formula variables resolved by formulaic (R/Seurat names, stateful transforms,
columns named like functions), and one-line CLI errors for malformed formulas/contrasts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scflashmm._design import fixed_design, make_design
from scflashmm.cli import main


@pytest.fixture(scope="module")
def obs():
    rng = np.random.default_rng(0)
    n = 80
    return pd.DataFrame(
        {
            "orig.ident": rng.choice(["s1", "s2", "s3", "s4"], n),
            "cell.type": rng.choice(["T", "B"], n),
            "libsize": rng.uniform(1e3, 5e3, n),
            "log": rng.choice(["a", "b"], n),
            "C": rng.choice(["x", "y"], n),
            "I": rng.normal(size=n),
            "np": rng.normal(size=n),
        },
        index=[f"c{i}" for i in range(n)],
    )


@pytest.mark.parametrize(
    ("formula", "columns"),
    [
        ("~0+`cell.type`", ["cell.type[B]", "cell.type[T]"]),
        ("~0+`cell.type`+scale(libsize)", ["cell.type[B]", "cell.type[T]", "scale(libsize)"]),
        ("~center(libsize)", ["Intercept", "center(libsize)"]),
        ("~poly(libsize, 2)", ["Intercept", "poly(libsize, 2)[1]", "poly(libsize, 2)[2]"]),
        (
            "~bs(libsize, 3)",
            ["Intercept", "bs(libsize, 3)[1]", "bs(libsize, 3)[2]", "bs(libsize, 3)[3]"],
        ),
        ("~0+log(libsize)", ["log(libsize)"]),
        ("~0+log", ["log[a]", "log[b]"]),
        ("~0+C+I", ["C[x]", "C[y]", "I"]),
        (
            "~0+C(`cell.type`)+np.log(libsize)",
            ["C(`cell.type`)[B]", "C(`cell.type`)[T]", "np.log(libsize)"],
        ),
        ("~0+C+np", ["C[x]", "C[y]", "np"]),
    ],
)
def test_fixed_formula_variables(obs, formula, columns):
    X, names = fixed_design(formula, obs)
    assert names == columns
    assert X.shape == (len(obs), len(columns))


@pytest.mark.parametrize(
    ("formula", "name"), [("~0+log(libsize)+log", "log"), ("~np+np.log(libsize)", "np")]
)
def test_column_hiding_a_function(obs, formula, name):
    with pytest.raises(ValueError, match=rf"uses '{name}' both as a column .* and as a function"):
        fixed_design(formula, obs)


def test_dotted_random_term(obs):
    design = make_design(obs, "~0+`cell.type`", "orig.ident")
    assert design.random_terms == ["orig.ident"]
    assert design.d == [4]


def test_missing_variable_named(obs):
    with pytest.raises(ValueError, match=r"no column 'nosuch' \(in the fixed formula\)"):
        fixed_design("~0+`cell.type`+nosuch", obs)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    import scflashmm as sfm

    adata = sfm.datasets.simulate_rnaseq(
        n_genes=8, n_cells=200, n_samples=4, n_clusters=2, n_de_genes=1, seed=2
    )
    path = tmp_path_factory.mktemp("form") / "d.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("fixed", "random", "contrast", "message"),
    [
        ("~0+cls|sam", "sam", None, "several parts"),
        ("~0+cls", "~0+sam|cls", None, "Cannot parse random-effects term"),
        ("~0+cls", "sam", "x=" + "(" * 5000 + "cls[1]" + ")" * 5000, "nested"),
    ],
    ids=["fixed-bar", "random-bar", "deep-contrast"],
)
def test_cli_errors_one_line(h5ad, tmp_path, capsys, fixed, random, contrast, message):
    argv = ["de", str(h5ad), "--fixed", fixed, "--random", random, "--counts"]
    argv += ["--out", str(tmp_path / "r.csv")]
    if contrast:
        argv += ["--contrast", contrast]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("scflashmm: error:") and message in err
