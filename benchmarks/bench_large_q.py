"""Large q: Chem97 (mlmRev; ``(1 | school) + (1 | lea)``, q = 2,541) against lme4, same run.

    PYTHONPATH=src python benchmarks/bench_large_q.py [max_genes]

Times ``lmm(stats, structure=...)`` (the sparse path, chosen automatically) on the Chem97
score, then on 1, 2, 4 ... ``max_genes`` (default 8) responses (the score plus noise) to show
the scaling in genes, and runs ``Rscript benchmarks/lme4_timing.R 0`` (lme4 on the same data,
default settings) right after. The summary statistics are computed first and not timed.
"""

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import scflashmm
from scflashmm._core.sumstats import summary_stats
from scflashmm._random_terms import random_design

ROOT = Path(__file__).parents[1]


def main(max_genes: int) -> None:
    data = pd.read_csv(ROOT / "tests" / "data" / "lme4" / "chem97" / "data.csv.gz")
    rd = random_design("(1 | school) + (1 | lea)", data)
    X = np.column_stack([np.ones(len(data)), data["gcsecnt"].to_numpy(float)])
    rng = np.random.default_rng(0)
    y = data["score"].to_numpy(float)
    Y = y[:, None] + rng.normal(0, 0.5, (len(y), max_genes))
    Y[:, 0] = y
    stats = summary_stats(X, Y, rd.Z)
    print(f"q = {rd.structure.q}, n = {len(y)}")
    m = 1
    while m <= max_genes:
        sub = scflashmm.SummaryStats(
            stats.XX, stats.XY[:, :m], stats.ZX, stats.ZY[:, :m], stats.ZZ, stats.Ynorm[:m], stats.n
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            fit = scflashmm.lmm(sub, structure=rd.structure, n_jobs=1)
            el = time.perf_counter() - t0
        print(f"scflashmm {fit.kernel}: {m} response(s) {el:.2f} s ({el / m:.2f} s per response)")
        m *= 2
    out = subprocess.run(
        ["Rscript", "benchmarks/lme4_timing.R", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    print("lme4:", " ".join(out.stdout.split()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
