"""Kernels of the Fisher-scoring solver, and the choice between them.

:class:`~.base.Kernel` is the interface; :class:`~.eigen.EigenKernel` serves one random
component in O(q) per gene, :class:`~.dense.DenseKernel` any number of components.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .._options import check_choice
from ..stats import SummaryStats
from .base import FixedEffects, GeneState, Kernel
from .dense import DenseKernel
from .eigen import EigenKernel

KernelChoice = Literal["auto", "eigen", "dense"]

__all__ = [
    "DenseKernel",
    "EigenKernel",
    "FixedEffects",
    "GeneState",
    "Kernel",
    "KernelChoice",
    "select_kernel",
]


def select_kernel(
    stats: SummaryStats,
    d: tuple[int, ...],
    zrz: np.ndarray,
    method: str,
    *,
    kernel: KernelChoice = "auto",
) -> Kernel:
    """Return the kernel for ``k = len(d)`` components (``"auto"``: eigen when ``k = 1``).

    Parameters
    ----------
    stats
        Summary statistics.
    d
        Component sizes ``(q_1 .. q_k)``.
    zrz
        ``Z'RZ``: ``ZZ`` reduced by the fixed effects (q, q).
    method
        ``"REML"`` or ``"ML"``.
    kernel
        ``"auto"``, or a forced ``"eigen"`` (one component only) or ``"dense"``.

    Returns
    -------
    The kernel, set up for all genes of ``stats``.
    """
    check_choice(kernel, "kernel", KernelChoice)
    if kernel == "eigen" and len(d) != 1:
        msg = f"The eigen kernel fits one random component; got k = {len(d)}."
        raise ValueError(msg)
    if kernel == "eigen" or (kernel == "auto" and len(d) == 1):
        return EigenKernel(stats, zrz, method)
    return DenseKernel(stats, d, zrz, method)
