"""Time the df methods of the structured (lme4-family) fit: residual, Satterthwaite, Kenward-Roger.

    PYTHONPATH=src python benchmarks/bench_kenward_roger_structured.py [n_genes] [n_genes_q275]

The designs of bench_structured.py: ``(1 + x | donor)`` over 25 donors (block path, q = 50)
and ``(1 | donor) + (1 | donor:celltype)`` over 25 x 10 levels (block path, q = 275). Each df
method is timed through :func:`scflashmm.lmm` (``structure=``, ``n_jobs=1``), best of three
interleaved runs; the table gives genes per second and the extra time of each per-test df over
the residual-df fit.
"""

import sys
import time

import numpy as np
from bench_structured import simulate

from scflashmm import lmm
from scflashmm._core.sumstats import summary_stats
from scflashmm._random_terms import random_design

DF = ("residual", "satterthwaite", "kenward-roger")


def main(n_genes: int, n_genes_large: int) -> None:
    cells, Y = simulate(max(n_genes, n_genes_large))
    X = np.column_stack([np.ones(len(cells)), cells["x"]])
    print(
        "| design | q | genes | "
        + " | ".join(f"{d} (genes/s)" for d in DF)
        + " | KR extra / Satt extra |"
    )
    print("|---|---|---|" + "---|" * (len(DF) + 1))
    for formula in ("(1 + x | donor)", "(1 | donor) + (1 | donor:celltype)"):
        rd = random_design(formula, cells)
        m = n_genes if rd.Z.shape[1] <= 100 else n_genes_large
        stats = summary_stats(X, Y[:, :m], rd.Z)
        best = dict.fromkeys(DF, np.inf)
        for _ in range(3):
            for df in DF:
                t = time.perf_counter()
                lmm(stats, structure=rd.structure, df=df, n_jobs=1)
                best[df] = min(best[df], time.perf_counter() - t)
        extra = {df: best[df] - best["residual"] for df in DF[1:]}
        rates = " | ".join(f"{m / best[df]:.0f}" for df in DF)
        ratio = extra["kenward-roger"] / extra["satterthwaite"]
        print(f"| `{formula}` | {rd.Z.shape[1]} | {m} | {rates} | {ratio:.2f} |")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*(args + [2000, 200][len(args) :]))
