"""Former home of the solver, kept so that ``from scflashmm._core.reml import ...`` still works.

The solver now lives in :mod:`scflashmm._core.fit` (the driver of a fit),
:mod:`scflashmm._core.scoring` (Fisher scoring) and :mod:`scflashmm._core.kernels`.
"""

from ._options import DfMethod, Method
from .fit import ConvergenceWarning, DegenerateFeatureWarning, LMMFit, lmm, lmm_fit

__all__ = [
    "ConvergenceWarning",
    "DegenerateFeatureWarning",
    "DfMethod",
    "LMMFit",
    "Method",
    "lmm",
    "lmm_fit",
]
