"""Threads shared by the pass over the cells and the solver: core count, BLAS limit, ordered map."""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

_BLAS_CONTROLLER: Any = None


def single_threaded_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread (if threadpoolctl is installed) while our own threads run.

    Our threads each make small or tall-skinny BLAS calls (``X'X``, batched ``p x p`` algebra);
    a multithreaded OpenBLAS on top of them oversubscribes the cores and was measured to take
    up to 1000x longer on such products when the machine's cores are busy
    (docs/benchmarks.md).
    """
    global _BLAS_CONTROLLER  # found once: finding the libraries takes ~10 ms
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn/scanpy
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    if _BLAS_CONTROLLER is False:  # pragma: no cover
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def available_cores() -> int:
    """Return the number of cores this process may use (its CPU affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def check_n_jobs(n_jobs: Any) -> int:
    """Return the number of threads: ``n_jobs``, or the cores this process may use."""
    if n_jobs is None:
        return available_cores()
    # ValueError (not check_positive_int's TypeError) also for True and other non-integers:
    # callers and tests rely on one exception type for every bad n_jobs.
    if (
        isinstance(n_jobs, bool)
        or not isinstance(n_jobs, (int, float, np.integer, np.floating))
        or not np.isfinite(n_jobs)
        or int(n_jobs) != n_jobs
        or n_jobs < 1
    ):
        msg = f"n_jobs must be a positive integer, got {n_jobs!r}."
        raise ValueError(msg)
    return int(n_jobs)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], n_jobs: int, *, window: int | None = None
) -> Iterator[R]:
    """``fn`` over ``items`` in ``n_jobs`` threads, yielding the results in the order of ``items``.

    ``items`` is drawn in the calling thread (so it may read from a file handle that is not
    thread safe), at most ``window`` (default ``n_jobs``) items ahead of the result being
    yielded, which bounds the memory held by items and results not yet consumed; a larger
    window keeps the threads busy when items take unequal times. With ``n_jobs = 1`` no thread
    is started. An error of ``fn`` is raised in the caller, and the items not yet started are
    cancelled.
    """
    if n_jobs == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(n_jobs) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) > (n_jobs if window is None else max(window, n_jobs)):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
