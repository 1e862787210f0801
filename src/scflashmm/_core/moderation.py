r"""Empirical-Bayes moderation of the between-sample variance, borrowing strength across genes.

With a handful of samples (donors) each gene's own estimate of its between-sample variance rests
on a few degrees of freedom: genes whose estimate falls near zero get tiny standard errors and
become top false discoveries. This module shrinks that estimate towards a value shared by all
genes, by an amount estimated from the data (limma's ``squeezeVar``; Smyth 2004), and maps it back
to the mixed model's covariance of ``beta`` for every coefficient and contrast.

The model
---------
One random component (a random intercept per sample, ``Z`` of ``q`` columns), so that for gene
``g``: ``y = X beta + Z b + e``, ``b ~ N(0, s_b I_q)``, ``e ~ N(0, s_e I_n)``. Project off the
fixed effects, ``R_ZZ = Z'(I - H)Z = U diag(lambda) U'`` with ``d`` non-zero eigenvalues
(``d = q - dim(col X cap col Z)``; for samples nested in two treatments and only within-sample
covariates besides, ``d = samples - 2``). The projected sample totals ``w = U' Z'(I - H) y``
are independent, ``w_j ~ N(0, lambda_j (s_e + s_b lambda_j))``: the data hold ``d`` degrees of
freedom about the **between-sample variance**

.. math:: \tau_g = s_{b,g} + s_{e,g} / \bar\lambda ,
          \qquad \bar\lambda = d \Big/ \sum_{j \le d} \lambda_j^{-1},

the variance of a sample's mean (``bar lambda`` is the harmonic mean of the non-zero
eigenvalues, about the number of cells per sample). For a balanced design and an interior
REML optimum, ``tau_hat_g`` (from the REML estimates) equals the sample-level mean square, and
``tau_hat_g ~ tau_g chi2_d / d``. Every between-sample coefficient has a variance proportional
to ``tau_g``; within-sample ones depend on ``s_e`` only, which rests on ``n - p - d`` df.

Prior and estimator (limma's ``fitFDist``)
------------------------------------------
``1 / tau_g ~ chi2_{d0} / (d0 tau0)`` across genes (a scaled inverse chi-square prior), so
that marginally ``tau_hat_g / tau0 ~ F(d, d0)``. ``d0`` and ``tau0`` are estimated by the method
of moments on ``z_g = log tau_hat_g``: with ``e_g = z_g - digamma(d/2) + log(d/2)``,
``E e = log tau0 - digamma(d0/2) + log(d0/2)`` and ``Var e = trigamma(d/2) + trigamma(d0/2)``.
So ``trigamma(d0/2) = var(e) - trigamma(d/2)`` (``d0 = inf``, full pooling, when that is <= 0)
and ``tau0 = exp(mean(e) + digamma(d0/2) - log(d0/2))``. The amount of pooling, ``d0``, is thus
estimated from how much the genes' variances differ beyond their sampling noise. ``robust=True``
first winsorises ``e`` (at quantiles 0.05 and 0.95 of a normal fit), a simple version of
limma's ``robust`` idea, so that a few outlying genes do not inflate ``var(e)``.

The posterior mean of ``1 / tau_g`` gives

.. math:: \tilde\tau_g = \frac{d_0 \tau_0 + d\, \hat\tau_g}{d_0 + d},

with ``d0 + d`` degrees of freedom. Mapping back: ``s_b~ = max(tau~ - s_e / bar lambda, 0)``
with the gene's own ``s_e`` (many df); ``beta`` and its covariance are the GLS estimates at
``(s_b~, s_e)``. The df of a coefficient or contrast ``c' beta`` is Satterthwaite's,
``2 v^2 / (g' S g)`` with ``v = c' cov c``, ``g = dv / d(tau, s_e)`` and ``S`` the variance of
the moderated ``(tau~, s_e)``, ``diag(2 tau~^2 / (d0 + d), 2 s_e^2 / (n - p - d))``: a purely
between-sample contrast gets ``d0 + d``, a within-sample one about ``n - p - d``.

Assumptions: one random component; ``tau_hat_g`` is close to a scaled chi-square on ``d`` df
(sample means of many cells; unequal cells per sample make this an approximation); the genes'
true ``tau_g`` follow roughly a scaled inverse chi-square (limma's assumption; a mixture of a
few very different groups is where it is tested in ``benchmarks/few_donors.md``).

Variants, measured in ``benchmarks/few_donors.md``: ``covariate`` makes ``tau0`` a spline trend
in, e.g., the mean log expression (limma-trend; on log counts the donor variance grows with the
mean, and one ``tau0`` leaves the highly expressed genes liberal); ``robust`` winsorises the
moments; ``estimator="mode"`` takes the penalised-REML posterior mode instead of the posterior
mean (liberal when ``d0`` is small); :func:`mixture_moderate` replaces the unimodal prior by a
nonparametric one on a grid around the trend (genes in groups with very different donor
variances), and was the calibrated choice there.

As ``d0 -> 0`` the moderated fit is the REML fit, tested on Satterthwaite-like df with ``d`` df
for ``tau``; as ``d0 -> inf`` every gene gets ``tau0``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special, stats

from ._options import check_choice

__all__ = [
    "between_sample_variance",
    "contrast_variance",
    "fit_f_dist",
    "gls_at",
    "mixture_moderate",
    "moderate",
    "natural_spline_basis",
    "penalized_tau",
    "squeeze_var",
    "trigamma_inverse",
]

#: Eigenvalues of ``R_ZZ`` below this fraction of the largest are zero (directions of Z in col X).
_EIGEN_RTOL = 1e-10


def trigamma_inverse(x: Any) -> np.ndarray:
    """Solve ``trigamma(y) = x`` for ``y > 0`` (Newton's method on ``1 / trigamma``, as limma).

    Parameters
    ----------
    x
        Positive values.

    Returns
    -------
    ``y`` with the shape of ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.where(x > 1e7, 1 / np.sqrt(np.maximum(x, 1e-300)), 0.5 + 1 / np.maximum(x, 1e-300))
    y = np.where(x < 1e-6, 1 / np.maximum(x, 1e-300), y)
    iterate = (x >= 1e-6) & (x <= 1e7)
    for _ in range(50):
        tri = special.polygamma(1, y)
        dif = tri * (1 - tri / x) / special.polygamma(2, y)
        dif = np.where(iterate, dif, 0.0)
        y = y + dif
        if np.all(-dif / y < 1e-8):
            break
    return y


def natural_spline_basis(x: Any, df: int) -> np.ndarray:
    """Natural cubic spline basis with an intercept, ``df`` columns.

    R's ``ns(x, df, intercept=TRUE)`` spans the same space. Knots at the ``df`` quantiles
    ``0, 1/(df-1), .., 1`` of ``x`` (the outer two are the boundary knots); linear beyond them.
    The truncated-power form of Hastie, Tibshirani and Friedman (2009), eq. 5.4-5.5, on ``x``
    scaled to [0, 1].

    Parameters
    ----------
    x
        Covariate values (genes,).
    df
        Number of columns, >= 1 (1: intercept only; 2: a straight line).

    Returns
    -------
    (genes, df) basis.
    """
    x = np.asarray(x, dtype=np.float64)
    span = np.ptp(x)
    u = (x - x.min()) / (span if span > 0 else 1.0)
    if df <= 2 or span == 0:
        return np.column_stack([np.ones_like(u), u][: max(df, 1)])
    knots = np.unique(np.quantile(u, np.linspace(0, 1, df)))
    if knots.size < 3:
        return np.column_stack([np.ones_like(u), u])

    def dk(k: int) -> np.ndarray:
        last = knots[-1]
        return (np.maximum(u - knots[k], 0) ** 3 - np.maximum(u - last, 0) ** 3) / (last - knots[k])

    cols = [np.ones_like(u), u] + [dk(k) - dk(knots.size - 2) for k in range(knots.size - 2)]
    return np.column_stack(cols)


def fit_f_dist(
    s2: Any,
    df1: Any,
    *,
    covariate: Any = None,
    trend_df: int = 4,
    robust: bool = False,
) -> tuple[Any, float]:
    """Moment estimates of a scaled F distribution for variances (limma's ``fitFDist``).

    ``s2_g ~ scale_g * F(df1_g, df2)``, i.e. ``s2_g`` is a chi-square estimate on ``df1_g`` df of a
    variance drawn from a scaled inverse chi-square with ``df2`` df and scale ``scale_g``: one
    scale for all genes, or a smooth trend in ``covariate`` (limma-trend, e.g. against mean
    expression: genes with a higher mean vary more between samples on the log scale).

    Parameters
    ----------
    s2
        Per-gene variance estimates (genes,); non-finite values are ignored, values <= 0 are
        raised to ``1e-5`` times the median (as limma).
    df1
        Their degrees of freedom, a scalar or (genes,).
    covariate
        Per-gene covariate of the prior scale (genes,), or None for one scale.
    trend_df
        Columns (intercept included) of the natural-spline trend in ``covariate``; limma uses 4.
    robust
        Winsorise the (trend-)centred log variances at the 5 % and 95 % normal quantiles of their
        own spread (median and IQR) before taking moments, so that a few genes with outlying
        variance inflate ``var(e)`` less (a simple version of limma's ``robust=TRUE``).

    Returns
    -------
    ``(scale, df2)``: ``scale`` a float, or (genes,) with a covariate (NaN where ``s2`` is not
    finite); ``df2`` is ``inf`` when the variances differ no more than their sampling noise
    (full pooling).
    """
    s2 = np.asarray(s2, dtype=np.float64)
    df1 = np.broadcast_to(np.asarray(df1, dtype=np.float64), s2.shape)
    ok = np.isfinite(s2) & np.isfinite(df1) & (df1 > 0)
    if covariate is not None:
        covariate = np.asarray(covariate, dtype=np.float64)
        if covariate.shape != s2.shape:
            msg = f"covariate must have one value per gene ({s2.shape}), got {covariate.shape}."
            raise ValueError(msg)
        ok &= np.isfinite(covariate)
    if ok.sum() < 2:
        msg = f"fit_f_dist needs at least two finite variances, got {int(ok.sum())}."
        raise ValueError(msg)
    x, d = s2[ok], df1[ok]
    x = np.maximum(x, 0.0)
    median = np.median(x)
    x = np.maximum(x, 1e-5 * (median if median > 0 else 1.0))
    e = np.log(x) - special.digamma(d / 2) + np.log(d / 2)
    if covariate is None:
        basis = np.ones((e.size, 1))
    else:
        basis = natural_spline_basis(covariate[ok], min(trend_df, e.size - 1))
    coef, *_ = np.linalg.lstsq(basis, e, rcond=None)
    emean = basis @ coef
    resid = e - emean
    rank = np.linalg.matrix_rank(basis)
    if robust:
        center = np.median(resid)
        spread = stats.iqr(resid) / (2 * stats.norm.ppf(0.75))
        bound = stats.norm.ppf(0.95) * spread
        resid = np.clip(resid, center - bound, center + bound)
        resid = resid - resid.mean()
    evar = np.sum(resid**2) / max(e.size - rank, 1) - special.polygamma(1, d / 2).mean()
    if evar > 0:
        df2 = float(2 * trigamma_inverse(evar))
        log_scale = emean + special.digamma(df2 / 2) - np.log(df2 / 2)
    else:
        df2 = np.inf
        log_scale = emean
    if covariate is None:
        return float(np.exp(log_scale[0])), df2
    scale = np.full(s2.shape, np.nan)
    scale[ok] = np.exp(log_scale)
    return scale, df2


def squeeze_var(
    s2: Any, df: Any, *, covariate: Any = None, trend_df: int = 4, robust: bool = False
) -> tuple[np.ndarray, Any, float]:
    """Posterior variances of an empirical-Bayes scaled inverse chi-square prior (``squeezeVar``).

    Parameters
    ----------
    s2
        Per-gene variance estimates (genes,).
    df
        Their degrees of freedom, a scalar or (genes,).
    covariate, trend_df, robust
        Passed to :func:`fit_f_dist`.

    Returns
    -------
    ``(s2_post, var_prior, df_prior)``: ``(df_prior var_prior + df s2) / (df_prior + df)`` per
    gene (``var_prior`` when ``df_prior`` is ``inf``), and the prior's scale (a float, or per
    gene with a covariate) and df. The posterior variances have ``df_prior + df`` df.
    """
    s2 = np.asarray(s2, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    var_prior, df_prior = fit_f_dist(s2, df, covariate=covariate, trend_df=trend_df, robust=robust)
    if np.isinf(df_prior):
        return np.broadcast_to(var_prior, s2.shape).copy(), var_prior, df_prior
    post = (df_prior * var_prior + df * s2) / (df_prior + df)
    return post, var_prior, df_prior


def between_sample_variance(zrz: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Per-gene between-sample variance ``tau = s_b + s_e / bar lambda`` and its df ``d``.

    Parameters
    ----------
    zrz
        ``R_ZZ = Z'Z - Z'X (X'X)^-1 X'Z`` (q, q), one random component.
    theta
        Per-gene ``(s_b, s_e)`` (genes, 2), e.g. the REML estimates.

    Returns
    -------
    ``(tau, d, bar_lambda)``: tau (genes,), the number ``d`` of non-zero eigenvalues of ``R_ZZ``
    and their harmonic mean.
    """
    lam = np.linalg.eigvalsh((zrz + zrz.T) / 2)
    lam = lam[lam > _EIGEN_RTOL * max(lam.max(), 0.0)]
    d = int(lam.size)
    if d == 0:
        msg = "The random effects are confounded with the fixed effects: no between-sample df."
        raise ValueError(msg)
    bar_lambda = float(d / np.sum(1 / lam))
    theta = np.asarray(theta, dtype=np.float64)
    return theta[:, 0] + theta[:, 1] / bar_lambda, d, bar_lambda


def gls_at(
    XX: np.ndarray,
    XY: np.ndarray,
    ZX: np.ndarray,
    ZY: np.ndarray | None,
    ZZ: np.ndarray,
    theta: np.ndarray,
    *,
    derivatives: bool = True,
    eig: tuple[np.ndarray, np.ndarray] | None = None,
    zyu: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GLS ``beta``, its covariance and ``dcov/dtheta`` at given ``(s_b, s_e)`` per gene.

    One random component; ``V = s_e I + s_b Z Z'``. Uses one eigendecomposition of ``Z'Z``
    shared by all genes (``O(q p^2)`` per gene, as matrix products).

    Parameters
    ----------
    XX, XY, ZX, ZY, ZZ
        Summary statistics (p, p), (p, genes), (q, p), (q, genes), (q, q).
    theta
        ``(s_b, s_e)`` per gene (genes, 2), ``s_e > 0`` and ``s_b > -s_e / max eig(Z'Z)``.
    derivatives
        Also return ``dcov``; ``False`` returns ``None`` in its place (cheaper).
    eig
        ``np.linalg.eigh((ZZ + ZZ.T) / 2)`` when already computed (callers that evaluate
        many ``theta`` on the same statistics).
    zyu
        ``ZY.T @ U`` (genes, q) with ``U`` the eigenvectors of ``eig``, when already computed;
        ``ZY`` is then not used.

    Returns
    -------
    ``coef`` (genes, p), ``cov`` (genes, p, p) and ``dcov`` (genes, 2, p, p), the derivatives of
    ``cov`` with respect to ``s_b`` and ``s_e``.
    """
    lam, U = np.linalg.eigh((ZZ + ZZ.T) / 2) if eig is None else eig
    lam = np.maximum(lam, 0.0)
    p = XX.shape[0]
    sb, se = theta[:, 0], theta[:, 1]
    rho = sb / se
    XZU = ZX.T @ U  # (p, q)
    YZU = np.asarray(ZY).T @ U if zyu is None else zyu  # (genes, q)
    # outer products of the columns of XZU, (p * p, q): sum_j a_gj XZU_pj XZU_rj = (a @ BB.T)
    BB = (XZU[:, None, :] * XZU[None, :, :]).reshape(p * p, -1)

    def weighted(a: np.ndarray) -> np.ndarray:
        return (a @ BB.T).reshape(-1, p, p)

    # X'V^-1X = (X'X - X'Z W Z'X) / s_e with W = U diag(rho f) U', where f (genes, q) are
    # the eigenvalues of (I + rho Z'Z)^-1: w = rho f = rho / (1 + rho lam), in place
    w = np.multiply(rho[:, None], lam[None, :])
    w += 1
    np.divide(rho[:, None], w, out=w)
    P = weighted(w)  # (genes, p, p); in place below: with p ~ 60 each copy is large
    np.subtract(XX[None], P, out=P)
    P /= se[:, None, None]
    rhs = (XY.T - (w * YZU) @ XZU.T) / se[:, None]
    cov = _inverse_or_nan(P)
    del P
    cov += np.swapaxes(cov, 1, 2)
    cov /= 2
    coef = np.matmul(cov, rhs[:, :, None])[:, :, 0]
    if not derivatives:
        return coef, cov, None
    f = 1 / (1 + rho[:, None] * lam[None, :])
    # dP/ds_b = -X'V^-1 Z Z' V^-1 X = -(XZU) diag(f^2 / s_e^2) (XZU)'
    dPb = -weighted(f**2) / se[:, None, None] ** 2
    # dP/ds_e = -X'V^-2 X = -(X'X - X'Q diag(1 - f^2) Q'X) / s_e^2, Q = Z U lam^-1/2
    inv_lam = np.divide(1.0, lam, out=np.zeros_like(lam), where=lam > 0)
    dPe = -(XX[None] - weighted((1 - f**2) * inv_lam[None, :])) / se[:, None, None] ** 2
    dcov = -np.stack([cov @ dPb @ cov, cov @ dPe @ cov], axis=1)
    return coef, cov, dcov


def _inverse_or_nan(P: np.ndarray) -> np.ndarray:
    """Inverses of a stack of matrices; NaN for the numerically singular ones.

    E.g. a gene whose residual variance is ~0 (``rho = s_b / s_e`` ~ 1e15): its ``X'V^-1X``
    is singular to working precision, and one such gene must not fail the whole batch.
    """
    try:
        return np.linalg.inv(P)
    except np.linalg.LinAlgError:
        pass
    sv = np.linalg.svd(P, compute_uv=False)
    good = np.isfinite(sv).all(axis=1) & (sv[:, -1] > sv[:, 0] * 1e3 * np.finfo(float).eps)
    out = np.full_like(P, np.nan)
    out[good] = np.linalg.pinv(P[good])
    return out


def contrast_variance(C: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``c' cov_g c`` for every gene ``g`` and column ``c`` of ``C`` (genes, contrasts)."""
    return np.einsum("gpc,pc->gc", cov @ C, C)


def penalized_tau(
    lam: np.ndarray,
    a: np.ndarray,
    s_e: np.ndarray,
    tau0: Any,
    d0: float,
    *,
    grid: int = 400,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mode of ``tau`` under the restricted likelihood and the prior (penalised REML).

    With ``s_e`` held at its estimate (it rests on ``n - p - d`` df), the restricted
    log-likelihood in ``s_b`` is, up to a constant,
    ``-1/2 sum_j [log(s_e + s_b lambda_j) + a_j / (s_e + s_b lambda_j)]`` with
    ``a_j = w_j^2 / lambda_j``; the prior adds ``-(d0/2 + 1) log tau - d0 tau0 / (2 tau)``
    for ``tau = s_b + s_e / bar lambda``. Maximised over ``s_b >= 0`` on a log grid refined by a
    parabola through the best three points and Newton steps, vectorised over genes.

    Parameters
    ----------
    lam
        The ``d`` non-zero eigenvalues of ``R_ZZ`` (d,).
    a
        ``w_j^2 / lambda_j`` per gene (genes, d).
    s_e
        Residual variances (genes,).
    tau0, d0
        Prior scale (a number or per gene) and df (finite, > 0).
    grid
        Grid points over ``s_b / s_e`` in ``[0, 1e4 / min lambda]``.

    Returns
    -------
    ``(tau_mode, var_tau)``: the mode, and the inverse of the penalised observed information in
    ``s_b`` there (genes,).
    """
    bar_lambda = lam.size / np.sum(1 / lam)
    tau0 = np.broadcast_to(np.asarray(tau0, dtype=np.float64), s_e.shape)

    def objective(sb: np.ndarray) -> np.ndarray:  # sb: (genes, points)
        v = s_e[:, None, None] + sb[:, :, None] * lam[None, None, :]
        ll = -0.5 * np.sum(np.log(v) + a[:, None, :] / v, axis=2)
        tau = sb + s_e[:, None] / bar_lambda
        return ll - (d0 / 2 + 1) * np.log(tau) - d0 * tau0[:, None] / (2 * tau)

    rel = np.concatenate([[0.0], np.geomspace(1e-6, 1e4, grid - 1)]) / lam.min()
    sb_grid = s_e[:, None] * rel[None, :]
    values = objective(sb_grid)
    best = np.clip(np.argmax(values, axis=1), 1, grid - 2)
    rows = np.arange(s_e.size)
    x = sb_grid[rows[:, None], best[:, None] + np.arange(-1, 2)]  # (genes, 3)
    y = values[rows[:, None], best[:, None] + np.arange(-1, 2)]
    # vertex of the parabola through the three points (falls back to the middle one)
    num = (x[:, 1] - x[:, 0]) ** 2 * (y[:, 1] - y[:, 2]) - (x[:, 1] - x[:, 2]) ** 2 * (
        y[:, 1] - y[:, 0]
    )
    den = (x[:, 1] - x[:, 0]) * (y[:, 1] - y[:, 2]) - (x[:, 1] - x[:, 2]) * (y[:, 1] - y[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = x[:, 1] - 0.5 * num / den
    good = np.isfinite(vertex) & (vertex >= x[:, 0]) & (vertex <= x[:, 2])
    sb = np.where(good, vertex, x[:, 1])
    top = np.argmax(values, axis=1) == 0
    for _ in range(4):  # Newton steps on central differences, kept inside the bracket
        h = np.maximum(1e-4 * (sb + s_e / bar_lambda), 1e-12)
        centre = np.maximum(sb, h)
        f = objective(np.column_stack([centre - h, centre, centre + h]))
        grad = (f[:, 2] - f[:, 0]) / (2 * h)
        info = -(f[:, 0] - 2 * f[:, 1] + f[:, 2]) / h**2
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(info > 0, grad / info, 0.0)
        sb = np.clip(centre + step, x[:, 0], x[:, 2])
    sb = np.where(top, 0.0, sb)
    h = np.maximum(1e-4 * (sb + s_e / bar_lambda), 1e-12)
    centre = np.maximum(sb, h)
    f = objective(np.column_stack([centre - h, centre, centre + h]))
    info = -(f[:, 0] - 2 * f[:, 1] + f[:, 2]) / h**2
    tau = sb + s_e / bar_lambda
    var_tau = np.where(info > 0, 1 / np.where(info > 0, info, 1.0), 2 * tau**2 / (d0 + lam.size))
    return tau, var_tau


def moderate(
    XX: np.ndarray,
    XY: np.ndarray,
    ZX: np.ndarray,
    ZY: np.ndarray,
    ZZ: np.ndarray,
    n: int,
    theta: np.ndarray,
    *,
    contrast: np.ndarray | None = None,
    covariate: np.ndarray | None = None,
    trend_df: int = 4,
    df_prior: float | None = None,
    robust: bool = False,
    estimator: str = "mean",
) -> dict[str, Any]:
    """Empirical-Bayes moderated tests of a one-component mixed model (see the module docstring).

    Parameters
    ----------
    XX, XY, ZX, ZY, ZZ
        Summary statistics (p, p), (p, genes), (q, p), (q, genes), (q, q).
    n
        Number of cells.
    theta
        Per-gene variance components ``(s_b, s_e)`` from the fit (genes, 2), e.g. REML.
    contrast
        Contrast matrix (p, c) to test; default the identity (every coefficient).
    covariate, trend_df
        A per-gene covariate of the prior scale ``tau0`` (genes,) and the columns of its spline
        trend, e.g. the mean log expression ``ZY.sum(axis=0) / n`` (with ``Z`` the indicators of
        the samples): between-sample variances on the log scale grow with the mean, and one
        ``tau0`` for all genes then under-moderates the highly expressed genes. None: one
        ``tau0``.
    df_prior
        Fix ``d0`` instead of estimating it (``0``: no moderation; ``inf``: full pooling).
    robust
        Passed to :func:`fit_f_dist`.
    estimator
        ``"mean"``: ``tau~ = (d0 tau0 + d tau_hat) / (d0 + d)`` (limma's posterior, df ``d0 + d``);
        ``"mode"``: the penalised-REML mode of :func:`penalized_tau`, with the variance of ``tau``
        from the penalised information.

    Returns
    -------
    dict with ``coef`` (genes, p), ``cov`` (genes, p, p), ``estimate``, ``se``, ``t``, ``df``,
    ``p`` (genes, c), ``theta`` (moderated ``(s_b~, s_e)``, genes x 2), ``tau``, ``tau_post``
    (genes,), ``var_prior`` (a number, or per gene with a covariate), and ``d``, ``bar_lambda``,
    ``df_prior`` (numbers).
    """
    estimator = check_choice(estimator, "estimator", ("mean", "mode"))
    theta = np.asarray(theta, dtype=np.float64)
    XXinv = np.linalg.inv(XX)
    zrz = ZZ - ZX @ XXinv @ ZX.T
    tau, d, bar_lambda = between_sample_variance(zrz, theta)
    ok = np.isfinite(tau)
    if covariate is not None:
        covariate = np.asarray(covariate, dtype=np.float64)
    fitted = fit_f_dist(tau, d, covariate=covariate, trend_df=trend_df, robust=robust)
    var_prior, d0 = fitted
    if df_prior is not None:
        d0 = float(df_prior)
        if d0 < 0:
            msg = f"df_prior must be >= 0, got {df_prior!r}."
            raise ValueError(msg)
        if np.isinf(d0) and np.isfinite(fitted[1]):  # full pooling: tau0 without the df factor
            var_prior = var_prior * np.exp(np.log(fitted[1] / 2) - special.digamma(fitted[1] / 2))
    tau_floor = np.maximum(tau, 1e-5 * np.median(tau[ok]))
    if np.isinf(d0):
        tau_post = np.broadcast_to(var_prior, tau.shape).astype(np.float64)
    elif d0 == 0:
        tau_post = tau.copy()
    else:
        tau_post = (d0 * var_prior + d * tau_floor) / (d0 + d)
    se_res = theta[:, 1]
    var_tau = 2 * tau_post**2 / (d0 + d) if np.isfinite(d0) else np.zeros_like(tau_post)
    if estimator == "mode" and 0 < d0 < np.inf:
        lam_all, U = np.linalg.eigh((zrz + zrz.T) / 2)
        keep = lam_all > _EIGEN_RTOL * max(lam_all.max(), 0.0)
        lam, U = lam_all[keep], U[:, keep]
        w = (U.T @ (ZY - ZX @ (XXinv @ XY))).T  # (genes, d)
        tau_post = np.full(tau.shape, np.nan)
        var_tau = np.full(tau.shape, np.nan)
        tau_post[ok], var_tau[ok] = penalized_tau(
            lam, w[ok] ** 2 / lam, se_res[ok], np.broadcast_to(var_prior, tau.shape)[ok], d0
        )
    sb = tau_post - se_res / bar_lambda
    if d0 > 0:
        sb = np.maximum(sb, 0.0)  # the prior puts no mass below s_e / bar_lambda
    theta_mod = np.column_stack([sb, se_res])
    p = XX.shape[0]
    C = np.eye(p) if contrast is None else np.asarray(contrast, dtype=np.float64)
    if C.ndim == 1:
        C = C[:, None]
    coef = np.full((theta.shape[0], p), np.nan)
    cov = np.full((theta.shape[0], p, p), np.nan)
    dcov = np.full((theta.shape[0], 2, p, p), np.nan)
    coef[ok], cov[ok], dcov[ok] = gls_at(XX, XY[:, ok], ZX, ZY[:, ok], ZZ, theta_mod[ok])
    estimate = coef @ C
    v = np.einsum("pc,gpr,rc->gc", C, cov, C)
    g = np.einsum("pc,gkpr,rc->gkc", C, dcov, C)  # (genes, 2, c)
    var_se = 2 * se_res**2 / max(n - p - d, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # v as a function of (tau, s_e): dv/dtau = g_b, dv/ds_e = g_e - g_b / bar_lambda
        g_e = g[:, 1] - g[:, 0] / bar_lambda
        ddf = 2 * v**2 / (g[:, 0] ** 2 * var_tau[:, None] + g_e**2 * var_se[:, None])
        se = np.sqrt(v)
        t = estimate / se
    ddf = np.minimum(ddf, n - p)
    pval = 2 * stats.t.sf(np.abs(t), ddf)
    return {
        "coef": coef,
        "cov": cov,
        "estimate": estimate,
        "se": se,
        "t": t,
        "df": ddf,
        "p": pval,
        "theta": theta_mod,
        "tau": tau,
        "tau_post": tau_post,
        "d": d,
        "bar_lambda": bar_lambda,
        "df_prior": d0,
        "var_prior": var_prior,
    }


def mixture_moderate(
    XX: np.ndarray,
    XY: np.ndarray,
    ZX: np.ndarray,
    ZY: np.ndarray,
    ZZ: np.ndarray,
    n: int,
    theta: np.ndarray,
    *,
    contrast: np.ndarray | None = None,
    covariate: np.ndarray | None = None,
    trend_df: int = 4,
    multipliers: Any = None,
    max_iter: int = 500,
    offset: np.ndarray | None = None,
) -> dict[str, Any]:
    """Test with a nonparametric (grid) prior on the between-sample variance.

    A scaled inverse chi-square prior is unimodal: when genes fall into groups with very
    different between-sample variances, it pulls a high-variance gene whose few-donor estimate
    came out low towards the middle, and its test becomes liberal. Here the prior of ``tau_g`` is
    instead a discrete distribution on ``center_g * m_k`` (``m_k`` a grid of multipliers,
    ``center_g`` the trend of :func:`fit_f_dist`, or one value), with weights ``pi_k`` shared by
    all genes and estimated by maximum likelihood (EM; the nonparametric MLE of the prior on the
    grid, as in variance adaptive shrinkage, Lu and Stephens 2016). ``tau_hat_g ~ tau_g chi2_d /
    d`` gives each gene posterior weights ``w_gk``. As ``tau_hat_g`` is independent of the
    between-sample contrasts (it lives in the orthogonal residual directions), the p-value
    ``sum_k w_gk p_gk``, with ``p_gk`` the normal p-value of the GLS estimate at
    ``s_b = max(center_g m_k - s_e / bar lambda, 0)``, is the posterior-predictive p-value under
    the estimated prior.

    Parameters
    ----------
    XX, XY, ZX, ZY, ZZ, n, theta, contrast, covariate, trend_df
        As :func:`moderate`.
    multipliers
        Grid of ``m_k``; default ``2 ** arange(-6, 6.5, 0.5)``.
    max_iter
        EM iterations.
    offset
        Added to the GLS coefficients (genes, p): with the statistics of a shifted response
        (:meth:`SummaryStats.centred`), the offset it returns.

    Returns
    -------
    dict with ``estimate``, ``se`` (at the posterior mean of ``tau``), ``p`` (genes, c), ``tau``,
    ``tau_post`` (posterior mean), ``weights`` (the prior ``pi_k``), ``multipliers`` and ``d``.
    """
    theta = np.asarray(theta, dtype=np.float64)
    XXinv = np.linalg.inv(XX)
    zrz = ZZ - ZX @ XXinv @ ZX.T
    tau, d, bar_lambda = between_sample_variance(zrz, theta)
    ok = np.isfinite(tau)
    center = fit_f_dist(tau, d, covariate=covariate, trend_df=trend_df)[0]
    center = np.broadcast_to(np.asarray(center, dtype=np.float64), tau.shape)
    m = 2.0 ** np.arange(-6, 6.5, 0.5) if multipliers is None else np.asarray(multipliers, float)
    grid = center[:, None] * m[None, :]  # (genes, K)
    t_hat = np.maximum(tau, 1e-5 * np.median(tau[ok]))[:, None]
    loglik = stats.chi2.logpdf(d * t_hat / grid, d) + np.log(d / grid)
    loglik = np.where(ok[:, None], loglik, 0.0)
    # EM on the likelihoods scaled to a row maximum of 1: the posterior of gene g is
    # lik_g * pi / (lik_g . pi), so an iteration is two matrix-vector products
    lik = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    L = lik[ok]
    weights = np.full(m.size, 1.0 / m.size)
    for _ in range(max_iter):
        pi = np.maximum(weights, 1e-300)
        new = pi * (L.T @ (1.0 / (L @ pi))) / L.shape[0]
        if np.max(np.abs(new - weights)) < 1e-8:
            weights = new
            break
        weights = new
    post = lik * np.maximum(weights, 1e-300)
    post /= post.sum(axis=1, keepdims=True)
    p = XX.shape[0]
    C = np.eye(p) if contrast is None else np.asarray(contrast, dtype=np.float64)
    if C.ndim == 1:
        C = C[:, None]
    s_e = theta[:, 1]
    # genes with s_e = 0 (all variance between samples) have no GLS fit here: NaN, as ~ok
    fit = ok & (s_e > 0)
    pval = np.zeros((tau.size, C.shape[1]))
    used = weights > 1e-6  # components without prior mass add nothing
    eig = np.linalg.eigh((ZZ + ZZ.T) / 2)  # shared by every gls_at below
    zyu = ZY[:, fit].T @ eig[1]
    for k in np.flatnonzero(used):
        sb = np.maximum(grid[:, k] - s_e / bar_lambda, 0.0)
        th = np.column_stack([sb, s_e])
        coef, cov = _gls_where(fit, XX, XY, ZX, ZZ, th, eig, zyu)
        if offset is not None:
            coef += offset
        z = (coef @ C) / np.sqrt(contrast_variance(C, cov))
        pval += post[:, k : k + 1] * 2 * stats.t.sf(np.abs(z), n - p)
    pval /= post[:, used].sum(axis=1, keepdims=True)
    tau_post = np.sum(post * grid, axis=1)
    sb = np.maximum(tau_post - s_e / bar_lambda, 0.0)
    th = np.column_stack([sb, s_e])
    coef, cov = _gls_where(fit, XX, XY, ZX, ZZ, th, eig, zyu)
    if offset is not None:
        coef += offset
    pval[~fit] = np.nan
    return {
        "estimate": coef @ C,
        "se": np.sqrt(contrast_variance(C, cov)),
        "p": pval,
        "tau": tau,
        "tau_post": tau_post,
        "weights": weights,
        "multipliers": m,
        "d": d,
    }


def _gls_where(
    fit: np.ndarray,
    XX: np.ndarray,
    XY: np.ndarray,
    ZX: np.ndarray,
    ZZ: np.ndarray,
    theta: np.ndarray,
    eig: tuple[np.ndarray, np.ndarray],
    zyu: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gls_at` ``coef, cov`` for the genes ``fit`` (``zyu`` is theirs); NaN elsewhere."""
    if fit.all():  # no copy into NaN-filled arrays (genes x p x p is large for p ~ 60)
        return gls_at(XX, XY, ZX, None, ZZ, theta, derivatives=False, eig=eig, zyu=zyu)[:2]
    p = XX.shape[0]
    coef = np.full((fit.size, p), np.nan)
    cov = np.full((fit.size, p, p), np.nan)
    coef[fit], cov[fit], _ = gls_at(
        XX, XY[:, fit], ZX, None, ZZ, theta[fit], derivatives=False, eig=eig, zyu=zyu
    )
    return coef, cov
