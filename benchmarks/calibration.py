"""Calibration of scflashmm's tests with few to many samples, side by side with pseudobulk.

Each repeat simulates ``simulate_rnaseq`` counts (3 cell types, two treatments, DE genes with
|logFC| ~ U(0.25, 1) in one cell type) for one design, and tests every gene in every cell type
for "treated vs control within this cell type" (the ``cls<k>:trt`` terms of
``~0 + log(libsize) + cls + cls:trt`` with a random intercept per sample, on log2(1 + counts)).

Designs: samples nested in treatment, 12 vs 13 ("25"), 5 vs 5 ("10"), 8 vs 8, 4 vs 4, 3 vs 3;
4 vs 4 with cells per sample over a 10x range ("var4v4"); and a paired design (4 donors, each
with treated and control cells: the tested effect is within samples, "paired4").
Donor variances: "hom", one variance 0.1 for every gene; "het", per-gene variances from a
gamma distribution with mean 0.1 and coefficient of variation 1 (genes simulated in blocks on
one set of cells, each block with one variance: the block variances are the gamma's quantiles
at (i + 0.5) / blocks, so the genes' variances follow a discretised gamma).

Methods (:data:`METHODS`, a registry of name -> function of the data):

- ``LMM, n - p df`` (FLASHMM), ``LMM, Satterthwaite`` (lmerTest's df);
- ``LMM nonnegative, Satterthwaite`` and ``LMM nonnegative, Kenward-Roger``: variance
  components >= 0 as lme4 (skipped, and said so, when the solver lacks them);
- ``moderated (default)``: what ``tl.flashmm_de`` does by default with one random term, the
  empirical-Bayes grid prior on the between-sample variance around a mean trend
  (``scflashmm.tl._moderate.moderate_fit``);
- ``t-test (cells)``: Welch t test over cells within the cell type, ignoring samples;
- ``pseudobulk PyDESeq2``: counts summed per sample and cell type, PyDESeq2 per cell type,
  design ``~trt`` (``~sam + trt`` paired). A benchmark extra: ``pip install pydeseq2``.

Reported per scenario and method (mean over repeats; sd of the FDP): FPR at 0.05 over the null
gene x cell-type pairs, FDP and power after BH at 5 % over all pairs, ranking power (share of
true DE pairs at the deepest cut of the p-value ranking, pooled over repeats, whose actual FDP
is at most 5 %), and seconds per fit (the LMM rows include the pass over the cells).

Usage::

    python benchmarks/calibration.py --quick                   # a few minutes
    python benchmarks/calibration.py --repeats 3 --genes 1000 --cells 10000
"""

from __future__ import annotations

import argparse
import inspect
import time
import warnings
from collections.abc import Callable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from scipy.stats import false_discovery_control

from scflashmm import lmm, summary_stats
from scflashmm._design import make_design
from scflashmm.datasets import simulate_rnaseq
from scflashmm.tl._moderate import moderate_fit

ALPHA = 0.05
FIXED = "~0+log(libsize)+cls+cls:trt"
DESIGNS = ("25", "10", "8v8", "4v4", "3v3", "var4v4", "paired4")
ARMS = {"25": (12, 13), "10": (5, 5), "8v8": (8, 8), "4v4": (4, 4), "3v3": (3, 3)}
MEAN_VAR, CV = 0.1, 1.0
HAS_NONNEGATIVE = "nonnegative" in inspect.signature(lmm).parameters


# ------------------------------------------------------------------------------ simulation


def make_obs(design: str, n_cells: int, n_clusters: int, rng: np.random.Generator) -> pd.DataFrame:
    """Cells assigned to samples, cell types and treatments for one design."""
    cls = (rng.integers(0, n_clusters, n_cells) + 1).astype(str)
    if design == "paired4":
        sam = np.array([f"D{i + 1}" for i in rng.integers(0, 4, n_cells)])
        trt = np.array(["A", "B"])[rng.integers(0, 2, n_cells)]
    else:
        n_a, n_b = ARMS.get(design, (4, 4))
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


def block_variances(kind: str, blocks: int) -> np.ndarray:
    """One donor variance per block of genes: all ``MEAN_VAR``, or gamma quantiles (CV 1)."""
    if kind == "hom":
        return np.full(blocks, MEAN_VAR)
    shape = 1 / CV**2
    return stats.gamma.ppf((np.arange(blocks) + 0.5) / blocks, shape, scale=MEAN_VAR / shape)


def simulate(
    design: str, kind: str, n_cells: int, n_genes: int, n_de: int, blocks: int, seed: int
) -> ad.AnnData:
    """Blocks of genes, each with its donor variance, on one set of cells."""
    rng = np.random.default_rng(seed)
    obs = make_obs(design, n_cells, 3, rng)
    parts = []
    for b, var in enumerate(block_variances(kind, blocks)):
        part = simulate_rnaseq(
            n_genes=n_genes // blocks,
            obs=obs,
            n_de_genes=n_de // blocks,
            var_random_effects=float(var),
            adjust_library_size=False,
            seed=rng,
        )
        part.var_names = [f"B{b + 1}_{g}" for g in part.var_names]
        part.var["var_random_effects"] = float(var)
        parts.append(part)
    out = ad.concat(parts, axis=1, merge="first")
    out.obs = parts[0].obs.copy()
    out.X = sp.csr_matrix(out.X)
    out.obs["libsize"] = np.asarray(out.X.sum(axis=1)).ravel().astype(float)
    out.uns["treatment"] = parts[0].uns["simulate_rnaseq"]["treatment"]
    return out


def truth_matrix(adata: ad.AnnData, clusters: list[str]) -> np.ndarray:
    truth = np.zeros((adata.n_vars, len(clusters)), dtype=bool)
    de = np.flatnonzero(adata.var["is_de"].to_numpy())
    cl = adata.var["de_cluster"].astype(str).to_numpy()
    for g in de:
        truth[g, clusters.index(cl[g])] = True
    return truth


# --------------------------------------------------------------------------------- methods


class Data:
    """One simulated data set with its design and summary statistics (computed once)."""

    def __init__(self, adata: ad.AnnData) -> None:
        self.adata = adata
        self.clusters = sorted(adata.obs["cls"].unique())
        start = time.perf_counter()
        self.design = make_design(adata.obs, FIXED, "sam")
        self.stats = summary_stats(self.design.X, adata.X, self.design.Z, is_counts=True)
        self.pass_seconds = time.perf_counter() - start
        self.inter = [j for j, c in enumerate(self.design.x_columns) if ":trt" in c]


def _lmm(df: str, *, nonnegative: bool = False) -> Callable[[Data], np.ndarray]:
    def run(data: Data) -> np.ndarray:
        extra = {"nonnegative": True} if nonnegative else {}
        return lmm(data.stats, df=df, output_cov=False, **extra).p[:, data.inter]

    return run


def _moderated(data: Data) -> np.ndarray:
    fit = lmm(data.stats, df="residual", output_cov=False)
    x_sum = data.design.X.sum(axis=0)
    return moderate_fit(data.stats, fit.theta, x_sum, None).p[:, data.inter]


def _ttest(data: Data) -> np.ndarray:
    adata = data.adata
    treated = adata.uns["treatment"]
    logged = adata.X.copy().astype(np.float64)
    logged.data = np.log1p(logged.data)
    out = np.full((adata.n_vars, len(data.clusters)), np.nan)
    for k, cl in enumerate(data.clusters):
        mask = (adata.obs["cls"] == cl).to_numpy()
        is_t = (adata.obs["trt"] == treated).to_numpy()
        a = logged[mask & is_t].toarray()
        b = logged[mask & ~is_t].toarray()
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, k] = stats.ttest_ind(a, b, axis=0, equal_var=False).pvalue
    return out


def _pseudobulk(data: Data) -> np.ndarray:
    """PyDESeq2 per cell type on counts summed per sample (imported lazily)."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    adata = data.adata
    paired = adata.obs["sam"].astype(str).str.startswith("D").all()
    inference = DefaultInference(n_cpus=1)
    out = np.full((adata.n_vars, len(data.clusters)), np.nan)
    treated = adata.uns["treatment"]
    for k, cl in enumerate(data.clusters):
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
        out[keep, k] = res.results_df["pvalue"].to_numpy()
    return out


#: name -> (function of the data, whether its time includes the pass over the cells)
METHODS: dict[str, tuple[Callable[[Data], np.ndarray], bool]] = {
    "LMM, n - p df": (_lmm("residual"), True),
    "LMM, Satterthwaite": (_lmm("satterthwaite"), True),
    "LMM nonnegative, Satterthwaite": (_lmm("satterthwaite", nonnegative=True), True),
    "LMM nonnegative, Kenward-Roger": (_lmm("kenward-roger", nonnegative=True), True),
    "moderated (default)": (_moderated, True),
    "t-test (cells)": (_ttest, False),
    "pseudobulk PyDESeq2": (_pseudobulk, False),
}


def available(name: str) -> bool:
    if "nonnegative" in name and not HAS_NONNEGATIVE:
        return False
    if name.startswith("pseudobulk"):
        try:
            import pydeseq2  # noqa: F401
        except ImportError:
            return False
    return True


# --------------------------------------------------------------------------------- metrics


def metrics(p: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    p = np.where(np.isnan(p), 1.0, p)  # untestable pairs count as negatives
    called = false_discovery_control(p.ravel(), method="bh").reshape(p.shape) <= ALPHA
    return {
        "fpr": float((p[~truth] < ALPHA).mean()),
        "fdp": float((called & ~truth).sum() / max(called.sum(), 1)),
        "power_bh": float((called & truth).sum() / max(truth.sum(), 1)),
    }


def ranking_power(p: np.ndarray, truth: np.ndarray) -> float:
    """Share of true pairs found at the deepest cut of the ranking with actual FDP <= 5 %."""
    p = np.where(np.isnan(p), 1.0, p)
    order = np.argsort(p, kind="stable")
    tp = np.cumsum(truth[order])
    fdp = 1 - tp / np.arange(1, p.size + 1)
    ok = np.flatnonzero(fdp <= ALPHA)
    return float(tp[ok[-1]] / truth.sum()) if ok.size else 0.0


def run(args: argparse.Namespace) -> tuple[pd.DataFrame, dict]:
    rows, pooled = [], {}
    methods = [m for m in args.methods if available(m)]
    for design in args.designs:
        for kind in args.variances:
            for r in range(args.repeats):
                seed = args.seed + 1000 * r + 7 * DESIGNS.index(design) + (kind == "het")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    adata = simulate(
                        design, kind, args.cells, args.genes, args.de, args.blocks, seed
                    )
                    data = Data(adata)
                    truth = truth_matrix(adata, data.clusters)
                    for method in methods:
                        func, with_pass = METHODS[method]
                        start = time.perf_counter()
                        p = func(data)
                        seconds = time.perf_counter() - start
                        seconds += data.pass_seconds if with_pass else 0.0
                        key = (design, kind, method)
                        pooled.setdefault(key, ([], []))
                        pooled[key][0].append(p.ravel())
                        pooled[key][1].append(truth.ravel())
                        rows.append(
                            {"design": design, "variances": kind, "method": method, "repeat": r}
                            | metrics(p, truth)
                            | {"seconds": seconds}
                        )
                if args.out:  # after every repeat, so that an interrupted run keeps its rows
                    pd.DataFrame(rows).to_csv(args.out, index=False)
                print(f"# {design} {kind} repeat {r} done", flush=True)
    return pd.DataFrame(rows), pooled


def table(results: pd.DataFrame, pooled: dict) -> str:
    lines = [
        "| design | donor variances | method | FPR at 0.05 | FDP at BH 5 % (sd) "
        "| power at BH 5 % | ranking power | s / fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (design, kind, method), g in results.groupby(["design", "variances", "method"], sort=False):
        p, truth = (np.concatenate(x) for x in pooled[(design, kind, method)])
        sd = g["fdp"].std() if len(g) > 1 else np.nan
        lines.append(
            f"| {design} | {kind} | {method} | {g['fpr'].mean():.3f} | "
            f"{g['fdp'].mean():.2f} ({sd:.2f}) | {g['power_bh'].mean():.3f} | "
            f"{ranking_power(p, truth):.3f} | {g['seconds'].mean():.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--variances", nargs="+", default=["hom", "het"], choices=["hom", "het"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=1000)
    parser.add_argument("--de", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=10, help="gene blocks (het variances)")
    parser.add_argument("--quick", action="store_true", help="2000 cells, 200 genes, 1 repeat")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=None, help="CSV of per-repeat results")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.genes, args.de, args.repeats = 2000, 200, 20, 1
    skipped = [m for m in args.methods if not available(m)]
    print(
        f"simulate_rnaseq: {args.cells} cells x {args.genes} genes ({args.blocks} blocks), "
        f"3 cell types, {args.de} DE genes; {args.repeats} repeats; seed {args.seed}."
        + (f" Not available here, skipped: {skipped}." if skipped else "")
    )
    start = time.perf_counter()
    results, pooled = run(args)
    print(table(results, pooled))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
