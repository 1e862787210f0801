"""False positive rate and power of FLASHMM's LMM vs cell-level tests, on simulate_rnaseq data.

Each repeat simulates a multi-sample, multi-cell-type data set (samples nested in treatment,
a per-sample random effect, DE genes with a treatment effect in one cell type) and tests, for
every gene and cell type, "treated vs control within this cell type":

- ``LMM (flashmm)``: FLASHMM's example model on log2(1 + counts),
  fixed ``~0 + log(libsize) + cls + cls:trt``, random ``~0 + sam``; p-value of ``cls<k>:trt``.
- ``LMM, (samples - 2) df``: the same fit, with the t statistics referred to a t distribution
  on (number of samples - 2) degrees of freedom instead of FLASHMM's n - p. With samples
  nested in treatment the treatment contrast is a between-sample comparison, so n - p (cells)
  overstates the df and makes the tails liberal when samples are few.
- ``LMM, Satterthwaite df``: the same model fit with ``df="satterthwaite"`` (lmerTest's
  approximation, per gene and coefficient, from the summary statistics); its ``s / fit``
  includes the fit, so the difference to the first row is the cost of the df.
- ``t-test (cells)``, ``Wilcoxon (cells)``: ``scanpy.tl.rank_genes_groups`` within the cell
  type, treated cells vs control cells, on log1p(counts). These treat cells as independent
  replicates and ignore that cells of one sample share its random effect.

Reported per method (mean, and sd over repeats): false positive rate at alpha = 0.05 over the
null gene x cell-type pairs (non-DE genes, and DE genes in the other cell types), power at
alpha = 0.05 over the true DE pairs, and the observed false discovery proportion after
Benjamini-Hochberg at 5 % over all pairs. Power is only meaningful where the FPR is controlled.

Usage::

    python benchmarks/calibration.py            # a few minutes on 2 cores
    python benchmarks/calibration.py --quick    # well under a minute
"""

from __future__ import annotations

import argparse
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import stats
from scipy.stats import false_discovery_control

from scflashmm import lmm_fit
from scflashmm._design import make_design
from scflashmm.datasets import simulate_rnaseq

ALPHA = 0.05
METHODS = (
    "LMM (flashmm)",
    "LMM, (samples - 2) df",
    "LMM, Satterthwaite df",
    "t-test (cells)",
    "Wilcoxon (cells)",
)


def lmm_pvalues(adata: ad.AnnData, df: str = "residual") -> tuple[np.ndarray, np.ndarray]:
    """P-values (genes x cell types) of the cls:trt terms: on the fit's df, on (samples - 2) df."""
    design = make_design(adata.obs, "~0+log(libsize)+cls+cls:trt", "sam")
    fit = lmm_fit(adata.X, design.X, design.Z, design.d, is_counts=True, df=df, output_cov=False)
    interactions = [j for j, name in enumerate(design.x_columns) if ":trt" in name]
    t = fit.t[:, interactions]
    return fit.p[:, interactions], 2 * stats.t.sf(np.abs(t), design.Z.shape[1] - 2)


def cell_level_pvalues(adata: ad.AnnData, method: str) -> np.ndarray:
    """P-values (genes x cell types): treated vs control cells within each cell type."""
    treated = adata.uns["simulate_rnaseq"]["treatment"]
    logged = ad.AnnData(
        X=adata.X.astype(np.float32),
        obs=adata.obs[["cls", "trt"]].copy(),
        var=pd.DataFrame(index=adata.var_names),
    )
    sc.pp.log1p(logged)
    control = [t for t in adata.obs["trt"].cat.categories if t != treated]
    if len(control) != 1:
        msg = "the cell-level comparison assumes two treatments"
        raise ValueError(msg)
    out = np.full((adata.n_vars, len(adata.obs["cls"].cat.categories)), np.nan)
    for k, cls in enumerate(adata.obs["cls"].cat.categories):
        sub = logged[logged.obs["cls"] == cls].copy()
        sc.tl.rank_genes_groups(
            sub, "trt", groups=[treated], reference=control[0], method=method, tie_correct=True
        )
        df = sc.get.rank_genes_groups_df(sub, group=treated).set_index("names")
        out[:, k] = df.loc[adata.var_names, "pvals"].to_numpy()
    return out


def truth_matrix(adata: ad.AnnData) -> np.ndarray:
    var = adata.var
    truth = np.zeros((adata.n_vars, len(adata.obs["cls"].cat.categories)), dtype=bool)
    de = np.flatnonzero(var["is_de"].to_numpy())
    truth[de, var["de_cluster"].cat.codes.to_numpy()[de]] = True
    return truth


def metrics(p: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    p = np.where(np.isnan(p), 1.0, p)  # untestable pairs (e.g. all-zero genes) count as negatives
    called = false_discovery_control(p.ravel(), method="bh").reshape(p.shape) <= ALPHA
    return {
        "fpr": float((p[~truth] < ALPHA).mean()),
        "power": float((p[truth] < ALPHA).mean()) if truth.any() else np.nan,
        "fdp": float((called & ~truth).sum() / max(called.sum(), 1)),
    }


def pvalues(adata: ad.AnnData) -> dict[str, tuple[np.ndarray, float]]:
    """P-values and seconds per method."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        p_lmm, p_lmm_df = lmm_pvalues(adata)
        seconds = time.perf_counter() - start
        out[METHODS[0]] = (p_lmm, seconds)
        out[METHODS[1]] = (p_lmm_df, seconds)
        start = time.perf_counter()
        out[METHODS[2]] = (lmm_pvalues(adata, df="satterthwaite")[0], time.perf_counter() - start)
        for method, name in [(METHODS[3], "t-test"), (METHODS[4], "wilcoxon")]:
            start = time.perf_counter()
            out[method] = (cell_level_pvalues(adata, name), time.perf_counter() - start)
    return out


def balanced_obs(n_cells: int, n_per_arm: int, n_clusters: int, seed: int) -> pd.DataFrame:
    """Cells spread uniformly over samples A1..A<n>, B1..B<n> (nested in treatment A / B)."""
    rng = np.random.default_rng(seed)
    sam = rng.integers(0, 2 * n_per_arm, n_cells)
    obs = pd.DataFrame(
        {
            "sam": [f"{'AB'[i // n_per_arm]}{i % n_per_arm + 1}" for i in sam],
            "cls": (rng.integers(0, n_clusters, n_cells) + 1).astype(str),
        },
        index=[f"Cell{i + 1}" for i in range(n_cells)],
    )
    obs["trt"] = obs["sam"].str[0]
    return obs


def run(scenarios: list[dict], repeats: int, seed: int) -> pd.DataFrame:
    rows = []
    seeds = np.random.SeedSequence(seed).spawn(len(scenarios) * repeats)
    for s, scenario in enumerate(scenarios):
        kwargs = scenario["kwargs"]
        for r in range(repeats):
            adata = simulate_rnaseq(**kwargs, seed=np.random.default_rng(seeds[s * repeats + r]))
            truth = truth_matrix(adata)
            for method, (p, seconds) in pvalues(adata).items():
                row = {"scenario": scenario["name"], "method": method, "repeat": r}
                rows.append(row | {"seconds": seconds} | metrics(p, truth))
    return pd.DataFrame(rows)


def table(results: pd.DataFrame) -> str:
    def cell(x: pd.Series) -> str:
        return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"

    lines = [
        "| scenario | method | FPR at 0.05 | power at 0.05 | FDP at BH 5 % | s / fit |",
        "|---|---|---|---|---|---|",
    ]
    for (scenario, method), g in results.groupby(["scenario", "method"], sort=False):
        lines.append(
            f"| {scenario} | {method} | {cell(g['fpr'])} | {cell(g['power'])} | {cell(g['fdp'])} "
            f"| {g['seconds'].mean():.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer genes, cells and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="simulations per scenario")
    parser.add_argument("--seed", type=int, default=20241)
    args = parser.parse_args()

    n_genes, n_cells, repeats = (300, 3000, 3) if args.quick else (1000, 10_000, 10)
    if args.repeats is not None:
        repeats = args.repeats
    common = {
        "n_genes": n_genes,
        "n_cells": n_cells,
        "n_clusters": 4,
        "n_de_genes": n_genes // 10,
        "var_random_effects": 0.1,
    }
    scenarios = [
        {"name": "25 samples", "kwargs": common | {"n_samples": 25}},
        {"name": "10 samples", "kwargs": common | {"n_samples": 10}},
        {
            "name": "3 vs 3 samples",
            "kwargs": common | {"obs": balanced_obs(n_cells, 3, 4, args.seed)},
        },
        {
            "name": "25 samples, no random effect",
            "kwargs": common | {"n_samples": 25, "var_random_effects": 0.0},
        },
    ]
    print(
        f"simulate_rnaseq: {n_cells} cells x {n_genes} genes, 4 cell types, 2 treatments, samples "
        f"nested in treatment, {n_genes // 10} DE genes with |logFC| ~ U(0.25, 1) in one cell "
        f"type each, var_random_effects = 0.1 unless stated; {repeats} repeats per scenario, "
        f"seed {args.seed}.\n"
    )
    pvalues(simulate_rnaseq(n_genes=20, n_cells=300, n_clusters=2, seed=0))  # warm up (numba)
    start = time.perf_counter()
    results = run(scenarios, repeats, args.seed)
    print(table(results))
    print(f"\n(mean ± sd over repeats; total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
