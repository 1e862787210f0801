"""The Fisher-scoring driver: iterates a :class:`~.kernels.Kernel` for a block of genes.

Unconstrained, as in FLASHMM (docs/model.md, Fisher scoring): a variance component may become
negative. A constrained driver (variances >= 0) is a replacement for :func:`fisher_scoring` that
uses the same two kernel methods, ``score_information`` and ``residual_variance``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .kernels import Kernel


def fisher_scoring(
    kernel: Kernel[Any],
    state: Any,
    s: np.ndarray,
    *,
    max_iter: int,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fisher scoring ``s += pinv(F) dl`` for a block of genes, masking converged ones.

    As in FLASHMM a gene stops after the pass whose score (computed before that pass's update)
    falls below ``epsilon``; ``niter`` counts passes. ``s`` (genes, k + 1) is updated in place
    and returned with ``niter`` (genes,).
    """
    niter = np.zeros(s.shape[0], dtype=np.int64)
    active = np.arange(s.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        dl, fim = kernel.score_information(kernel.subset(state, active), s[active])
        s[active] += np.einsum("gij,gj->gi", pinv_small(fim), dl)
        niter[active] += 1
        # NaN scores (a diverged gene) compare False: the gene stops and is flagged later.
        active = active[np.max(np.abs(dl), axis=1) > epsilon]
    return s, niter


def pinv_small(F: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a stack of small symmetric Fisher informations (FLASHMM's ginv).

    For one component (2 x 2) the closed-form inverse equals the SVD pseudo-inverse wherever the
    matrix is well conditioned and is ~10x faster; the SVD is kept for the other rows.
    """
    if F.shape[1] != 2:
        return _pinv_finite(F)
    a, b, c = F[:, 0, 0], F[:, 0, 1], F[:, 1, 1]
    det = a * c - b * b
    scale = np.maximum(np.abs(a), np.abs(c))
    regular = np.abs(det) > 1e-8 * scale**2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.stack([np.stack([c, -b], -1), np.stack([-b, a], -1)], axis=1) / det[:, None, None]
    if not regular.all():
        inv[~regular] = _pinv_finite(F[~regular])
    return inv


def _pinv_finite(F: np.ndarray) -> np.ndarray:
    """Pseudo-inverses of the finite matrices of a stack; NaN for the others (a diverged gene)."""
    out = np.full_like(F, np.nan)
    finite = np.isfinite(F).all(axis=(1, 2))
    out[finite] = np.linalg.pinv(F[finite])
    return out
