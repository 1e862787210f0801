"""The pass over the cells: blocks of a local source in threads, or a Dask array where it lives.

Blocks of cells are processed in a thread pool (``n_jobs``) and added in block order, so the
result does not depend on the number of threads. A Dask array is reduced where its blocks
live: each task gives the partial statistics of a run of consecutive blocks, and a tree of
in-order sums adds them on the workers (:func:`dask_row_pass`; docs/benchmarks.md, T9).
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._threads import ordered_map
from .blocks import block_stats
from .checks import DEFAULT_CHUNK_SIZE, CorruptMatrixError
from .plan import DesignPlan
from .sources import CompressedBlock, Source


def _local_pass(
    source: Source,
    plan: DesignPlan,
    *,
    is_counts: bool,
    size: int,
    n_jobs: int,
    progress: Callable[[int, int], None] | None,
    shift: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Packed statistics of a local source, its blocks summed (or placed) in block order.

    With ``shift``, a dense source (blocks of cells) gives the statistics of ``y - c`` with
    ``c`` the mean of each gene over the first block (0 for a sparse source, where a shift
    would densify); returns the packed statistics and ``c`` (or None, unshifted).
    """
    n, m = source.shape
    total_units = n if source.axis == 0 else m
    spans = list(source.spans(size))

    def read(span: tuple[int, int]) -> tuple[int, Any, np.ndarray, np.ndarray]:
        # in the calling thread (ordered_map draws its items there): one reader of a file
        start, stop = span
        chunk = source.read(start, stop)
        if source.axis == 0:
            return start, chunk, plan.codes[:, start:stop], plan.cont[start:stop]
        return start, chunk, plan.codes, plan.cont

    items = map(read, spans)
    c = None
    if shift and source.axis == 0 and spans:
        first = read(spans[0])
        c = dense_shift(first[1], is_counts=is_counts)
        items = itertools.chain([first], map(read, spans[1:]))
    total = np.zeros((plan.rows + (c is not None), m))

    def run(args: tuple[int, Any, np.ndarray, np.ndarray]) -> np.ndarray:
        start, chunk, codes, cont = args
        try:
            return block_stats(
                chunk,
                codes,
                cont,
                plan.sizes,
                is_counts=is_counts,
                axis=source.axis,
                start=start,
                shift=c,
            )
        except CorruptMatrixError as exc:
            if not source.label or source.label in str(exc):
                raise
            msg = f"{str(exc).rstrip('.')}{source.label}."
            raise CorruptMatrixError(msg) from exc

    jobs = 1 if len(spans) == 1 else n_jobs
    done = 0
    results = ordered_map(run, items, jobs)
    for (start, stop), result in zip(spans, results, strict=True):
        if source.axis == 0:
            total += result
        else:
            total[:, start:stop] = result
        done += stop - start
        if progress is not None:
            progress(done, total_units)
    return total, c


#: Cells of the first block that choose the shift (their mean) and whether to shift at all.
SHIFT_CELLS = 1024
#: Shift when some gene's squared mean exceeds this many times its variance there: its squared
#: norm would then lose more than 4 of float64's 16 digits to the mean (docs/model.md, Offsets).
SHIFT_RATIO = 1e4


def dense_shift(chunk: Any, *, is_counts: bool) -> np.ndarray | None:
    """Return the shift of each gene for a dense source, or None for no shift.

    The shift is each gene's mean over the first :data:`SHIFT_CELLS` cells of ``chunk`` (the
    first block), used only if some gene's mean is large against its spread there
    (:data:`SHIFT_RATIO`): typical data are not shifted, and pay nothing. None also for a
    sparse block, an empty one or non-numeric values (the block kernels report those); a gene
    with a non-finite value gets no shift (the kernels report it).
    """
    if sp.issparse(chunk) or isinstance(chunk, CompressedBlock):
        return None
    values = np.asarray(chunk[:SHIFT_CELLS])
    if values.ndim != 2 or values.shape[0] == 0 or values.dtype.kind not in "biuf":
        return None
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        values = values.astype(np.float64)
        if is_counts:
            values = np.log1p(values, out=values)
        c = values.mean(axis=0)
        ok = np.isfinite(c)
        c[~ok] = 0.0
        var = np.mean((values - c) ** 2, axis=0)
        large = ok & (c * c > SHIFT_RATIO * var)
    return c if large.any() else None


#: A task of the Dask pass covers consecutive blocks of cells until it has at least this many
#: cells per row of its result. The result (rows x genes) is allocated, sent and summed once per
#: task whatever the number of cells, so small blocks (``read_elem_lazy`` defaults to 1,000
#: cells) cost more in results than in reading (docs/benchmarks.md, T9).
CELLS_PER_RESULT_ROW = 16

#: Results added by one task of the tree reduction of a Dask pass.
SPLIT_EVERY = 8


def _dask_block(
    y: Any,
    codes: np.ndarray,
    cont: np.ndarray,
    *,
    start: int,
    sizes: tuple[int, ...],
    is_counts: bool,
) -> np.ndarray:
    """Packed partial statistics of one Dask block of cells (``codes`` is cells x groups)."""
    codes = np.ascontiguousarray(codes.T)
    return block_stats(y, codes, cont, sizes, is_counts=is_counts, axis=0, start=start)


def _dask_pass(
    Y: Any,
    plan: DesignPlan,
    *,
    is_counts: bool,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Packed statistics of a Dask array of cells x genes (see :func:`dask_row_pass`)."""
    return dask_row_pass(
        Y,
        _dask_block,
        (plan.codes.T, plan.cont),
        rows=plan.rows,
        progress=progress,
        sizes=tuple(plan.sizes),
        is_counts=is_counts,
    )


def dask_row_pass(
    Y: Any,
    block: Callable[..., np.ndarray],
    per_cell: tuple[np.ndarray, ...],
    *,
    rows: int,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Sum ``block`` over the blocks of cells of a Dask array, where the blocks live.

    Parameters
    ----------
    Y
        Dask array, cells x genes, of numeric numpy or scipy.sparse blocks.
    block
        ``block(y, *slices, start=first cell, **kwargs)`` returns the ``(rows, genes of y)``
        partial result of one block ``y`` of Y; ``slices`` are those of ``per_cell`` for its
        cells. It must be importable by the workers (a module-level function).
    per_cell
        Arrays with one row per cell (e.g. the design codes): each task carries only its own
        cells' rows, so nothing of size n is sent to every worker.
    rows
        Rows of the result of ``block``.
    progress
        ``progress(done, total)`` with the cells done so far: on a ``dask.distributed`` client
        (``Client(...)`` or ``with client.as_current()``) as the tasks finish; on Dask's local
        schedulers a callback counts them.
    **kwargs
        Passed to ``block`` (pickled once per task: keep them small).

    Returns
    -------
    The ``(rows, genes)`` sum, computed by the active Dask scheduler.

    Notes
    -----
    One task covers consecutive blocks of cells until it has ``CELLS_PER_RESULT_ROW * rows``
    cells; small blocks are stacked into pieces of up to ``DEFAULT_CHUNK_SIZE`` cells, whose
    results are added in place (larger blocks are used as they are). Each column block of Y
    is reduced apart by a tree whose tasks add ``SPLIT_EVERY`` results in cell order, and the
    columns are put together at the end: the sum does not depend on the scheduler, the number
    of workers or ``progress``.
    """
    dtype = getattr(Y, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "biuf":
        msg = f"Y must be numeric, got dtype {dtype}."
        raise ValueError(msg)
    cells = tuple(int(c) for c in Y.chunks[0])
    first = np.cumsum((0, *cells))
    runs = _runs(cells, CELLS_PER_RESULT_ROW * rows)
    keys = Y.__dask_keys__()
    name = f"flashmm-blocks-{uuid.uuid4().hex}"
    run_block = functools.partial(_run_blocks, block, **kwargs)
    layer: dict[Any, Any] = {}
    leaves: list[list[Any]] = []
    leaf_cells: dict[Any, int] = {}
    for j in range(len(Y.chunks[1])):
        leaves.append([])
        for r, (a, b) in enumerate(runs):
            lo, hi = int(first[a]), int(first[b])
            slices = [np.ascontiguousarray(x[lo:hi]) for x in per_cell]
            layer[(name, r, j)] = (
                run_block,
                [int(c) for c in first[a:b]],
                [keys[i][j] for i in range(a, b)],
                *slices,
            )
            leaves[j].append((name, r, j))
            leaf_cells[(name, r, j)] = hi - lo
    return _tree_total(Y, layer, leaves, leaf_cells, progress)


def _tree_total(
    Y: Any,
    layer: dict[Any, Any],
    leaves: list[list[Any]],
    leaf_cells: dict[Any, int],
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    """Compute the sum of the results ``leaves[j]`` of each column block j, put side by side.

    ``layer`` holds the tasks of the leaves (on top of Y's graph); a tree whose tasks add
    ``SPLIT_EVERY`` results in order is added, and the total computed by the active scheduler.
    With ``progress``, ``progress(done, total)`` counts the cells (``leaf_cells``, each
    counted once over the column blocks) of the finished leaves.
    """
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph

    name = f"flashmm-sum-{uuid.uuid4().hex}"
    tops = []
    for j, level in enumerate(leaves):
        depth = 0
        while len(level) > 1:
            up = []
            for g in range(0, len(level), SPLIT_EVERY):
                key = (name, depth, g // SPLIT_EVERY, j)
                layer[key] = (_sum_in_order, level[g : g + SPLIT_EVERY])
                up.append(key)
            level, depth = up, depth + 1
        tops.append(level[0])
    final = (name, "total")
    layer[final] = (_hstack, tops)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[Y])
    total = Delayed(final, graph, layer=name)
    if progress is None:
        return np.asarray(total.compute())
    scale = len(leaves)
    n_cells = sum(leaf_cells.values()) // scale
    client = _distributed_client()
    if client is not None:
        from distributed import as_completed

        futures = client.compute([*(Delayed(k, graph, layer=name) for k in leaf_cells), total])
        result = futures.pop()
        finished = as_completed(futures)
        futures.clear()  # a leaf's result is released once counted and summed
        done = 0
        for future in finished:
            done += leaf_cells[future.key]
            progress(done // scale, n_cells)
        return np.asarray(result.result())
    from dask.callbacks import Callback

    done = [0]

    def posttask(key, result, dsk, state, worker_id):
        if key in leaf_cells:
            done[0] += leaf_cells[key]
            progress(done[0] // scale, n_cells)

    with Callback(posttask=posttask):  # unoptimised, so that the tasks keep their keys
        return np.asarray(total.compute(optimize_graph=False))


def _runs(cells: tuple[int, ...], target: int) -> list[tuple[int, int]]:
    """Cut the blocks into runs ``[a, b)`` of at least ``target`` cells (but the last)."""
    runs, a, count = [], 0, 0
    for i, c in enumerate(cells):
        count += c
        if count >= target:
            runs.append((a, i + 1))
            a, count = i + 1, 0
    if a < len(cells):
        runs.append((a, len(cells)))
    return runs


def _run_blocks(
    block: Callable[..., np.ndarray],
    starts: list[int],
    ys: list[Any],
    *slices: np.ndarray,
    **kwargs: Any,
) -> np.ndarray:
    """One task: the results of consecutive blocks of cells, added in place in cell order.

    A block call has a fixed cost of the order of its result (rows x genes), so small blocks
    are stacked (a copy of their values) into pieces of up to ``DEFAULT_CHUNK_SIZE`` cells,
    the working memory of a chunk of the local pass, and each piece is processed at once.
    """
    out, i = None, 0
    while i < len(ys):
        k, cells = i + 1, ys[i].shape[0]
        while k < len(ys) and cells + ys[k].shape[0] <= DEFAULT_CHUNK_SIZE:
            cells += ys[k].shape[0]
            k += 1
        lo = starts[i] - starts[0]
        part = block(
            _stack(ys[i:k]),
            *(x[lo : lo + cells] for x in slices),
            start=starts[i],
            **kwargs,
        )
        if out is None:
            out = part
        else:
            out += part
        i = k
    return out


def _stack(ys: list[Any]) -> Any:
    """Stack blocks of cells (sparse blocks into one CSR)."""
    if len(ys) == 1:
        return ys[0]
    if all(sp.issparse(y) for y in ys):
        return sp.vstack(ys, format="csr")
    return np.concatenate([np.asarray(y) for y in ys])


def _sum_in_order(parts: list[np.ndarray]) -> np.ndarray:
    """Add results in their order (a tree task of a Dask pass)."""
    out = np.array(parts[0], dtype=np.float64, copy=True)
    for part in parts[1:]:
        out += part
    return out


def _hstack(parts: list[np.ndarray]) -> np.ndarray:
    """Put the sums of the column blocks (the last axis) together."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


def _distributed_client() -> Any:
    """Return the active ``dask.distributed`` client, or None (also without distributed)."""
    try:
        from distributed import default_client
    except ImportError:
        return None
    try:
        return default_client()
    except ValueError:
        return None
