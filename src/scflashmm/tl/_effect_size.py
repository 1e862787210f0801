"""Log2 fold changes of normalised means: an effect size on the scale analysts compare.

The coefficients of :func:`scflashmm.tl.flashmm_de` fitted to counts are differences of mean
``log2(1 + y)``, which shrink towards zero for lowly expressed genes (docs/effect_sizes.md).
This module gives, for every gene and design column, an estimate on the log2 scale of the
normalised mean expression, comparable with a pseudobulk ``log2FoldChange``:

1. the cells are grouped into *patterns*: cells with the same values of the design's factor
   (indicator) columns, e.g. one pattern per cell type x treatment;
2. per pattern ``k`` and gene ``g`` the normalised mean ``m_kg = S_kg / L_k + prior / mean(L)``,
   with ``S_kg`` the sum of the gene's counts over the pattern's cells, ``L_k`` the pattern's
   library size (the sum of its cells' library sizes) and a prior count of 0.5 (finite values
   for genes without counts in a pattern; two such patterns compare as 0);
3. the design restricted to its factor columns, one row per pattern, is fitted to
   ``log2(m_kg)`` by least squares weighted by the patterns' numbers of cells; its coefficient
   for a design column (and any contrast, applied to these coefficients) is the effect size.

For a design that is saturated in its factors (e.g. ``~0+log(libsize)+cls+cls:trt``) the fit is
exact: ``cls[1]:trt[T.B]`` is ``log2`` of the ratio of the normalised means of treated and
control cells of cell type 1. Columns that are not indicators (``log(libsize)``, a numeric
covariate) have no such estimate (NaN). Only the per-pattern sums are needed: they come from a
streaming pass over the stored values (sparse stays sparse; never cells x genes dense).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core._accumulate import scatter_add
from .._core._threads import check_n_jobs, ordered_map
from .._core.sources import CompressedBlock, is_dask_array, open_source
from .._results import LOG2FC, varm_key

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "PRIOR_COUNT",
    "factor_patterns",
    "grouped_effect_size_tables",
    "log2_fold_changes",
    "pattern_sums",
]

#: Counts added to every pattern (scaled to its library size), as edgeR's ``prior.count``.
PRIOR_COUNT = 0.5
#: Largest number of per-pattern sums (patterns x genes, float64: 2 GB) held in memory.
_MAX_SUMS = 1 << 28
#: Suffix of the ``varm`` table of the effect sizes (genes x design columns).
#: How the effect size is defined, recorded in ``uns[key]["effect_size"]``.
DEFINITION = (
    "log2 fold change of normalised means: the design's factor (indicator) columns fitted, "
    "weighted by cells, to log2(sum of counts / sum of library sizes + prior) of each design "
    "pattern; NaN for other columns"
)


def factor_patterns(
    X: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group the cells by their values of the design's indicator columns.

    Parameters
    ----------
    X
        Fixed-effects design, cells x p.

    Returns
    -------
    ``(columns, codes, patterns, counts)``: the indicator columns (only 0 and 1, e.g.
    factor levels, their interactions and an intercept), the pattern of each cell (int64,
    0 .. U-1), the U distinct rows of ``X[:, columns]`` and the number of cells of each.
    """
    X = np.asarray(X, dtype=np.float64)
    columns = np.flatnonzero(((X == 0) | (X == 1)).all(axis=0))
    on = X[:, columns] != 0
    # one byte string per cell: unique over a 1-D array of those is much faster than axis=0
    packed = np.ascontiguousarray(np.packbits(on, axis=1))
    keys = packed.view(np.dtype((np.void, max(packed.shape[1], 1)))).reshape(-1)
    if packed.shape[1] == 0:
        keys = np.zeros(X.shape[0], dtype=np.int8)
    _, first, codes, counts = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    patterns = on[first].astype(np.float64)
    return columns, codes.reshape(-1).astype(np.int64), patterns, counts


def pattern_sums(
    Y: Any, codes: np.ndarray, n_patterns: int, *, chunk_size: int = 10_000
) -> np.ndarray:
    """Sum the rows (cells) of ``Y`` by pattern in one streaming pass: ``(U, genes)`` float64.

    ``Y`` is anything :func:`scflashmm.tl.flashmm_de` reads (dense, CSR, CSC, backed, Dask);
    blocks of cells (of genes for CSC) are read one at a time and only their stored values are
    visited (a scatter-add), so cells x genes is never densified.
    """
    codes = np.asarray(codes, dtype=np.int32)
    if is_dask_array(Y):
        return _dask_sums(Y, codes, n_patterns)
    source = open_source(Y)
    _, m = source.shape
    out = np.zeros((n_patterns, m))
    spans = list(source.spans(chunk_size))

    def read(span: tuple[int, int]) -> tuple[int, int, Any]:  # in the calling thread
        return (*span, source.read(*span))

    def run(item: tuple[int, int, Any]) -> np.ndarray:
        start, stop, block = item
        if source.axis == 0:
            return _block_sums(block, codes[start:stop], n_patterns)
        part = np.zeros((n_patterns, stop - start))
        _add_column_block(part, block, codes)
        return part

    # blocks in threads (the scatter-add releases the GIL), added in block order as the core
    jobs = 1 if len(spans) == 1 else check_n_jobs(None)
    for (start, stop), part in zip(spans, ordered_map(run, map(read, spans), jobs), strict=True):
        if source.axis == 0:
            out += part
        else:
            out[:, start:stop] = part
    return out


def _arrays(block: Any, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(data, indices, indptr)`` of a compressed block (no copy when in memory)."""
    if not isinstance(block, CompressedBlock):
        block = sp.csr_matrix(block) if fmt == "csr" else sp.csc_matrix(block)
    indptr = np.asarray(block.indptr, dtype=np.int64)
    return np.asarray(block.data), np.asarray(block.indices, dtype=np.int32), indptr


def _check_values(values: np.ndarray) -> np.ndarray:
    """Return the stored values as float64 after checking them."""
    if values.dtype.kind not in "biuf":
        msg = f"Effect sizes need numeric values, got dtype {values.dtype}."
        raise ValueError(msg)
    if values.size:
        lo, hi = values.min(), values.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            msg = "Effect sizes need finite values; the matrix holds NaN or infinite values."
            raise ValueError(msg)
        if lo < 0:
            msg = (
                "Effect sizes need expression on the linear scale (counts or normalised "
                "counts), but the matrix holds negative values; pass effect_size=False, or "
                "fit a counts layer."
            )
            raise ValueError(msg)
    return np.asarray(values, dtype=np.float64)


def _add_row_block(out: np.ndarray, block: Any, codes: np.ndarray) -> None:
    """``out[pattern of cell, gene] += y`` over the stored values of a block of cells."""
    if isinstance(block, CompressedBlock) or sp.issparse(block):
        data, indices, indptr = _arrays(block, "csr")
        rows = np.repeat(codes, np.diff(indptr))
        scatter_add(out, rows, indices, _check_values(data))
        return
    block = _check_values(np.asarray(block))
    out += _indicator(codes, out.shape[0]) @ block


def _add_column_block(out: np.ndarray, block: Any, codes: np.ndarray) -> None:
    """Add ``y`` to ``out[pattern of cell, gene]`` for a CSC block of genes (all cells)."""
    data, indices, indptr = _arrays(block, "csc")
    genes = np.repeat(np.arange(indptr.size - 1, dtype=np.int32), np.diff(indptr))
    scatter_add(out, codes[indices], genes, _check_values(data))


def _indicator(codes: np.ndarray, n_patterns: int) -> sp.csr_matrix:
    """Return the U x cells matrix with a 1 where a cell belongs to a pattern."""
    ones = np.ones(codes.size)
    return sp.csr_matrix((ones, (codes, np.arange(codes.size))), shape=(n_patterns, codes.size))


def _block_sums(block: Any, codes: np.ndarray, n_patterns: int) -> np.ndarray:
    out = np.zeros((n_patterns, block.shape[1]))
    _add_row_block(out, block, codes)
    return out


def _dask_sums(Y: Any, codes: np.ndarray, n_patterns: int) -> np.ndarray:
    import dask

    if any(np.isnan(c) for c in Y.chunks[0]):
        Y = Y.compute_chunk_sizes()
    starts = np.cumsum((0, *Y.chunks[0]))
    parts = []
    for i, (lo, hi) in enumerate(itertools.pairwise(starts)):
        row = Y.blocks[i]
        parts.append(dask.delayed(_block_sums)(row, codes[lo:hi], n_patterns))
    return np.sum(dask.compute(*parts), axis=0)


def log2_fold_changes(
    sums: np.ndarray,
    library: np.ndarray,
    patterns: np.ndarray,
    counts: np.ndarray,
    *,
    prior_count: float = PRIOR_COUNT,
) -> np.ndarray:
    """Coefficients of the factor design fitted to log2 normalised pattern means.

    Parameters
    ----------
    sums
        ``(U, genes)``: sum of each gene's counts over each pattern's cells.
    library
        ``(U,)``: sum of the library sizes of each pattern's cells.
    patterns
        ``(U, f)``: the factor columns of the design, one row per pattern.
    counts
        ``(U,)``: cells per pattern (the weights).
    prior_count
        Counts added to each pattern in proportion to its library size.

    Returns
    -------
    ``(genes, f)``: the weighted least-squares coefficients.
    """
    library = np.asarray(library, dtype=np.float64)
    if (library <= 0).any():
        msg = "Every design pattern needs a positive library size to normalise its counts."
        raise ValueError(msg)
    means = sums / library[:, None] + prior_count / library.mean()
    logm = np.log2(means)
    w = np.asarray(counts, dtype=np.float64)[:, None]
    gram = patterns.T @ (w * patterns)
    return np.linalg.solve(gram, patterns.T @ (w * logm)).T


def effect_size_table(
    X: np.ndarray,
    x_columns: Sequence[str],
    Y: Any,
    *,
    var_names: pd.Index,
    library_size: np.ndarray | None = None,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Genes x design columns: the log2 fold change of normalised means of each column.

    ``library_size`` gives one library size per cell (default: each cell's sum over the
    genes of ``Y``, taken per pattern from the same pass). Non-indicator columns are NaN.
    """
    columns, codes, patterns, counts = factor_patterns(X)
    if patterns.shape[0] * len(var_names) > _MAX_SUMS:
        msg = (
            f"Effect sizes need the sums of {len(var_names)} genes over {patterns.shape[0]} "
            "groups of cells (one per combination of the design's factor levels), too many "
            "to hold; pass effect_size=False."
        )
        raise ValueError(msg)
    sums = None
    if columns.size:
        sums = pattern_sums(Y, codes, patterns.shape[0], chunk_size=chunk_size or 10_000)
    return _table(sums, columns, codes, patterns, counts, library_size, var_names, x_columns)


def _table(
    sums: np.ndarray | None,
    columns: np.ndarray,
    codes: np.ndarray,
    patterns: np.ndarray,
    counts: np.ndarray,
    library_size: np.ndarray | None,
    var_names: pd.Index,
    x_columns: Sequence[str],
) -> pd.DataFrame:
    """Return the effect-size table of one set of cells from its pattern ``sums`` (or None).

    ``codes`` and ``library_size`` are those of its cells (library: default each pattern's
    sum over the genes).
    """
    out = np.full((len(var_names), len(x_columns)), np.nan)
    if columns.size and sums is not None:
        if library_size is None:
            library = sums.sum(axis=1)
        else:
            library = np.bincount(
                codes, weights=np.asarray(library_size, np.float64), minlength=len(counts)
            )
        out[:, columns] = log2_fold_changes(sums, library, patterns, counts)
    return pd.DataFrame(out, index=pd.Index(var_names), columns=pd.Index(x_columns, dtype=object))


def grouped_effect_size_tables(
    groups: Sequence[tuple[np.ndarray, np.ndarray, Sequence[str]]],
    Y: Any,
    n_cells: int,
    *,
    var_names: pd.Index,
    library_size: np.ndarray | None = None,
    chunk_size: int | None = None,
) -> list[pd.DataFrame]:
    """:func:`effect_size_table` of every group, from one pass over ``Y`` for all groups.

    ``groups`` holds each group's ``(cells, X, x_columns)``: the indices of its cells, its
    design on those cells and the design's column names. The patterns of all groups are
    numbered one after the other (cells in no group: one more pattern, unused), so one
    streaming :func:`pattern_sums` gives every group's sums; each group's table is then that of
    :func:`effect_size_table` on its cells.
    """
    codes = np.zeros(n_cells, dtype=np.int64)
    parts = []
    n_patterns = 0
    for cells, X, _ in groups:
        columns, group_codes, patterns, counts = factor_patterns(X)
        codes[cells] = n_patterns + group_codes
        parts.append((n_patterns, columns, group_codes, patterns, counts))
        n_patterns += patterns.shape[0]
    assigned = np.zeros(n_cells, dtype=bool)
    for cells, _, _ in groups:
        assigned[cells] = True
    codes[~assigned] = n_patterns  # cells of no group: summed apart, not used
    if (n_patterns + 1) * len(var_names) > _MAX_SUMS:
        msg = (
            f"Effect sizes need the sums of {len(var_names)} genes over {n_patterns} groups "
            "of cells (one per group and combination of the design's factor levels), too many "
            "to hold; pass effect_size=False."
        )
        raise ValueError(msg)
    sums = None
    if any(part[1].size for part in parts):
        sums = pattern_sums(Y, codes, n_patterns + 1, chunk_size=chunk_size or 10_000)
    sizes = None if library_size is None else np.asarray(library_size, np.float64)
    return [
        _table(
            None if sums is None else sums[lo : lo + patterns.shape[0]],
            columns,
            group_codes,
            patterns,
            counts,
            None if sizes is None else sizes[cells],
            var_names,
            x_columns,
        )
        for (cells, _, x_columns), (lo, columns, group_codes, patterns, counts) in zip(
            groups, parts, strict=True
        )
    ]


def _effect_size_options(
    adata: Any, *, effect_size: bool | None, is_counts: bool, library_size: str | None
) -> tuple[bool, np.ndarray | None]:
    """Check the options; return whether to estimate effect sizes and the library sizes."""
    if effect_size is None:
        effect_size = is_counts
    if not isinstance(effect_size, bool | np.bool_):
        msg = f"effect_size must be True, False or None, got {effect_size!r}."
        raise TypeError(msg)
    if library_size is not None and not effect_size:
        msg = "library_size is only used with effect_size=True."
        raise ValueError(msg)
    if not effect_size:
        return False, None
    sizes = None
    if library_size is not None:
        if library_size not in adata.obs.columns:
            msg = f"library_size={library_size!r} is not a column of adata.obs."
            raise ValueError(msg)
        sizes = pd.to_numeric(adata.obs[library_size], errors="coerce").to_numpy(np.float64)
        if not np.isfinite(sizes).all() or (sizes <= 0).any():
            msg = f"adata.obs[{library_size!r}] must hold positive finite library sizes."
            raise ValueError(msg)
    return True, sizes


def fit_effect_sizes(
    adata: Any,
    Y: Any,
    X: np.ndarray,
    x_columns: Sequence[str],
    key: str,
    *,
    effect_size: bool | None,
    is_counts: bool,
    library_size: str | None,
    chunk_size: int | None,
) -> dict[str, pd.DataFrame]:
    """Return the ``varm`` entry of the effect sizes of :func:`scflashmm.tl.flashmm_de`, or {}.

    ``effect_size=None`` means: when the fit is on counts (``is_counts=True``).
    """
    wanted, sizes = _effect_size_options(
        adata, effect_size=effect_size, is_counts=is_counts, library_size=library_size
    )
    if not wanted:
        return {}
    table = effect_size_table(
        X, x_columns, Y, var_names=adata.var_names, library_size=sizes, chunk_size=chunk_size
    )
    return {varm_key(key, LOG2FC): table}


def fit_grouped_effect_sizes(
    adata: Any,
    Y: Any,
    groups: Sequence[tuple[np.ndarray, np.ndarray, Sequence[str]]],
    keys: Sequence[str],
    *,
    effect_size: bool | None,
    is_counts: bool,
    library_size: str | None,
    chunk_size: int | None,
) -> list[dict[str, pd.DataFrame]]:
    """Return :func:`fit_effect_sizes` of every group, from one pass over the cells.

    ``groups`` holds each group's ``(cells, X, x_columns)`` and ``keys`` its key; without
    effect sizes, a list of empty dicts.
    """
    wanted, sizes = _effect_size_options(
        adata, effect_size=effect_size, is_counts=is_counts, library_size=library_size
    )
    if not wanted:
        return [{} for _ in groups]
    tables = grouped_effect_size_tables(
        groups, Y, adata.n_obs, var_names=adata.var_names, library_size=sizes,
        chunk_size=chunk_size,
    )  # fmt: skip
    return [{varm_key(k, LOG2FC): t} for k, t in zip(keys, tables, strict=True)]
