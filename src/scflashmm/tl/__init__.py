"""scflashmm.tl: tools that fit models and write results into AnnData."""

from ._flashmm_de import flashmm_de

__all__ = ["flashmm_de"]
