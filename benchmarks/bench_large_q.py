"""Large q: Chem97 (mlmRev; ``(1 | school) + (1 | lea)``, q = 2,541) against lme4, same run.

    PYTHONPATH=src python benchmarks/bench_large_q.py [counts ...] [--jobs N] [--crossed]

Times ``lmm(stats, structure=...)`` (the Schur path, chosen automatically) on 1, 100 and
1,000 responses by default (the Chem97 score, then the score plus noise) to show that the time
grows linearly in genes, and runs ``Rscript benchmarks/lme4_timing.R 0`` (lme4 on the same
data, default settings, one response) right after. CPU seconds are printed beside the wall
time (on a shared machine they are the better guide). ``--jobs`` sets ``n_jobs`` (default 1, as
lme4 runs on one core). ``--crossed`` also times a fully crossed design of the same size
(2,410 levels crossed with 131, each cell's two levels drawn independently), where the Schur
complement is dense (131 x 131 per gene). The summary statistics are computed first and not
timed.
"""

import argparse
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import scflashmm
from scflashmm._core.sumstats import summary_stats
from scflashmm._random_terms import random_design

ROOT = Path(__file__).parents[1]

#: lme4 on the crossed variant, default settings, one response (as lme4_timing.R does Chem97).
_LME4_CROSSED = """
suppressPackageStartupMessages(library(lme4))
d <- read.csv(commandArgs(trailingOnly = TRUE)[1])
d$school <- factor(d$school); d$lea <- factor(d$lea)
t0 <- proc.time()
invisible(lmer(score ~ 1 + gcsecnt + (1 | school) + (1 | lea), data = d, REML = TRUE,
               control = lmerControl(check.conv.singular = "ignore")))
t <- proc.time() - t0
cat(sprintf("%.4f (CPU %.4f)", t[["elapsed"]], t[["user.self"]] + t[["sys.self"]]))
"""


def _time(data: pd.DataFrame, counts: list[int], jobs: int, label: str) -> None:
    rd = random_design("(1 | school) + (1 | lea)", data)
    X = np.column_stack([np.ones(len(data)), data["gcsecnt"].to_numpy(float)])
    rng = np.random.default_rng(0)
    y = data["score"].to_numpy(float)
    m = max(counts)
    Y = y[:, None] + rng.normal(0, 0.5, (len(y), m))
    Y[:, 0] = y
    stats = summary_stats(X, Y, rd.Z)
    print(f"{label}: q = {rd.structure.q}, n = {len(y)}")
    for k in counts:
        sub = scflashmm.SummaryStats(
            stats.XX, stats.XY[:, :k], stats.ZX, stats.ZY[:, :k], stats.ZZ, stats.Ynorm[:k], stats.n
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0, c0 = time.perf_counter(), time.process_time()
            fit = scflashmm.lmm(sub, structure=rd.structure, n_jobs=jobs)
            el, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"  scflashmm {fit.kernel}: {k} response(s) {el:.2f} s ({el / k:.3f} s per response; "
            f"CPU {cpu / k:.3f} s), n_jobs={jobs}, {int(fit.converged.sum())} converged"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[1, 100, 1000])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--crossed", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    data = pd.read_csv(ROOT / "tests" / "data" / "lme4" / "chem97" / "data.csv.gz")
    _time(data, args.counts, args.jobs, "Chem97 (schools nested in LEAs)")
    if args.crossed:
        rng = np.random.default_rng(1)
        crossed = data.assign(lea=rng.permutation(data["lea"].to_numpy()))
        _time(crossed, args.counts, args.jobs, "crossed (LEA permuted over cells)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "crossed.csv"
            crossed.to_csv(path, index=False)
            out = subprocess.run(
                ["Rscript", "-e", _LME4_CROSSED, str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
        print("lme4 crossed (s per response):", out.stdout.strip())
    out = subprocess.run(
        ["Rscript", "benchmarks/lme4_timing.R", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    print("lme4 (s per response):", " ".join(out.stdout.split()))


if __name__ == "__main__":
    main()
