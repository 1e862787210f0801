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
statistics are then fit by :func:`scflashmm._core.fit.lmm`, batched over its genes, and
written as an ordinary fit under the key ``f"{key}:{group}"``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._contrast import DesignConditions
from .._core._accumulate import scatter_add
from .._core._options import (
    DfMethod,
    Method,
    check_positive_float,
    check_positive_int,
)
from .._core._threads import check_n_jobs, ordered_map, single_threaded_blas
from .._core.blocks import _pieces, _values
from .._core.checks import _check_chunk_size
from .._core.passes import dask_row_pass
from .._core.sources import CompressedBlock, is_dask_array, open_source, shape2
from .._core.stats import SummaryStats
from .._core.sumstats import NonFiniteError
from .._design import _as_factor, _normalize_random, _parse_formula, check_no_missing, make_design
from ._effect_size import fit_grouped_effect_sizes
from ._flashmm_de import (
    DesignInfo,
    FitOptions,
    _check_input,
    _contrasts,
    check_fit_options,
    data_params,
    fit_and_record,
    view_to_actual,
    warn_if_raw_counts,
)
from ._matrix import ProgressBar, is_csc, nonfinite_error

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
    nonnegative: bool | None,
    moderate: bool | None,
    n_jobs: int | None,
    store_stats: bool,
    store_cov: bool,
    effect_size: bool | None,
    criterion: str,
    library_size: str | None = None,
) -> AnnData | None:
    """:func:`scflashmm.tl.flashmm_de` with ``groupby``: see its docstring."""
    Y, source = _check_input(adata, layer=layer, key_added=key_added, copy=copy)
    jobs = check_n_jobs(n_jobs)
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
            cond = DesignConditions(adata.obs.iloc[cells], fixed, design.x_columns)
            cmat, expressions = _contrasts(contrasts, design.x_columns, cond)
        except ValueError as exc:
            skipped[name] = str(exc)
            continue
        groups.append(_Group(name, cells, design, cmat, expressions))
    if not groups:
        reasons = "; ".join(f"{k!r}: {v}" for k, v in skipped.items())
        msg = f"No group of adata.obs[{groupby!r}] can be fit: {reasons}"
        raise ValueError(msg)
    if skipped:
        reasons = "; ".join(f"{k!r} ({v})" for k, v in skipped.items())
        msg = f"{len(skipped)} group(s) of {groupby!r} not fit: {reasons}"
        warnings.warn(msg, UserWarning, stacklevel=3)
    opts = check_fit_options(  # the same terms in every group
        method=method,
        df=df,
        nonnegative=nonnegative,
        moderate=moderate,
        theta0=theta0,
        max_iter=max_iter,
        epsilon=epsilon,
        info=DesignInfo.of(groups[0].design),
        criterion=criterion,
    )

    stats = _grouped_statistics(
        adata, Y, source, groups, chunk_size=chunk_size, is_counts=is_counts, progress=progress,
        n_jobs=jobs,
    )  # fmt: skip
    warn_if_raw_counts(Y, source, is_counts=is_counts)
    effect_sizes = fit_grouped_effect_sizes(  # one more pass, for all groups
        adata, Y, [(g.cells, g.design.X, g.design.x_columns) for g in groups],
        [group_key(key_added, g.name) for g in groups], effect_size=effect_size,
        is_counts=is_counts, library_size=library_size, chunk_size=chunk_size,
    )  # fmt: skip

    params = data_params(
        fixed=fixed,
        random=random,
        layer=layer,
        is_counts=is_counts,
        chunk_size=chunk_size,
        store_stats=store_stats,
        effect_size=any(effect_sizes),
        library_size=library_size,
        store_cov=store_cov,
    ) | {"groupby": groupby}
    varm: dict[str, Any] = {}
    records: dict[str, dict[str, Any]] = {}
    fitted = []
    results = _fit_groups(
        groups, stats, effect_sizes, groupby, adata, opts, params, key_added, jobs, store_stats
    )
    for group, result in zip(groups, results, strict=True):
        if isinstance(result, np.linalg.LinAlgError):  # the solver failed for this group only
            skipped[group.name] = f"the fit failed ({result})"
            msg = f"{groupby} = {group.name!r} not fit: the solver failed ({result})."
            warnings.warn(msg, UserWarning, stacklevel=2)
            continue
        tables, record = result
        fitted.append(group)
        record["n_cells"] = int(group.cells.size)
        record["group"] = group.name
        varm |= tables
        records[group_key(key_added, group.name)] = record
    from .. import __version__

    top = {
        "params": records[next(iter(records))]["params"] if records else params,
        "groupby": groupby,
        "groups": [g.name for g in fitted],
        "group_keys": list(records),
        "n_cells": [int(g.cells.size) for g in fitted],
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
    check_no_missing(col, f"{groupby!r}] (groupby)", advice="Drop or label")
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


@dataclass
class _Layout:
    """Slots of the pass: per cell, the output row and the weight of its value in each slot.

    A slot is a design column position ``j`` of every group's ``X`` (row: the cell's group,
    weight: ``X_g[cell, j]``) or a random term of every group's ``Z`` with one non-zero per
    cell (row: the cell's column of all groups' ``Z``, weight: its value). Rows ``-1``: none.
    """

    rows: np.ndarray  # int32 (n, slots + 1): the last column is the cell's group (norms)
    weights: np.ndarray  # float64 (n, slots)
    offsets: np.ndarray  # first output row of each slot (slots + 1,), the norms after them
    G: int
    x_from: list[list[tuple[str, Any]]]  # per group and X column: ("slot", k) or ("levels", x)
    z_rows: list[np.ndarray]  # per group: output rows of its Z columns

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1]) + self.G


def _layout(groups: list[_Group], n: int) -> _Layout:
    G = len(groups)
    rows_cols: list[np.ndarray] = []
    weight_cols: list[np.ndarray] = []
    sizes: list[int] = []
    z_rows = [np.zeros(g.design.Z.shape[1], dtype=np.int64) for g in groups]
    # random terms: one slot per term where every cell has at most one non-zero in the term,
    # else one slot per column position (exact for any Z, slower)
    levels: list[np.ndarray | None] = [None] * G  # a term of 0/1 indicators covering the group
    for t in range(len(groups[0].design.d)):
        blocks = []
        for g in groups:
            lo = sum(g.design.d[:t])
            blocks.append((lo, sp.csr_matrix(g.design.Z[:, lo : lo + g.design.d[t]])))
        if all(np.diff(B.indptr).max(initial=0) <= 1 for _, B in blocks):
            r = np.full(n, -1, dtype=np.int32)
            w = np.zeros(n)
            base, total = sum(sizes), 0
            for i, (g, (lo, B)) in enumerate(zip(groups, blocks, strict=True)):
                nz = np.diff(B.indptr) == 1
                r[g.cells[nz]] = total + B.indices
                w[g.cells[nz]] = B.data
                z_rows[i][lo : lo + B.shape[1]] = base + total + np.arange(B.shape[1])
                if levels[i] is None and nz.all() and (B.data == 1).all():
                    levels[i] = np.asarray(B.indices)
                total += B.shape[1]
            rows_cols.append(r)
            weight_cols.append(w)
            sizes.append(total)
            continue
        for j in range(max(B.shape[1] for _, B in blocks)):
            r = np.full(n, -1, dtype=np.int32)
            w = np.zeros(n)
            for i, (g, (lo, B)) in enumerate(zip(groups, blocks, strict=True)):
                if j < B.shape[1]:
                    r[g.cells] = i
                    w[g.cells] = B[:, j].toarray().ravel()
                    z_rows[i][lo + j] = sum(sizes) + i
            rows_cols.append(r)
            weight_cols.append(w)
            sizes.append(G)
    # fixed columns: from the sums per level of an indicator term where the column is constant
    # within each level (an intercept, donor-level covariates), else one slot per position
    x_from: list[list[tuple[str, Any]]] = [[] for _ in groups]
    for j in range(max(g.design.X.shape[1] for g in groups)):
        derived = {}
        for i, g in enumerate(groups):
            if j >= g.design.X.shape[1] or levels[i] is None:
                continue
            x, lv = g.design.X[:, j], levels[i]
            per_level = np.zeros(z_rows[i].size)
            per_level[lv] = x
            if np.array_equal(per_level[lv], x):
                derived[i] = per_level
        slot = None
        for i, g in enumerate(groups):
            if j >= g.design.X.shape[1]:
                continue
            if i in derived:
                x_from[i].append(("levels", derived[i]))
                continue
            if slot is None:
                slot = len(sizes)
                rows_cols.append(np.full(n, -1, dtype=np.int32))
                weight_cols.append(np.zeros(n))
                sizes.append(G)
            rows_cols[slot][g.cells] = i
            weight_cols[slot][g.cells] = g.design.X[:, j]
            x_from[i].append(("slot", slot))
    group = np.full(n, -1, dtype=np.int32)
    for i, g in enumerate(groups):
        group[g.cells] = i
    return _Layout(
        rows=np.ascontiguousarray(np.column_stack([*rows_cols, group])),
        weights=np.ascontiguousarray(np.column_stack([*weight_cols, np.ones(n)])),
        offsets=np.cumsum([0, *sizes]),
        G=G,
        x_from=x_from,
        z_rows=z_rows,
    )


def _grouped_statistics(
    adata: AnnData,
    Y: Any,
    source: str,
    groups: list[_Group],
    *,
    chunk_size: int | None,
    is_counts: bool,
    progress: bool | None,
    n_jobs: int | None = None,
) -> list[SummaryStats]:
    """One pass over the cells; the statistics of every group (errors as the ungrouped pass)."""
    bar = ProgressBar(progress, unit="genes" if is_csc(Y) else "cells")
    try:
        return grouped_summary_stats(
            Y, groups, chunk_size=chunk_size, is_counts=is_counts, n_jobs=n_jobs, progress=bar
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
    n = shape2(Y)[0] if src is None else src.shape[0]
    lay = _layout(groups, n)
    size = _check_chunk_size(chunk_size)
    jobs = check_n_jobs(n_jobs)
    with single_threaded_blas():
        if src is None:
            total = _dask_grouped_pass(Y, lay, is_counts, progress)
        else:
            total = _local_grouped_pass(
                src, lay, is_counts=is_counts, size=size, n_jobs=jobs, progress=progress
            )
        if is_counts:  # sums of ln(1 + y): rescale to log2
            total[: lay.offsets[-1]] /= _LN2
            total[lay.offsets[-1] :] /= _LN2 * _LN2
        out = []
        for i, g in enumerate(groups):
            X, Z = g.design.X, sp.csc_matrix(g.design.Z)
            ZY = _rows(total, lay.z_rows[i])
            XY = np.stack(
                [
                    total[lay.offsets[k] + i] if how == "slot" else k @ ZY  # sum over levels
                    for how, k in lay.x_from[i]
                ]
            )
            out.append(
                SummaryStats(
                    XX=X.T @ X,
                    XY=XY,
                    ZX=np.asarray(Z.T @ X),
                    ZY=ZY,
                    ZZ=(Z.T @ Z).toarray(),
                    Ynorm=total[lay.offsets[-1] + i].copy(),
                    n=int(g.cells.size),
                )
            )
    return out


def _rows(total: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``total[rows]``: a view when the rows are consecutive (a group's random effects)."""
    if rows.size and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
        return total[rows[0] : rows[0] + rows.size]
    return total[rows]


def group_block(
    chunk: Any,
    lay: _Layout,
    rows: slice,
    *,
    is_counts: bool,
    axis: int = 0,
    start: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Return the slot sums and per-group norms of a block of ``Y``: ``(lay.n_rows, genes)``.

    ``rows`` selects the block's cells in ``lay`` (all cells for column blocks). Values are
    checked and transformed (``ln(1 + y)`` for counts) as in the ungrouped pass. With ``out``
    (``(lay.n_rows, genes)``) the sums are added to it (and it is returned).
    """
    R, Wt = lay.rows[rows], lay.weights[rows]
    if isinstance(chunk, CompressedBlock) or sp.issparse(chunk):
        if not isinstance(chunk, CompressedBlock):
            chunk = sp.csc_matrix(chunk) if axis == 1 else sp.csr_matrix(chunk)
            chunk = CompressedBlock(
                chunk.data, chunk.indices, chunk.indptr, chunk.shape, chunk.format
            )
    else:
        dense = sp.csr_matrix(np.asarray(chunk))
        chunk = CompressedBlock(dense.data, dense.indices, dense.indptr, dense.shape, "csr")
    data, indices, indptr = chunk.data, chunk.indices, chunk.indptr
    m = chunk.shape[1]
    if out is None:
        out = np.zeros((lay.n_rows, m))
    parts = [out[lay.offsets[k] : lay.offsets[k + 1]] for k in range(len(lay.offsets) - 1)]
    norms = out[lay.offsets[-1] :]
    csc = chunk.format == "csc"
    n_slots = len(parts)
    # per block: slots where every cell has a row (no mask), and weights that are all 1
    complete = np.asarray((R >= 0).all(axis=0))
    unit = np.asarray(((Wt[:, :n_slots] == 1) | (R[:, :n_slots] < 0)).all(axis=0))
    for a, b in _pieces(indptr):
        lo, hi = int(indptr[a]), int(indptr[b])
        if hi == lo:
            continue
        where = f"{'genes' if csc else 'cells'} {start + a}..{start + b - 1}"
        v = _values(
            data[lo:hi], is_counts=is_counts, where=where, start=start + a, stop=start + b,
            axis=1 if csc else 0,
        )  # fmt: skip
        counts = np.diff(indptr[a : b + 1])
        idx = indices[lo:hi]
        genes = np.repeat(np.arange(a, b, dtype=idx.dtype), counts) if csc else idx
        piece = (idx, None) if csc else (slice(a, b), counts)
        for k in range(n_slots + 1):
            part = parts[k] if k < n_slots else norms
            r = _per_value(R[:, k], *piece).astype(idx.dtype, copy=False)
            if k == n_slots:
                w = v * v
            else:
                w = v if unit[k] else v * _per_value(Wt[:, k], *piece)
            if complete[k]:
                scatter_add(part, r, genes, w)
            else:
                keep = r >= 0
                if keep.any():
                    scatter_add(part, r[keep], genes[keep], w[keep])
    return out


def _per_value(x: np.ndarray, cells: Any, counts: np.ndarray | None) -> np.ndarray:
    """Per-cell ``x`` for each stored value of a piece.

    A CSR piece (``cells`` a slice, ``counts`` values per cell) repeats each cell's entry; a
    CSC piece (``cells`` the cell of each value) gathers.
    """
    return x[cells] if counts is None else np.repeat(x[cells], counts)


def _local_grouped_pass(
    source: Any, lay: _Layout, *, is_counts: bool, size: int, n_jobs: int, progress: Any
) -> np.ndarray:
    """Pass over a local source; return the summed ``(lay.n_rows, genes)`` table.

    Row blocks are added into one table per thread (each block touches every group's rows, so
    a table per block would cost its zeroing and sum): memory is ``n_jobs`` tables, whatever
    the block size. Column blocks fill their genes' columns of one table.
    """
    m = source.shape[1]
    total_units = source.shape[source.axis]
    spans = list(source.spans(size))
    jobs = 1 if len(spans) == 1 else n_jobs
    local = threading.local()
    tables: list[np.ndarray] = []
    lock = threading.Lock()

    def read(span: tuple[int, int]) -> tuple[int, int, Any]:
        start, stop = span  # in the calling thread: one reader of a file
        return start, stop, source.read(start, stop)

    def run(args: tuple[int, int, Any]) -> np.ndarray | None:
        start, stop, chunk = args
        if source.axis == 1:
            return group_block(chunk, lay, slice(None), is_counts=is_counts, axis=1, start=start)
        table = getattr(local, "table", None)
        if table is None:
            table = local.table = np.zeros((lay.n_rows, m))
            with lock:
                tables.append(table)
        group_block(chunk, lay, slice(start, stop), is_counts=is_counts, start=start, out=table)
        return None

    columns = np.zeros((lay.n_rows, m)) if source.axis == 1 else None
    done = 0
    for (start, stop), part in zip(spans, ordered_map(run, map(read, spans), jobs), strict=True):
        if columns is not None:
            columns[:, start:stop] = part
        done += stop - start
        if progress is not None:
            progress(done, total_units)
    if columns is not None:
        return columns
    total = tables.pop(0)
    while tables:
        total += tables.pop()
    return total


def _dask_grouped_block(y, rows, weights, *, start, lay, is_counts):
    sub = _Layout(rows, weights, lay.offsets, lay.G, lay.x_from, lay.z_rows)
    y = y if sp.issparse(y) or isinstance(y, np.ndarray) else np.asarray(y)
    return group_block(y, sub, slice(None), is_counts=is_counts, start=int(start))


def _dask_grouped_pass(Y: Any, lay: _Layout, is_counts: bool, progress: Any) -> np.ndarray:
    """Run the grouped pass on Dask: blocks summed where they live (:func:`dask_row_pass`)."""
    meta = _Layout(lay.rows[:0], lay.weights[:0], lay.offsets, lay.G, lay.x_from, lay.z_rows)
    return dask_row_pass(
        Y,
        _dask_grouped_block,
        (lay.rows, lay.weights),
        rows=lay.n_rows,
        progress=progress,
        lay=meta,
        is_counts=is_counts,
    )


def _fit_groups(
    groups: list[_Group],
    stats: list[SummaryStats],
    extra: list[dict[str, Any]],
    groupby: str,
    adata: AnnData,
    opts: FitOptions,
    params: dict[str, Any],
    key: str,
    n_jobs: int,
    store_stats: bool,
) -> list[tuple[dict[str, Any], dict[str, Any]] | np.linalg.LinAlgError]:
    """Fit every group (as :func:`flashmm_de` fits all cells), ``n_jobs`` groups at a time.

    Each group is one batched :func:`~scflashmm._core.fit.lmm` call over its genes (one
    thread) and its moderation; BLAS is limited to one thread meanwhile. A group whose solver
    fails gets its ``LinAlgError`` in place of its result. The warnings of a group are
    re-issued, in the order of the groups, with its name.
    """
    local = threading.local()
    caught: list[tuple[int, Warning | str, type[Warning]]] = []

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        caught.append((getattr(local, "group", -1), message, category))

    def fit(i: int) -> tuple[dict[str, Any], dict[str, Any]] | np.linalg.LinAlgError:
        local.group = i
        group = groups[i]
        try:
            return fit_and_record(
                adata,
                stats[i],
                DesignInfo.of(group.design),
                opts,
                params,
                group.cmat,
                group.expressions,
                group_key(key, group.name),
                store_stats=store_stats,
                n_jobs=1,
                extra_tables=extra[i],
                progress=False,
            )
        except np.linalg.LinAlgError as exc:
            return exc
        finally:
            local.group = -1

    jobs = max(1, min(n_jobs, len(groups)))
    with warnings.catch_warnings(), single_threaded_blas():
        warnings.simplefilter("always")
        warnings.showwarning = show  # called in the thread that warns: tagged with its group
        results = list(ordered_map(fit, range(len(groups)), jobs, window=len(groups)))
    for i, message, category in sorted(caught, key=lambda c: c[0]):
        where = f"{groupby} = {groups[i].name!r}: " if i >= 0 else ""
        warnings.warn(f"{where}{message}", category, stacklevel=4)
    return results


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
    view_to_actual(target)
    previous = target.uns.get(key)
    if isinstance(previous, Mapping):
        for old in previous.get("varm_keys", []):
            target.varm.pop(str(old), None)
        for old in previous.get("group_keys", []):
            target.uns.pop(str(old), None)
    mapping = target.varm  # once: each access of adata.varm re-validates every entry
    for name, value in varm.items():
        mapping[name] = value
    for name, record in records.items():
        target.uns[name] = record
    target.uns[key] = top
    return target if copy else None


def is_grouped(adata: AnnData, key: str) -> bool:
    """Whether ``adata.uns[key]`` is the record of a fit with ``groupby``."""
    info = adata.uns.get(key)
    return isinstance(info, Mapping) and "group_keys" in info
