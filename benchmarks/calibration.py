"""Calibration and power of DE methods on simulate_rnaseq data, common vs per-gene donor variances.

Each repeat simulates a multi-sample, multi-cell-type data set (4 cell types, DE genes with a
treatment effect in one cell type each, a per-sample random effect) and every method tests, for
every gene and cell type, "treated vs control within this cell type". Every scenario is run
twice: with one donor (sample) variance for all genes, and with per-gene variances drawn from a
gamma distribution with the same mean and a coefficient of variation of 1
(``simulate_rnaseq(var_random_effects=("gamma", mean, 1.0))``), since real genes differ in how
much they vary between donors.

Methods (a registry: name -> function(adata, scenario) -> p-values and log fold changes,
genes x cell types; a new row is one new entry in ``METHODS``):

- ``LMM, n - p df``: FLASHMM's example model on log2(1 + counts), fixed
  ``~0 + log(libsize) + cls + cls:trt``, random ``~0 + sam``; t tests of ``cls<k>:trt`` on
  n - p (cells) degrees of freedom, FLASHMM's choice.
- ``LMM, Satterthwaite``: the same fit with ``df="satterthwaite"`` (lmerTest's df).
- ``LMM nonnegative, Satterthwaite`` / ``LMM nonnegative, Kenward-Roger``: variance
  components constrained to >= 0 as lme4 (``nonnegative=True``), with Satterthwaite or
  Kenward-Roger df (skipped when the solver lacks the option).
- ``LMM moderated (default)``: what ``tl.flashmm_de`` does by default with one random term:
  the between-sample variance ``tau = s_b + s_e / bar lambda`` moderated across genes by an
  empirical-Bayes grid prior around a trend in the mean expression, posterior-predictive p
  values (``scflashmm._core.moderation.mixture_moderate``).
- ``t-test (cells)``: ``scanpy.tl.rank_genes_groups`` (t-test) within the cell type, treated
  vs control cells on log1p(counts); treats cells as independent replicates.
- ``pseudobulk (PyDESeq2)``: counts summed per sample x cell type (x treatment in the paired
  design), then PyDESeq2 per cell type with design ``~trt`` (``~sam + trt`` when paired) and
  the Wald test of treated vs control. Needs ``pip install pydeseq2`` (a benchmark extra, not a
  dependency of scflashmm); skipped with a message if it is missing.

Metrics, over the gene x cell type pairs of each repeat (non-DE genes, and DE genes in the other
cell types, are the null pairs):

- FPR at 0.05: share of null pairs with p < 0.05;
- FDP at BH 5 %: share of false pairs among those called at Benjamini-Hochberg 5 % (0 if none);
- power at BH 5 %: share of true DE pairs called at BH 5 %;
- ranking power: pairs of all repeats pooled and ranked by p-value; the share of true DE pairs
  above the deepest cut whose actual FDP is <= 5 % (cuts only between distinct p-values). It
  measures the ordering alone, whatever the calibration of the p-values;
- s / fit: seconds per data set (all cell types), on a machine shared with other jobs.

Untestable pairs (NaN p-values, e.g. a gene without counts in a cell type) count as p = 1.

Usage::

    python benchmarks/calibration.py                           # the table in docs/calibration.md
    python benchmarks/calibration.py --quick                   # a few minutes
    python benchmarks/calibration.py --repeats 3 --scenarios 3v3,8v8 --methods "LMM, Satterthwaite"
    python benchmarks/calibration.py --list                    # scenario keys and method names
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import false_discovery_control

from scflashmm import lmm_fit
from scflashmm._design import make_design
from scflashmm.datasets import simulate_rnaseq

ALPHA = 0.05
N_CLUSTERS = 4
VAR_MEAN = 0.1  # mean donor variance (log scale) in every scenario
VAR_CV = 1.0  # its coefficient of variation across genes in the heterogeneous runs


# ----------------------------------------------------------------------------------------
# scenarios
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A simulation design; ``obs(n_cells, rng)`` gives the cells' metadata (or None)."""

    key: str
    name: str
    n_samples: int = 25
    samples_nested: bool = True
    null: bool = False
    obs: Callable[[int, np.random.Generator], pd.DataFrame] | None = None
    paired: bool = False  # treatment within samples: pseudobulk per sample and treatment
    extra: dict = field(default_factory=dict)

    def kwargs(self, n_cells: int, n_genes: int, rng: np.random.Generator) -> dict:
        kw = {
            "n_genes": n_genes,
            "n_clusters": N_CLUSTERS,
            "n_de_genes": 0 if self.null else n_genes // 10,
            "n_samples": self.n_samples,
            "samples_nested": self.samples_nested,
        }
        if self.obs is None:
            kw["n_cells"] = n_cells
        else:
            kw["obs"] = self.obs(n_cells, rng)
        return kw | self.extra


def nested_obs(per_arm: int, weights: np.ndarray | None = None) -> Callable:
    """Samples A1..A<n>, B1..B<n> nested in treatment A / B; cells spread by `weights`."""

    def make(n_cells: int, rng: np.random.Generator) -> pd.DataFrame:
        names = [f"{t}{i + 1}" for t in "AB" for i in range(per_arm)]
        w = np.ones(len(names)) if weights is None else np.asarray(weights, dtype=float)
        sam = rng.choice(len(names), n_cells, p=w / w.sum())
        obs = pd.DataFrame(
            {
                "sam": np.asarray(names)[sam],
                "cls": (rng.integers(0, N_CLUSTERS, n_cells) + 1).astype(str),
            },
            index=[f"Cell{i + 1}" for i in range(n_cells)],
        )
        obs["trt"] = obs["sam"].str[0]
        return obs

    return make


# 10x range of cells per sample, interleaved so that both arms span the range
_RANGE = np.geomspace(1, 10, 10)[[0, 2, 4, 6, 8, 1, 3, 5, 7, 9]]

SCENARIOS = {
    s.key: s
    for s in [
        Scenario("25", "25 samples"),
        Scenario("10", "10 samples", n_samples=10),
        Scenario("8v8", "8 vs 8", obs=nested_obs(8)),
        Scenario("4v4", "4 vs 4", obs=nested_obs(4)),
        Scenario("3v3", "3 vs 3", obs=nested_obs(3)),
        Scenario(
            "null10x", "null, 5 vs 5, 10x range of cells", null=True, obs=nested_obs(5, _RANGE)
        ),
        Scenario("paired", "paired, 6 samples", n_samples=6, samples_nested=False, paired=True),
    ]
}


# ----------------------------------------------------------------------------------------
# methods: name -> function(adata, scenario) -> (p, log fc), genes x cell types
# ----------------------------------------------------------------------------------------

Result = tuple[np.ndarray, np.ndarray]


def _lmm(adata: ad.AnnData, df: str) -> Result:
    design = make_design(adata.obs, "~0+log(libsize)+cls+cls:trt", "sam")
    fit = lmm_fit(adata.X, design.X, design.Z, design.d, is_counts=True, df=df, output_cov=False)
    cols = [j for j, name in enumerate(design.x_columns) if ":trt" in name]
    return fit.p[:, cols], fit.coef[:, cols]


def lmm_residual(adata: ad.AnnData, scenario: Scenario) -> Result:
    """LMM, t tests on n - p df (FLASHMM)."""
    return _lmm(adata, "residual")


def lmm_satterthwaite(adata: ad.AnnData, scenario: Scenario) -> Result:
    """LMM, t tests on Satterthwaite df."""
    return _lmm(adata, "satterthwaite")


def _lmm_nonnegative(adata: ad.AnnData, df: str) -> Result:
    design = make_design(adata.obs, "~0+log(libsize)+cls+cls:trt", "sam")
    fit = lmm_fit(adata.X, design.X, design.Z, design.d, is_counts=True, df=df, nonnegative=True)
    cols = [j for j, name in enumerate(design.x_columns) if ":trt" in name]
    return fit.p[:, cols], fit.coef[:, cols]


def lmm_nonnegative_satterthwaite(adata: ad.AnnData, scenario: Scenario) -> Result:
    """LMM with variance components >= 0 (as lme4), Satterthwaite df."""
    return _lmm_nonnegative(adata, "satterthwaite")


def lmm_nonnegative_kenward_roger(adata: ad.AnnData, scenario: Scenario) -> Result:
    """LMM with variance components >= 0 (as lme4), Kenward-Roger se and df."""
    return _lmm_nonnegative(adata, "kenward-roger")


def lmm_moderated(adata: ad.AnnData, scenario: Scenario) -> Result:
    """``tl.flashmm_de``'s default: EB-moderated between-sample variance (grid prior, trend)."""
    from scflashmm import tl

    fitted = tl.flashmm_de(
        adata, "~0+log(libsize)+cls+cls:trt", "sam", is_counts=True, copy=True, key_added="cal"
    )
    cols = [c for c in fitted.uns["cal"]["x_columns"] if ":trt" in c]
    return (
        fitted.varm["cal_p"][cols].to_numpy(),
        fitted.varm["cal_coef"][cols].to_numpy(),
    )


def _arms(adata: ad.AnnData) -> tuple[str, str]:
    treated = adata.uns["simulate_rnaseq"]["treatment"]
    control = [t for t in adata.obs["trt"].cat.categories if t != treated]
    if len(control) != 1:
        msg = "the benchmark assumes two treatments"
        raise ValueError(msg)
    return treated, control[0]


def ttest_cells(adata: ad.AnnData, scenario: Scenario) -> Result:
    """Welch t-test over cells within each cell type (scanpy), on log1p(counts)."""
    import scanpy as sc

    treated, control = _arms(adata)
    logged = ad.AnnData(
        X=adata.X.astype(np.float32),
        obs=adata.obs[["cls", "trt"]].copy(),
        var=pd.DataFrame(index=adata.var_names),
    )
    sc.pp.log1p(logged)
    clusters = adata.obs["cls"].cat.categories
    p = np.full((adata.n_vars, len(clusters)), np.nan)
    lfc = np.full_like(p, np.nan)
    for k, cls in enumerate(clusters):
        sub = logged[logged.obs["cls"] == cls].copy()
        sc.tl.rank_genes_groups(sub, "trt", groups=[treated], reference=control, method="t-test")
        df = sc.get.rank_genes_groups_df(sub, group=treated).set_index("names")
        p[:, k] = df.loc[adata.var_names, "pvals"].to_numpy()
        lfc[:, k] = df.loc[adata.var_names, "logfoldchanges"].to_numpy()
    return p, lfc


def pseudobulk_deseq2(adata: ad.AnnData, scenario: Scenario) -> Result:
    """Counts summed per sample x cell type, PyDESeq2 Wald test per cell type."""
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    treated, control = _arms(adata)
    keys = ["cls", "sam", "trt"] if scenario.paired else ["cls", "sam"]
    obs = adata.obs
    groups = obs.groupby(keys, observed=True).ngroup().to_numpy()
    n_groups = int(groups.max()) + 1
    indicator = sp.csr_matrix(
        (np.ones(adata.n_obs), (groups, np.arange(adata.n_obs))), shape=(n_groups, adata.n_obs)
    )
    sums = (indicator @ adata.X).toarray().astype(np.int64)  # pseudobulk samples x genes
    first_cell = pd.Series(np.arange(adata.n_obs)).groupby(groups).first().to_numpy()
    meta = obs.iloc[first_cell][["cls", "sam", "trt"]].astype(str)
    meta.index = [f"pb{i}" for i in range(n_groups)]
    design = "~sam + trt" if scenario.paired else "~trt"
    inference = DefaultInference(n_cpus=1)
    clusters = obs["cls"].cat.categories
    p = np.full((adata.n_vars, len(clusters)), np.nan)
    lfc = np.full_like(p, np.nan)
    for k, cls in enumerate(clusters):
        rows = np.flatnonzero(meta["cls"].to_numpy() == cls)
        counts = pd.DataFrame(sums[rows], index=meta.index[rows], columns=adata.var_names)
        keep = counts.sum(0).to_numpy() > 0
        dds = DeseqDataSet(
            counts=counts.loc[:, keep],
            metadata=meta.iloc[rows],
            design=design,
            refit_cooks=True,
            inference=inference,
            quiet=True,
        )
        dds.deseq2()
        stats_ = DeseqStats(
            dds, contrast=["trt", treated, control], inference=inference, quiet=True
        )
        stats_.summary()
        res = stats_.results_df
        p[keep, k] = res["pvalue"].to_numpy()
        lfc[keep, k] = res["log2FoldChange"].to_numpy()
    return p, lfc


METHODS: dict[str, Callable[[ad.AnnData, Scenario], Result]] = {
    "LMM, n - p df": lmm_residual,
    "LMM, Satterthwaite": lmm_satterthwaite,
    "LMM nonnegative, Satterthwaite": lmm_nonnegative_satterthwaite,
    "LMM nonnegative, Kenward-Roger": lmm_nonnegative_kenward_roger,
    "LMM moderated (default)": lmm_moderated,
    "t-test (cells)": ttest_cells,
    "pseudobulk (PyDESeq2)": pseudobulk_deseq2,
}
OPTIONAL = {"pseudobulk (PyDESeq2)": "pydeseq2"}
NEEDS_NONNEGATIVE = ("LMM nonnegative, Satterthwaite", "LMM nonnegative, Kenward-Roger")


def available_methods(names: list[str]) -> list[str]:
    """The methods whose optional dependency is installed (with a message for the others)."""
    import inspect

    from scflashmm import lmm

    out = []
    for name in names:
        if name in NEEDS_NONNEGATIVE and "nonnegative" not in inspect.signature(lmm).parameters:
            print(f"skipping {name!r}: this version's solver has no nonnegative option")
            continue
        module = OPTIONAL.get(name)
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                print(f"skipping {name!r}: `pip install {module}` to run it")
                continue
        out.append(name)
    return out


# ----------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------


def truth_matrix(adata: ad.AnnData) -> np.ndarray:
    """True DE pairs, genes x cell types."""
    var = adata.var
    truth = np.zeros((adata.n_vars, len(adata.obs["cls"].cat.categories)), dtype=bool)
    de = np.flatnonzero(var["is_de"].to_numpy())
    truth[de, var["de_cluster"].cat.codes.to_numpy()[de]] = True
    return truth


def metrics(p: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """FPR at 0.05, FDP and power at BH 5 % of one repeat."""
    p = np.where(np.isnan(p), 1.0, p)
    called = false_discovery_control(p.ravel(), method="bh").reshape(p.shape) <= ALPHA
    return {
        "fpr": float((p[~truth] < ALPHA).mean()),
        "fdp": float((called & ~truth).sum() / max(called.sum(), 1)),
        "power": float((called & truth).sum() / truth.sum()) if truth.any() else np.nan,
    }


def ranking_power(p: np.ndarray, truth: np.ndarray, fdp: float = ALPHA) -> float:
    """Share of true pairs above the deepest cut of the p-value ranking with actual FDP <= fdp.

    Cuts are only placed between distinct p-values (ties are taken together).
    """
    p = np.where(np.isnan(p), 1.0, np.asarray(p, dtype=float)).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    if not truth.any():
        return np.nan
    order = np.argsort(p, kind="stable")
    p, truth = p[order], truth[order]
    tp = np.cumsum(truth)
    k = np.arange(1, p.size + 1)
    cut = np.append(p[1:] != p[:-1], True)  # a cut after position i is possible
    ok = cut & ((k - tp) <= fdp * k)
    return float(tp[ok].max() / truth.sum()) if ok.any() else 0.0


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------


def run(
    scenarios: list[Scenario],
    methods: list[str],
    *,
    repeats: int,
    n_genes: int,
    n_cells: int,
    seed: int,
    variances: tuple[str, ...] = ("common", "heterogeneous"),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-repeat metrics and the pooled ranking power, for every scenario and variance."""
    rows, pooled = [], {}
    seeds = iter(np.random.SeedSequence(seed).spawn(len(scenarios) * len(variances) * repeats))
    for scenario in scenarios:
        for variance in variances:
            var_re = VAR_MEAN if variance == "common" else ("gamma", VAR_MEAN, VAR_CV)
            print(f"{scenario.name}, {variance} variance ...", file=sys.stderr, flush=True)
            for r in range(repeats):
                rng = np.random.default_rng(next(seeds))
                kwargs = scenario.kwargs(n_cells, n_genes, rng)
                adata = simulate_rnaseq(**kwargs, var_random_effects=var_re, seed=rng)
                truth = truth_matrix(adata)
                for method in methods:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        start = time.perf_counter()
                        p, _ = METHODS[method](adata, scenario)
                        seconds = time.perf_counter() - start
                    key = (scenario.name, variance, method)
                    rows.append(
                        {"scenario": scenario.name, "variance": variance, "method": method}
                        | {"repeat": r, "seconds": seconds}
                        | metrics(p, truth)
                    )
                    pooled.setdefault(key, []).append((p, truth))
    ranking = pd.DataFrame(
        [
            {"scenario": s, "variance": v, "method": m}
            | {
                "ranking_power": ranking_power(
                    np.concatenate([a for a, _ in runs]), np.concatenate([t for _, t in runs])
                )
            }
            for (s, v, m), runs in pooled.items()
        ]
    )
    return pd.DataFrame(rows), ranking


def table(results: pd.DataFrame, ranking: pd.DataFrame) -> str:
    """Markdown table: mean ± sd over repeats; ranking power pooled over repeats."""

    def cell(x: pd.Series) -> str:
        if x.isna().all():
            return "n/a"
        return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"

    rank = ranking.set_index(["scenario", "variance", "method"])["ranking_power"]
    lines = [
        "| scenario | donor variance | method | FPR at 0.05 | FDP at BH 5 % | power at BH 5 % "
        "| ranking power | s / fit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (s, v, m), g in results.groupby(["scenario", "variance", "method"], sort=False):
        rp = rank[(s, v, m)]
        rp_text = "n/a" if np.isnan(rp) else f"{rp:.3f}"
        lines.append(
            f"| {s} | {v} | {m} | {cell(g['fpr'])} | {cell(g['fdp'])} | {cell(g['power'])} "
            f"| {rp_text} | {g['seconds'].mean():.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Command line: run the scenarios and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 genes, 2000 cells, 1 repeat")
    parser.add_argument(
        "--repeats", type=int, default=None, help="simulations per scenario and variance (2)"
    )
    parser.add_argument("--genes", type=int, default=None, help="genes per data set (300)")
    parser.add_argument("--cells", type=int, default=None, help="cells per data set (3000)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated keys (see --list)"
    )
    parser.add_argument(
        "--methods", default=";".join(METHODS), help="semicolon-separated names (see --list)"
    )
    parser.add_argument("--variances", default="common,heterogeneous")
    parser.add_argument("--seed", type=int, default=20241)
    parser.add_argument("--csv", default=None, help="also write the per-repeat rows here")
    parser.add_argument("--list", action="store_true", help="list scenarios and methods")
    args = parser.parse_args()
    if args.list:
        for s in SCENARIOS.values():
            print(f"scenario {s.key!r}: {s.name}")
        for m in METHODS:
            print(f"method {m!r}")
        return
    n_genes, n_cells, repeats = (200, 2000, 1) if args.quick else (300, 3000, 2)
    n_genes = args.genes or n_genes
    n_cells = args.cells or n_cells
    repeats = args.repeats or repeats
    unknown = [k for k in args.scenarios.split(",") if k not in SCENARIOS]
    unknown += [m for m in args.methods.split(";") if m not in METHODS]
    if unknown:
        parser.error(f"unknown scenario(s) or method(s): {unknown}; see --list")
    scenarios = [SCENARIOS[k] for k in args.scenarios.split(",")]
    methods = available_methods(args.methods.split(";"))
    variances = tuple(args.variances.split(","))
    logging.getLogger("scflashmm").setLevel(logging.WARNING)
    print(
        f"simulate_rnaseq: {n_cells} cells x {n_genes} genes, {N_CLUSTERS} cell types, 2 "
        f"treatments, {n_genes // 10} DE genes (0 in the null) with |logFC| ~ U(0.25, 1) in one "
        f"cell type each; donor variance {VAR_MEAN} (common) or gamma with mean {VAR_MEAN}, "
        f"CV {VAR_CV} (heterogeneous); {repeats} repeats per scenario and variance, "
        f"seed {args.seed}.\n"
    )
    warm = simulate_rnaseq(n_genes=20, n_cells=300, n_clusters=2, seed=0)  # numba, imports
    for m in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            METHODS[m](warm, SCENARIOS["25"])
    start, cpu_start = time.perf_counter(), time.process_time()
    results, ranking = run(
        scenarios,
        methods,
        repeats=repeats,
        n_genes=n_genes,
        n_cells=n_cells,
        seed=args.seed,
        variances=variances,
    )
    print(table(results, ranking))
    print(
        f"\n(mean ± sd over repeats; total {time.perf_counter() - start:.0f} s wall, "
        f"{time.process_time() - cpu_start:.0f} s CPU)"
    )
    if args.csv:
        results.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
