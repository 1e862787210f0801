"""Simulated data sets (:func:`simulate_rnaseq`, FLASHMM's ``simuRNAseq``)."""

from ._simulate import simulate_rnaseq

__all__ = ["simulate_rnaseq"]
