"""Time `scflashmm.lmm` on summary statistics against the plain per-gene implementation.

    python benchmarks/bench_solver.py            # the three configurations below
    python benchmarks/bench_solver.py --quick    # fewer genes
    python benchmarks/bench_solver.py --satterthwaite   # also time df="satterthwaite"
    python benchmarks/bench_solver.py --options  # cost of nonnegative, Satterthwaite, KR
    python benchmarks/bench_solver.py --lme4 [--quick]  # only the lme4-style designs

Configurations: (a) 20,000 genes, p = 21, q = 25, k = 1; (b) the same plus a second component
of 20 levels (k = 2); (c) 2,000 genes, p = 61, q = 259, k = 1 (the tuberculosis T-cell atlas
shape). The per-gene implementation (tests/core/test_reml.py::plain_lmm, a direct transcription
of docs/model.md, Fisher scoring) is timed on a sample of genes and extrapolated. With
``--satterthwaite`` the fit with ``df="satterthwaite"`` is timed too (with ``output_cov=True``,
so including the (genes, k, p, p) derivatives kept for contrasts), best of three, interleaved
with three more default fits, and its extra cost over the best default fit is reported.
With ``--options`` the table is instead the time of each option set, best of three
interleaved: the default fit; ``nonnegative=True``; ``df="satterthwaite"``;
``nonnegative=True, df="satterthwaite"``; ``nonnegative=True, df="kenward-roger"``; and
``criterion="relative"``; each relative to the default fit, and Kenward-Roger's extra cost
relative to Satterthwaite's extra cost (both with ``nonnegative=True``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "core"))
from test_reml import plain_lmm

import scflashmm
from scflashmm import SummaryStats
from scflashmm._random_terms import random_design

#: lme4-style designs: 25 donors x 200 cells, x uniform on (-1, 1), 10 cell types.
LME4_DESIGNS = ("(1 + x | donor)", "(1 | donor) + (1 | donor:celltype)")


def lme4_design_stats(formula: str, n_genes: int, seed: int = 0) -> tuple[SummaryStats, object]:
    """Summary statistics of genes simulated as in benchmarks/lme4_timing.R, by gene blocks."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    donors, per = 25, 200
    cells = pd.DataFrame(
        {
            "donor": np.repeat([f"d{i:02d}" for i in range(donors)], per),
            "celltype": rng.choice([f"c{i}" for i in range(10)], donors * per),
            "x": rng.uniform(-1, 1, donors * per),
        }
    )
    rd = random_design(formula, cells)
    X = np.column_stack([np.ones(len(cells)), cells["x"]])
    d = pd.factorize(cells["donor"])[0]
    ct = pd.factorize(cells["donor"] + cells["celltype"])[0]
    Z = rd.Z.tocsr()
    parts: dict[str, list[np.ndarray]] = {"XY": [], "ZY": [], "Ynorm": []}
    for lo in range(0, n_genes, 2000):
        g = min(2000, n_genes - lo)
        Y = (
            rng.normal(0, 0.5, (donors, g))[d]
            + rng.normal(0, 0.3, (donors, g))[d] * cells["x"].to_numpy()[:, None]
            + rng.normal(0, 0.3, (ct.max() + 1, g))[ct]
            + rng.normal(size=(len(cells), g))
        )
        parts["XY"].append(X.T @ Y)
        parts["ZY"].append(np.asarray(Z.T @ Y))
        parts["Ynorm"].append((Y**2).sum(0))
    stats = SummaryStats(
        XX=X.T @ X,
        XY=np.hstack(parts["XY"]),
        ZX=np.asarray(Z.T @ X),
        ZY=np.hstack(parts["ZY"]),
        ZZ=(Z.T @ Z).toarray(),
        Ynorm=np.concatenate(parts["Ynorm"]),
        n=len(cells),
    )
    return stats, rd.structure


def bench_lme4_designs(n_genes: int) -> None:
    """Genes per second of lmm(structure=...) on the two lme4-style designs (2 threads).

    Also the process's CPU seconds (both threads): on a shared machine wall time moves with
    the load, while genes per CPU second times the cores estimates an idle machine's rate.
    """
    import os

    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| design | genes | q | solver | s | genes/s | cpu s | genes/cpu-s | converged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for formula in LME4_DESIGNS:
        stats, structure = lme4_design_stats(formula, n_genes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c0, t0 = time.process_time(), time.perf_counter()
            fit = scflashmm.lmm(stats, structure=structure, n_jobs=2)
            el, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"| {formula} | {n_genes} | {structure.q} | {getattr(fit, 'kernel', 'components')} "
            f"| {el:.2f} | {n_genes / el:,.0f} | {cpu:.2f} | {n_genes / cpu:,.0f} "
            f"| {fit.converged.mean():.3f} |"
        )
    print("lme4 per gene: Rscript benchmarks/lme4_timing.R (same designs, one gene at a time)")


def make_stats(
    n_genes: int, p: int, d: tuple[int, ...], n_cells: int, seed: int = 0
) -> SummaryStats:
    """Summary statistics of simulated data with real random effects, built gene block by block."""
    rng = np.random.default_rng(seed)
    n_cls = p - 1
    cls = rng.integers(0, n_cls, n_cells)
    X = np.column_stack([np.log(rng.gamma(5, 400, n_cells)), np.eye(n_cls)[cls]])
    Z = np.hstack([np.eye(q)[rng.integers(0, q, n_cells)] for q in d])
    parts = {"XY": [], "ZY": [], "Ynorm": []}
    for lo in range(0, n_genes, 2000):
        g = min(2000, n_genes - lo)
        Y = (
            X @ rng.normal(0, 0.3, (p, g))
            + Z @ rng.normal(0, 0.3, (Z.shape[1], g))
            + rng.normal(size=(n_cells, g))
        )
        parts["XY"].append(X.T @ Y)
        parts["ZY"].append(Z.T @ Y)
        parts["Ynorm"].append((Y**2).sum(0))
    return SummaryStats(
        XX=X.T @ X,
        XY=np.hstack(parts["XY"]),
        ZX=Z.T @ X,
        ZY=np.hstack(parts["ZY"]),
        ZZ=Z.T @ Z,
        Ynorm=np.concatenate(parts["Ynorm"]),
        n=n_cells,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--satterthwaite", action="store_true", help="also time df='satterthwaite'")
    parser.add_argument("--options", action="store_true", help="time each option of lmm")
    parser.add_argument("--lme4", action="store_true", help="only the lme4-style designs")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    if args.lme4:
        bench_lme4_designs(20_000 // scale)
        return
    configs = [
        ("a", 20_000 // scale, 21, (25,), 20_000),
        ("b", 20_000 // scale, 21, (25, 20), 20_000),
        ("c", 2_000 // scale, 61, (259,), 30_000),
    ]
    if args.options:
        time_options(configs)
        return
    extra = " satterthwaite s | extra |" if args.satterthwaite else ""
    header = "| case | genes | p | d | scflashmm s | genes/s | plain genes/s (sample) | speed-up |"
    print(header + extra)
    print("|---|---|---|---|---|---|---|---|" + "---|---|" * args.satterthwaite)
    for name, m, p, d, n in configs:
        stats = make_stats(m, p, d, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            scflashmm.lmm(stats, list(d))
            fast = time.perf_counter() - t0
            sample = 20
            small = SummaryStats(
                stats.XX,
                stats.XY[:, :sample],
                stats.ZX,
                stats.ZY[:, :sample],
                stats.ZZ,
                stats.Ynorm[:sample],
                stats.n,
            )
            t0 = time.perf_counter()
            plain_lmm(small, list(d))
            plain = (time.perf_counter() - t0) / sample
            cells = ""
            if args.satterthwaite:
                times: dict[str, list[float]] = {"residual": [], "satterthwaite": []}
                for _ in range(3):  # interleaved, best of three: the machine may be busy
                    for df, seconds in times.items():
                        t0 = time.perf_counter()
                        scflashmm.lmm(stats, list(d), df=df)
                        seconds.append(time.perf_counter() - t0)
                base, satt = min(times["residual"]), min(times["satterthwaite"])
                cells = f" {satt:.2f} | +{100 * (satt / base - 1):.0f} % |"
        print(
            f"| {name} | {m} | {p} | {d} | {fast:.2f} | {m / fast:,.0f} | {1 / plain:,.0f} "
            f"| {plain * m / fast:,.0f}x |{cells}"
        )


OPTIONS = {
    "default": {},
    "nonnegative": {"nonnegative": True},
    "satterthwaite": {"df": "satterthwaite"},
    "nonneg+satt": {"nonnegative": True, "df": "satterthwaite"},
    "nonneg+KR": {"nonnegative": True, "df": "kenward-roger"},
    "relative": {"criterion": "relative"},
}


def time_options(configs: list) -> None:
    """Best of three interleaved fits per option set; times relative to the default fit."""
    names = list(OPTIONS)
    print("| case | genes | " + " | ".join(names) + " | KR extra / Satt extra |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for name, m, p, d, n in configs:
        stats = make_stats(m, p, d, n)
        times: dict[str, list[float]] = {key: [] for key in names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                for key, options in OPTIONS.items():
                    t0 = time.perf_counter()
                    scflashmm.lmm(stats, list(d), **options)
                    times[key].append(time.perf_counter() - t0)
        best = {key: min(value) for key, value in times.items()}
        base = best["default"]
        cells = [f"{best['default']:.2f} s"] + [f"{best[key] / base:.2f}x" for key in names[1:]]
        kr_extra = best["nonneg+KR"] - best["nonnegative"]
        satt_extra = best["nonneg+satt"] - best["nonnegative"]
        ratio = kr_extra / satt_extra if satt_extra > 0 else float("nan")
        print(f"| {name} | {m} | " + " | ".join(cells) + f" | {ratio:.2f} |")


if __name__ == "__main__":
    main()
