"""Peak memory of a fit against the memory guard's estimate (docs/guarantees.md, Memory).

    PYTHONPATH=src python benchmarks/bench_fit_memory.py            # the table
    PYTHONPATH=src python benchmarks/bench_fit_memory.py --quick    # small sizes

Each case runs in a fresh Python process: it builds the design and a sparse response (10%
non-zero), resets the kernel's high-water mark (``/proc/self/clear_refs``), runs
:func:`scflashmm.summary_stats` and :func:`scflashmm.lmm` (or the structured path for an
lme4-style term), and reports the peak RSS above the RSS before the pass (``VmHWM`` minus
``VmRSS``: the work of the fit, without the data) next to
:func:`scflashmm._core.checks.fit_memory_bytes`. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import scipy.sparse as sp

#: (label, n, p, sizes of the random factors, genes, n_jobs, lme4-style term or None)
CASES = [
    ("k=1", 30_000, 3, (2_000,), 200, 2, None),
    ("k=1", 30_000, 3, (4_000,), 100, 2, None),
    ("k=2", 30_000, 3, (400, 200), 50, 1, None),
    ("k=2", 30_000, 3, (400, 200), 50, 2, None),
    ("k=2", 30_000, 3, (1_000, 200), 10, 2, None),
    ("k=3", 30_000, 3, (300, 150, 50), 50, 1, None),
    ("k=3", 30_000, 3, (300, 150, 50), 50, 2, None),
    ("lme4 block", 30_000, 3, (200,), 100, 1, "(1 + x | g)"),
    ("lme4 block", 30_000, 3, (200,), 100, 2, "(1 + x | g)"),
    ("lme4 block", 30_000, 3, (450,), 20, 2, "(1 + x | g)"),
    ("lme4 sparse", 30_000, 3, (600,), 20, 2, "(1 + x | g)"),
    ("2 components", 30_000, 3, (300, 100), 50, 1, "(1 | g) + (1 | h)"),
    ("2 components", 30_000, 3, (300, 100), 50, 2, "(1 | g) + (1 | h)"),
    ("2 components", 30_000, 3, (600, 200), 20, 2, "(1 | g) + (1 | h)"),
    ("lme4 dense", 30_000, 3, (150, 50), 50, 2, "(1 + x | g) + (1 | h)"),
]
QUICK = [
    ("k=1", 5_000, 3, (500,), 50, 2, None),
    ("k=2", 5_000, 3, (300, 100), 50, 2, None),
    ("lme4 block", 5_000, 3, (50,), 50, 2, "(1 + x | g)"),
]


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    msg = f"{field} not in /proc/self/status"
    raise RuntimeError(msg)


def run_case(n: int, p: int, sizes: tuple[int, ...], m: int, n_jobs: int, term: str | None):
    """Measure one case in this process; return a dict (printed as JSON by the child)."""
    import warnings

    import pandas as pd

    import scflashmm
    from scflashmm._core.checks import fit_memory_bytes, memory_layout

    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    Y = sp.random(n, m, density=0.1, format="csr", random_state=1, dtype=np.float64)
    structure = None
    if term is None:
        Z = sp.hstack([sp.csr_matrix(np.eye(q)[rng.integers(0, q, n)]) for q in sizes]).tocsr()
        d = tuple(sizes)
    else:
        from scflashmm._random_terms import random_design

        obs = pd.DataFrame({"g": rng.integers(0, sizes[0], n).astype(str), "x": X[:, 1]})
        obs["h"] = rng.integers(0, sizes[-1], n).astype(str)
        rd = random_design(term, obs)
        Z, structure, d = sp.csr_matrix(rd.Z), rd.structure, (rd.Z.shape[1],)
    q = Z.shape[1]
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = scflashmm.summary_stats(X, Y, Z, n_jobs=n_jobs)
        if structure is None:
            scflashmm.lmm(stats, d, n_jobs=n_jobs)
        else:
            scflashmm.lmm(stats, structure=structure, n_jobs=n_jobs)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - before
    k = len(d) if structure is None else len(structure.terms)
    layout = memory_layout(d if structure is None else [t.q for t in structure.terms], structure)
    estimate = fit_memory_bytes(n, p, q, m, k, n_jobs=n_jobs, **layout)
    return {"q": q, "k": k, "peak": peak, "estimate": estimate, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--only", type=int, nargs="*", help="indices of the cases to run")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| case | n | q | genes | n_jobs | measured (MB) | estimate (MB) | ratio | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = QUICK if args.quick else CASES
    if args.only:
        cases = [cases[i] for i in args.only]
    for label, n, p, sizes, m, jobs, term in cases:
        case = json.dumps([n, p, sizes, m, jobs, term])
        out = subprocess.run(
            [sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mb = 2**20
        print(
            f"| {label}{' ' + term if term else ''} | {n:,} | {r['q']:,} | {m} | {jobs} | "
            f"{r['peak'] / mb:,.0f} | {r['estimate'] / mb:,.0f} | "
            f"{r['estimate'] / r['peak']:.2f} | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
