"""Measure scflashmm's settings next to pseudobulk PyDESeq2 for docs/pseudobulk.md.

Simulates the data of ``benchmarks/few_donors.py`` (samples nested in treatment, three cell
types, genes in four blocks of donor variance: "hom" 0.1 each, "het" 0.02 / 0.1 / 0.3 / 0.6)
and tests every gene for "treated vs control within cell type k" with

- scflashmm, FLASHMM's n - p df (``moderate=False, df="residual"``);
- scflashmm, ``df="satterthwaite"`` (lmerTest's df, from the same fit);
- scflashmm, REML t on (samples - 2) df (a conservative reference row);
- pseudobulk: counts summed per sample x cell type, PyDESeq2 ``~trt`` per cell type.

It writes one row per design, variance setting and method (means over the repeats) to
``docs/_data/pseudobulk.csv``, which docs/pseudobulk.md shows as its table. Needs the
``benchmark`` extra (PyDESeq2)::

    python docs/_scripts/pseudobulk.py                       # the page's numbers
    python docs/_scripts/pseudobulk.py --repeats 1 --genes 200   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from few_donors import (  # noqa: E402
    VARIANCES,
    metrics,
    pseudobulk_pvalues,
    simulate,
    truth_matrix,
)

from scflashmm import lmm, summary_stats  # noqa: E402
from scflashmm._design import make_design  # noqa: E402

OUT = ROOT / "docs" / "_data" / "pseudobulk.csv"
LABELS = {"3v3": "3 vs 3", "8v8": "8 vs 8", "25": "12 vs 13"}


def lmm_rows(adata) -> tuple[dict[str, np.ndarray], float]:
    """P-values (genes x cell types) of the cls:trt terms and the seconds of the whole fit."""
    start = time.perf_counter()
    design = make_design(adata.obs, "~0+log(libsize)+cls+cls:trt", "sam")
    st = summary_stats(design.X, adata.X, design.Z, is_counts=True)
    fit = lmm(st, df="satterthwaite")
    seconds = time.perf_counter() - start
    inter = [j for j, name in enumerate(design.x_columns) if ":trt" in name]
    t = fit.t[:, inter]
    n_samples = design.Z.shape[1]
    return {
        "scflashmm, n - p df (FLASHMM)": 2 * stats.t.sf(np.abs(t), fit.df),
        "scflashmm, Satterthwaite df": fit.p[:, inter],
        "scflashmm, samples - 2 df": 2 * stats.t.sf(np.abs(t), n_samples - 2),
    }, seconds


def write(rows: list[dict], out: Path) -> pd.DataFrame:
    """Average the rows over repeats and write the page's CSV; return the table."""
    table = (
        pd.DataFrame(rows)
        .groupby(["design", "donor variances", "method"], sort=False)
        .mean()
        .reset_index()
    )
    table = table.rename(
        columns={
            "fpr": "FPR at 0.05",
            "fdp": "FDP at BH 5 %",
            "power_bh": "power at BH 5 %",
            "seconds": "time (s)",
        }
    )[
        [
            "design",
            "donor variances",
            "method",
            "FPR at 0.05",
            "FDP at BH 5 %",
            "power at BH 5 %",
            "time (s)",
        ]
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    table.round({"FPR at 0.05": 3, "FDP at BH 5 %": 2, "power at BH 5 %": 2, "time (s)": 1}).to_csv(
        out, index=False
    )
    return table


def main() -> None:
    """Run from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--variances", nargs="+", default=["hom", "het"], choices=VARIANCES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cells", type=int, default=6000)
    parser.add_argument("--genes", type=int, default=600)
    parser.add_argument("--de", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows = []
    for design in args.designs:
        for variances in args.variances:
            for r in range(args.repeats):
                seed = args.seed + 1000 * r + 7 * list(LABELS).index(design)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    adata = simulate(
                        design, VARIANCES[variances], args.cells, args.genes, args.de, seed
                    )
                    clusters = sorted(adata.obs["cls"].unique())
                    truth = truth_matrix(adata, clusters)
                    pvals, seconds = lmm_rows(adata)
                    times = dict.fromkeys(pvals, seconds)
                    start = time.perf_counter()
                    pvals["pseudobulk PyDESeq2"] = pseudobulk_pvalues(adata, clusters, False)
                    times["pseudobulk PyDESeq2"] = time.perf_counter() - start
                for method, p in pvals.items():
                    rows.append(
                        {"design": LABELS[design], "donor variances": variances, "method": method}
                        | metrics(p, truth)
                        | {"seconds": times[method]}
                    )
                print(f"# {design} {variances} repeat {r}: {times}", flush=True)
                write(rows, args.out)  # after every repeat: an interrupted run keeps its rows
    table = write(rows, args.out)
    print(table.to_string(index=False))
    print(f"({args.repeats} repeats, {args.genes} genes, {args.cells} cells; wrote {args.out})")


if __name__ == "__main__":
    main()
