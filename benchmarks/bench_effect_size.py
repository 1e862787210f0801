"""Cost of the effect sizes (log2 fold changes of normalised means) of ``tl.flashmm_de``.

Times, on simulated counts (CSR), the pass of the summary statistics, the pass of the pattern
sums of the effect sizes, and the whole fit with and without effect sizes (best of
``--repeats``), and prints the median ratio of ``log_fc`` and ``log2fc_means`` to the
simulator's true log2 fold changes on its DE genes::

    PYTHONPATH=src python benchmarks/bench_effect_size.py --cells 20000 --genes 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import scflashmm as sfm
from scflashmm._core.sumstats import summary_stats
from scflashmm._design import make_design
from scflashmm.tl._effect_size import factor_patterns, pattern_sums

FIXED = "~0+log(libsize)+cls+cls:trt"


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    args = parser.parse_args()
    for seed in args.seeds:
        run(seed, args)


def run(seed: int, args: argparse.Namespace) -> None:
    """Time and check one simulated data set."""
    adata = sfm.datasets.simulate_rnaseq(
        n_genes=args.genes, n_cells=args.cells, n_de_genes=60, seed=seed
    )
    design = make_design(adata.obs, FIXED, "sam")
    _, codes, patterns, _ = factor_patterns(design.X)
    t_stats = best(lambda: summary_stats(design.X, adata.X, design.Z, is_counts=True), 3)
    t_sums = best(lambda: pattern_sums(adata.X, codes, patterns.shape[0]), 3)

    def fit(effect_size: bool) -> None:
        sfm.tl.flashmm_de(adata, FIXED, "sam", is_counts=True, effect_size=effect_size)

    t_off = best(lambda: fit(False), args.repeats)
    t_on = best(lambda: fit(True), args.repeats)
    de = adata.var[adata.var["is_de"]]
    truth = de["beta"].to_numpy() / np.log(2)
    cols = [f"cls[{c}]:trt[T.B]" for c in de["de_cluster"]]
    pick = zip(de.index, cols, strict=True)
    cells = [
        (adata.var_names.get_loc(g), list(adata.uns["flashmm"]["x_columns"]).index(c))
        for g, c in pick
    ]
    rows, columns = np.array(cells).T
    coef = adata.varm["flashmm_coef"].to_numpy()[rows, columns]
    lfc = adata.varm["flashmm_log2fc"].to_numpy()[rows, columns]
    print(
        f"seed {seed}: summary statistics {t_stats:.2f} s, pattern sums {t_sums:.2f} s; "
        f"fit {t_off:.2f} s without, {t_on:.2f} s with effect sizes; median ratio to the "
        f"true log2 FC: log_fc {np.median(coef / truth):.2f}, "
        f"log2fc_means {np.median(lfc / truth):.2f}"
    )


if __name__ == "__main__":
    main()
