"""Time the structured (lme4-family) solver on simulated genes.

    PYTHONPATH=src python benchmarks/bench_structured.py [n_genes] [n_genes_q275]

Two designs from the random-slopes issue: ``(1 + x | donor)`` over 25 donors, and
``(1 | donor) + (1 | donor:celltype)`` over 25 x 10 levels (q = 275). Prints genes per second
of :func:`fit_structured` (the summary statistics are computed first and not timed).
"""

import sys
import time

import numpy as np
import pandas as pd

from scflashmm._core.structured import fit_structured
from scflashmm._core.sumstats import summary_stats
from scflashmm._random_terms import random_design


def simulate(n_genes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    donors, per = 25, 200
    cells = pd.DataFrame(
        {
            "donor": np.repeat([f"d{i:02d}" for i in range(donors)], per),
            "celltype": rng.choice([f"c{i}" for i in range(10)], donors * per),
            "x": rng.uniform(-1, 1, donors * per),
        }
    )
    d = pd.factorize(cells["donor"])[0]
    b0 = rng.normal(0, 0.5, (donors, n_genes))
    b1 = rng.normal(0, 0.3, (donors, n_genes))
    ct = pd.factorize(cells["donor"] + cells["celltype"])[0]
    b2 = rng.normal(0, 0.3, (ct.max() + 1, n_genes))
    Y = b0[d] + b1[d] * cells["x"].to_numpy()[:, None] + b2[ct] + rng.normal(size=(len(d), n_genes))
    return cells, Y


def main(n_genes: int, n_genes_large: int) -> None:
    cells, Y = simulate(n_genes)
    X = np.column_stack([np.ones(len(cells)), cells["x"]])
    for formula in ("(1 + x | donor)", "(1 | donor) + (1 | donor:celltype)"):
        rd = random_design(formula, cells)
        if rd.Z.shape[1] > 100:
            n_genes = min(n_genes, n_genes_large)
        stats = summary_stats(X, Y[:, :n_genes], rd.Z)
        t = time.perf_counter()
        fit = fit_structured(stats, rd.structure)
        el = time.perf_counter() - t
        print(
            f"{formula:40s} q={rd.Z.shape[1]:4d} genes={n_genes} {el:7.2f} s "
            f"{n_genes / el:8.1f} genes/s  converged={fit.converged.mean():.3f} "
            f"median niter={np.median(fit.niter):.0f}"
        )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*(args + [1000, 100][len(args) :]))
