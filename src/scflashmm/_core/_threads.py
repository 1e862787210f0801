"""Thread settings shared by the pass over the cells and the solver."""

from __future__ import annotations

import contextlib
import os
from typing import Any

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


def check_n_jobs(n_jobs: Any) -> int:
    """Return the number of threads: ``n_jobs``, or the cores this process may use."""
    if n_jobs is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(n_jobs, bool) or int(n_jobs) != n_jobs or n_jobs < 1:
        msg = f"n_jobs must be a positive integer, got {n_jobs!r}."
        raise ValueError(msg)
    return int(n_jobs)
