"""Empirical-Bayes moderation of the between-sample variance for ``tl`` (one random component).

The front end's glue to :func:`scflashmm._core.moderation.mixture_moderate`: the grid prior on
``tau_g = s_b + s_e / bar lambda`` centred on a trend in the mean expression, the variant that
``benchmarks/few_donors.md`` and docs/calibration.md measured to be calibrated with 3 to 25
samples, whether genes share one donor variance or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core.moderation import (
    between_sample_variance,
    contrast_variance,
    gls_at,
    mixture_moderate,
)

if TYPE_CHECKING:
    from .._core.sumstats import SummaryStats

#: How the moderated fit is recorded in ``uns[key]["moderation"]["method"]``.
MODERATION_METHOD = "grid prior on the between-sample variance, centred on a mean trend"


@dataclass(frozen=True)
class Moderated:
    """Moderated tests of the design columns and contrasts (genes first)."""

    se: np.ndarray
    t: np.ndarray
    p: np.ndarray
    cov: np.ndarray
    contrast: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    tau: np.ndarray
    tau_post: np.ndarray
    record: dict[str, Any]


def resolve_moderate(
    moderate: Any, d: list[int], random_terms: list[str], *, structured: bool = False
) -> bool:
    """Return whether to moderate: None means "when the model has one random component".

    lme4-style terms (``structured``) are not moderated: the moderation is defined for
    FLASHMM's one-component parameterisation.
    """
    if moderate is None:
        return len(d) == 1 and not structured
    if not isinstance(moderate, (bool, np.bool_)):
        msg = f"moderate must be True, False or None, got {moderate!r}."
        raise TypeError(msg)
    if moderate and structured:
        msg = (
            "moderate=True is defined for a random intercept given in FLASHMM's form (a column "
            f"name such as 'sam' or '~0+sam'), not for lme4-style terms {random_terms}. Pass "
            "random='sam', or moderate=False with df='satterthwaite'."
        )
        raise ValueError(msg)
    if moderate and len(d) != 1:
        msg = (
            f"moderate=True needs exactly one random component (the moderated variance is the "
            f"between-sample variance of one random intercept), got {len(d)}: {random_terms}. "
            "Pass moderate=False (and df='satterthwaite' or 'kenward-roger')."
        )
        raise ValueError(msg)
    return bool(moderate)


def mean_covariate(stats: SummaryStats, x_sum: np.ndarray) -> np.ndarray:
    """Mean of each gene's fixed-effect (OLS) fit, ``1'X (X'X)^-1 X'y / n``.

    This is the mean of ``y`` whenever the constant is in the span of ``X`` (an intercept, or
    the indicators of a factor), and needs only ``X'1``, ``X'X`` and ``X'Y``.
    """
    a = np.linalg.lstsq(stats.XX, x_sum, rcond=None)[0]
    return (a @ stats.XY) / stats.n


def moderate_fit(
    stats: SummaryStats,
    theta: np.ndarray,
    coef: np.ndarray,
    x_sum: np.ndarray,
    cmat: np.ndarray | None,
) -> Moderated:
    """Moderated standard errors, t and p of the coefficients (and contrasts).

    ``p`` is the posterior-predictive p value of :func:`mixture_moderate`; ``se`` and ``cov``
    are those of the GLS estimate at the posterior mean of ``tau``; ``t = coef / se`` with the
    fit's ``coef`` (genes, p), which is kept.
    """
    p = stats.XX.shape[0]
    C = np.eye(p) if cmat is None else np.hstack([np.eye(p), cmat])
    covariate = mean_covariate(stats, x_sum)
    fit_stats, offset = stats.centred()  # accurate for a large mean (docs/model.md, Offsets)
    res = mixture_moderate(
        fit_stats.XX, fit_stats.XY, fit_stats.ZX, fit_stats.ZY, fit_stats.ZZ, stats.n, theta,
        contrast=C, covariate=covariate, offset=offset,
    )  # fmt: skip
    zrz = stats.ZZ - stats.ZX @ np.linalg.solve(stats.XX, stats.ZX.T)
    _, d, bar_lambda = between_sample_variance(zrz, theta)
    tau_post = res["tau_post"]
    ok = np.isfinite(tau_post) & (theta[:, 1] > 0)  # s_e = 0: no GLS fit (NaN)
    sb = np.maximum(tau_post - theta[:, 1] / bar_lambda, 0.0)
    cov = np.full((theta.shape[0], p, p), np.nan)
    th = np.column_stack([sb, theta[:, 1]])
    _, cov[ok], _ = gls_at(
        stats.XX, stats.XY[:, ok], stats.ZX, stats.ZY[:, ok], stats.ZZ, th[ok], derivatives=False
    )
    se_all = np.sqrt(contrast_variance(C, cov))
    est_all = np.asarray(coef, dtype=np.float64) @ C
    with np.errstate(invalid="ignore", divide="ignore"):
        t_all = est_all / se_all
    p_all = np.where(ok[:, None], res["p"], np.nan)
    contrast = None
    if cmat is not None:
        contrast = (est_all[:, p:], se_all[:, p:], t_all[:, p:], p_all[:, p:])
    record = {
        "method": MODERATION_METHOD,
        "covariate": "mean of the fixed-effect fit",
        "d": int(d),
        "bar_lambda": float(bar_lambda),
        "multipliers": np.asarray(res["multipliers"], dtype=np.float64),
        "weights": np.asarray(res["weights"], dtype=np.float64),
    }
    return Moderated(
        se=se_all[:, :p],
        t=t_all[:, :p],
        p=p_all[:, :p],
        cov=cov,
        contrast=contrast,
        tau=res["tau"],
        tau_post=tau_post,
        record=record,
    )
