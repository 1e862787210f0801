"""The interface between the Fisher-scoring driver and a kernel, and the shared GLS step.

A kernel evaluates, for a block of genes at once, every quantity of the restricted (REML) or
full (ML) log-likelihood that the driver needs, from the summary statistics reduced by the
fixed effects (docs/model.md, Fisher scoring). Its per-gene data live in a typed *state*
(a dataclass of arrays whose first axis is the gene); the kernel itself holds only what all
genes share (designs, eigenbases). ``theta = (s_1 .. s_k, s_0)``, residual last, is passed as
``s`` (genes, k + 1).

Adding a kernel (a structured random-effects covariance, a sparse ``q x q`` algebra) is one new
module with a subclass of :class:`Kernel`, and a line in
:func:`scflashmm._core.kernels.select_kernel`.
The driver (:mod:`scflashmm._core.scoring`) and the degrees of freedom
(:mod:`scflashmm._core.satterthwaite`) use only the methods below.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np


@dataclass(frozen=True)
class GeneState:
    """Per-gene data of a kernel: every field is an array whose first axis is the gene."""

    #: ``y'Ry``: sum of squares of each gene after the fixed effects (genes,).
    yry: np.ndarray


State = TypeVar("State", bound=GeneState)


@dataclass(frozen=True)
class FixedEffects:
    """Generalised least-squares estimates at ``theta`` for a block of genes."""

    coef: np.ndarray  #: (genes, p)
    se: np.ndarray  #: (genes, p)
    cov: np.ndarray  #: covariance of coef (genes, p, p)
    fim_beta: np.ndarray | None = None  #: Fisher information of coef (genes, p, p)
    re: np.ndarray | None = None  #: BLUPs of the random effects (genes, q)


class Kernel(ABC, Generic[State]):
    """Score, information and estimates of a linear mixed model for a block of genes."""

    #: Number of random components ``k``; ``theta`` has ``k + 1`` entries.
    k: int

    @abstractmethod
    def prepare(self, zry: np.ndarray, yry: np.ndarray) -> State:
        """Per-gene state from ``Z'Ry`` (genes, q) and ``y'Ry`` (genes,)."""

    def subset(self, state: State, rows: np.ndarray) -> State:
        """Return the state of the genes ``rows`` of a block."""
        fields = {f.name: getattr(state, f.name)[rows] for f in dataclasses.fields(state)}
        return dataclasses.replace(state, **fields)

    @abstractmethod
    def score_information(self, state: State, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score ``dl`` (genes, k + 1) and Fisher information ``fim`` (genes, k + 1, k + 1)."""

    @abstractmethod
    def residual_variance(self, state: State, s: np.ndarray) -> np.ndarray:
        """``s_0`` that maximises the likelihood at the ratios ``s_i / s_0`` of ``s`` (genes,)."""

    @abstractmethod
    def logdet(self, state: State, s: np.ndarray) -> np.ndarray:
        """``log det M0`` (genes,): the log-likelihood's determinant term beyond ``s_0``."""

    @abstractmethod
    def fixed_effects(
        self,
        s: np.ndarray,
        XY: np.ndarray,
        ZY: np.ndarray,
        *,
        output_re: bool,
        output_fim: bool,
    ) -> FixedEffects:
        """GLS estimates from ``X'y`` (genes, p) and ``Z'y`` (genes, q) at ``s``."""

    @abstractmethod
    def satterthwaite_parts(self, state: State, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Quadratic term of the observed information and ``d(X'V^-1X)/ds_i``.

        The first is (genes, k + 1, k + 1), the second (genes, k, p, p), one per component.
        The observed information is the quadratic term minus the Fisher information
        (:mod:`scflashmm._core.satterthwaite`).
        """


def gls(xvx: np.ndarray, rhs: np.ndarray, s0: np.ndarray, *, output_fim: bool) -> FixedEffects:
    """Generalised least squares from ``xvx = X' V^-1 X s0`` and ``rhs = X' V^-1 y s0``."""
    C = batched_inverse(xvx)
    coef = np.einsum("gij,gj->gi", C, rhs)
    cov = (C + C.transpose(0, 2, 1)) * (s0[:, None, None] / 2)
    fim = (xvx + xvx.transpose(0, 2, 1)) / (2 * s0[:, None, None]) if output_fim else None
    return FixedEffects(coef, np.sqrt(np.diagonal(cov, axis1=1, axis2=2)), cov, fim)


def batched_inverse(A: np.ndarray) -> np.ndarray:
    """Inverse of each matrix of a stack; the pseudo-inverse (as FLASHMM's ginv) where singular."""
    try:
        return np.linalg.inv(A)
    except np.linalg.LinAlgError:
        out = np.full_like(A, np.nan)
        finite = np.isfinite(A).all(axis=(1, 2))
        out[finite] = np.linalg.pinv(A[finite])
        return out
