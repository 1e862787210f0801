"""scflashmm.tl: tools that fit models and write results into AnnData."""

from .._contrast import contrasts_within
from ._flashmm_de import flashmm_de
from ._refit import flashmm_refit

__all__ = ["contrasts_within", "flashmm_de", "flashmm_refit"]
