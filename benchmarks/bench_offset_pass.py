"""The pass over the cells with and without shifted statistics (docs/model.md, Offsets).

    PYTHONPATH=src python benchmarks/bench_offset_pass.py [--cells 50000] [--genes 2000]

Times :func:`scflashmm.summary_stats` (minimum of ``--repeat`` runs, 2 threads) on dense
float64 matrices, of mean 0 (not shifted) and of mean 1e5 (shifted: each gene's mean over the
first cells is subtracted), and on a CSR matrix of counts with about 27% non-zero values
(never shifted), with the design of the
benchmarks' T1 table: ``~0 + log(libsize) + cls + cls:trt`` (10 cell types) and 25 samples.
Run it with ``PYTHONPATH`` pointing at two versions of the package to compare them.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.sparse as sp

import scflashmm


def design(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cls = rng.integers(0, 10, n)
    sam = rng.integers(0, 25, n)
    trt = (sam % 2).astype(float)
    libsize = rng.lognormal(8, 0.3, n)
    C = np.eye(10)[cls]
    X = np.column_stack([np.log(libsize), C, C * trt[:, None]])
    Z = sp.csr_matrix(np.eye(25)[sam])
    return X, Z


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, m = args.cells, args.genes
    rng = np.random.default_rng(0)
    X, Z = design(n, rng)
    print(f"scflashmm from {os.path.dirname(scflashmm.__file__)}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {n} cells x {m} genes, 2 threads")
    for name, make, is_counts in (
        ("dense float64 (y, mean 0)", lambda: rng.normal(size=(n, m)), False),
        ("dense float64 (y + 1e5)", lambda: rng.normal(size=(n, m)) + 1e5, False),
        ("CSR counts (27% non-zero, float32)", lambda: counts_csr(n, m, rng), True),
    ):
        Y = make()
        t = best(
            lambda Y=Y, c=is_counts: scflashmm.summary_stats(X, Y, Z, n_jobs=2, is_counts=c),
            args.repeat,
        )
        stats = scflashmm.summary_stats(X[:100], Y[:100], Z[:100], is_counts=is_counts)
        shifted = getattr(stats, "shifted", None) is not None
        print(f"{name}, is_counts={is_counts}, shifted={shifted}: {t:.2f} s")
        del Y


def counts_csr(n: int, m: int, rng: np.random.Generator) -> sp.csr_matrix:
    Y = sp.random(
        n, m, density=0.27, format="csr", random_state=1, data_rvs=lambda k: rng.poisson(2, k) + 1
    )
    Y.data = Y.data.astype(np.float32)
    return Y


if __name__ == "__main__":
    main()
