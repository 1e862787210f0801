"""The per-gene result of a linear mixed-model fit (:class:`LMMFit`) and the fit's warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._options import DfMethod, check_df
from .inference import contrast_estimates
from .kenward_roger import adjusted_se
from .satterthwaite import contrast_df


class ConvergenceWarning(UserWarning):
    """Fisher scoring stopped at ``max_iter`` with ``|dlogL| > epsilon`` for some genes."""


class DegenerateFeatureWarning(UserWarning):
    """Genes that cannot be fit (all zero, or exactly explained by the fixed effects)."""


@dataclass(eq=False)
class LMMFit:
    """Per-gene fit of a linear mixed model (genes first).

    Attributes
    ----------
    coef, se, t, p
        Fixed effects, their standard errors, t values and two-sided p values (genes, p). With
        ``df_method="kenward-roger"`` the standard errors are Kenward-Roger's adjusted ones
        (as lmerTest reports them), and t and p use them.
    theta, se_theta, dlogL
        Variance components ``(s_1 .. s_k, s_0)``, residual last; their standard errors from the
        Fisher information; the score at the final estimate (genes, k + 1).
    logLik, niter
        Log-likelihood (REML: lme4's REML logLik + log det(X'X) / 2) and Fisher-scoring passes.
    converged
        ``all(|dlogL| <= epsilon)`` per gene (with ``criterion="relative"`` on the score of the
        standardised response, with ``nonnegative`` over the components not held at 0); False
        for genes that could not be fit.
    singular
        Per gene, whether a variance component is exactly 0 (lme4's singular fit; only with
        ``nonnegative=True``, else all False).
    df
        Residual degrees of freedom ``n - p`` (FLASHMM's df for every t test).
    df_method
        ``"residual"`` (``p`` on ``df``), ``"satterthwaite"`` (``p`` on ``df_satterthwaite``) or
        ``"kenward-roger"`` (``p`` on ``df_kenward_roger``).
    df_satterthwaite, vcov_theta, dfim_beta
        Only with ``df_method="satterthwaite"``: per-coefficient Satterthwaite df (genes, p);
        covariance of theta from the observed information (genes, k + 1, k + 1); and, when
        ``cov`` is kept, the derivatives of ``X'V^-1X`` (``cov^-1``) with respect to the
        component variances ``s_1 .. s_k`` (genes, k, p, p), from which
        :func:`scflashmm.lmm_test` gets the df of contrasts
        (:func:`scflashmm._core.satterthwaite.covariance_jacobian` gives ``dcov/dtheta``).
    df_kenward_roger, vcov_theta_kr, cov_adjusted
        Only with ``df_method="kenward-roger"``: per-coefficient Kenward-Roger df (genes, p);
        the expected-information covariance of theta ``2 IE^-1`` it uses (genes, k + 1, k + 1);
        and, when ``cov`` is kept, the adjusted covariance of beta (genes, p, p). With
        ``dfim_beta`` and ``cov`` (the unadjusted one) these give the df of later contrasts.
    cov, fim_beta, fim_theta, re
        Covariance of beta (genes, p, p); Fisher information of beta (genes, p, p) and of theta
        (genes, k + 1, k + 1); BLUPs of the random effects (genes, q). None unless requested.
    method, epsilon, criterion, nonnegative
        Estimation method, convergence tolerance and criterion, and whether variance components
        were kept >= 0.
    feature_names, covariate_names, component_names
        Names of genes, fixed-effect columns and random components, where given.
    """

    coef: np.ndarray
    se: np.ndarray
    t: np.ndarray
    p: np.ndarray
    theta: np.ndarray
    se_theta: np.ndarray
    dlogL: np.ndarray
    logLik: np.ndarray
    niter: np.ndarray
    converged: np.ndarray
    df: int
    method: str
    epsilon: float
    cov: np.ndarray | None = None
    fim_beta: np.ndarray | None = None
    fim_theta: np.ndarray | None = None
    re: np.ndarray | None = None
    feature_names: list[str] | None = None
    covariate_names: list[str] | None = None
    component_names: list[str] | None = None
    d: tuple[int, ...] = field(default=())
    df_method: str = "residual"
    df_satterthwaite: np.ndarray | None = None
    vcov_theta: np.ndarray | None = None
    dfim_beta: np.ndarray | None = None
    singular: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    nonnegative: bool = False
    criterion: str = "flashmm"
    df_kenward_roger: np.ndarray | None = None
    vcov_theta_kr: np.ndarray | None = None
    cov_adjusted: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        """Number of genes."""
        return self.coef.shape[0]

    def contrast_estimates(
        self, contrast: np.ndarray, df: DfMethod | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | int]:
        """Estimates, standard errors and degrees of freedom of contrasts for every gene.

        Parameters
        ----------
        contrast
            Contrast matrix (p, c), one column per contrast.
        df
            ``"residual"`` (``n - p``), ``"satterthwaite"`` or ``"kenward-roger"`` (each needs a
            fit with that ``df``); default the fit's ``df_method``.

        Returns
        -------
        ``c' beta`` and its standard error (genes, c): ``sqrt(c' cov c)``, or Kenward-Roger's
        adjusted ``sqrt(c' cov_adjusted c)``; and the df: ``n - p``, or Satterthwaite's or
        Kenward-Roger's per gene and contrast (genes, c).
        """
        method = check_df(self.df_method if df is None else df)
        if self.cov is None:
            msg = "Testing contrasts needs the covariance of beta: fit with output_cov=True."
            raise ValueError(msg)
        contrast = np.asarray(contrast, dtype=np.float64).reshape(self.coef.shape[1], -1)
        estimate, se = contrast_estimates(self.coef, self.cov, contrast)
        if method == "residual":
            return estimate, se, self.df
        if method == "satterthwaite":
            if self.dfim_beta is None or self.vcov_theta is None:
                msg = (
                    "Satterthwaite df of contrasts need a fit with df='satterthwaite' and "
                    "output_cov=True."
                )
                raise ValueError(msg)
            ddf = contrast_df(self.cov, self.dfim_beta, self.theta, self.vcov_theta, contrast)
            return estimate, se, ddf
        if self.dfim_beta is None or self.vcov_theta_kr is None or self.cov_adjusted is None:
            msg = (
                "Kenward-Roger df of contrasts need a fit with df='kenward-roger' and "
                "output_cov=True."
            )
            raise ValueError(msg)
        # Kenward-Roger's df is Satterthwaite's formula with the expected information
        # (docs/model.md, Kenward-Roger)
        ddf = contrast_df(self.cov, self.dfim_beta, self.theta, self.vcov_theta_kr, contrast)
        return estimate, adjusted_se(self.cov_adjusted, contrast), ddf

    def to_frame(self) -> Any:
        """One row per gene: coefficients, se, t, p, variance components and diagnostics.

        Returns
        -------
        pandas.DataFrame with columns ``<cov>_coef``, ``<cov>_se``, ``<cov>_t``, ``<cov>_p`` (and
        ``<cov>_df`` with Satterthwaite or Kenward-Roger df) per covariate,
        ``theta_<component>`` and ``theta_residual``, ``niter``, ``converged``, ``singular`` and
        ``logLik``.
        """
        import pandas as pd

        covs = self.covariate_names or [f"x{j + 1}" for j in range(self.coef.shape[1])]
        comps = self.component_names or [f"var{i + 1}" for i in range(self.theta.shape[1] - 1)]
        columns: dict[str, np.ndarray] = {}
        for j, name in enumerate(covs):
            for what in ("coef", "se", "t", "p"):
                columns[f"{name}_{what}"] = getattr(self, what)[:, j]
            ddf = self.df_kenward_roger if self.df_satterthwaite is None else self.df_satterthwaite
            if ddf is not None:
                columns[f"{name}_df"] = ddf[:, j]
        for i, name in enumerate([*comps, "residual"]):
            columns[f"theta_{name}"] = self.theta[:, i]
        columns |= {
            "niter": self.niter,
            "converged": self.converged,
            "singular": self.singular,
            "logLik": self.logLik,
        }
        return pd.DataFrame(columns, index=self.feature_names)
