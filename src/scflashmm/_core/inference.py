"""Wald tests of fixed effects and contrasts, and Benjamini-Hochberg adjustment."""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import special
from scipy import stats as sstats

Alternative = Literal["two-sided", "less", "greater"]
ALTERNATIVES = ("two-sided", "less", "greater")


def check_alternative(alternative: str) -> str:
    """Return the alternative, accepting R's spelling ``"two.sided"`` too."""
    alternative = "two-sided" if alternative == "two.sided" else alternative
    if alternative not in ALTERNATIVES:
        msg = f"alternative must be one of {ALTERNATIVES}, got {alternative!r}."
        raise ValueError(msg)
    return alternative


def t_pvalue(t: np.ndarray, df: float | np.ndarray, alternative: str = "two-sided") -> np.ndarray:
    """p-values of t statistics with ``df`` degrees of freedom (lower tail for ``"less"``)."""
    alternative = check_alternative(alternative)
    # special.stdtr is the t CDF that scipy.stats.t uses, without its argument-checking overhead.
    if alternative == "less":
        return special.stdtr(df, t)
    if alternative == "greater":
        return special.stdtr(df, -t)
    return 2 * special.stdtr(df, -np.abs(t))


def contrast_estimates(
    coef: np.ndarray, cov: np.ndarray, contrast: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Estimates ``c' beta`` (genes, c) and their standard errors ``sqrt(c' cov c)``.

    ``coef`` is (genes, p), ``cov`` (genes, p, p) and ``contrast`` (p, c).
    """
    estimate = coef @ contrast
    variance = np.einsum("pc,gpr,rc->gc", contrast, cov, contrast)
    return estimate, np.sqrt(variance)


def bh_adjust(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of a 1-D array; NaN stays NaN and is not counted."""
    pvalues = np.asarray(pvalues, dtype=np.float64)
    out = np.full(pvalues.shape, np.nan)
    ok = ~np.isnan(pvalues)
    if ok.any():
        out[ok] = sstats.false_discovery_control(pvalues[ok], method="bh")
    return out
