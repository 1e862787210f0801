"""``tl.flashmm_de(..., groupby=...)``: one model per level of an ``obs`` column, in one pass.

Summary statistics are sums over cells, so the statistics of every group can be accumulated
in the same pass over the cells. Each group's design ``X_g, Z_g`` is built from the group's
cells alone (:func:`scflashmm._design.make_design` on the group's ``obs``, so a factor level
absent from a group drops out of its design). Then one pass computes, for all groups at once:

- ``[X Z]' Y`` of the indicator-like columns (factor levels, interactions, intercepts, random
  effects) of the block-diagonal design whose columns for group ``g`` are zero outside its
  cells: the pass plan (:class:`scflashmm._core.plan.DesignPlan`) sums them by pattern, one
  scatter-add of the stored values whatever the number of groups;
- the other design columns (e.g. ``log(libsize)``) and the squared norms ``Ynorm`` per group,
  by a scatter-add of ``w * y`` into the rows of the cell's group (one per column position,
  whatever the number of groups).

``X_g'X_g``, ``Z_g'X_g`` and ``Z_g'Z_g`` come from the small designs directly. Each group's
statistics are then fit by :func:`scflashmm._core.reml.lmm`, batched over its genes, and
written as an ordinary fit under the key ``f"{key}:{group}"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core._accumulate import scatter_add
from .._core._options import (
    DfMethod,
    Method,
    check_df,
    check_method,
    check_positive_float,
    check_positive_int,
    check_theta0,
)
from .._core._threads import check_n_jobs, ordered_map, single_threaded_blas
from .._core.blocks import _pieces, block_stats
from .._core.checks import _check_chunk_size
from .._core.passes import reduce_dask_blocks
from .._core.plan import DesignPlan
from .._core.reml import lmm
from .._core.sources import CompressedBlock, is_dask_array, open_source, shape2
from .._core.stats import SummaryStats
from .._core.sumstats import NonFiniteError
from .._design import _as_factor, _normalize_random, _parse_formula, make_design
from ._flashmm_de import _check_input, _contrasts, _result_tables, _uns_record
from ._matrix import ProgressBar, is_csc, looks_like_counts, nonfinite_error

if TYPE_CHECKING:
    from anndata import AnnData

    from .._design import Design

__all__ = ["group_key"]

_LN2 = float(np.log(2.0))


def group_key(key: str, group: str) -> str:
    """Return the key under which the fit of ``group`` of a grouped fit ``key`` is stored."""
    return f"{key}:{str(group).replace('/', '|')}"


@dataclass
class _Group:
    name: str
    cells: np.ndarray  # indices of the group's cells
    design: Design
    cmat: pd.DataFrame | None
    expressions: dict[str, str]
    indicator: np.ndarray  # X columns summed by pattern (indices into design.X)
    continuous: np.ndarray  # X columns summed with weights


def flashmm_de_groupby(
    adata: AnnData,
    fixed: str,
    random: str | Sequence[str],
    *,
    groupby: str,
    layer: str | None,
    is_counts: bool,
    method: Method,
    df: DfMethod,
    contrasts: Mapping[str, str] | Sequence[str] | None,
    theta0: Sequence[float] | None,
    max_iter: int,
    epsilon: float,
    key_added: str,
    chunk_size: int | None,
    copy: bool,
    progress: bool | None,
) -> AnnData | None:
    """:func:`scflashmm.tl.flashmm_de` with ``groupby``: see its docstring."""
    Y, source = _check_input(adata, layer=layer, key_added=key_added, copy=copy)
    method = check_method(method)
    df = check_df(df)
    max_iter = check_positive_int(max_iter, "max_iter")
    epsilon = check_positive_float(epsilon, "epsilon")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    codes, levels = _group_codes(adata.obs, groupby, fixed, random)

    groups, skipped = [], {}
    for g, name in enumerate(levels):
        cells = np.flatnonzero(codes == g)
        if cells.size == 0:
            skipped[name] = "no cells"
            continue
        try:
            design = make_design(adata.obs.iloc[cells], fixed, random)
            if cells.size <= design.X.shape[1]:
                msg = f"{cells.size} cells for {design.X.shape[1]} fixed-effect columns"
                raise ValueError(msg)
            cmat, expressions = _contrasts(contrasts, design.x_columns)
        except ValueError as exc:
            skipped[name] = str(exc)
            continue
        ind, cont = _split_columns(design.X)
        groups.append(_Group(name, cells, design, cmat, expressions, ind, cont))
    if not groups:
        reasons = "; ".join(f"{k!r}: {v}" for k, v in skipped.items())
        msg = f"No group of adata.obs[{groupby!r}] can be fit: {reasons}"
        raise ValueError(msg)
    if skipped:
        reasons = "; ".join(f"{k!r} ({v})" for k, v in skipped.items())
        msg = f"{len(skipped)} group(s) of {groupby!r} not fit: {reasons}"
        warnings.warn(msg, UserWarning, stacklevel=3)
    start = check_theta0(theta0, len(groups[0].design.d))  # the same terms in every group

    stats = _grouped_statistics(
        adata, Y, source, groups, chunk_size=chunk_size, is_counts=is_counts, progress=progress
    )
    if not is_counts and looks_like_counts(Y):
        msg = (
            f"{source} looks like raw counts (non-negative integers), but "
            "is_counts=False fits them untransformed. Pass is_counts=True to fit log2(1 + y) "
            "as FLASHMM does, or normalise and log-transform first."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)

    params = {
        "fixed": fixed,
        "random": [random] if isinstance(random, str) else list(random),
        "method": method,
        "df": df,
        "layer": layer,
        "is_counts": bool(is_counts),
        "epsilon": epsilon,
        "max_iter": max_iter,
        "theta0": None if start is None else start.tolist(),
        "chunk_size": chunk_size,
        "groupby": groupby,
    }
    varm: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    for group, st in zip(groups, stats, strict=True):
        sub = group_key(key_added, group.name)
        fit = _fit_group(group, st, groupby, adata.var_names, method, start, max_iter, epsilon, df)
        tables = _result_tables(fit, adata.var_names, sub, group.cmat)
        record = _uns_record(
            adata, group.design, fit, params, group.cmat, group.expressions, list(tables)
        )
        record["n_cells"] = int(group.cells.size)
        record["group"] = group.name
        varm |= tables
        records[sub] = record
    from .. import __version__

    top = {
        "params": params,
        "groupby": groupby,
        "groups": [g.name for g in groups],
        "group_keys": list(records),
        "n_cells": [int(g.cells.size) for g in groups],
        "skipped": list(skipped),
        "skipped_reasons": list(skipped.values()),
        "varm_keys": list(varm),
        "version": __version__,
    }
    return _write_groups(adata, key_added, varm, records, top, copy=copy)


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------


def _formula_variables(fixed: str, random: str | Sequence[str], obs: pd.DataFrame) -> set[str]:
    names = set(_parse_formula(fixed, what="fixed formula").required_variables)
    for formula, _ in _normalize_random(random, obs):
        names |= set(_parse_formula(formula, what="random formula").required_variables)
    return names


def _group_codes(
    obs: pd.DataFrame, groupby: Any, fixed: str, random: str | Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """Check the ``groupby`` column; return each cell's group (0..G-1) and the group names."""
    if not isinstance(groupby, str):
        msg = f"groupby must be the name of a column of adata.obs, got {groupby!r}."
        raise TypeError(msg)
    if groupby not in obs.columns:
        avail = ", ".join(repr(str(c)) for c in list(obs.columns)[:20])
        msg = f"groupby={groupby!r} is not a column of adata.obs. Available columns: {avail}."
        raise ValueError(msg)
    col = obs[groupby]
    na = col.isna().to_numpy()
    if na.any():
        first = obs.index[np.flatnonzero(na)[0]]
        msg = (
            f"adata.obs[{groupby!r}] (groupby) has {int(na.sum())} missing value(s), e.g. in "
            f"cell {first!r}. Drop or label those cells before fitting."
        )
        raise ValueError(msg)
    if groupby in _formula_variables(fixed, random, obs):
        msg = (
            f"groupby={groupby!r} is also used in the model formulas; within a group it is "
            "constant. Remove it from fixed/random (each group gets its own model)."
        )
        raise ValueError(msg)
    if isinstance(col.dtype, pd.CategoricalDtype):
        factor = col.array  # unused categories are kept: reported as empty groups
    else:
        factor = _as_factor(col)
    names = [str(c) for c in factor.categories]
    keys = [group_key("", n) for n in names]
    if len(set(keys)) != len(keys):
        msg = f"The groups of {groupby!r} have names that differ only by '/' or '|': {names}."
        raise ValueError(msg)
    return np.asarray(factor.codes, dtype=np.int64), names


def _split_columns(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns of ``X`` that take one non-zero value (or none), and the others."""
    nz = X != 0
    hi = np.where(nz, X, -np.inf).max(axis=0)
    lo = np.where(nz, X, np.inf).min(axis=0)
    single = (lo == hi) | ~nz.any(axis=0)
    return np.flatnonzero(single), np.flatnonzero(~single)


@dataclass
class _Layout:
    """The combined pass: indicator design ``A`` (n x r), weights ``W`` (n x w), group codes."""

    A: sp.csc_matrix
    W: np.ndarray
    codes: np.ndarray  # int32 group index (into the fitted groups) of each cell, -1 if none
    x_rows: list[np.ndarray]  # per group: rows of A holding its indicator X columns
    z_rows: list[np.ndarray]  # per group: rows of A holding its Z columns


def _layout(groups: list[_Group], n: int) -> _Layout:
    rows, cols, vals = [], [], []
    x_rows, z_rows = [], []
    col = 0
    w = max(g.continuous.size for g in groups)
    W = np.zeros((n, w))
    codes = np.full(n, -1, dtype=np.int32)
    for i, g in enumerate(groups):
        codes[g.cells] = i
        Xi = g.design.X[:, g.indicator]
        r, c = np.nonzero(Xi)
        rows.append(g.cells[r])
        cols.append(c + col)
        vals.append(Xi[r, c])
        x_rows.append(np.arange(col, col + g.indicator.size))
        col += g.indicator.size
        Z = g.design.Z.tocoo()
        rows.append(g.cells[Z.row])
        cols.append(Z.col + col)
        vals.append(Z.data)
        z_rows.append(np.arange(col, col + Z.shape[1]))
        col += Z.shape[1]
        W[g.cells, : g.continuous.size] = g.design.X[:, g.continuous]
    A = sp.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, col)
    )
    return _Layout(A, W, codes, x_rows, z_rows)


def _grouped_statistics(
    adata: AnnData,
    Y: Any,
    source: str,
    groups: list[_Group],
    *,
    chunk_size: int | None,
    is_counts: bool,
    progress: bool | None,
) -> list[SummaryStats]:
    """One pass over the cells; the statistics of every group (errors as the ungrouped pass)."""
    bar = ProgressBar(progress, unit="genes" if is_csc(Y) else "cells")
    try:
        return grouped_summary_stats(
            Y, groups, chunk_size=chunk_size, is_counts=is_counts, progress=bar
        )
    except NonFiniteError as exc:
        raise nonfinite_error(exc, Y, source, adata.obs_names, adata.var_names) from exc
    except ValueError as exc:
        msg = f"{source}: {exc}"
        raise ValueError(msg) from exc
    finally:
        bar.close()


def grouped_summary_stats(
    Y: Any,
    groups: list[_Group],
    *,
    chunk_size: int | None = None,
    is_counts: bool = False,
    n_jobs: int | None = None,
    progress: Any = None,
) -> list[SummaryStats]:
    """Return the summary statistics of each group's model, in one pass over ``Y``."""
    dask = is_dask_array(Y)
    src = None if dask else open_source(Y)
    if dask and any(np.isnan(c) for c in Y.chunks[0]):
        Y = Y.compute_chunk_sizes()
    n, m = shape2(Y) if src is None else src.shape
    lay = _layout(groups, n)
    size = _check_chunk_size(chunk_size)
    jobs = check_n_jobs(n_jobs)
    G, w = len(groups), lay.W.shape[1]
    with single_threaded_blas():
        plan = DesignPlan(np.zeros((n, 0)), lay.A, m)
        if src is None:
            packed, extra = _dask_grouped_pass(Y, plan, lay, G, is_counts, progress)
        else:
            packed, extra = _local_grouped_pass(
                src, plan, lay, G, is_counts=is_counts, size=size, n_jobs=jobs, progress=progress
            )
        AY, _ = plan.unpack(packed, is_counts=is_counts)
        norms = extra[:G] / (_LN2 * _LN2) if is_counts else extra[:G]
        weighted = extra[G:].reshape(w, G, m) / (_LN2 if is_counts else 1.0)
        out = []
        for i, g in enumerate(groups):
            X, Z = g.design.X, sp.csc_matrix(g.design.Z)
            XY = np.empty((X.shape[1], m))
            XY[g.indicator] = AY[lay.x_rows[i]]
            XY[g.continuous] = weighted[: g.continuous.size, i]
            ZZ = Z.T @ Z
            out.append(
                SummaryStats(
                    XX=X.T @ X,
                    XY=XY,
                    ZX=np.asarray(Z.T @ X),
                    ZY=AY[lay.z_rows[i]],
                    ZZ=ZZ.toarray(),
                    Ynorm=norms[i].copy(),
                    n=int(g.cells.size),
                )
            )
    return out


def _triplets(chunk: Any, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(cells, genes, stored values, genes in the chunk)`` of a block of ``Y``."""
    if isinstance(chunk, CompressedBlock) or sp.issparse(chunk):
        if not isinstance(chunk, CompressedBlock):
            chunk = sp.csc_matrix(chunk) if axis == 1 else sp.csr_matrix(chunk)
        data, indices, indptr = chunk.data, chunk.indices, chunk.indptr
        outer = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
        inner = np.asarray(indices, dtype=np.int64)
        if chunk.format == "csc":
            return inner, outer, data, chunk.shape[1]
        return outer, inner, data, chunk.shape[1]
    dense = np.asarray(chunk)
    r, m = dense.shape
    cells = np.repeat(np.arange(r, dtype=np.int64), m)
    genes = np.tile(np.arange(m, dtype=np.int64), r)
    return cells, genes, dense.ravel(), m


def group_block(
    chunk: Any, codes: np.ndarray, W: np.ndarray, G: int, *, is_counts: bool, axis: int = 0
) -> np.ndarray:
    """Per group: ``sum y^2`` then ``sum W[:, k] y`` for each k; ``((1 + w) G, genes)``.

    ``codes`` and ``W`` are those of the chunk's cells (all cells for column blocks); values
    are ``ln(1 + y)`` for counts (checked beforehand by :func:`block_stats`).
    """
    w = W.shape[1]
    if isinstance(chunk, CompressedBlock) and chunk.format == "csr" and axis == 0:
        return _group_block_csr(chunk, codes, W, G, is_counts=is_counts)
    cells, genes, values, m = _triplets(chunk, axis)
    out = np.zeros(((1 + w) * G, m))
    v = values.astype(np.float64)
    if is_counts:
        np.log1p(v, out=v)
    rows = codes[cells].astype(np.int64)
    keep = rows >= 0
    if not keep.all():
        rows, genes, v, cells = rows[keep], genes[keep], v[keep], cells[keep]
    scatter_add(out[:G], rows, genes, v * v)
    for k in range(w):
        scatter_add(out[(k + 1) * G : (k + 2) * G], rows, genes, v * W[cells, k])
    return out


def _group_block_csr(
    chunk: CompressedBlock, codes: np.ndarray, W: np.ndarray, G: int, *, is_counts: bool
) -> np.ndarray:
    """:func:`group_block` of a CSR block, in cache-sized pieces as :func:`block_stats`."""
    data, indices, indptr = chunk.data, chunk.indices, chunk.indptr
    w = W.shape[1]
    out = np.zeros(((1 + w) * G, chunk.shape[1]))
    parts = [out[k * G : (k + 1) * G] for k in range(1 + w)]
    for a, b in _pieces(indptr):
        lo, hi = int(indptr[a]), int(indptr[b])
        if hi == lo:
            continue
        v = data[lo:hi].astype(np.float64)
        if is_counts:
            np.log1p(v, out=v)
        counts = np.diff(indptr[a : b + 1])
        rows = np.repeat(codes[a:b], counts)
        idx = indices[lo:hi]
        if rows.min() < 0:  # cells of no fitted group
            keep = rows >= 0
            rows, idx, v = rows[keep], idx[keep], v[keep]
            cells = np.repeat(np.arange(a, b), counts)[keep]
        else:
            cells = None
        rows = rows.astype(idx.dtype, copy=False)
        scatter_add(parts[0], rows, idx, v * v)
        for k in range(w):
            weight = W[a:b, k]
            wv = W[cells, k] if cells is not None else np.repeat(weight, counts)
            scatter_add(parts[k + 1], rows, idx, v * wv)
    return out


def _local_grouped_pass(
    source: Any,
    plan: DesignPlan,
    lay: _Layout,
    G: int,
    *,
    is_counts: bool,
    size: int,
    n_jobs: int,
    progress: Any,
) -> tuple[np.ndarray, np.ndarray]:
    n, m = source.shape
    total_units = n if source.axis == 0 else m
    packed = np.zeros((plan.rows, m))
    extra = np.zeros(((1 + lay.W.shape[1]) * G, m))
    spans = list(source.spans(size))

    def read(span: tuple[int, int]) -> tuple[int, Any, slice]:
        start, stop = span  # in the calling thread: one reader of a file
        return start, source.read(start, stop), slice(start, stop)

    def run(args: tuple[int, Any, slice]) -> tuple[np.ndarray, np.ndarray]:
        start, chunk, cut = args
        rows = cut if source.axis == 0 else slice(None)
        a = block_stats(
            chunk,
            plan.codes[:, rows],
            plan.cont[rows],
            plan.sizes,
            is_counts=is_counts,
            axis=source.axis,
            start=start,
        )
        b = group_block(
            chunk, lay.codes[rows], lay.W[rows], G, is_counts=is_counts, axis=source.axis
        )
        return a, b

    jobs = 1 if len(spans) == 1 else n_jobs
    done = 0
    for (start, stop), (a, b) in zip(spans, ordered_map(run, map(read, spans), jobs), strict=True):
        if source.axis == 0:
            packed += a
            extra += b
        else:
            packed[:, start:stop] = a
            extra[:, start:stop] = b
        done += stop - start
        if progress is not None:
            progress(done, total_units)
    return packed, extra


def _dask_grouped_block(y, codes, cont, gcodes, W, start, *, sizes, G, is_counts):
    codes = np.ascontiguousarray(codes.T)
    a = block_stats(y, codes, cont, sizes, is_counts=is_counts, axis=0, start=int(start[0]))
    b = group_block(y, gcodes, W, G, is_counts=is_counts)
    return np.vstack([a, b])[None]


def _dask_grouped_pass(
    Y: Any, plan: DesignPlan, lay: _Layout, G: int, is_counts: bool, progress: Any
) -> tuple[np.ndarray, np.ndarray]:
    import dask.array as da

    dtype = getattr(Y, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "biuf":
        msg = f"Y must be numeric, got dtype {dtype}."
        raise ValueError(msg)
    rows = Y.chunks[0]
    codes = da.from_array(plan.codes.T, chunks=(rows, plan.codes.shape[0]))
    cont = da.from_array(plan.cont, chunks=(rows, plan.cont.shape[1]))
    gcodes = da.from_array(lay.codes, chunks=(rows,))
    W = da.from_array(lay.W, chunks=(rows, lay.W.shape[1]))
    starts = da.from_array(np.cumsum((0, *rows[:-1])), chunks=1)
    extra_rows = (1 + lay.W.shape[1]) * G
    blocks = da.blockwise(
        _dask_grouped_block,
        "ikj",
        Y,
        "ij",
        codes,
        "ia",
        cont,
        "ib",
        gcodes,
        "i",
        W,
        "ic",
        starts,
        "i",
        new_axes={"k": plan.rows + extra_rows},
        adjust_chunks={"i": 1},
        align_arrays=False,
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        sizes=tuple(plan.sizes),
        G=G,
        is_counts=is_counts,
    )
    total = reduce_dask_blocks(blocks, rows, progress)
    return total[: plan.rows], total[plan.rows :]


def _fit_group(
    group: _Group,
    stats: SummaryStats,
    groupby: str,
    var_names: pd.Index,
    method: Method,
    start: np.ndarray | None,
    max_iter: int,
    epsilon: float,
    df: DfMethod,
):
    """Fit one group; its warnings name the group."""
    design = group.design
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = lmm(
            stats,
            design.d,
            method=method,
            theta0=start,
            max_iter=max_iter,
            epsilon=epsilon,
            output_cov=True,
            df=df,
            feature_names=list(map(str, var_names)),
            covariate_names=design.x_columns,
            component_names=design.random_terms,
        )
    for w in caught:
        msg = f"{groupby} = {group.name!r}: {w.message}"
        warnings.warn(msg, w.category, stacklevel=4)
    return fit


def _write_groups(
    adata: AnnData,
    key: str,
    varm: Mapping[str, Any],
    records: Mapping[str, dict[str, Any]],
    top: dict[str, Any],
    *,
    copy: bool,
) -> AnnData | None:
    """Write every group's fit and the grouped record, replacing an earlier fit under ``key``."""
    target = adata.copy() if copy else adata
    if target.is_view:
        target._init_as_actual(target.copy())
    previous = target.uns.get(key)
    if isinstance(previous, Mapping):
        for old in previous.get("varm_keys", []):
            target.varm.pop(str(old), None)
        for old in previous.get("group_keys", []):
            target.uns.pop(str(old), None)
    for name, value in varm.items():
        target.varm[name] = value
    for name, record in records.items():
        target.uns[name] = record
    target.uns[key] = top
    return target if copy else None


def is_grouped(adata: AnnData, key: str) -> bool:
    """Whether ``adata.uns[key]`` is the record of a fit with ``groupby``."""
    info = adata.uns.get(key)
    return isinstance(info, Mapping) and "group_keys" in info
