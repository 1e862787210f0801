"""scflashmm: single-cell differential expression with linear mixed models fit from summary statistics.

The Python home of the method of the R package FLASHMM (Xu et al.): summary statistics are
accumulated in one pass over the cells, then REML/ML is fit by Fisher scoring for every gene.
"""

from . import datasets, get, pl, tl
from ._core.reml import LMMFit
from ._core.sumstats import SummaryStats
from ._lowlevel import contrast_matrix, lmm, lmm_fit, lmm_test, summary_stats

__version__ = "0.1.0"

__all__ = [
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
