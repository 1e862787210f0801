"""Load the FLASHMM 1.3.0 reference cases in tests/data/reference (see its README.md).

Arrays are returned in scflashmm's orientation: genes first for per-gene outputs, cells x genes
for Y. Long-form arrays (cov, FIM) are reshaped to (genes, rows, cols).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"
CASES = sorted(p.name for p in REFERENCE.iterdir() if p.is_dir())


def _matrix(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, index_col=0)


def _long(path: Path, genes: list[str], rows: list[str]) -> np.ndarray:
    """Long form gene,row,col,value (row fastest) -> (genes, rows, rows)."""
    table = pd.read_csv(path)
    values = table["value"].to_numpy().reshape(len(genes), len(rows), len(rows))
    return values.transpose(0, 2, 1)  # R column-major: row index fastest


@cache
def load_case(name: str) -> dict:
    """Inputs and FLASHMM outputs of one reference case (cached; do not modify in place)."""
    folder = REFERENCE / name
    spec = json.loads((folder / "spec.json").read_text())
    genes = (folder / "genes.txt").read_text().split()
    cells = (folder / "cells.txt").read_text().split()
    counts = sp.csr_array(scipy.io.mmread(folder / "Y.mtx").T.tocsr())
    dtypes = {c: str for c, kind in spec["obs_columns"].items() if kind in ("character", "factor")}
    obs = pd.read_csv(folder / "obs.csv", index_col=0, dtype=dtypes)
    X = _matrix(folder / "X.csv")
    Z = _matrix(folder / "Z.csv")
    covariates = list(X.columns)
    case = {
        "name": name,
        "spec": spec,
        "genes": genes,
        "cells": cells,
        "counts": counts,
        "Y": _transform(counts, spec["is_counts"]),
        "obs": obs,
        "X": X.to_numpy(dtype=np.float64),
        "Z": Z.to_numpy(dtype=np.float64),
        "covariates": covariates,
        "d": spec["d"],
        "df": int((folder / "df.txt").read_text()),
    }
    for what in ("coef", "se", "t", "p", "theta", "se_theta", "dlogL"):
        case[what] = _matrix(folder / f"{what}.csv").T.to_numpy(dtype=np.float64)
    case["logLik"] = _matrix(folder / "logLik.csv")["logLik"].to_numpy(dtype=np.float64)
    case["niter"] = _matrix(folder / "niter.csv")["niter"].to_numpy(dtype=np.float64)
    case["cov"] = _long(folder / "cov.csv", genes, covariates)
    if (folder / "RE.csv").exists():
        case["re"] = _matrix(folder / "RE.csv").T.to_numpy(dtype=np.float64)
        case["fim_beta"] = _long(folder / "FIM_beta.csv", genes, covariates)
        k1 = len(spec["d"]) + 1
        case["fim_theta"] = _long(folder / "FIM_theta.csv", genes, [""] * k1)
    ss = {k: _matrix(folder / f"ss_{k}.csv").to_numpy(dtype=np.float64) for k in ("XX", "XY", "ZX", "ZY", "ZZ")}
    ss["Ynorm"] = _matrix(folder / "ss_Ynorm.csv")["Ynorm"].to_numpy(dtype=np.float64)
    ss["n"] = int((folder / "ss_n.txt").read_text())
    case["ss"] = ss
    case["test_default"] = _matrix(folder / "test_default.csv")
    if (folder / "contrast.csv").exists():
        case["contrast"] = _matrix(folder / "contrast.csv")
        case["test_contrast"] = {
            alt: _matrix(folder / f"test_contrast_{alt}.csv") for alt in ("two.sided", "less", "greater")
        }
    return case


def _transform(counts: sp.csr_array, is_counts: bool) -> sp.csr_array:
    Y = counts.astype(np.float64)
    if is_counts:
        Y.data = np.log2(1 + Y.data)
    return Y
