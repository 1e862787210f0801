"""scflashmm: single-cell differential expression with mixed models fit from summary statistics.

The Python home of the method of the R package FLASHMM (Xu et al.): summary statistics are
accumulated in one pass over the cells, then REML/ML is fit by Fisher scoring for every gene.
"""

from . import datasets, get, pl, tl
from ._core.fit import lmm, lmm_fit
from ._core.lmmfit import ConvergenceWarning, DegenerateFeatureWarning, LMMFit
from ._core.sumstats import SummaryStats, summary_stats
from ._lmm_test import contrast_matrix, lmm_test

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "DegenerateFeatureWarning",
    "LMMFit",
    "SummaryStats",
    "contrast_matrix",
    "datasets",
    "get",
    "lmm",
    "lmm_fit",
    "lmm_test",
    "pl",
    "summary_stats",
    "tl",
]
