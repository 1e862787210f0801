"""REML/ML for structured random effects (lme4's family), every gene at once.

Model per gene: ``y = X beta + Z b + e``, ``b ~ N(0, G)``, ``e ~ N(0, s0 I)``, with ``G`` from a
:class:`~scflashmm._core.structure.CovarianceStructure`: block-diagonal over terms, each term
``I_L kron Sigma_t`` with ``Sigma_t = L_t L_t'`` positive semi-definite.

Only the summary statistics are used. REML is the likelihood of the residuals after the fixed
effects: with ``R = I - X (X'X)^-1 X'`` it is an ML problem in ``n' = n - p`` observations with
``Z'RZ`` (``zrz``), ``Z'Ry`` (``zry``) and ``y'Ry`` (``yry``); ML uses ``Z'Z`` in the traces.
With ``D = G / s0``, ``M = (I + D T)^-1`` (``T = zrz`` for REML, ``Z'Z`` for ML):

- ``log|V| = n' log s0 + log|I + D T|`` and ``y'V^-1y = (yry - zry' M D zry) / s0``;
- the score in the linear parameters ``gamma`` (entries of the ``Sigma_t``, then ``s0``) is
  ``(u'E_j u - tr(E_j W) / s0) / 2`` with ``u = M' zry / s0``, ``W = T M`` and ``E_j`` the
  symmetric unit pattern of entry ``j`` repeated over the term's levels; the expected information
  is ``tr(E_j W E_k W) / (2 s0^2)`` (and ``tr(E_j W M)``, ``n' - q + tr(M M)`` with ``s0``).

Fisher scoring runs on the Cholesky entries ``L_t`` (chain rule ``J' dl``, ``J' F J``), so that
every iterate is positive semi-definite, with a step-halving line search on the log-likelihood
and an active set for Cholesky diagonals that reach zero (a singular fit, lme4's boundary),
released again when the likelihood increases along them.

Scoring starts from one Fisher step in ``(gamma, s0)`` from lme4's start (made positive
definite), and takes the score and information of the next pass from the line search's first
(full) step, so that a pass costs one factorisation.

Modules: :mod:`.problem` (dense algebra), :mod:`.block` (block-diagonal ``Z'Z``),
:mod:`.nested` (closed forms for ``(1 | a) + (1 | a:b)``), :mod:`.schur` (large ``q``: a
Schur complement on one large scalar term), :mod:`.scoring` (the Fisher-scoring driver and the
choice of algebra) and :mod:`.driver`
(:func:`scflashmm.lmm`'s entry, blocks of genes, inference on the variances).
"""

from .block import zz_blocks
from .driver import (
    BLOCK_MIN_Q,
    StructuredLMMFit,
    check_memory,
    dispatch_structure,
    lmm_structured,
)
from .problem import _Problem
from .schur import SCHUR_MIN_Q
from .scoring import StructuredFit, fit_structured

__all__ = [
    "BLOCK_MIN_Q",
    "SCHUR_MIN_Q",
    "StructuredFit",
    "StructuredLMMFit",
    "_Problem",
    "check_memory",
    "dispatch_structure",
    "fit_structured",
    "lmm_structured",
    "zz_blocks",
]
