"""The pass over the cells: blocks of a local source in threads, or a Dask array where it lives.

Blocks of cells are processed in a thread pool (``n_jobs``) and added in block order, so the
result does not depend on the number of threads. A Dask array is reduced where its blocks
live: each block gives its partial statistics, summed by a tree reduction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._threads import ordered_map
from .blocks import block_stats
from .checks import CorruptMatrixError
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


def _dask_block(
    y: Any,
    codes: np.ndarray,
    cont: np.ndarray,
    start: np.ndarray,
    *,
    sizes: tuple[int, ...],
    is_counts: bool,
) -> np.ndarray:
    """Partial statistics of one Dask block of cells, shaped (1, rows, genes) for the tree sum."""
    codes = np.ascontiguousarray(codes.T)
    out = block_stats(y, codes, cont, sizes, is_counts=is_counts, axis=0, start=int(start[0]))
    return out[None]


def _dask_pass(
    Y: Any,
    plan: DesignPlan,
    *,
    is_counts: bool,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    import dask.array as da

    dtype = getattr(Y, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "biuf":
        msg = f"Y must be numeric, got dtype {dtype}."
        raise ValueError(msg)
    # the per-cell design arrays, cut like the cells of Y, and the first cell of each block
    rows = Y.chunks[0]
    codes = da.from_array(plan.codes.T, chunks=(rows, plan.codes.shape[0]))
    cont = da.from_array(plan.cont, chunks=(rows, plan.cont.shape[1]))
    starts = da.from_array(np.cumsum((0, *rows[:-1])), chunks=1)
    blocks = da.blockwise(
        _dask_block,
        "ikj",
        Y,
        "ij",
        codes,
        "ia",
        cont,
        "ib",
        starts,
        "i",
        new_axes={"k": plan.rows},
        adjust_chunks={"i": 1},
        align_arrays=False,
        concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0), dtype=np.float64),
        sizes=tuple(plan.sizes),
        is_counts=is_counts,
    )
    return reduce_dask_blocks(blocks, rows, progress)


def reduce_dask_blocks(
    blocks: Any, rows: tuple[int, ...], progress: Callable[[int, int], None] | None
) -> np.ndarray:
    """Sum the per-block partial statistics ``(blocks, rows, genes)`` of a Dask pass.

    With ``progress``, ``progress(done, total)`` is called with the cells of the blocks done so
    far: on a ``dask.distributed`` client (the active one: ``Client(...)`` or ``with
    client.as_current()``) the blocks are summed in about 20 batches submitted at once and
    reported as they finish; on Dask's local schedulers a callback counts finished blocks.
    """
    if progress is None:
        return np.asarray(blocks.sum(axis=0).compute())
    total = int(sum(rows))
    client = _distributed_client()
    if client is not None:
        from distributed import as_completed

        step = max(1, -(-len(rows) // 20))
        cuts = list(range(0, len(rows), step))
        parts = [blocks[a : a + step].sum(axis=0) for a in cuts]
        cells = {i: int(sum(rows[a : a + step])) for i, a in enumerate(cuts)}
        futures = client.compute(parts)
        index = {f.key: i for i, f in enumerate(futures)}
        out, done = None, 0
        for future in as_completed(futures):
            part = np.asarray(future.result())
            out = part if out is None else out + part
            done += cells[index[future.key]]
            progress(done, total)
        return out
    from dask.callbacks import Callback

    name = blocks.name
    done = [0]

    def posttask(key, result, dsk, state, worker_id):
        if isinstance(key, tuple) and key[0] == name:
            done[0] += int(rows[key[1]])
            progress(done[0], total)

    with Callback(posttask=posttask):  # unfused, so that the blocks keep their keys
        return np.asarray(blocks.sum(axis=0).compute(optimize_graph=False))


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
