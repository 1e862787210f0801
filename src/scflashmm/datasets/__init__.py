"""Simulated data sets (:func:`simulate_rnaseq`, FLASHMM's ``simuRNAseq``)."""

from ._simulate import VarianceDistribution, simulate_rnaseq

__all__ = ["VarianceDistribution", "simulate_rnaseq"]
