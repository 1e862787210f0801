"""scflashmm.get: tidy tables of results stored in AnnData."""

from ._flashmm_df import flashmm_df
from ._tables import flashmm_matrix

__all__ = ["flashmm_df", "flashmm_matrix"]
