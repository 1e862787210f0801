"""Load the FLASHMM 1.3.0 reference cases of ``tests/data/reference`` (see its README.md).

``load_case(name)`` returns a dict of arrays/tables in FLASHMM's orientation (covariates x genes),
``case_adata(name)`` an AnnData (cells x genes, raw values; counts for count cases) whose ``obs``
holds the factor columns as categoricals with the R level order of ``spec.json``.
Everything is cached: treat the returned objects as read-only (``case_adata`` returns a copy).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io
from scipy import sparse

REFERENCE = Path(__file__).parent / "data" / "reference"
CASES = sorted(p.name for p in REFERENCE.iterdir() if (p / "spec.json").exists())
ALTERNATIVES = {"two-sided": "two.sided", "less": "less", "greater": "greater"}


def case_path(name: str) -> Path:
    """Folder of a case; ``name`` may be the full name or its letter prefix (``"b"``)."""
    for case in CASES:
        if case == name or case.split("_", 1)[0] == name:
            return REFERENCE / case
    msg = f"No reference case {name!r}; available: {CASES}"
    raise KeyError(msg)


def _csv(path: Path, **kw) -> pd.DataFrame:
    return pd.read_csv(path, index_col=0, **kw)


def _long_to_array(path: Path, genes: list[str], names: list[str]) -> np.ndarray:
    """Long gene,row,col,value (row fastest, R column-major) -> (m, p, p) array [gene, row, col]."""
    df = pd.read_csv(path)
    m, p = len(genes), len(names)
    # order is row fastest, then col, then gene: reshape to [gene, col, row]
    assert len(df) == m * p * p
    assert list(df["gene"].iloc[:: p * p]) == genes
    assert list(df["row"].iloc[:p]) == names
    return df["value"].to_numpy(dtype=float).reshape(m, p, p).transpose(0, 2, 1)


@cache
def load_case(name: str) -> dict:
    """All inputs and FLASHMM outputs of one case.

    Keys: ``name``, ``path``, ``spec``, ``genes``, ``cells``, ``Y`` (CSR cells x genes, raw:
    counts for count cases), ``obs`` (categoricals for factor columns, R level order), ``X``,
    ``Z`` (DataFrames, R column names), ``coef``/``se``/``t``/``p`` (covariates x genes),
    ``theta``/``se_theta``/``dlogL`` (var1..vark, var0 x genes), ``logLik``/``niter`` (Series),
    ``df`` (int), ``cov`` ((m, p, p), R X column order), ``test_default``, and when present
    ``contrast`` (covariates x contrasts), ``test_contrast`` (dict alternative -> table),
    ``RE``, ``FIM_beta``, ``FIM_theta``, ``ss`` (dict XX, XY, ZX, ZY, ZZ, Ynorm, n).
    """
    path = case_path(name)
    spec = json.loads((path / "spec.json").read_text())
    genes = (path / "genes.txt").read_text().split()
    cells = (path / "cells.txt").read_text().split()
    Y = sparse.csr_matrix(scipy.io.mmread(path / "Y.mtx").T, dtype=np.float64)
    character = [c for c, cls in spec["obs_columns"].items() if cls in ("character", "factor")]
    obs = _csv(path / "obs.csv", dtype=dict.fromkeys(character, str))
    obs.index = obs.index.astype(str)
    for col, levels in spec["factor_levels"].items():
        if col in obs.columns:
            obs[col] = pd.Categorical(obs[col], categories=levels)
    assert list(obs.index) == cells
    out = {
        "name": path.name,
        "path": path,
        "spec": spec,
        "genes": genes,
        "cells": cells,
        "Y": Y,
        "obs": obs,
        "X": _csv(path / "X.csv"),
        "Z": _csv(path / "Z.csv"),
        "df": int((path / "df.txt").read_text().strip()),
        "test_default": _csv(path / "test_default.csv"),
    }
    for stem in ("coef", "se", "t", "p", "theta", "se_theta", "dlogL"):
        out[stem] = _csv(path / f"{stem}.csv")
    out["logLik"] = _csv(path / "logLik.csv")["logLik"]
    out["niter"] = _csv(path / "niter.csv")["niter"]
    x_names = list(out["X"].columns)
    out["cov"] = _long_to_array(path / "cov.csv", genes, x_names)
    if (path / "contrast.csv").exists():
        out["contrast"] = _csv(path / "contrast.csv")
        out["test_contrast"] = {
            alt: _csv(path / f"test_contrast_{r_alt}.csv") for alt, r_alt in ALTERNATIVES.items()
        }
    if (path / "RE.csv").exists():
        out["RE"] = _csv(path / "RE.csv")
    for fim, names in (("FIM_beta", x_names), ("FIM_theta", list(out["theta"].index))):
        if (path / f"{fim}.csv").exists():
            out[fim] = _long_to_array(path / f"{fim}.csv", genes, names)
    ss = {}
    for stem in ("XX", "XY", "ZX", "ZY", "ZZ"):
        ss[stem] = _csv(path / f"ss_{stem}.csv")
    ss["Ynorm"] = _csv(path / "ss_Ynorm.csv").iloc[:, 0]
    ss["n"] = int((path / "ss_n.txt").read_text().strip())
    out["ss"] = ss
    return out


def case_adata(name: str, *, layout: str = "csr"):
    """AnnData of a case: ``X`` cells x genes (``layout`` "csr", "csc" or "dense"), obs, var.

    The values are the raw ones (counts for count cases: fit them with ``is_counts=True``).
    """
    import anndata as ad

    case = load_case(name)
    Y = case["Y"]
    if layout == "csc":
        Y = Y.tocsc()
    elif layout == "dense":
        Y = Y.toarray()
    elif layout != "csr":
        msg = f"unknown layout {layout!r}"
        raise ValueError(msg)
    return ad.AnnData(
        X=Y.copy(),
        obs=case["obs"].copy(),
        var=pd.DataFrame(index=pd.Index(case["genes"], dtype=str)),
    )


def r_to_formulaic_expr(expr: str, mapping: dict[str, str]) -> str:
    """Rewrite a contrast expression over R names into one over formulaic names."""
    import re

    keys = sorted(mapping, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(k) for k in keys))
    return pattern.sub(lambda m: mapping[m.group(0)], expr)


def genes_first(frame: pd.DataFrame) -> np.ndarray:
    """A FLASHMM table (rows: covariates or components, columns: genes) as (genes, rows)."""
    return frame.T.to_numpy(dtype=np.float64)


def lmm_fit_case(case: dict):
    """``scflashmm.lmm_fit`` on a case's X, Y, Z, called as FLASHMM was (spec.json)."""
    import scflashmm

    spec = case["spec"]
    return scflashmm.lmm_fit(
        case["Y"],
        case["X"].to_numpy(),
        case["Z"].to_numpy(),
        spec["d"],
        is_counts=spec["is_counts"],
        method=spec["method"],
        theta0=spec["theta0"],
        max_iter=spec["max_iter"],
        epsilon=spec["epsilon"],
        output_re="RE" in case,
        output_fim="FIM_beta" in case,
        feature_names=case["genes"],
        covariate_names=list(case["X"].columns),
    )


def comparable_genes(case: dict) -> np.ndarray:
    """Genes FLASHMM fits meaningfully: not all-zero, and not case f's constant Gene2 (noise)."""
    keep = ~np.isin(case["genes"], case["spec"]["na_genes"])
    if case["name"].startswith("f_"):
        keep &= np.array(case["genes"]) != "Gene2"
    return keep


# ------------------------------------------------------------------------ the AnnData front end

#: Case b's model and FLASHMM's contrasts of case b over formulaic's names (spec.json "contrasts").
FIXED_B = "~0+log(libsize)+cls+cls:trt"
BVSA_B = "(cls[1]:trt[T.B] + cls[2]:trt[T.B] + cls[3]:trt[T.B] + cls[4]:trt[T.B])/4"
CONTRASTS_B = {
    "BvsA": BVSA_B,
    "cls1:trtB - cls2:trtB": "cls[1]:trt[T.B] - cls[2]:trt[T.B]",
    "libsize_effect": "log(libsize)",
}
#: Columns of get.flashmm_df (pertpy's DE schema, plus df, converged and singular).
TIDY_COLUMNS = [
    "variable", "contrast", "log_fc", "sd", "t_value", "df", "p_value", "adj_p_value",
    "converged", "singular",
]  # fmt: skip
#: The same for a fit of counts, which has effect sizes (log2 fold changes of normalised means).
TIDY_COLUMNS_COUNTS = [*TIDY_COLUMNS, "log2fc_means"]
#: varm tables compared between two fits (with f"{key}_" in front).
RESULT_TABLES = ["coef", "se", "t", "p", "theta", "se_theta", "diag"]


#: ``tl.flashmm_de``'s options that give FLASHMM's exact numbers (its defaults are calibrated
#: for few samples instead: docs/calibration.md).
FLASHMM_SETTINGS = {
    "moderate": False,
    "df": "residual",
    "nonnegative": False,
    "criterion": "flashmm",
}


def fit_case(name: str, **kwargs) -> tuple[Any, dict, dict[str, str]]:
    """Fit a reference case through flashmm_de; return (adata, case, R name -> formulaic name)."""
    import warnings

    import scflashmm as sfm
    from scflashmm import ConvergenceWarning, DegenerateFeatureWarning

    case = load_case(name)
    spec = case["spec"]
    adata = kwargs.pop("adata", None) or case_adata(name)
    kwargs = FLASHMM_SETTINGS | kwargs
    kwargs.setdefault("store_cov", True)  # the parity tests compare FLASHMM's covariance
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


def assert_same_results(
    a: Any, b: Any, key: str = "flashmm", atol: float = 1e-10, *, effect_sizes: bool = True
) -> None:
    """The varm tables (and contrasts, covariance, effect sizes) of two fits agree."""
    contrasts = ["contrast_coef", "contrast_se", "contrast_t", "contrast_p"]
    for suffix in [*RESULT_TABLES, *contrasts, *(["log2fc"] if effect_sizes else [])]:
        name = f"{key}_{suffix}"
        if name in a.varm or name in b.varm:
            pd.testing.assert_frame_equal(a.varm[name], b.varm[name], atol=atol, rtol=1e-9)
    if f"{key}_cov" in a.varm or f"{key}_cov" in b.varm:
        cov_a, cov_b = a.varm[f"{key}_cov"], b.varm[f"{key}_cov"]
        np.testing.assert_allclose(cov_a, cov_b, atol=atol, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# formulaic <-> R model.matrix names (moved here from the package: only the tests need them)
# --------------------------------------------------------------------------------------------

_ENCODED = re.compile(r"^(?P<var>.+?)\[(?:T\.)?(?P<level>[^\[\]]*)\]$")


def _split_interaction(name: str) -> list[str]:
    """Split on ':' outside brackets, parentheses and backticks."""
    parts: list[str] = []
    cur: list[str] = []
    depth, tick = 0, False
    for ch in name:
        if ch == "`":
            tick = not tick
        elif not tick and ch in "([":
            depth += 1
        elif not tick and ch in ")]":
            depth -= 1
        if ch == ":" and depth == 0 and not tick:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _r_part(part: str) -> str:
    if part == "Intercept":
        return "(Intercept)"
    m = _ENCODED.match(part)
    if m is None:
        return part.replace("`", "")
    return f"{m['var'].replace('`', '')}{m['level']}"


def r_column_name(name: str) -> str:
    """Spell a formulaic design-column name the way R's ``model.matrix`` does.

    Parameters
    ----------
    name
        A formulaic column name.

    Returns
    -------
    The R name: ``"Intercept"`` -> ``"(Intercept)"``, ``"trt[T.B]"`` -> ``"trtB"``,
    ``"cls[1]"`` -> ``"cls1"``, ``"cls[1]:trt[T.B]"`` -> ``"cls1:trtB"``; numeric terms such
    as ``"log(libsize)"`` or ``"age"`` are unchanged. The order of the variables inside an
    interaction is kept (R may order them differently; see :func:`match_r_columns`).

    Examples
    --------
    >>> r_column_name("cls[1]:trt[T.B]")
    'cls1:trtB'
    """
    return ":".join(_r_part(p) for p in _split_interaction(name))


def _canonical(r_name: str) -> frozenset[str]:
    return frozenset(_split_interaction(r_name))


def match_r_columns(names: Sequence[str], r_names: Sequence[str]) -> list[int]:
    """Position in ``names`` (formulaic) of each of ``r_names`` (R ``model.matrix``).

    Interaction names are compared as sets of factors, so ``cls[T.2]:trt[A]`` matches R's
    ``trtA:cls2``.

    Parameters
    ----------
    names
        Formulaic column names.
    r_names
        R column names.

    Returns
    -------
    ``idx`` with ``names[idx[i]]`` corresponding to ``r_names[i]``.

    Raises
    ------
    ValueError
        If a name has no counterpart, or the lists differ in length.
    """
    keys: dict[frozenset[str], int] = {}
    for i, n in enumerate(names):
        key = _canonical(r_column_name(n))
        if key in keys:
            msg = f"Columns {names[keys[key]]!r} and {n!r} have the same R name."
            raise ValueError(msg)
        keys[key] = i
    if len(names) != len(r_names):
        msg = f"{len(names)} formulaic columns but {len(r_names)} R columns."
        raise ValueError(msg)
    out = []
    for r in r_names:
        key = _canonical(r)
        if key not in keys:
            msg = f"R column {r!r} has no formulaic counterpart among {list(names)}."
            raise ValueError(msg)
        out.append(keys[key])
    return out
