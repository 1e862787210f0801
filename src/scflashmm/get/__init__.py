"""scflashmm.get: tidy tables of results stored in AnnData."""

from ._flashmm_df import flashmm_df

__all__ = ["flashmm_df"]
