r"""Simulate multi-sample, multi-cell-type scRNA-seq counts (FLASHMM's ``simuRNAseq``).

The model
---------
Gene ``g`` has a reference mean ``mu_g`` and negative binomial (NB) size ``phi_g``
(dispersion ``1/phi_g``). They are method-of-moments estimates from reference counts
(``mu_g`` = mean, ``phi_g = mu_g^2 / (v_g - mu_g)`` with ``v_g`` the variance, ``ddof=1``),
or, without a reference, drawn as ``mu_g = 1 + Poisson(1)`` and ``phi_g = 1 + Poisson(1)``.
Cell ``i`` belongs to sample ``s(i)``, cell type (cluster) ``c(i)`` and treatment ``t(i)``
and has library size ``L_i``. The count of gene ``g`` in cell ``i`` is

.. math::

    y_{ig} \sim \mathrm{NB}(\mathrm{mean} = m_{ig}, \mathrm{size} = \phi_g), \qquad
    \log m_{ig} = \log \mu_g + (\log L_i - \overline{\log L}) + b_{s(i) g}
                  + \beta_g \, [t(i) = T] \, [c(i) = k_g],

with ``b_{sg} ~ N(0, sigma^2_g)`` independent over samples and genes (``sigma^2_g`` is
``var_random_effects``: one value for all genes as in R, or one per gene), ``T`` the
treated condition, and ``beta_g != 0`` only for the DE genes, each of which is DE in one
cell type ``k_g``.

Differences from the R function (all documented in :func:`simulate_rnaseq`): the
reference is cells x genes (AnnData orientation); without a reference the gene parameters
are used as drawn instead of being re-estimated from a generated reference matrix, and
library sizes are drawn from a moment-matched NB instead of summing that matrix; with
nested samples every treatment gets at least one sample.
"""

from __future__ import annotations

import logging
import string
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from scflashmm._core._threads import check_n_jobs

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["VarianceDistribution", "simulate_rnaseq"]

logger = logging.getLogger(__name__)

# Cells x genes entries drawn per chunk. Each chunk has its own random stream, so the
# result depends on this constant (and on the seed) but not on the number of threads.
_CHUNK_ENTRIES = 1 << 21
_LETTERS = string.ascii_uppercase


def simulate_rnaseq(
    counts: AnnData | np.ndarray | sp.spmatrix | sp.sparray | None = None,
    *,
    n_genes: int | None = None,
    n_cells: int | None = None,
    obs: pd.DataFrame | None = None,
    samples_nested: bool = True,
    n_samples: int = 25,
    n_clusters: int = 10,
    n_treatments: int = 2,
    treatment: str | None = None,
    n_de_genes: int | None = None,
    n_de_genes_per_cluster: Sequence[int] | Mapping[str, int] | None = None,
    p_de_genes_per_cluster: Sequence[float] | Mapping[str, float] | None = None,
    adjust_library_size: bool = True,
    direction: Literal["both", "up", "down"] = "both",
    minbeta: float = 0.25,
    maxbeta: float = 1.0,
    var_random_effects: float = 0.1,
    seed: int | np.random.Generator | None = None,
    n_jobs: int | None = None,
) -> AnnData:
    """Simulate a multi-sample, multi-cell-type scRNA-seq data set with cell-type-specific DE.

    A port of FLASHMM's ``simuRNAseq``: negative binomial counts whose gene means and
    dispersions come from reference counts (or are drawn), with a normal random effect per
    sample and gene and, for the DE genes, a treatment effect (log fold change on the
    natural-log scale) in one cell type. See the module docstring for the model.

    Parameters
    ----------
    counts
        Reference counts, **cells x genes** (AnnData orientation; the R function takes
        genes x cells): an AnnData (its ``X``), a dense array or a scipy sparse matrix.
        Genes with zero mean or with variance <= mean are dropped (as in R). If `None`,
        gene means and NB sizes are drawn as ``1 + Poisson(1)`` each.
    n_genes
        Number of genes to simulate. Defaults to the number of reference genes; required
        when `counts` is `None`. When it differs from the number of usable reference genes,
        genes are sampled from them (with replacement if there are fewer).
    n_cells
        Number of cells to simulate. Defaults to the number of reference cells (or of rows
        of `obs`); required when both `counts` and `obs` are `None`. When it differs, cells
        (rows of the reference metadata, with their library sizes) are sampled, with
        replacement if there are fewer.
    obs
        Metadata of the reference cells with columns ``sam``, ``cls`` and ``trt`` (values
        are converted to strings); with `counts`, one row per reference cell (and, for an
        AnnData, the same index as its ``obs_names``). Other columns are carried along. A
        ``libsize`` column is replaced, as in R. If `None`, cells are assigned uniformly at
        random to `n_clusters` cell types ``"1"..`` and `n_treatments` treatments ``"A"..``,
        and to samples as described under `samples_nested`.
    samples_nested
        Used when `obs` is `None`. If `True`, the `n_samples` samples are split among the
        treatments (one each, the rest multinomially; R does not guarantee one each) and
        named by treatment letter and number (``"A1"``, ``"A2"``, ..., ``"B1"``, ...), so
        each sample belongs to one treatment. If `False`, samples ``"S1".."S<n_samples>"``
        are crossed with treatment.
    n_samples
        Number of samples (subjects) when `obs` is `None`.
    n_clusters
        Number of cell types when `obs` is `None`; also the default of `n_de_genes`.
    n_treatments
        Number of treatments (conditions) when `obs` is `None`, at most 26.
    treatment
        The treated condition, a level of ``trt``. Defaults to the last level in sorted
        order (``"B"`` for two generated treatments), as in R.
    n_de_genes
        Total number of DE genes; defaults to `n_clusters` (R's ``nDEgenes = ncls``). They
        are split among the cell types present by a multinomial draw with probabilities
        `p_de_genes_per_cluster`. The DE genes are the last genes of ``var``.
    n_de_genes_per_cluster
        Number of DE genes in each cell type, either a sequence aligned with the sorted
        cell-type labels or a mapping from label to number (missing labels get 0). Replaces
        the multinomial draw; if `n_de_genes` is also given, it must equal the total.
    p_de_genes_per_cluster
        Probabilities (normalised) of the cell types for the DE genes, a sequence aligned
        with the sorted cell-type labels or a mapping (missing labels get 0). Default:
        equal.
    adjust_library_size
        If `True`, library sizes are the reference cells' total counts (drawn, without a
        reference; see Notes). If `False`, every cell gets the mean library size, so the
        library size has no effect on the means.
    direction
        ``"both"``: effects ``+/- Uniform(minbeta, maxbeta)`` with random signs; ``"up"``
        (needs ``minbeta > 0``) or ``"down"`` (needs ``maxbeta < 0``): ``Uniform(minbeta,
        maxbeta)``.
    minbeta, maxbeta
        Bounds of the DE effects (natural-log fold change), ``minbeta < maxbeta``; for
        ``"both"``, ``minbeta * maxbeta > 0``.
    var_random_effects
        Variance of the per-sample, per-gene random effects on the log mean (the donor
        variance): a number (every gene the same, as in R), one value per simulated gene,
        or a distribution across genes, :class:`VarianceDistribution` or the tuple
        ``(distribution, mean, cv)``, e.g. ``("gamma", 0.1, 1.0)`` for gamma-distributed
        variances with mean 0.1 and coefficient of variation 1. Real genes differ in their
        donor variance; methods tuned on a common one can look calibrated and not be.
    seed
        Seed or :class:`numpy.random.Generator` (as for :func:`numpy.random.default_rng`).
        The same integer seed gives the same AnnData, whatever `n_jobs`.
    n_jobs
        Threads used to draw the counts. Default: the CPUs available to the process.

    Returns
    -------
    AnnData with

    ``X``
        :class:`scipy.sparse.csr_matrix` of ``int32`` counts, cells x genes.
    ``obs``
        ``sam``, ``cls``, ``trt`` (categorical; levels in sorted string order as R's
        ``factor`` under the C locale, unused levels removed), ``libsize`` (float), and any
        other column of `obs`.
    ``var``
        ``is_de`` (bool), ``beta`` (DE effect on the natural-log mean, 0 for other genes),
        ``de_cluster`` (categorical cell type, NaN for non-DE genes), ``mu`` (reference
        mean), ``dispersion`` (NB dispersion ``1/size``: variance = mu + dispersion mu^2),
        ``size`` (NB size; this is what R's ``ref.mean.dispersion$dispersion`` holds) and
        ``reference_gene`` (the reference gene it was sampled from) and
        ``var_random_effect`` (the variance of the gene's per-sample random effects).
    ``uns["simulate_rnaseq"]``
        ``treatment`` (the treated condition), ``n_de_genes_per_cluster`` (label -> number)
        and ``params`` (the arguments, resolved; h5ad-serialisable).

    Raises
    ------
    ValueError
        For inconsistent arguments, as ``simuRNAseq`` checks them: ``minbeta >= maxbeta``,
        `direction` inconsistent with the signs of the bounds, more DE genes than usable
        genes, per-cluster numbers or probabilities not matching the cell types, a
        `treatment` that is not a level of ``trt``, metadata without ``sam``/``cls``/``trt``
        or not matching the reference cells, no usable reference gene, negative counts, a
        reference cell without counts when adjusting library sizes, and the like; and for
        a `var_random_effects` that is negative or not finite, has not one value per gene,
        or names an unknown distribution or a negative mean or cv.

    Notes
    -----
    Without `counts`, R generates a genes x cells reference matrix from the drawn means and
    sizes, re-estimates them from it and uses its column sums as library sizes. Here the
    drawn means and sizes are used directly, and each library size is drawn from an NB with
    the mean ``sum(mu)`` and variance ``sum(mu + mu^2 / size)`` of such a column sum (at
    least 1), which avoids generating a second matrix of the size of the output.

    Counts are drawn in chunks of cells, vectorised over cells and genes, as gamma-Poisson
    mixtures, and stored sparse as they are drawn: peak memory is about the size of the
    output plus a few chunks per thread.

    Examples
    --------
    >>> import scflashmm as fm
    >>> adata = fm.datasets.simulate_rnaseq(n_genes=50, n_cells=1000, n_clusters=4, seed=0)
    >>> adata.uns["simulate_rnaseq"]["treatment"]
    'B'
    """
    n_jobs = _check_arguments(
        direction=direction,
        minbeta=minbeta,
        maxbeta=maxbeta,
        n_samples=n_samples,
        n_clusters=n_clusters,
        n_treatments=n_treatments,
        n_genes=n_genes,
        n_cells=n_cells,
        n_de_genes=n_de_genes,
        n_de_genes_per_cluster=n_de_genes_per_cluster,
        p_de_genes_per_cluster=p_de_genes_per_cluster,
        n_jobs=n_jobs,
    )
    variances = _check_variances(var_random_effects)
    rng = np.random.default_rng(seed)

    # reference genes (mean, NB size) and reference cells (names, library sizes)
    ref = _reference(
        rng,
        counts,
        n_genes=n_genes,
        n_cells=n_cells,
        obs=obs,
        adjust_library_size=adjust_library_size,
    )
    n_genes = ref.n_genes_default if n_genes is None else n_genes
    n_cells = ref.n_cells if n_cells is None else n_cells
    # design of the cells: samples, cell types, treatments of the reference cells
    meta = _reference_metadata(
        rng,
        ref,
        obs=obs,
        counts_given=counts is not None,
        n_samples=n_samples,
        n_clusters=n_clusters,
        n_treatments=n_treatments,
        samples_nested=samples_nested,
        adjust_library_size=adjust_library_size,
    )
    # the genes and cells to simulate (drawn from the reference ones)
    genes = _pick(rng, ref.keep, n_genes)
    meta = _pick_cells(rng, meta, n_cells)
    treatment = _check_treatment(meta, treatment)
    clusters = list(meta["cls"].cat.categories)
    # gene parameters: DE effects, then the donor (sample) variance of each gene
    de = _de_genes(
        rng,
        clusters,
        n_genes=n_genes,
        n_de_genes=n_de_genes,
        n_de_default=n_clusters if n_de_genes is None else n_de_genes,
        n_de_genes_per_cluster=n_de_genes_per_cluster,
        p_de_genes_per_cluster=p_de_genes_per_cluster,
        direction=direction,
        minbeta=minbeta,
        maxbeta=maxbeta,
    )
    var_re = _gene_variances(rng, variances, n_genes)
    # the counts
    X = _counts(
        rng,
        meta,
        treatment,
        de,
        log_mu=np.log(ref.mu[genes]),
        size=ref.size[genes],
        var_re=var_re,
        n_jobs=n_jobs,
    )
    # the AnnData
    params = {
        "reference": "generated" if counts is None else "counts",
        "n_genes": int(n_genes),
        "n_cells": int(n_cells),
        "metadata": "generated" if obs is None else "obs",
        "samples_nested": bool(samples_nested),
        "n_samples": int(n_samples),
        "n_clusters": int(n_clusters),
        "n_treatments": int(n_treatments),
        "treatment": treatment,
        "n_de_genes": int(de.n_per.sum()),
        "adjust_library_size": bool(adjust_library_size),
        "direction": direction,
        "minbeta": float(minbeta),
        "maxbeta": float(maxbeta),
        "var_random_effects": _variances_param(variances),
    }
    if isinstance(seed, int | np.integer):
        params["seed"] = int(seed)
    if de.prob is not None and p_de_genes_per_cluster is not None:
        params["p_de_genes_per_cluster"] = dict(zip(clusters, map(float, de.prob), strict=True))
    return AnnData(
        X=X,
        obs=meta,
        var=_var_table(ref, genes, de, clusters, var_re),
        uns={"simulate_rnaseq": _uns(treatment, clusters, de, params)},
    )


# ----------------------------------------------------------------------------------------
# donor variances across genes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VarianceDistribution:
    """Donor (sample) variances that differ between genes: a distribution with a mean and CV.

    Pass it (or the tuple ``(distribution, mean, cv)``) as ``var_random_effects`` of
    :func:`simulate_rnaseq`; every gene then draws its own variance of the per-sample random
    effect, recorded in ``var["var_random_effect"]``.

    Parameters
    ----------
    distribution
        ``"gamma"``: shape ``1 / cv**2`` and scale ``mean * cv**2``. ``"lognormal"``:
        ``exp(N(m, s**2))`` with ``s**2 = log(1 + cv**2)`` and ``m = log(mean) - s**2 / 2``.
    mean
        Mean of the variances across genes, >= 0.
    cv
        Coefficient of variation (sd / mean) of the variances across genes, >= 0; 0 gives
        every gene `mean`.

    Examples
    --------
    >>> import scflashmm as fm
    >>> spread = fm.datasets.VarianceDistribution("gamma", mean=0.1, cv=1.0)
    >>> adata = fm.datasets.simulate_rnaseq(
    ...     n_genes=50, n_cells=500, var_random_effects=spread, seed=0
    ... )
    >>> adata.var["var_random_effect"].std() > 0
    np.True_
    """

    distribution: Literal["gamma", "lognormal"]
    mean: float
    cv: float

    def __post_init__(self) -> None:
        if self.distribution not in _DISTRIBUTIONS:
            msg = (
                f"Unknown distribution of var_random_effects {self.distribution!r}; "
                f"use one of {list(_DISTRIBUTIONS)}."
            )
            raise ValueError(msg)
        for name in ("mean", "cv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                msg = f"The {name} of var_random_effects must be a number, got {value!r}."
                raise ValueError(msg)
            if not (np.isfinite(value) and value >= 0):
                msg = f"The {name} of var_random_effects must be finite and >= 0, got {value}."
                raise ValueError(msg)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw `n` variances."""
        if self.mean == 0 or self.cv == 0:
            return np.full(n, float(self.mean))
        if self.distribution == "gamma":
            return rng.gamma(1.0 / self.cv**2, self.mean * self.cv**2, n)
        s2 = np.log1p(self.cv**2)
        return rng.lognormal(np.log(self.mean) - s2 / 2, np.sqrt(s2), n)


_DISTRIBUTIONS = ("gamma", "lognormal")
_Variances = float | np.ndarray | VarianceDistribution


def _check_variances(value: object) -> _Variances:
    """Return a scalar, a per-gene array (length checked later) or a distribution."""
    if isinstance(value, VarianceDistribution):
        return value
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        if len(value) != 3:
            msg = f"var_random_effects as a tuple is (distribution, mean, cv), got {value!r}."
            raise ValueError(msg)
        return VarianceDistribution(*value)
    if isinstance(value, str):
        msg = (
            f"var_random_effects={value!r}: give a distribution as (distribution, mean, cv), "
            "e.g. ('gamma', 0.1, 1.0)."
        )
        raise ValueError(msg)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        msg = f"var_random_effects must be a number, an array or a distribution, got {value!r}."
        raise ValueError(msg) from None
    if arr.ndim > 1:
        msg = f"var_random_effects must be a number or one value per gene, got shape {arr.shape}."
        raise ValueError(msg)
    if not (np.all(np.isfinite(arr)) and np.all(arr >= 0)):
        msg = "var_random_effects must be finite and >= 0."
        raise ValueError(msg)
    return float(arr) if arr.ndim == 0 else arr


def _gene_variances(rng: np.random.Generator, variances: _Variances, n_genes: int) -> np.ndarray:
    """Return the variance of the per-sample random effect of each gene."""
    if isinstance(variances, VarianceDistribution):
        return variances.draw(rng, n_genes)
    if isinstance(variances, np.ndarray):
        if variances.size != n_genes:
            msg = (
                f"var_random_effects has {variances.size} values but {n_genes} genes are simulated."
            )
            raise ValueError(msg)
        return variances.copy()
    return np.full(n_genes, variances)


def _variances_param(variances: _Variances) -> object:
    """Return the argument as recorded in ``uns["simulate_rnaseq"]["params"]``."""
    if isinstance(variances, VarianceDistribution):
        return {
            "distribution": variances.distribution,
            "mean": float(variances.mean),
            "cv": float(variances.cv),
        }
    if isinstance(variances, np.ndarray):
        return "per gene, see var['var_random_effect']"
    return float(variances)


# ----------------------------------------------------------------------------------------
# steps of simulate_rnaseq
# ----------------------------------------------------------------------------------------


@dataclass
class _Reference:
    """Reference genes (``keep`` indexes the usable ones) and reference cells."""

    mu: np.ndarray
    size: np.ndarray
    gene_names: pd.Index
    cell_names: pd.Index | None
    libsize: np.ndarray
    keep: np.ndarray
    n_genes_default: int

    @property
    def n_cells(self) -> int:
        return self.libsize.size


def _reference(
    rng: np.random.Generator,
    counts: object,
    *,
    n_genes: int | None,
    n_cells: int | None,
    obs: pd.DataFrame | None,
    adjust_library_size: bool,
) -> _Reference:
    """Gene means and NB sizes, and library sizes: drawn, or estimated from reference counts."""
    if counts is None:
        if n_genes is None:
            msg = "n_genes is required when counts is None."
            raise ValueError(msg)
        if n_cells is None and obs is None:
            msg = "n_cells (or obs) is required when counts is None."
            raise ValueError(msg)
        n_ref_cells = len(obs) if obs is not None else n_cells
        mu = 1.0 + rng.poisson(1.0, n_genes)
        size = 1.0 + rng.poisson(1.0, n_genes)
        # library sizes: moment-matched NB for a column sum of the R function's reference
        total = float(mu.sum())
        var_total = float((mu + mu**2 / size).sum())
        libsize = rng.negative_binomial(
            total**2 / (var_total - total), total / var_total, n_ref_cells
        )
        return _Reference(
            mu=mu,
            size=size,
            gene_names=_default_names("Gene", n_genes),
            cell_names=None,
            libsize=np.maximum(libsize, 1).astype(np.float64),
            keep=np.arange(n_genes),
            n_genes_default=n_genes,
        )
    matrix, gene_names, cell_names = _unpack_counts(counts)
    n_ref_cells, n_ref_genes = matrix.shape
    if n_ref_cells < 2:
        msg = f"counts needs at least 2 cells (rows) to estimate variances, got {n_ref_cells}."
        raise ValueError(msg)
    mu, var, libsize = _moments(matrix)
    del matrix
    with np.errstate(divide="ignore", invalid="ignore"):
        size = mu**2 / (var - mu)
    usable = (var > mu) & (mu > 0)
    if not usable.all():
        logger.info(
            "Removing %d gene(s) with zero mean and %d with variance <= mean.",
            int((mu <= 0).sum()),
            int((var <= mu).sum()),
        )
    keep = np.flatnonzero(usable)
    if keep.size == 0:
        msg = "No reference gene has a positive mean and a variance above its mean."
        raise ValueError(msg)
    if adjust_library_size and (libsize <= 0).any():
        msg = (
            f"{int((libsize <= 0).sum())} reference cell(s) have no counts, so log library "
            "size is undefined; remove them (e.g. sc.pp.filter_cells(adata, min_counts=1)) "
            "or pass adjust_library_size=False."
        )
        raise ValueError(msg)
    return _Reference(
        mu=mu,
        size=size,
        gene_names=gene_names,
        cell_names=cell_names,
        libsize=libsize,
        keep=keep,
        n_genes_default=n_ref_genes,
    )


def _reference_metadata(
    rng: np.random.Generator,
    ref: _Reference,
    *,
    obs: pd.DataFrame | None,
    counts_given: bool,
    n_samples: int,
    n_clusters: int,
    n_treatments: int,
    samples_nested: bool,
    adjust_library_size: bool,
) -> pd.DataFrame:
    """``sam``, ``cls``, ``trt`` (given or drawn) and ``libsize`` of the reference cells."""
    if obs is None:
        meta = _random_metadata(
            rng,
            ref.n_cells,
            n_samples=n_samples,
            n_clusters=n_clusters,
            n_treatments=n_treatments,
            samples_nested=samples_nested,
        )
        names = ref.cell_names
        meta.index = _default_names("Cell", ref.n_cells) if names is None else names
    else:
        meta = _check_obs(obs, ref.n_cells, ref.cell_names, counts_given=counts_given)
    libsize = ref.libsize
    meta["libsize"] = libsize if adjust_library_size else np.full(libsize.size, libsize.mean())
    return meta


def _pick(rng: np.random.Generator, keep: np.ndarray, n: int) -> np.ndarray:
    """`n` of the usable reference genes: all in order, or sampled (with replacement if fewer)."""
    if keep.size == n:
        return keep
    return keep[rng.choice(keep.size, n, replace=keep.size < n)]


def _pick_cells(rng: np.random.Generator, meta: pd.DataFrame, n_cells: int) -> pd.DataFrame:
    """`n_cells` reference cells (sampled unless all), with R's factors for sam, cls, trt."""
    n_ref = len(meta)
    if n_ref != n_cells:
        rows = rng.choice(n_ref, n_cells, replace=n_ref < n_cells)
        meta = meta.iloc[rows].copy()
        meta.index = _default_names("Cell", n_cells)
    for col in ("sam", "cls", "trt"):
        meta[col] = _r_factor(meta[col])
    return meta


def _check_treatment(meta: pd.DataFrame, treatment: str | None) -> str:
    trt_levels = list(meta["trt"].cat.categories)
    if treatment is None:
        treatment = trt_levels[-1]
    elif str(treatment) not in trt_levels:
        msg = f"treatment {treatment!r} is not a level of trt: {trt_levels}."
        raise ValueError(msg)
    treatment = str(treatment)
    if len(trt_levels) == 1:
        logger.info("Only one condition, %r: DE is confounded with cell type.", treatment)
    return treatment


@dataclass
class _DEGenes:
    """The last ``n_per.sum()`` genes are DE: effect ``beta`` in cell type ``cls_code``."""

    n_per: np.ndarray
    prob: np.ndarray | None
    cols: np.ndarray
    cls_code: np.ndarray
    beta: np.ndarray


def _de_genes(
    rng: np.random.Generator,
    clusters: list[str],
    *,
    n_genes: int,
    n_de_genes: int | None,
    n_de_default: int,
    n_de_genes_per_cluster: Sequence[int] | Mapping[str, int] | None,
    p_de_genes_per_cluster: Sequence[float] | Mapping[str, float] | None,
    direction: str,
    minbeta: float,
    maxbeta: float,
) -> _DEGenes:
    """How many DE genes in each cell type, and their effects."""
    prob = None
    if n_de_genes_per_cluster is not None:
        n_per = _per_cluster(n_de_genes_per_cluster, clusters, "n_de_genes_per_cluster")
        if np.any(n_per != np.round(n_per)):
            msg = "n_de_genes_per_cluster must hold integers."
            raise ValueError(msg)
        n_per = n_per.astype(np.int64)
        if n_de_genes is not None and int(n_per.sum()) != n_de_genes:
            msg = f"n_de_genes={n_de_genes} but n_de_genes_per_cluster sums to {int(n_per.sum())}."
            raise ValueError(msg)
    else:
        if p_de_genes_per_cluster is None:
            prob = np.full(len(clusters), 1.0 / len(clusters))
        else:
            prob = _per_cluster(p_de_genes_per_cluster, clusters, "p_de_genes_per_cluster")
            if prob.sum() <= 0:
                msg = "p_de_genes_per_cluster must have a positive sum."
                raise ValueError(msg)
            prob = prob / prob.sum()
        n_per = rng.multinomial(n_de_default, prob)
    n_de = int(n_per.sum())
    if n_de > n_genes:
        msg = f"{n_de} DE genes requested but only {n_genes} genes are simulated."
        raise ValueError(msg)
    beta = rng.uniform(minbeta, maxbeta, n_de)
    if direction == "both":
        beta *= 2 * rng.binomial(1, 0.5, n_de) - 1
    return _DEGenes(
        n_per=n_per,
        prob=prob,
        cols=np.arange(n_genes - n_de, n_genes),
        cls_code=np.repeat(np.arange(len(clusters)), n_per),
        beta=beta,
    )


def _counts(
    rng: np.random.Generator,
    meta: pd.DataFrame,
    treatment: str,
    de: _DEGenes,
    *,
    log_mu: np.ndarray,
    size: np.ndarray,
    var_re: np.ndarray,
    n_jobs: int,
) -> sp.csr_matrix:
    """Per-sample random effects ``N(0, var_re[g])``, then the NB counts."""
    n_samples = len(meta["sam"].cat.categories)
    re = rng.normal(0.0, np.sqrt(var_re), (n_samples, log_mu.size))
    log_lib = np.log(meta["libsize"].to_numpy(dtype=np.float64))
    log_lib -= log_lib.mean()
    return _draw_counts(
        rng,
        log_mu=log_mu,
        size=size,
        re=re,
        sam_codes=meta["sam"].cat.codes.to_numpy(),
        log_lib=log_lib,
        treated=(meta["trt"] == treatment).to_numpy(),
        cls_codes=meta["cls"].cat.codes.to_numpy(),
        de_cols=de.cols,
        de_cls_code=de.cls_code,
        de_beta=de.beta,
        n_jobs=n_jobs,
    )


def _uns(treatment: str, clusters: list[str], de: _DEGenes, params: dict) -> dict:
    return {
        "treatment": treatment,
        "n_de_genes_per_cluster": {c: int(k) for c, k in zip(clusters, de.n_per, strict=True)},
        "params": params,
    }


def _var_table(
    ref: _Reference, genes: np.ndarray, de: _DEGenes, clusters: list[str], var_re: np.ndarray
) -> pd.DataFrame:
    n_genes = genes.size
    beta = np.zeros(n_genes)
    beta[de.cols] = de.beta
    de_cluster = np.full(n_genes, -1)
    de_cluster[de.cols] = de.cls_code
    size = ref.size[genes]
    ref_genes = ref.gene_names[genes]
    return pd.DataFrame(
        {
            "is_de": np.isin(np.arange(n_genes), de.cols),
            "beta": beta,
            "de_cluster": pd.Categorical.from_codes(de_cluster, categories=clusters),
            "mu": ref.mu[genes],
            "dispersion": 1.0 / size,
            "size": size,
            "reference_gene": np.asarray(ref_genes, dtype=object),
            "var_random_effect": var_re,
        },
        index=_make_unique(ref_genes),
    )


# ----------------------------------------------------------------------------------------
# argument checks and inputs
# ----------------------------------------------------------------------------------------


def _check_arguments(
    *,
    direction: str,
    minbeta: float,
    maxbeta: float,
    n_samples: int,
    n_clusters: int,
    n_treatments: int,
    n_genes: int | None,
    n_cells: int | None,
    n_de_genes: int | None,
    n_de_genes_per_cluster: object,
    p_de_genes_per_cluster: object,
    n_jobs: int | None,
) -> int:
    """Check the scalar arguments; return the number of threads."""
    if direction not in ("both", "up", "down"):
        msg = f"direction must be 'both', 'up' or 'down', got {direction!r}."
        raise ValueError(msg)
    if not (np.isfinite(minbeta) and np.isfinite(maxbeta)):
        msg = f"minbeta and maxbeta must be finite, got {minbeta} and {maxbeta}."
        raise ValueError(msg)
    if not minbeta < maxbeta:
        msg = f"minbeta must be smaller than maxbeta, got minbeta={minbeta}, maxbeta={maxbeta}."
        raise ValueError(msg)
    if direction == "both" and not minbeta * maxbeta > 0:
        msg = (
            "With direction='both' the effects are +/- Uniform(minbeta, maxbeta), so minbeta and "
            f"maxbeta must have the same sign (minbeta * maxbeta > 0); got {minbeta}, {maxbeta}."
        )
        raise ValueError(msg)
    if direction == "up" and not minbeta > 0:
        msg = f"direction='up' needs minbeta > 0, got {minbeta}."
        raise ValueError(msg)
    if direction == "down" and not maxbeta < 0:
        msg = f"direction='down' needs maxbeta < 0, got {maxbeta}."
        raise ValueError(msg)
    if n_de_genes_per_cluster is not None and p_de_genes_per_cluster is not None:
        msg = "Give at most one of n_de_genes_per_cluster and p_de_genes_per_cluster."
        raise ValueError(msg)
    for name, value, minimum in [
        ("n_samples", n_samples, 1),
        ("n_clusters", n_clusters, 1),
        ("n_treatments", n_treatments, 1),
        ("n_genes", n_genes, 1),
        ("n_cells", n_cells, 1),
        ("n_de_genes", n_de_genes, 0),
    ]:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            msg = f"{name} must be an integer >= {minimum}, got {value!r}."
            raise ValueError(msg)
    if n_treatments > len(_LETTERS):
        msg = f"n_treatments must be at most {len(_LETTERS)} (letters), got {n_treatments}."
        raise ValueError(msg)
    return check_n_jobs(n_jobs)


def _unpack_counts(counts: object) -> tuple[np.ndarray | sp.csr_matrix, pd.Index, pd.Index | None]:
    """Return (cells x genes matrix, gene names, cell names or None)."""
    if isinstance(counts, AnnData):
        matrix = counts.X
        genes = pd.Index(counts.var_names.astype(str))
        cells = pd.Index(counts.obs_names.astype(str))
    else:
        matrix = counts
        genes = cells = None
    if matrix is None:
        msg = "counts has no X."
        raise ValueError(msg)
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
    else:
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
            msg = f"counts must be a 2-D numeric cells x genes matrix, got shape {matrix.shape}."
            raise ValueError(msg)
    if genes is None:
        genes = _default_names("Gene", matrix.shape[1])
    return matrix, genes, cells


def _moments(matrix: np.ndarray | sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene mean and variance (ddof=1) and per-cell totals, without densifying."""
    n, m = matrix.shape
    if sp.issparse(matrix):
        values = matrix.data.astype(np.float64)
        cols = matrix.indices
        row_sums = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
        sums = np.bincount(cols, weights=values, minlength=m)
        sumsq = np.bincount(cols, weights=values * values, minlength=m)
    else:
        values = matrix.astype(np.float64, copy=False)
        row_sums = values.sum(axis=1)
        sums = values.sum(axis=0)
        sumsq = np.einsum("ij,ij->j", values, values)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        msg = "counts must be finite and non-negative."
        raise ValueError(msg)
    mu = sums / n
    var = (sumsq - n * mu * mu) / (n - 1)
    return mu, var, row_sums


def _random_metadata(
    rng: np.random.Generator,
    n: int,
    *,
    n_samples: int,
    n_clusters: int,
    n_treatments: int,
    samples_nested: bool,
) -> pd.DataFrame:
    """Cells assigned at random to cell types, treatments and samples (as R's simuRNAseq)."""
    cls_labels = [str(k + 1) for k in range(n_clusters)]
    cls = pd.Categorical.from_codes(rng.integers(0, n_clusters, n), categories=cls_labels)
    trt_labels = list(_LETTERS[:n_treatments])
    trt_codes = rng.integers(0, n_treatments, n)
    trt = pd.Categorical.from_codes(trt_codes, categories=trt_labels)
    if samples_nested:
        if n_samples < n_treatments:
            msg = (
                f"With nested samples, n_samples ({n_samples}) must be >= n_treatments "
                f"({n_treatments})."
            )
            raise ValueError(msg)
        equal = np.full(n_treatments, 1.0 / n_treatments)
        n_sam_trt = 1 + rng.multinomial(n_samples - n_treatments, equal)
        offsets = np.concatenate([[0], np.cumsum(n_sam_trt)[:-1]])
        sam_codes = offsets[trt_codes] + rng.integers(0, n_sam_trt[trt_codes])
        sam_labels = [
            f"{t}{i + 1}" for t, k in zip(trt_labels, n_sam_trt, strict=True) for i in range(k)
        ]
    else:
        sam_codes = rng.integers(0, n_samples, n)
        sam_labels = [f"S{i + 1}" for i in range(n_samples)]
    sam = pd.Categorical.from_codes(sam_codes, categories=sam_labels)
    return pd.DataFrame({"sam": sam, "cls": cls, "trt": trt})


def _check_obs(
    obs: object, n_ref_cells: int, cell_names: pd.Index | None, *, counts_given: bool
) -> pd.DataFrame:
    if not isinstance(obs, pd.DataFrame):
        msg = f"obs must be a pandas DataFrame, got {type(obs).__name__}."
        raise ValueError(msg)
    missing = [c for c in ("sam", "cls", "trt") if c not in obs.columns]
    if missing:
        msg = f"obs must have columns 'sam', 'cls' and 'trt'; missing {missing}."
        raise ValueError(msg)
    if counts_given and len(obs) != n_ref_cells:
        msg = f"obs has {len(obs)} rows but counts has {n_ref_cells} cells (rows)."
        raise ValueError(msg)
    if cell_names is not None and not obs.index.astype(str).equals(cell_names):
        msg = "The index of obs must equal the obs_names of the reference AnnData."
        raise ValueError(msg)
    meta = obs.copy()
    for col in ("sam", "cls", "trt"):
        if meta[col].isna().any():
            msg = f"obs[{col!r}] has missing values."
            raise ValueError(msg)
        meta[col] = meta[col].astype(str)
    meta.index = meta.index.astype(str)
    if not meta.index.is_unique:
        meta.index = _make_unique(meta.index)
    return meta


def _r_factor(values: pd.Series) -> pd.Series:
    """Categorical with R's factor levels: the used values, sorted as strings (C locale)."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        cat = values.cat.remove_unused_categories()
        cat = cat.cat.rename_categories([str(c) for c in cat.cat.categories])
        return cat.cat.reorder_categories(sorted(cat.cat.categories))
    values = values.astype(str)
    return values.astype(pd.CategoricalDtype(sorted(values.unique())))


def _per_cluster(
    values: Sequence[float] | Mapping[str, float], clusters: list[str], name: str
) -> np.ndarray:
    if isinstance(values, Mapping):
        unknown = [k for k in values if str(k) not in clusters]
        if unknown:
            msg = f"{name} has labels that are not cell types (cls): {unknown}; cls: {clusters}."
            raise ValueError(msg)
        given = {str(k): v for k, v in values.items()}
        out = np.array([given.get(c, 0) for c in clusters], dtype=np.float64)
    else:
        out = np.asarray(values, dtype=np.float64)
        if out.ndim != 1 or out.size != len(clusters):
            msg = (
                f"{name} must have one value per cell type ({len(clusters)}: {clusters}, sorted), "
                f"got {out.size}."
            )
            raise ValueError(msg)
    if not np.all(np.isfinite(out)) or np.any(out < 0):
        msg = f"{name} must be finite and non-negative."
        raise ValueError(msg)
    return out


def _default_names(prefix: str, n: int) -> pd.Index:
    return pd.Index([f"{prefix}{i + 1}" for i in range(n)])


def _make_unique(names: ArrayLike) -> pd.Index:
    """Append ``-1``, ``-2``, ... to repeated names (as AnnData's var_names_make_unique)."""
    names = pd.Index(np.asarray(names, dtype=object).astype(str))
    if names.is_unique:
        return names
    seen = set(names)
    out = list(names)
    rank = pd.Series(np.arange(len(names))).groupby(np.asarray(names)).cumcount().to_numpy()
    for i in np.flatnonzero(rank > 0):
        k = int(rank[i])
        candidate = f"{out[i]}-{k}"
        while candidate in seen:
            k += 1
            candidate = f"{out[i]}-{k}"
        seen.add(candidate)
        out[i] = candidate
    return pd.Index(out)


# ----------------------------------------------------------------------------------------
# drawing the counts
# ----------------------------------------------------------------------------------------


class _GrowableCSR:
    """Append rows of non-zeros into arrays grown in place (realloc), then trimmed."""

    def __init__(self, n_rows: int) -> None:
        self.indptr = np.zeros(n_rows + 1, dtype=np.int64)
        self.data = np.empty(0, dtype=np.int32)
        self.indices = np.empty(0, dtype=np.int32)
        self.nnz = 0
        self.row = 0

    def append(
        self, row_nnz: np.ndarray, data: np.ndarray, indices: np.ndarray, capacity_hint: int
    ) -> None:
        end = self.nnz + data.size
        if end > self.data.size:
            new_cap = max(end, capacity_hint, int(self.data.size * 1.1) + 1)
            self.data.resize(new_cap, refcheck=False)
            self.indices.resize(new_cap, refcheck=False)
        self.data[self.nnz : end] = data
        self.indices[self.nnz : end] = indices
        self.indptr[self.row + 1 : self.row + 1 + row_nnz.size] = self.nnz + np.cumsum(row_nnz)
        self.nnz = end
        self.row += row_nnz.size

    def finish(self, shape: tuple[int, int]) -> sp.csr_matrix:
        self.data.resize(self.nnz, refcheck=False)
        self.indices.resize(self.nnz, refcheck=False)
        X = sp.csr_matrix((self.data, self.indices, self.indptr), shape=shape)
        X.has_sorted_indices = True
        return X


def _draw_counts(
    rng: np.random.Generator,
    *,
    log_mu: np.ndarray,
    size: np.ndarray,
    re: np.ndarray,
    sam_codes: np.ndarray,
    log_lib: np.ndarray,
    treated: np.ndarray,
    cls_codes: np.ndarray,
    de_cols: np.ndarray,
    de_cls_code: np.ndarray,
    de_beta: np.ndarray,
    n_jobs: int,
) -> sp.csr_matrix:
    n_cells = sam_codes.size
    n_genes = log_mu.size
    rows_per_chunk = max(1, _CHUNK_ENTRIES // n_genes)
    starts = list(range(0, n_cells, rows_per_chunk))
    rngs = rng.spawn(len(starts))
    inv_size = 1.0 / size
    col_template = np.broadcast_to(np.arange(n_genes, dtype=np.int32), (rows_per_chunk, n_genes))

    def draw(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo = starts[k]
        hi = min(lo + rows_per_chunk, n_cells)
        eta = re[sam_codes[lo:hi]]
        eta += log_mu
        eta += log_lib[lo:hi, None]
        if de_cols.size:
            hit = treated[lo:hi, None] & (cls_codes[lo:hi, None] == de_cls_code)
            eta[:, de_cols] += hit * de_beta
        np.exp(eta, out=eta)
        eta *= inv_size  # gamma scale = mean / size
        rng_k = rngs[k]
        lam = rng_k.standard_gamma(size, size=eta.shape)
        lam *= eta
        del eta
        y = rng_k.poisson(lam)
        del lam
        nonzero = y != 0
        return (
            np.count_nonzero(nonzero, axis=1),
            y[nonzero].astype(np.int32),
            col_template[: hi - lo][nonzero],
        )

    out = _GrowableCSR(n_cells)
    n_jobs = max(1, min(n_jobs, len(starts)))

    def consume(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        row_nnz, data, indices = result
        # first chunk: guess the total from its density; later grow by 10 % steps
        hint = int(1.05 * data.size / max(row_nnz.size, 1) * n_cells) + 1 if out.row == 0 else 0
        out.append(row_nnz, data, indices, hint)

    if n_jobs == 1:
        for k in range(len(starts)):
            consume(draw(k))
    else:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            pending: deque = deque()
            for k in range(len(starts)):
                pending.append(pool.submit(draw, k))
                if len(pending) >= 2 * n_jobs:
                    consume(pending.popleft().result())
            while pending:
                consume(pending.popleft().result())
    return out.finish((n_cells, n_genes))
