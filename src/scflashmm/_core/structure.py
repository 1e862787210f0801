"""Covariance structure of the random effects, parameterised as lme4 does.

The random effects ``b`` (length ``q``) of ``y = X beta + Z b + e`` are split into terms; term
``t`` has ``L_t`` levels (e.g. donors) and ``n_t`` effects per level (e.g. an intercept and a
slope). Its columns of ``Z`` are level-major (for each level its ``n_t`` effects), so that

    G = blockdiag_t( I_{L_t} kron Sigma_t ),    e ~ N(0, s0 I),

with ``Sigma_t`` the ``n_t x n_t`` covariance of one level's effects: unstructured
(``correlated=True``, lme4's ``(1 + x | g)``) or diagonal (``correlated=False``).

Parameters follow lme4: ``theta`` holds, term after term, the lower-triangular Cholesky factor
``T_t`` of ``Sigma_t / s0`` column by column (for 2 x 2: ``T11, T21, T22``; only the diagonal
for a diagonal term), with diagonals ``>= 0``; ``Sigma_t = s0 T_t T_t'``. The linear
parameters ``gamma`` are the entries of the ``Sigma_t`` in the same order (variances and
covariances, absolute). FLASHMM's independent components ``d = (q_1 .. q_k)`` are the special
case of ``k`` terms with one effect each (:meth:`CovarianceStructure.from_d`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CovarianceStructure", "RandomTermStructure"]


@dataclass(frozen=True)
class RandomTermStructure:
    """One random-effects term: ``n_levels`` independent copies of an ``n_t``-vector.

    Attributes
    ----------
    group
        Name of the grouping factor (``"donor"``, ``"donor:sample"``).
    n_levels
        Number of levels ``L_t`` of the grouping factor.
    effects
        Names of the effects per level (``("(Intercept)", "time")``), ``n_t`` of them.
    correlated
        Unstructured ``Sigma_t`` (True) or diagonal (False).
    """

    group: str
    n_levels: int
    effects: tuple[str, ...]
    correlated: bool = True

    def __post_init__(self) -> None:
        if int(self.n_levels) < 1 or len(self.effects) < 1:
            msg = f"Term {self.group!r} needs at least one level and one effect."
            raise ValueError(msg)
        object.__setattr__(self, "effects", tuple(str(e) for e in self.effects))
        object.__setattr__(self, "n_levels", int(self.n_levels))

    @property
    def n_effects(self) -> int:
        """Effects per level ``n_t``."""
        return len(self.effects)

    @property
    def q(self) -> int:
        """Columns of ``Z`` of this term, ``L_t n_t``."""
        return self.n_levels * self.n_effects

    @property
    def entries(self) -> list[tuple[int, int]]:
        """``(row, column)`` of each parameter in ``T_t`` / ``Sigma_t``, lme4's order."""
        n = self.n_effects
        if not self.correlated:
            return [(a, a) for a in range(n)]
        return [(a, b) for b in range(n) for a in range(b, n)]

    @property
    def n_theta(self) -> int:
        """Number of parameters of this term."""
        return len(self.entries)


@dataclass(frozen=True)
class CovarianceStructure:
    """Block-diagonal covariance ``G`` of the random effects, term by term.

    Attributes
    ----------
    terms
        The terms, in the order of the columns of ``Z``.

    Notes
    -----
    ``theta`` (see the module docstring) is lme4's ``getME(fit, "theta")``; ``gamma`` are the
    absolute variances and covariances in the same order, which :meth:`varcorr_names` names as
    lme4's ``VarCorr`` does (``"donor: (Intercept)"``, ``"donor: time"``, and
    ``"donor: cov((Intercept), time)"`` or, for correlations, ``"donor: corr((Intercept), time)"``).
    Methods taking parameters accept any leading batch axes (e.g. genes first).
    """

    terms: tuple[RandomTermStructure, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms:
            msg = "A covariance structure needs at least one term."
            raise ValueError(msg)

    @classmethod
    def from_d(cls, d: Sequence[int], names: Sequence[str] | None = None) -> CovarianceStructure:
        """FLASHMM's independent components: ``k`` terms ``s_i I_{q_i}``.

        Parameters
        ----------
        d
            Sizes ``(q_1 .. q_k)`` of the components.
        names
            Names of the components (default ``"Z1" .. "Zk"``).
        """
        names = [f"Z{i + 1}" for i in range(len(d))] if names is None else list(names)
        if len(names) != len(d):
            msg = f"names has {len(names)} entries for {len(d)} components."
            raise ValueError(msg)
        return cls(
            tuple(
                RandomTermStructure(n, int(k), ("(Intercept)",))
                for n, k in zip(names, d, strict=True)
            )
        )

    # ----------------------------------------------------------------- sizes and names

    @property
    def q(self) -> int:
        """Total number of random effects (columns of ``Z``)."""
        return sum(t.q for t in self.terms)

    @property
    def n_theta(self) -> int:
        """Number of covariance parameters (without the residual variance)."""
        return sum(t.n_theta for t in self.terms)

    @property
    def offsets(self) -> np.ndarray:
        """First column of each term in ``Z`` (and ``q`` at the end)."""
        return np.cumsum([0, *(t.q for t in self.terms)])

    @property
    def theta_offsets(self) -> np.ndarray:
        """First parameter of each term in ``theta`` (and ``n_theta`` at the end)."""
        return np.cumsum([0, *(t.n_theta for t in self.terms)])

    @property
    def d(self) -> tuple[int, ...] | None:
        """FLASHMM's ``d`` if every term has one effect, else None."""
        if all(t.n_effects == 1 for t in self.terms):
            return tuple(t.q for t in self.terms)
        return None

    def theta_names(self) -> list[str]:
        """lme4's names of ``theta`` (``"donor.(Intercept)"``, ``"donor.time.(Intercept)"``)."""
        out = []
        for t in self.terms:
            for a, b in t.entries:
                ea, eb = t.effects[a], t.effects[b]
                out.append(f"{t.group}.{ea}" if a == b else f"{t.group}.{ea}.{eb}")
        return out

    def varcorr_names(self, *, correlation: bool = True) -> list[str]:
        """Names of the variance parameters, lme4 ``VarCorr``-like.

        Parameters
        ----------
        correlation
            Name off-diagonal entries ``corr(a, b)`` (True) or ``cov(a, b)`` (False).
        """
        kind = "corr" if correlation else "cov"
        out = []
        for t in self.terms:
            for a, b in t.entries:
                ea, eb = t.effects[a], t.effects[b]
                out.append(f"{t.group}: {ea}" if a == b else f"{t.group}: {kind}({eb}, {ea})")
        return out

    def lower_bounds(self) -> np.ndarray:
        """Lower bounds of ``theta``: 0 on the Cholesky diagonals, ``-inf`` elsewhere."""
        return np.array([0.0 if a == b else -np.inf for t in self.terms for a, b in t.entries])

    # ----------------------------------------------------------------- conversions

    def cholesky_factors(self, theta: np.ndarray) -> list[np.ndarray]:
        """Return the ``T_t`` (..., n_t, n_t) of each term from ``theta`` (..., n_theta)."""
        theta = np.asarray(theta, dtype=float)
        self._check_last(theta, self.n_theta, "theta")
        out = []
        for t, lo in zip(self.terms, self.theta_offsets[:-1], strict=True):
            T = np.zeros((*theta.shape[:-1], t.n_effects, t.n_effects))
            for k, (a, b) in enumerate(t.entries):
                T[..., a, b] = theta[..., lo + k]
            out.append(T)
        return out

    def covariance_blocks(
        self, theta: np.ndarray, sigma2: np.ndarray | float = 1.0
    ) -> list[np.ndarray]:
        """``Sigma_t = sigma2 T_t T_t'`` (..., n_t, n_t) of each term."""
        s = np.asarray(sigma2, dtype=float)[..., None, None]
        return [s * (T @ np.swapaxes(T, -1, -2)) for T in self.cholesky_factors(theta)]

    def gamma_from_blocks(self, blocks: Sequence[np.ndarray]) -> np.ndarray:
        """Entries of the ``Sigma_t`` in ``theta`` order (..., n_theta)."""
        cols = [B[..., a, b] for t, B in zip(self.terms, blocks, strict=True) for a, b in t.entries]
        return np.stack(cols, axis=-1)

    def blocks_from_gamma(self, gamma: np.ndarray) -> list[np.ndarray]:
        """Symmetric ``Sigma_t`` (..., n_t, n_t) from their entries ``gamma`` (..., n_theta)."""
        gamma = np.asarray(gamma, dtype=float)
        self._check_last(gamma, self.n_theta, "gamma")
        out = []
        for t, lo in zip(self.terms, self.theta_offsets[:-1], strict=True):
            S = np.zeros((*gamma.shape[:-1], t.n_effects, t.n_effects))
            for k, (a, b) in enumerate(t.entries):
                S[..., a, b] = S[..., b, a] = gamma[..., lo + k]
            out.append(S)
        return out

    def theta_from_gamma(self, gamma: np.ndarray, sigma2: np.ndarray | float) -> np.ndarray:
        """lme4's ``theta`` from absolute covariances (positive semi-definite ``Sigma_t``).

        Singular blocks get a Cholesky factor with zero diagonals where the pivot vanishes.
        """
        s = np.asarray(sigma2, dtype=float)
        blocks = self.blocks_from_gamma(gamma)
        factors = [_psd_cholesky(B / s[..., None, None]) for B in blocks]
        cols = [
            T[..., a, b] for t, T in zip(self.terms, factors, strict=True) for a, b in t.entries
        ]
        return np.stack(cols, axis=-1)

    def varcorr(
        self, theta: np.ndarray, sigma2: np.ndarray | float, *, correlation: bool = True
    ) -> np.ndarray:
        """Variances and correlations (or covariances) in the order of :meth:`varcorr_names`.

        Parameters
        ----------
        theta
            lme4's ``theta`` (..., n_theta).
        sigma2
            Residual variance (...).
        correlation
            Off-diagonal entries as correlations (True; NaN where a variance is 0) or
            covariances (False).
        """
        blocks = self.covariance_blocks(theta, sigma2)
        gamma = self.gamma_from_blocks(blocks)
        if not correlation:
            return gamma
        out = gamma.copy()
        k = 0
        for t, S in zip(self.terms, blocks, strict=True):
            for a, b in t.entries:
                if a != b:
                    den = np.sqrt(S[..., a, a] * S[..., b, b])
                    with np.errstate(invalid="ignore", divide="ignore"):
                        out[..., k] = np.where(
                            den > 0, S[..., a, b] / np.where(den > 0, den, 1), np.nan
                        )
                k += 1
        return out

    def relative_covariance(self, theta: np.ndarray) -> np.ndarray:
        """Dense ``G / s0`` (..., q, q) for small ``q`` (level-major within each term)."""
        blocks = self.covariance_blocks(theta)
        return self.dense_from_blocks(blocks)

    def dense_from_blocks(self, blocks: Sequence[np.ndarray]) -> np.ndarray:
        """Dense block-diagonal ``blockdiag(I_{L_t} kron B_t)`` (..., q, q)."""
        lead = blocks[0].shape[:-2]
        D = np.zeros((*lead, self.q, self.q))
        for t, B, lo in zip(self.terms, blocks, self.offsets[:-1], strict=True):
            n = t.n_effects
            for level in range(t.n_levels):
                i = lo + level * n
                D[..., i : i + n, i : i + n] = B
        return D

    @staticmethod
    def _check_last(x: np.ndarray, size: int, what: str) -> None:
        if x.shape[-1:] != (size,):
            msg = f"{what} must have {size} entries in its last axis; got shape {x.shape}."
            raise ValueError(msg)


def _psd_cholesky(S: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """Lower Cholesky factor of positive semi-definite ``S`` (..., n, n), zero where singular."""
    n = S.shape[-1]
    L = np.zeros_like(S)
    scale = np.maximum(np.max(np.abs(np.diagonal(S, axis1=-2, axis2=-1)), axis=-1), 1e-300)
    for j in range(n):
        v = S[..., j, j] - np.sum(L[..., j, :j] ** 2, axis=-1)
        ok = v > tol * scale
        L[..., j, j] = np.where(ok, np.sqrt(np.where(ok, v, 1.0)), 0.0)
        for i in range(j + 1, n):
            num = S[..., i, j] - np.sum(L[..., i, :j] * L[..., j, :j], axis=-1)
            L[..., i, j] = np.where(ok, num / np.where(ok, L[..., j, j], 1.0), 0.0)
    return L
