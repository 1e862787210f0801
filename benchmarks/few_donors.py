"""Few donors, genes that differ in their donor variance: which inference is calibrated?

Each repeat simulates ``simulate_rnaseq`` counts in four blocks of genes on one set of cells
(separate calls with their own seeds, counts stacked): with a common donor variance
(``--variances 0.1 0.1 0.1 0.1``, "homogeneous") or four different ones (0.02, 0.1, 0.3, 0.6,
"heterogeneous"). Library sizes are not varied by the simulator (``adjust_library_size=False``,
so the blocks agree); the model still adjusts for the observed log library size. Every gene
is tested for "treated vs control within cell type k" (the ``cls<k>:trt`` terms of
``~0 + log(libsize) + cls + cls:trt`` with a random intercept per sample) by:

- ``LMM, n - p df``: FLASHMM's df; ``LMM, Satterthwaite``: lmerTest's df;
  ``LMM, samples - 2 df``: the REML t on (samples - 2) df (a reference row);
- ``EB moderated``: the REML fit with the between-sample variance moderated across genes with an
  estimated prior df (``scflashmm._core.moderation.moderate``); ``EB trend``: the same with the
  prior scale a spline trend in the mean log expression (limma-trend); ``EB trend robust``: and
  the winsorised moment estimator; ``EB trend, penalised REML``: the posterior mode of the
  restricted likelihood times the same prior, df from the penalised information; ``EB trend,
  grid prior``: a nonparametric prior on a grid around the trend, ``mixture_moderate``; ``EB full
  pooling``: the prior df set to infinity;
- ``pseudobulk PyDESeq2``: counts summed per sample and cell type, PyDESeq2 per cell type with
  design ``~trt`` (``~sam + trt`` when paired).

Designs: samples nested in treatment (3 vs 3, 4 vs 4, 8 vs 8, 5 vs 5 = "10 samples",
12 vs 13 = "25 samples"), 4 vs 4 with cells per sample over a 10x range, and a paired design
(4 donors, each with treated and control cells, so the tested effect is within samples).

Reported per method (mean over repeats): FPR at 0.05 and at 0.001 (the tail that BH uses) over
null gene x cell-type pairs, power at 0.05, FDP and power at BH 5 %, and ranking power (share
of true DE pairs found at the deepest cut of the p-value ranking, pooled over repeats, whose
actual FDP is at most 5 %).

Usage::

    python benchmarks/few_donors.py --designs 3v3 8v8 --variances het
    python benchmarks/few_donors.py            # every design, both variance settings
"""

from __future__ import annotations

import argparse
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from scipy.stats import false_discovery_control

from scflashmm import lmm, summary_stats
from scflashmm._core.moderation import mixture_moderate, moderate
from scflashmm._design import make_design
from scflashmm.datasets import simulate_rnaseq

ALPHA = 0.05
VARIANCES = {"hom": (0.1, 0.1, 0.1, 0.1), "het": (0.02, 0.1, 0.3, 0.6)}
DESIGNS = ("3v3", "4v4", "8v8", "10", "25", "var4v4", "paired4")


def make_obs(design: str, n_cells: int, n_clusters: int, rng: np.random.Generator) -> pd.DataFrame:
    """Cells assigned to samples, cell types and treatments for one design."""
    cls = (rng.integers(0, n_clusters, n_cells) + 1).astype(str)
    if design == "paired4":
        donor = rng.integers(0, 4, n_cells)
        trt = np.array(["A", "B"])[rng.integers(0, 2, n_cells)]
        sam = np.array([f"D{i + 1}" for i in donor])
    else:
        n_a, n_b = {
            "3v3": (3, 3),
            "4v4": (4, 4),
            "8v8": (8, 8),
            "10": (5, 5),
            "25": (12, 13),
            "var4v4": (4, 4),
        }[design]
        weights = np.ones(n_a + n_b)
        if design == "var4v4":  # cells per sample over a 10x range, in both arms
            weights = np.geomspace(1, 10, n_a + n_b)[rng.permutation(n_a + n_b)]
        idx = rng.choice(n_a + n_b, n_cells, p=weights / weights.sum())
        names = [f"A{i + 1}" for i in range(n_a)] + [f"B{i + 1}" for i in range(n_b)]
        sam = np.array(names)[idx]
        trt = np.array([s[0] for s in sam])
    return pd.DataFrame(
        {"sam": sam, "cls": cls, "trt": trt}, index=[f"Cell{i + 1}" for i in range(n_cells)]
    )


def simulate(
    design: str, variances: tuple[float, ...], n_cells: int, n_genes: int, n_de: int, seed: int
) -> ad.AnnData:
    """Blocks of genes with their own donor variance on one set of cells."""
    rng = np.random.default_rng(seed)
    obs = make_obs(design, n_cells, 3, rng)
    blocks = []
    for b, var in enumerate(variances):
        block = simulate_rnaseq(
            n_genes=n_genes // len(variances),
            obs=obs,
            n_de_genes=n_de // len(variances),
            var_random_effects=var,
            adjust_library_size=False,
            seed=rng,
        )
        block.var_names = [f"B{b + 1}_{g}" for g in block.var_names]
        block.var["var_random_effects"] = var
        blocks.append(block)
    out = ad.concat(blocks, axis=1, merge="first")
    out.obs = blocks[0].obs.copy()
    out.X = sp.csr_matrix(out.X)
    out.obs["libsize"] = np.asarray(out.X.sum(axis=1)).ravel().astype(float)
    out.uns["treatment"] = blocks[0].uns["simulate_rnaseq"]["treatment"]
    return out


def truth_matrix(adata: ad.AnnData, clusters: list[str]) -> np.ndarray:
    truth = np.zeros((adata.n_vars, len(clusters)), dtype=bool)
    de = np.flatnonzero(adata.var["is_de"].to_numpy())
    cl = adata.var["de_cluster"].astype(str).to_numpy()
    for g in de:
        truth[g, clusters.index(cl[g])] = True
    return truth


def lmm_pvalues(adata: ad.AnnData) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """P-values (genes x cell types) of the cls:trt terms for every LMM-based method."""
    design = make_design(adata.obs, "~0+log(libsize)+cls+cls:trt", "sam")
    inter = [j for j, name in enumerate(design.x_columns) if ":trt" in name]
    st = summary_stats(design.X, adata.X, design.Z, is_counts=True)
    out, info = {}, {}
    start = time.perf_counter()
    fit = lmm(st, df="satterthwaite")
    seconds = time.perf_counter() - start
    n_samples = design.Z.shape[1]
    t = fit.t[:, inter]
    out["LMM, n - p df"] = 2 * stats.t.sf(np.abs(t), fit.df)
    out["LMM, Satterthwaite"] = fit.p[:, inter]
    out["LMM, samples - 2 df"] = 2 * stats.t.sf(np.abs(t), n_samples - 2)
    args = (st.XX, st.XY, st.ZX, st.ZY, st.ZZ, st.n, fit.theta)
    mean = st.ZY.sum(axis=0) / st.n  # mean log expression (Z: sample indicators)
    for name, kwargs in [
        ("EB moderated", {}),
        ("EB trend", {"covariate": mean}),
        ("EB trend robust", {"covariate": mean, "robust": True}),
        ("EB trend, penalised REML", {"covariate": mean, "estimator": "mode"}),
        ("EB full pooling", {"df_prior": np.inf}),
    ]:
        start = time.perf_counter()
        res = moderate(*args, **kwargs)
        out[name] = res["p"][:, inter]
        info[name] = res["df_prior"]
        info["seconds " + name] = time.perf_counter() - start
    start = time.perf_counter()
    out["EB trend, grid prior"] = mixture_moderate(*args, covariate=mean)["p"][:, inter]
    info["seconds EB trend, grid prior"] = time.perf_counter() - start
    info["seconds LMM"] = seconds
    return out, info


def pseudobulk_pvalues(adata: ad.AnnData, clusters: list[str], paired: bool) -> np.ndarray:
    """PyDESeq2 per cell type on counts summed per sample (imported lazily)."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    inference = DefaultInference(n_cpus=1)
    out = np.full((adata.n_vars, len(clusters)), np.nan)
    treated = adata.uns["treatment"]
    for k, cl in enumerate(clusters):
        sub = adata[adata.obs["cls"] == cl]
        groups = sub.obs["sam"].astype(str) + "|" + sub.obs["trt"].astype(str)
        codes, levels = pd.factorize(groups)
        indicator = sp.csr_matrix(
            (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(levels), len(codes))
        )
        counts = np.asarray((indicator @ sub.X).todense()).round().astype(int)
        meta = pd.DataFrame(
            {"sam": [s.split("|")[0] for s in levels], "trt": [s.split("|")[1] for s in levels]},
            index=[f"P{i}" for i in range(len(levels))],
        )
        keep = counts.sum(axis=0) > 0
        frame = pd.DataFrame(counts[:, keep], index=meta.index, columns=adata.var_names[keep])
        dds = DeseqDataSet(
            counts=frame,
            metadata=meta,
            design="~sam + trt" if paired else "~trt",
            inference=inference,
            quiet=True,
        )
        dds.deseq2()
        control = next(t for t in meta["trt"].unique() if t != treated)
        res = DeseqStats(dds, contrast=["trt", treated, control], inference=inference, quiet=True)
        res.summary()
        p = res.results_df["pvalue"].to_numpy()
        out[keep, k] = p
    return out


def metrics(p: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    p = np.where(np.isnan(p), 1.0, p)
    called = false_discovery_control(p.ravel(), method="bh").reshape(p.shape) <= ALPHA
    return {
        "fpr": float((p[~truth] < ALPHA).mean()),
        "fpr_tail": float((p[~truth] < 1e-3).mean()),
        "power": float((p[truth] < ALPHA).mean()),
        "fdp": float((called & ~truth).sum() / max(called.sum(), 1)),
        "power_bh": float((called & truth).sum() / truth.sum()),
    }


def ranking_power(p: np.ndarray, truth: np.ndarray) -> float:
    """Share of true pairs found at the deepest cut of the ranking with actual FDP <= 5 %."""
    p = np.where(np.isnan(p), 1.0, p)
    order = np.argsort(p, kind="stable")
    tp = np.cumsum(truth[order])
    fdp = 1 - tp / np.arange(1, p.size + 1)
    ok = np.flatnonzero(fdp <= ALPHA)
    return float(tp[ok[-1]] / truth.sum()) if ok.size else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--variances", nargs="+", default=["hom", "het"], choices=VARIANCES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--de", type=int, default=60)
    parser.add_argument("--no-pseudobulk", action="store_true")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=None, help="CSV of per-repeat results")
    args = parser.parse_args()
    rows, pooled = [], {}
    start_all = time.perf_counter()
    for design in args.designs:
        for variances in args.variances:
            for r in range(args.repeats):
                seed = args.seed + 1000 * r + 7 * DESIGNS.index(design)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    adata = simulate(
                        design, VARIANCES[variances], args.cells, args.genes, args.de, seed
                    )
                    clusters = sorted(adata.obs["cls"].unique())
                    truth = truth_matrix(adata, clusters)
                    pvals, info = lmm_pvalues(adata)
                    if not args.no_pseudobulk:
                        start = time.perf_counter()
                        pvals["pseudobulk PyDESeq2"] = pseudobulk_pvalues(
                            adata, clusters, design == "paired4"
                        )
                        info["seconds pseudobulk PyDESeq2"] = time.perf_counter() - start
                for method, p in pvals.items():
                    key = (design, variances, method)
                    pooled.setdefault(key, ([], []))
                    pooled[key][0].append(p.ravel())
                    pooled[key][1].append(truth.ravel())
                    rows.append(
                        {"design": design, "variances": variances, "method": method, "repeat": r}
                        | metrics(p, truth)
                        | {"d0": info.get(method, np.nan)}
                    )
                if args.out:  # after every repeat, so that an interrupted run keeps its rows
                    pd.DataFrame(rows).to_csv(args.out, index=False)
                print(
                    f"# {design} {variances} repeat {r}: "
                    + ", ".join(f"{k} {v:.3g}" for k, v in info.items()),
                    flush=True,
                )
    results = pd.DataFrame(rows)
    if args.out:
        results.to_csv(args.out, index=False)
    lines = [
        "| design | donor variances | method | FPR at 0.05 | FPR at 0.001 | power at 0.05 "
        "| FDP at BH 5 % (sd) | power at BH 5 % | ranking power | prior df d0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (design, variances, method), g in results.groupby(
        ["design", "variances", "method"], sort=False
    ):
        p, truth = (np.concatenate(x) for x in pooled[(design, variances, method)])
        d0 = g["d0"].mean()
        lines.append(
            f"| {design} | {variances} | {method} | {g['fpr'].mean():.3f} | "
            f"{g['fpr_tail'].mean():.4f} | {g['power'].mean():.3f} | "
            f"{g['fdp'].mean():.2f} ({g['fdp'].std():.2f}) | {g['power_bh'].mean():.3f} | "
            f"{ranking_power(p, truth):.3f} | {'' if np.isnan(d0) else f'{d0:.1f}'} |"
        )
    print("\n".join(lines))
    print(f"\n({args.repeats} repeats; total {time.perf_counter() - start_all:.0f} s)")


if __name__ == "__main__":
    main()
