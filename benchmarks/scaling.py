"""Scaling benchmarks of scflashmm (issue 7). One command per table of docs/benchmarks.md:

    python benchmarks/scaling.py target   # T1: 100k cells x 1,000 genes, in-memory CSR, end to end
    python benchmarks/scaling.py paper    # T2: 20k/60k/120k x 6,000, vs statsmodels and R
    python benchmarks/scaling.py backed   # T3: 500k x 2,000 from a backed sparse h5ad
    python benchmarks/scaling.py floor    # T4: the pass over the cells vs a bare scipy product
    python benchmarks/scaling.py solver   # T5: fit alone, 11,600 genes, q = 259, p = 62
    python benchmarks/scaling.py kernels  # T6: building blocks of the pass (how it was chosen)
    python benchmarks/scaling.py atlas    # T7: the atlas shape from a backed h5ad, single/groupby
    python benchmarks/scaling.py groupby  # T8: in memory: groupby vs a loop over subsets
    python benchmarks/scaling.py dask     # T9: the pass on Dask (in process, LocalCluster 1/2)

Options: ``--repeat N`` (default 3; the minimum time is reported, the largest peak RSS),
``--data DIR`` (simulated h5ad files are cached there; default ``$TMPDIR/scflashmm-bench``),
``--quick`` (smaller sizes, for a smoke test). Every measurement runs in a fresh Python
process; its peak RSS is the kernel's high-water mark (``VmHWM``), reset just before the timed
call (``/proc/self/clear_refs``), so it covers that call with the data already loaded.

The data are ``scflashmm.datasets.simulate_rnaseq`` counts whose gene means come from a
synthetic low-count reference (about 27% non-zero, as the 100k x 1,000 row of docs/benchmarks.md),
whose cells carry 25 samples nested in 2 treatments and 10 (T1) or 12 (T2, T3) cell types. The
model is FLASHMM's ``~0 + log(libsize) + cls + cls:trt`` with a random intercept per sample,
counts fit as ``log2(1 + y)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXED = "~0+log(libsize)+cls+cls:trt"
RANDOM = "sam"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def reference(n_genes: int, n_clusters: int, seed: int = 0, n_ref: int = 2000, scale: float = 0.6):
    """Synthetic reference: low-mean NB counts (cells x genes; ~27% non-zero once simulated) and
    their cells' metadata: 25 samples nested in 2 treatments (12 A, 13 B), ``n_clusters`` types."""
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.8, scale, n_genes) + 0.02
    lam = rng.gamma(1.0, mu, (n_ref, n_genes))
    counts = sp.csr_matrix(rng.poisson(lam).astype(np.int32))
    samples = [f"A{i}" for i in range(1, 13)] + [f"B{i}" for i in range(1, 14)]
    sam = np.array(samples)[np.arange(n_ref) % len(samples)]
    obs = pd.DataFrame(
        {
            "sam": sam,
            "cls": (rng.integers(0, n_clusters, n_ref) + 1).astype(str),
            "trt": [s[0] for s in sam],
        },
        index=[f"ref{i}" for i in range(n_ref)],
    )
    return counts, obs


def dataset(data_dir: Path, n_cells: int, n_genes: int, n_clusters: int, *, chunk: int = 0) -> Path:
    """Simulate (once) and write an h5ad; in chunks of ``chunk`` cells when given (low memory)."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    import scflashmm as sfm

    path = data_dir / f"sim_{n_cells}x{n_genes}_k{n_clusters}.h5ad"
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    ref, ref_obs = reference(n_genes, n_clusters)
    t0 = time.perf_counter()
    kwargs = dict(obs=ref_obs, n_genes=n_genes)
    tmp = path.with_suffix(".part")
    if not chunk:
        adata = sfm.datasets.simulate_rnaseq(ref, n_cells=n_cells, seed=1, **kwargs)
        adata.write_h5ad(tmp)
    else:
        # Each chunk is its own simulate_rnaseq call (same reference genes, its own seed, so
        # its own sample effects); X is appended to the file chunk by chunk.
        obs = []
        with h5py.File(tmp, "w") as f:
            for i, start in enumerate(range(0, n_cells, chunk)):
                part = sfm.datasets.simulate_rnaseq(
                    ref, n_cells=min(chunk, n_cells - start), seed=100 + i, **kwargs
                )
                if i == 0:
                    write_elem(f, "X", part.X)
                    var = part.var
                else:
                    sparse_dataset(f["X"]).append(part.X)
                part.obs.index = [f"c{start + j}" for j in range(part.n_obs)]
                obs.append(part.obs)
                del part
            obs = pd.concat(obs)
            for col in ("sam", "cls", "trt"):
                obs[col] = obs[col].astype(str).astype("category")
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
        ad.read_h5ad(tmp, backed="r").file.close()  # readable
    tmp.rename(path)
    print(f"  simulated {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


#: The shape of the tuberculosis T-cell atlas FLASHMM's paper fits (docs/benchmarks.md, Scale).
ATLAS = {"cells": 499_713, "genes": 11_596, "donors": 259, "types": 30, "density": 0.07}
ATLAS_FIXED = "~0+log(libsize)+sex+cls+cls:trt"  # 1 + 2 + 29 + 30 = 62 columns
ATLAS_GROUP_FIXED = "~log(libsize)+sex+trt"  # within one cell type: 4 columns
ATLAS_RANDOM = "donor"


def atlas_dataset(data_dir: Path, *, quick: bool = False, chunk: int = 5_000) -> Path:
    """Write (once) a synthetic backed h5ad of the atlas shape, in chunks, never dense.

    Cells get a cell type (30, unequal sizes) and a donor (259; each donor has a treatment
    and a sex); each gene is non-zero in a cell with probability ``rate_gene * effect_donor``
    (about 7 % overall), with small geometric counts. CSR int32, appended chunk by chunk.
    """
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    n, m = (60_000, 2_000) if quick else (ATLAS["cells"], ATLAS["genes"])
    donors, types = ATLAS["donors"], ATLAS["types"]
    path = data_dir / f"atlas_{n}x{m}.h5ad"
    if path.exists():
        return path
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(14)
    t0 = time.perf_counter()
    rate = np.clip(rng.gamma(0.7, ATLAS["density"] / 0.7, m), 0.002, 0.9).astype(np.float32)
    donor_effect = rng.lognormal(0.0, 0.25, (donors, 1)).astype(np.float32)
    type_weight = rng.dirichlet(np.full(types, 2.0))
    donor = rng.integers(0, donors, n)
    cls = rng.choice(types, n, p=type_weight)
    trt = np.array(["A", "B"])[np.arange(donors) % 2]
    sex = np.array(["F", "M"])[rng.integers(0, 2, donors)]
    libsize = np.zeros(n)
    tmp = path.with_suffix(".part")
    with h5py.File(tmp, "w") as f:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            p = rate[None, :] * donor_effect[donor[start:stop]]
            mask = rng.random((stop - start, m), dtype=np.float32) < p
            part = sp.csr_matrix(mask, dtype=np.int32)
            part.data = rng.geometric(0.6, part.nnz).astype(np.int32)
            libsize[start:stop] = np.asarray(part.sum(axis=1)).ravel()
            if start == 0:
                write_elem(f, "X", part)
            else:
                sparse_dataset(f["X"]).append(part)
            del mask, part, p
        obs = pd.DataFrame(
            {
                "libsize": np.maximum(libsize, 1.0),
                "cls": pd.Categorical([f"T{c + 1:02d}" for c in cls]),
                "donor": pd.Categorical([f"D{d + 1:03d}" for d in donor]),
                "trt": pd.Categorical(trt[donor]),
                "sex": pd.Categorical(sex[donor]),
            },
            index=[f"c{i}" for i in range(n)],
        )
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=[f"g{j}" for j in range(m)]))
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
    ad.read_h5ad(tmp, backed="r").file.close()  # readable
    tmp.rename(path)
    print(f"  wrote {path.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


# --------------------------------------------------------------------------------------------
# measurements (each in its own process)
# --------------------------------------------------------------------------------------------


def _rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker_e2e(spec: dict) -> dict:
    """flashmm_de end to end; then the same phases one by one through the low-level API."""
    import anndata as ad

    import scflashmm as sfm
    from scflashmm._design import make_design

    base = _rss_mb()["VmRSS"]
    backed = spec.get("backed", False)
    adata = ad.read_h5ad(spec["path"], backed="r" if backed else None)
    X = adata.X
    matrix_mb = sum(a.nbytes for a in (X.data, X.indices, X.indptr)) / 2**20 if not backed else 0.0
    loaded = _rss_mb()["VmRSS"]
    out = {"n": adata.n_obs, "m": adata.n_vars, "base_mb": base, "matrix_mb": matrix_mb}
    if not backed:
        out["density"] = X.nnz / (adata.n_obs * adata.n_vars)
    reset = _reset_peak()
    t0 = time.perf_counter()
    sfm.tl.flashmm_de(adata, FIXED, RANDOM, is_counts=True)
    out["total_s"] = time.perf_counter() - t0
    out["peak_mb"] = _rss_mb()["VmHWM"] if reset else float("nan")
    out["loaded_mb"] = loaded
    out["p"] = len(adata.uns["flashmm"]["x_columns"])
    out["q"] = int(sum(adata.uns["flashmm"]["d"]))

    t = time.perf_counter()
    design = make_design(adata.obs, FIXED, RANDOM)
    out["design_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stats = sfm.summary_stats(design.X, adata.X, design.Z, is_counts=True)
    out["stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sfm.lmm(stats, design.d, covariate_names=design.x_columns)
    out["fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sfm.lmm_test(fit)
    out["tests_s"] = time.perf_counter() - t
    out["nonconverged"] = int((~fit.converged).sum())
    if backed:
        adata.file.close()
    return out


def worker_statsmodels(spec: dict) -> dict:
    """statsmodels MixedLM (REML) on a few genes; the per-gene time extrapolates to all genes."""
    import anndata as ad
    import statsmodels.api as sm

    from scflashmm._design import make_design

    adata = ad.read_h5ad(spec["path"])
    design = make_design(adata.obs, FIXED, RANDOM)
    groups = adata.obs[RANDOM].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    genes = rng.choice(adata.n_vars, spec["genes"], replace=False)
    times = []
    for g in genes:
        y = np.log2(1 + adata.X[:, g].toarray().ravel())
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sm.MixedLM(y, design.X, groups=groups).fit(reml=True)
        times.append(time.perf_counter() - t)
    return {"per_gene_s": float(np.mean(times)), "genes": len(genes), "m": adata.n_vars}


def worker_floor(spec: dict) -> dict:
    """The pass over the cells against a bare scipy sparse product with the (p+q) design."""
    import anndata as ad
    import scipy.sparse as sp

    import scflashmm as sfm
    import scflashmm._core.sumstats as ss
    from scflashmm._design import make_design

    adata = ad.read_h5ad(spec["path"])
    Y = adata.X
    design = make_design(adata.obs, FIXED, RANDOM)
    X, Z = design.X, design.Z
    if spec.get("q_donors"):  # a random intercept with hundreds of levels
        rng = np.random.default_rng(0)
        levels = rng.integers(0, spec["q_donors"], adata.n_obs)
        Z = sp.csr_matrix((np.ones(adata.n_obs), (np.arange(adata.n_obs), levels)))
    XZ = np.hstack([X, Z.toarray()])
    XZs = sp.csr_matrix(XZ)
    Y64 = Y.astype(np.float64)
    rep = spec["inner"]

    def best(f):
        times = []
        for _ in range(rep):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    out = {"n": Y.shape[0], "m": Y.shape[1], "nnz": int(Y.nnz), "p": X.shape[1], "q": Z.shape[1]}
    out["floor_s"] = best(lambda: Y64.T @ XZ)  # float64 values, dense design: the floor
    out["floor_stored_s"] = best(lambda: Y.T @ XZ)  # stored int32 values (scipy upcasts)
    out["sparse_design_s"] = best(lambda: XZs.T @ Y64)  # formulaic-style sparse design

    def product_pass():  # the former implementation: log2(1+y), Y' [X Z], bincount
        XZY = np.zeros((XZ.shape[1], Y.shape[1]))
        Ynorm = np.zeros(Y.shape[1])
        for a in range(0, Y.shape[0], 10_000):
            c = Y[a : a + 10_000]
            v = np.log1p(c.data.astype(np.float64)) / np.log(2.0)
            c = sp.csr_matrix((v, c.indices, c.indptr), shape=c.shape)
            XZY += np.asarray(c.T @ XZ[a : a + 10_000]).T
            Ynorm += np.bincount(c.indices, weights=v * v, minlength=Y.shape[1])
        return XZY, Ynorm

    out["product_pass_s"] = best(product_pass)
    plan = ss.DesignPlan(X, Z, Y.shape[1])
    out["groups"] = [[len(c), int(U)] for c, U in plan.groups]
    out["continuous"] = int(plan.continuous.size)
    for jobs in (1, 2):
        out[f"stats_{jobs}_s"] = best(
            lambda jobs=jobs: sfm.summary_stats(X, Y, Z, is_counts=True, n_jobs=jobs)
        )
    out["plan_s"] = best(lambda: ss.DesignPlan(X, Z, Y.shape[1]))
    return out


def worker_solver(spec: dict) -> dict:
    """Fit alone on summary statistics of simulated data with real random effects."""
    import scflashmm as sfm

    n_genes, n_cells, q = spec["genes"], spec["cells"], spec["q"]
    n_cls = 31
    rng = np.random.default_rng(0)
    cls = rng.integers(0, n_cls, n_cells)
    donor = rng.integers(0, q, n_cells)
    trt = donor % 2
    onehot = np.eye(n_cls)[cls]
    X = np.column_stack([np.log(rng.gamma(5, 400, n_cells)), onehot, onehot[:, 1:] * trt[:, None]])
    Z = np.eye(q)[donor]
    parts = []
    for lo in range(0, n_genes, 400):
        g = min(400, n_genes - lo)
        Y = (
            X @ rng.normal(0, 0.3, (X.shape[1], g))
            + Z @ rng.normal(0, 0.3, (q, g))
            + rng.normal(size=(n_cells, g))
        )
        parts.append(sfm.summary_stats(X, Y, Z))
    stats = sfm.SummaryStats(
        XX=parts[0].XX,
        XY=np.hstack([s.XY for s in parts]),
        ZX=parts[0].ZX,
        ZY=np.hstack([s.ZY for s in parts]),
        ZZ=parts[0].ZZ,
        Ynorm=np.concatenate([s.Ynorm for s in parts]),
        n=n_cells,
    )
    del parts, Y
    reset = _reset_peak()
    before = _rss_mb()["VmRSS"]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = sfm.lmm(stats)
    return {
        "fit_s": time.perf_counter() - t,
        "p": X.shape[1],
        "q": q,
        "m": n_genes,
        "n": n_cells,
        "peak_extra_mb": (_rss_mb()["VmHWM"] - before) if reset else float("nan"),
        "nonconverged": int((~fit.converged).sum()),
        "median_niter": float(np.median(fit.niter)),
    }


def worker_kernels(spec: dict) -> dict:
    """Building blocks of the pass on 10 blocks of 10,000 cells, with 1 and 2 threads.

    The 2-thread time shows whether a kernel releases the GIL (it halves only if it does).
    """
    from concurrent.futures import ThreadPoolExecutor

    import anndata as ad
    import scipy.sparse as sp
    from scipy.sparse import _sparsetools as st

    import scflashmm as sfm
    import scflashmm._core.blocks as pass_blocks
    from scflashmm._design import make_design

    adata = ad.read_h5ad(spec["path"])
    Y = adata.X
    n, m = Y.shape
    design = make_design(adata.obs, FIXED, RANDOM)
    X = design.X
    rng = np.random.default_rng(0)
    q = spec["q"]
    sam = adata.obs[RANDOM].cat.codes.to_numpy() if q == 25 else rng.integers(0, q, n)
    Z = np.eye(q)[sam]
    XZ = np.hstack([X, Z])
    blocks = []
    for a in range(0, n, 10_000):
        c = Y[a : a + 10_000]
        v = np.log1p(c.data.astype(np.float64)) / np.log(2.0)
        blocks.append((a, sp.csr_matrix((v, c.indices, c.indptr), shape=c.shape), c.data))

    def product(b):
        a, c, _ = b
        return c.T @ XZ[a : a + c.shape[0]]

    def add_at(b):
        a, c, _ = b
        out = np.zeros((q, m))
        np.add.at(out, (np.repeat(sam[a : a + c.shape[0]], np.diff(c.indptr)), c.indices), c.data)
        return out

    def bincount(b):
        a, c, _ = b
        key = np.repeat(sam[a : a + c.shape[0]].astype(np.int64) * m, np.diff(c.indptr))
        key += c.indices
        return np.bincount(key, weights=c.data, minlength=q * m)

    def indicator_product(b):
        a, c, _ = b
        G = sp.csr_matrix(
            (np.ones(c.shape[0]), sam[a : a + c.shape[0]], np.arange(c.shape[0] + 1)),
            shape=(c.shape[0], q),
        )
        return (c.T @ G).toarray()

    def scatter_add(b):
        a, c, _ = b
        out = np.zeros((q, m))
        rows = np.repeat(sam[a : a + c.shape[0]].astype(np.int32), np.diff(c.indptr))
        st.coo_todense(q, m, c.nnz, rows, c.indices, c.data, out.ravel(), 0)
        return out

    def log_naive(b):
        return np.log2(1 + b[2])

    def log_inplace(b):
        v = b[2].astype(np.float64)
        return np.log1p(v, out=v)

    def ynorm_bincount(b):
        c = b[1]
        return np.bincount(c.indices, weights=c.data * c.data, minlength=m)

    def ynorm_matvec(b):
        c = b[1]
        return sp.csc_matrix(
            (c.data * c.data, c.indices, c.indptr), shape=(m, c.shape[0])
        ) @ np.ones(c.shape[0])

    kernels = {
        "Y' [X Z] (dense design, p+q columns)": product,
        "Z'Y by np.add.at": add_at,
        "Z'Y by np.bincount": bincount,
        "Z'Y by sparse indicator product Y' G": indicator_product,
        "Z'Y by scatter-add (scipy coo_todense)": scatter_add,
        "log2(1 + y) naive (int32 -> float64)": log_naive,
        "log(1 + y) one copy, in place": log_inplace,
        "Ynorm by np.bincount": ynorm_bincount,
        "Ynorm by sparse matvec": ynorm_matvec,
    }
    out = {}
    for name, f in kernels.items():
        for jobs in (1, 2):
            times = []
            for _ in range(spec["inner"]):
                t = time.perf_counter()
                with ThreadPoolExecutor(jobs) as pool:
                    list(pool.map(f, blocks))
                times.append(time.perf_counter() - t)
            out[f"{name}|{jobs}_s"] = min(times)
    pieces = {}
    for piece in (1 << 14, 1 << 17, 1 << 20, 1 << 30):
        pass_blocks._PIECE = piece  # the piece size of the pass (_core/blocks.py)
        times = []
        for _ in range(spec["inner"]):
            t = time.perf_counter()
            sfm.summary_stats(X, Y, Z, is_counts=True, n_jobs=1)
            times.append(time.perf_counter() - t)
        pieces[str(piece)] = min(times)
    out["pieces"] = pieces
    out["nnz"] = int(Y.nnz)
    return out


def worker_atlas(spec: dict) -> dict:
    """flashmm_de from the backed atlas-shape file, single model or ``groupby`` cell type."""
    import anndata as ad

    import scflashmm as sfm

    base = _rss_mb()["VmRSS"]
    adata = ad.read_h5ad(spec["path"], backed="r")
    load = os.getloadavg()[0]
    reset = _reset_peak()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec["mode"] == "groupby":
            sfm.tl.flashmm_de(adata, ATLAS_GROUP_FIXED, ATLAS_RANDOM, groupby="cls", is_counts=True)
        else:
            sfm.tl.flashmm_de(adata, ATLAS_FIXED, ATLAS_RANDOM, is_counts=True)
    out = {"total_s": time.perf_counter() - t0, "base_mb": base, "load": load}
    out["peak_mb"] = _rss_mb()["VmHWM"] if reset else float("nan")
    info = adata.uns["flashmm"]
    if spec["mode"] == "groupby":
        subs = [adata.uns[k] for k in info["group_keys"]]
        out["groups"] = len(subs)
        out["p"] = max(len(u["x_columns"]) for u in subs)
        out["q"] = int(sum(sum(u["d"]) for u in subs))
        out["nonconverged"] = int(sum(u["n_nonconverged"] for u in subs))
    else:
        out["groups"] = 1
        out["p"], out["q"] = len(info["x_columns"]), int(sum(info["d"]))
        out["nonconverged"] = int(info["n_nonconverged"])
    out["n"], out["m"] = adata.n_obs, adata.n_vars
    adata.file.close()
    return out


def worker_groupby_memory(spec: dict) -> dict:
    """In memory: the single interaction model, a loop of subset fits, and ``groupby``."""
    import anndata as ad

    import scflashmm as sfm

    backed = ad.read_h5ad(spec["path"], backed="r")
    adata = backed[: spec["cells"]].to_memory()
    backed.file.close()
    out = {"n": adata.n_obs, "m": adata.n_vars, "groups": int(adata.obs["cls"].nunique())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        sfm.tl.flashmm_de(adata, ATLAS_FIXED, ATLAS_RANDOM, is_counts=True)
        out["single_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for g in adata.obs["cls"].cat.categories:
            sub = adata[adata.obs["cls"] == g].copy()
            sfm.tl.flashmm_de(sub, ATLAS_GROUP_FIXED, ATLAS_RANDOM, is_counts=True)
        out["loop_s"] = time.perf_counter() - t
        t = time.perf_counter()
        sfm.tl.flashmm_de(adata, ATLAS_GROUP_FIXED, ATLAS_RANDOM, groupby="cls", is_counts=True)
        out["groupby_s"] = time.perf_counter() - t
    return out


def worker_dask(spec: dict) -> dict:
    """The pass over a lazily read Dask array: in process, or on a LocalCluster.

    ``workers``: -1 the local pass over the backed file (no Dask), 0 Dask's threaded scheduler
    in this process, k > 0 a LocalCluster of k worker processes with ``threads`` threads each.
    Times: ``startup_s`` the cluster and client, ``first_s`` the first call (the workers import
    numpy/scipy/anndata/scflashmm and open the file), ``pass_s`` the best of 2 further calls.
    """
    import h5py
    from anndata.experimental import read_elem_lazy

    import scflashmm as sfm
    from scflashmm._core.passes import CELLS_PER_RESULT_ROW, _runs
    from scflashmm._core.plan import DesignPlan
    from scflashmm._design import make_design

    f = h5py.File(spec["path"], "r")
    import anndata as ad

    obs = ad.read_h5ad(spec["path"], backed="r").obs
    design = make_design(obs, ATLAS_FIXED, ATLAS_RANDOM)
    Y = read_elem_lazy(f["X"], chunks=(spec["chunk"], -1))
    rows = DesignPlan(design.X, design.Z, Y.shape[1]).rows
    out = {
        "n": int(Y.shape[0]),
        "m": int(Y.shape[1]),
        "blocks": len(Y.chunks[0]),
        "tasks": len(_runs(Y.chunks[0], CELLS_PER_RESULT_ROW * rows)),
    }
    workers = spec["workers"]
    data = f["X"] if workers == -1 else Y

    def timed_calls() -> None:
        t = time.perf_counter()
        sfm.summary_stats(design.X, data, design.Z, is_counts=True)
        out["first_s"] = time.perf_counter() - t
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            sfm.summary_stats(design.X, data, design.Z, is_counts=True)
            best = min(best, time.perf_counter() - t)
        out["pass_s"] = best

    if workers <= 0:  # the local pass, or Dask's threaded scheduler in process
        timed_calls()
    else:
        from distributed import Client, LocalCluster

        t = time.perf_counter()
        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=spec.get("threads", 1),
                processes=True,
                dashboard_address=":0",
            ) as cluster,
            Client(cluster),
        ):
            out["startup_s"] = time.perf_counter() - t
            timed_calls()
    f.close()
    return out


WORKERS = {
    "e2e": worker_e2e,
    "statsmodels": worker_statsmodels,
    "floor": worker_floor,
    "solver": worker_solver,
    "kernels": worker_kernels,
    "atlas": worker_atlas,
    "groupby_memory": worker_groupby_memory,
    "dask": worker_dask,
}


def run(kind: str, spec: dict, repeat: int) -> dict:
    """Run a worker ``repeat`` times in fresh processes: min of times, max of peaks."""
    results = []
    for _ in range(repeat):
        proc = subprocess.run(
            [sys.executable, __file__, "_worker", kind, json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            msg = f"worker {kind} failed"
            raise RuntimeError(msg)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    merged = dict(results[0])
    for key in merged:
        values = [r[key] for r in results]
        if key.endswith("_s"):
            merged[key] = min(values)
        elif key.endswith("_mb"):
            merged[key] = max(values)
    return merged


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def machine() -> str:
    load = open("/proc/loadavg").read().split()[:3]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average at start {' '.join(load)}"
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_s(x: float) -> str:
    if x < 1:
        return f"{x:.3f}"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}" if x < 3600 else f"{x / 3600:.1f} h"


def r_flashmm_available() -> bool:
    rscript = shutil.which("Rscript")
    if not rscript:
        return False
    check = subprocess.run(
        [rscript, "-e", "quit(status = !requireNamespace('FLASHMM', quietly = TRUE))"],
        capture_output=True,
        check=False,
    )
    return check.returncode == 0


def run_r(path: Path, data_dir: Path) -> dict:
    """R FLASHMM ``flashmm()`` on the same data (MatrixMarket + obs.csv), timed by the R script."""
    import anndata as ad
    import scipy.io

    stem = data_dir / path.stem
    mtx, obs_csv = stem.with_suffix(".mtx"), stem.with_suffix(".obs.csv")
    if not mtx.exists():
        adata = ad.read_h5ad(path)
        scipy.io.mmwrite(mtx, adata.X.T.tocoo(), field="integer")
        adata.obs.to_csv(obs_csv)
    time_bin = shutil.which("time") or "/usr/bin/time"
    cmd = ["Rscript", str(HERE / "flashmm_bench.R"), str(mtx), str(obs_csv)]
    if Path(time_bin).exists():
        cmd = [time_bin, "-v", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for line in proc.stderr.splitlines():
        if "Maximum resident set size" in line:
            out["peak_mb"] = int(line.split()[-1]) / 1024
    return out


def cmd_target(args) -> str:
    n, m = (20_000, 1_000) if args.quick else (100_000, 1_000)
    path = dataset(args.data, n, m, 10)
    r = run("e2e", {"path": str(path)}, args.repeat)
    over = r["peak_mb"] - r["base_mb"] - r["matrix_mb"]
    rows = [
        [
            f"{r['n']:,} x {r['m']:,}",
            f"{100 * r['density']:.0f}%",
            f"{r['p']}, {r['q']}",
            fmt_s(r["design_s"]),
            fmt_s(r["stats_s"]),
            fmt_s(r["fit_s"]),
            fmt_s(r["tests_s"]),
            fmt_s(r["total_s"]),
            f"{r['matrix_mb']:.0f}",
            f"{r['base_mb']:.0f}",
            f"{r['peak_mb']:.0f}",
            f"{over:.0f}",
        ]
    ]
    header = [
        "cells x genes",
        "non-zero",
        "p, q",
        "design s",
        "summary stats s",
        "fit s",
        "tests s",
        "flashmm_de total s",
        "CSR MB",
        "Python+imports MB",
        "peak RSS MB",
        "peak - imports - CSR MB",
    ]
    return table(header, rows)


def cmd_paper(args) -> str:
    sizes = (
        [(5_000, 1_000), (10_000, 1_000)]
        if args.quick
        else [(20_000, 6_000), (60_000, 6_000), (120_000, 6_000)]
    )
    have_r = r_flashmm_available()
    if not have_r:
        print(
            "R FLASHMM column skipped: Rscript with the FLASHMM package is not installed.",
            file=sys.stderr,
        )
    rows = []
    for n, m in sizes:
        path = dataset(args.data, n, m, 12)
        r = run("e2e", {"path": str(path)}, args.repeat)
        sm = run("statsmodels", {"path": str(path), "genes": 3}, 1)
        r_col = "not installed"
        if have_r:
            rr = run_r(path, args.data)
            r_col = f"{fmt_s(rr['total_s'])} s, {rr.get('peak_mb', float('nan')):.0f} MB"
        rows.append(
            [
                f"{n:,} x {m:,}",
                f"{100 * r['density']:.0f}%",
                f"{r['p']}, {r['q']}",
                fmt_s(r["design_s"]),
                fmt_s(r["stats_s"]),
                fmt_s(r["fit_s"]),
                fmt_s(r["tests_s"]),
                fmt_s(r["total_s"]),
                f"{r['peak_mb']:.0f}",
                f"{fmt_s(sm['per_gene_s'] * sm['m'])} (extrapolated from {sm['genes']} genes)",
                r_col,
            ]
        )
    header = [
        "cells x genes",
        "non-zero",
        "p, q",
        "design s",
        "summary stats s",
        "fit s",
        "tests s",
        "flashmm_de total s",
        "peak RSS MB",
        "statsmodels MixedLM s",
        "R FLASHMM",
    ]
    return table(header, rows)


def cmd_backed(args) -> str:
    n, m, chunk = (60_000, 500, 20_000) if args.quick else (500_000, 2_000, 50_000)
    path = dataset(args.data, n, m, 12, chunk=chunk)
    r = run("e2e", {"path": str(path), "backed": True}, args.repeat)
    size_mb = path.stat().st_size / 2**20
    rows = [
        [
            f"{r['n']:,} x {r['m']:,}",
            f"{size_mb:.0f}",
            f"{r['p']}, {r['q']}",
            fmt_s(r["design_s"]),
            fmt_s(r["stats_s"]),
            fmt_s(r["fit_s"]),
            fmt_s(r["tests_s"]),
            fmt_s(r["total_s"]),
            f"{r['base_mb']:.0f}",
            f"{r['peak_mb']:.0f}",
        ]
    ]
    header = [
        "cells x genes",
        "h5ad MB",
        "p, q",
        "design s",
        "summary stats s",
        "fit s",
        "tests s",
        "flashmm_de total s",
        "Python+imports MB",
        "peak RSS MB",
    ]
    return table(header, rows)


def cmd_floor(args) -> str:
    cases = [(20_000, 1_000, 10)] if args.quick else [(100_000, 1_000, 10), (120_000, 6_000, 12)]
    rows = []
    for n, m, k in cases:
        path = dataset(args.data, n, m, k)
        for donors in (0, 259):
            inner = 3 if n * m <= 100_000 * 1_000 else 1  # keep the table within minutes
            spec = {"path": str(path), "q_donors": donors, "inner": inner}
            r = run("floor", spec, args.repeat)
            best = min(r["stats_1_s"], r["stats_2_s"])
            rows.append(
                [
                    f"{r['n']:,} x {r['m']:,}",
                    f"{r['nnz'] / 1e6:.0f}M",
                    f"{r['p']}, {r['q']}",
                    fmt_s(r["floor_s"]),
                    fmt_s(r["floor_stored_s"]),
                    fmt_s(r["sparse_design_s"]),
                    fmt_s(r["product_pass_s"]),
                    fmt_s(r["stats_1_s"]),
                    fmt_s(r["stats_2_s"]),
                    f"{best / r['floor_s']:.2f}",
                    ", ".join(f"{c} cols/{u} patterns" for c, u in r["groups"])
                    + f"; {r['continuous']} product col.",
                ]
            )
    header = [
        "cells x genes",
        "stored",
        "p, q",
        "floor: Y64' [X Z] s",
        "Y' [X Z] (int32) s",
        "sparse [X Z]' Y s",
        "product pass s",
        "summary_stats 1 thread s",
        "summary_stats 2 threads s",
        "ratio to floor",
        "plan",
    ]
    return table(header, rows)


def cmd_solver(args) -> str:
    spec = {"genes": 2_000 if args.quick else 11_600, "cells": 50_000, "q": 259}
    r = run("solver", spec, args.repeat)
    rows = [
        [
            f"{r['m']:,}",
            f"{r['n']:,}",
            f"{r['p']}",
            f"{r['q']}",
            fmt_s(r["fit_s"]),
            f"{r['peak_extra_mb']:.0f}",
            f"{r['median_niter']:.0f}",
            str(r["nonconverged"]),
        ]
    ]
    header = [
        "genes",
        "cells",
        "p",
        "q",
        "fit s",
        "peak RSS above stats MB",
        "median iterations",
        "not converged",
    ]
    return table(header, rows)


def cmd_kernels(args) -> str:
    n, m = (20_000, 1_000) if args.quick else (100_000, 1_000)
    path = dataset(args.data, n, m, 10)
    results = {
        q: run("kernels", {"path": str(path), "q": q, "inner": 3}, args.repeat) for q in (25, 259)
    }
    names = [k.split("|")[0] for k in results[25] if k.endswith("|1_s")]
    rows = []
    for name in names:
        row = [name]
        for q in (25, 259):
            one, two = results[q][f"{name}|1_s"], results[q][f"{name}|2_s"]
            row += [fmt_s(one), fmt_s(two)]
        rows.append(row)
    header = [
        "kernel (10 blocks of 10,000 cells)",
        "q=25: 1 thread s",
        "2 threads s",
        "q=259: 1 thread s",
        "2 threads s",
    ]
    pieces = results[25]["pieces"]
    rows2 = [
        [f"{int(k):,}" if int(k) < 1 << 30 else "whole block", fmt_s(v)] for k, v in pieces.items()
    ]
    return (
        f"{n:,} cells x {m:,} genes, {results[25]['nnz'] / 1e6:.0f}M stored values, p = 21.\n\n"
        + table(header, rows)
        + "\n\nsummary_stats (1 thread, q = 25) by stored values per piece of a block:\n\n"
        + table(["values per piece", "summary_stats s"], rows2)
    )


def _drop_page_cache() -> bool:
    """Drop the page cache (root only), so that the next read comes from the disk."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        return True
    except OSError:
        return False


def cmd_atlas(args) -> str:
    path = atlas_dataset(args.data, quick=args.quick)
    size_gb = path.stat().st_size / 2**30
    rows = []
    for mode in ("single", "groupby"):
        for cache in ("cold", "warm"):
            if cache == "cold":
                if not _drop_page_cache():
                    continue
                results = [run("atlas", {"path": str(path), "mode": mode}, 1)]
                for _ in range(args.repeat - 1):
                    _drop_page_cache()
                    results.append(run("atlas", {"path": str(path), "mode": mode}, 1))
                r = dict(results[0])
                r["total_s"] = min(x["total_s"] for x in results)
                r["peak_mb"] = max(x["peak_mb"] for x in results)
                r["load"] = max(x["load"] for x in results)
            else:
                r = run("atlas", {"path": str(path), "mode": mode}, args.repeat)
            rows.append(
                [
                    "single model" if mode == "single" else f"groupby cell type ({r['groups']})",
                    cache,
                    f"{r.get('load', float('nan')):.1f}",
                    f"{r['n']:,} x {r['m']:,}",
                    f"{size_gb:.2f}",
                    f"{r['p']}, {r['q']}",
                    fmt_s(r["total_s"]),
                    f"{r['peak_mb']:.0f}",
                    str(r["nonconverged"]),
                ]
            )
    header = [
        "model",
        "page cache",
        "load average (1 min) at start",
        "cells x genes",
        "h5ad GB",
        "p, q (groupby: largest p, sum of q)",
        "flashmm_de total s",
        "peak RSS MB",
        "not converged",
    ]
    return table(header, rows)


def cmd_groupby(args) -> str:
    path = atlas_dataset(args.data, quick=args.quick)
    cells = 20_000 if args.quick else 120_000
    r = run("groupby_memory", {"path": str(path), "cells": cells}, args.repeat)
    rows = [
        [
            f"{r['n']:,} x {r['m']:,}",
            str(r["groups"]),
            fmt_s(r["single_s"]),
            fmt_s(r["loop_s"]),
            fmt_s(r["groupby_s"]),
            f"{r['loop_s'] / r['groupby_s']:.2f}",
        ]
    ]
    header = [
        "cells x genes (in memory)",
        "cell types",
        "single model s",
        "loop of subset fits s",
        "groupby s",
        "loop / groupby",
    ]
    return table(header, rows)


def cmd_dask(args) -> str:
    path = atlas_dataset(args.data, quick=args.quick)
    chunk = 10_000 if args.quick else 25_000
    rows = []
    base = None
    for workers, threads, size, label in (
        (-1, 1, chunk, "local pass (backed file, threads)"),
        (0, 1, chunk, "Dask, threaded scheduler in process"),
        (1, 1, chunk, "LocalCluster, 1 worker process"),
        (1, 2, chunk, "LocalCluster, 1 worker process x 2 threads"),
        (2, 1, chunk, "LocalCluster, 2 worker processes"),
        (1, 1, 1_000, "LocalCluster, 1 worker, anndata's default blocks"),
    ):
        spec = {"path": str(path), "chunk": size, "workers": workers, "threads": threads}
        r = run("dask", spec, args.repeat)
        base = r["pass_s"] if base is None else base
        rows.append(
            [
                label,
                f"{r['n']:,} x {r['m']:,}",
                f"{r['blocks']} / {r['tasks']}" if workers >= 0 else "-",
                fmt_s(r["startup_s"]) if "startup_s" in r else "-",
                fmt_s(r["first_s"]),
                fmt_s(r["pass_s"]),
                f"{r['pass_s'] / base:.2f}",
            ]
        )
    header = [
        "pass",
        "cells x genes",
        "Dask blocks / tasks",
        "cluster start-up s",
        "first call s",
        "next calls s",
        "next calls / local pass",
    ]
    return table(header, rows)


COMMANDS = {
    "target": cmd_target,
    "paper": cmd_paper,
    "backed": cmd_backed,
    "floor": cmd_floor,
    "solver": cmd_solver,
    "kernels": cmd_kernels,
    "atlas": cmd_atlas,
    "groupby": cmd_groupby,
    "dask": cmd_dask,
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=[*COMMANDS, "all"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(
            os.environ.get("SCFLASHMM_BENCH_DATA", Path(tempfile.gettempdir()) / "scflashmm-bench")
        ),
    )
    args = parser.parse_args()
    names = list(COMMANDS) if args.table == "all" else [args.table]
    print(f"<!-- {machine()} -->")
    for name in names:
        t = time.perf_counter()
        print(f"\n### {name}\n")
        print(COMMANDS[name](args))
        print(f"\n<!-- {name}: {time.perf_counter() - t:.0f} s with --repeat {args.repeat} -->")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
