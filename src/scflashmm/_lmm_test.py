"""FLASHMM's ``lmmtest`` and ``contrast.matrix``: tests of fixed effects and contrasts as tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ._contrast import Cond, parse_contrast
from ._core._options import DfMethod, check_df
from ._core.inference import check_alternative, t_pvalue
from ._core.lmmfit import LMMFit


def contrast_matrix(
    contrasts: Mapping[str, str] | Sequence[str] | str,
    names: Sequence[str],
    *,
    cond: Cond | None = None,
) -> pd.DataFrame:
    """Build a contrast matrix from expressions over design column names.

    Parameters
    ----------
    contrasts
        A mapping ``name -> expression`` or a list of expressions (each named by its own text),
        e.g. ``{"BvsA": "trtB - trtA"}``, ``["A-(B+C+D)/3", "cls1:trtB - cls2:trtB"]``.
        Expressions are linear: column names, numbers, ``+ - * /`` and parentheses. Names may
        contain brackets, colons, dots and parentheses (``log(libsize)``, ``cls[1]:trt[T.B]``).
    names
        Design column names (e.g. ``fit.covariate_names``).
    cond
        Evaluates ``cond(variable="level", ...)`` terms (design rows of hypothetical cells),
        e.g. ``scflashmm._contrast.DesignConditions(obs, fixed, names)``; without it such
        terms are an error.

    Returns
    -------
    Covariates (rows, ``names``) x contrasts (columns).
    """
    names = [str(x) for x in names]
    if len(set(names)) != len(names):
        msg = f"Design column names must be unique, got {names}."
        raise ValueError(msg)
    if isinstance(contrasts, str):
        contrasts = [contrasts]
    items = contrasts.items() if isinstance(contrasts, Mapping) else [(c, c) for c in contrasts]
    columns = {str(label): parse_contrast(expr, names, cond=cond) for label, expr in items}
    if not columns:
        msg = "No contrast given."
        raise ValueError(msg)
    return pd.DataFrame(columns, index=names)


def lmm_test(
    fit: LMMFit,
    index: Sequence[int | str] | int | str | None = None,
    contrast: Any = None,
    alternative: str = "two-sided",
    *,
    df: DfMethod | None = None,
) -> pd.DataFrame:
    """T tests of fixed effects or of contrasts of them, for every gene (FLASHMM's ``lmmtest``).

    Parameters
    ----------
    fit
        A fit from :func:`scflashmm.lmm` or :func:`scflashmm.lmm_fit` (with ``output_cov=True``
        when testing contrasts).
    index
        Fixed effects to test, as 0-based positions or covariate names; default all. Ignored
        when ``contrast`` is given.
    contrast
        Contrasts to test: a DataFrame from :func:`contrast_matrix`, a (p, c) array, or
        expressions (mapping or list) parsed with :func:`contrast_matrix`.
    alternative
        ``"two-sided"``, ``"less"`` (lower tail) or ``"greater"`` (upper tail).
    df
        Degrees of freedom: ``"residual"`` (``n - p``, FLASHMM), ``"satterthwaite"`` or
        ``"kenward-roger"`` (each needs a fit with that ``df``, and ``output_cov=True`` for
        contrasts); default the fit's ``df_method``. Kenward-Roger tests use its adjusted
        standard errors; ``"residual"`` on a Kenward-Roger fit uses the unadjusted ones.

    Returns
    -------
    Genes x ``[<name>_coef ..., <name>_t ..., <name>_p ...]`` in FLASHMM's order, followed by
    ``[<name>_df ...]`` with Satterthwaite or Kenward-Roger df.
    """
    alternative = check_alternative(alternative)
    df = check_df(fit.df_method if df is None else df)
    per_gene = {"satterthwaite": fit.df_satterthwaite, "kenward-roger": fit.df_kenward_roger}
    if df != "residual" and per_gene[df] is None:
        msg = f"{df} df need a fit with df={df!r} (scflashmm.lmm or lmm_fit)."
        raise ValueError(msg)
    covariates = fit.covariate_names or [f"x{j + 1}" for j in range(fit.coef.shape[1])]
    if contrast is None:
        positions = _positions(index, covariates)
        labels = [covariates[j] for j in positions]
        estimate, se = fit.coef[:, positions], fit.se[:, positions]
        if df != fit.df_method and fit.df_method == "kenward-roger":  # unadjusted se
            if fit.cov is None:
                msg = "Residual df on a Kenward-Roger fit need output_cov=True."
                raise ValueError(msg)
            se = np.sqrt(np.diagonal(fit.cov, axis1=1, axis2=2))[:, positions]
        ddf = fit.df if df == "residual" else per_gene[df][:, positions]  # type: ignore[index]
    else:
        matrix = _as_contrast_frame(contrast, covariates)
        labels = [str(c) for c in matrix.columns]
        estimate, se, ddf = fit.contrast_estimates(matrix.to_numpy(dtype=np.float64), df)
    t = estimate / se
    p = t_pvalue(t, ddf, alternative)
    parts = [("coef", estimate), ("t", t), ("p", p)]
    if df != "residual":
        parts.append(("df", ddf))
    blocks = [
        pd.DataFrame(values, columns=[f"{name}_{what}" for name in labels])
        for what, values in parts
    ]
    table = pd.concat(blocks, axis=1)
    if fit.feature_names:  # else keep the RangeIndex (assigning None raises in pandas)
        table.index = pd.Index(fit.feature_names, name="gene")
    return table


def _positions(index: Any, covariates: list[str]) -> list[int]:
    if index is None:
        return list(range(len(covariates)))
    scalar = isinstance(index, int | str | np.integer) or np.ndim(index) == 0
    items = [index] if scalar else list(index)
    positions = []
    for item in items:
        if isinstance(item, str):
            if item not in covariates:
                msg = f"Unknown covariate {item!r}; the fit has {covariates}."
                raise ValueError(msg)
            positions.append(covariates.index(item))
        elif isinstance(item, int | np.integer) and -len(covariates) <= item < len(covariates):
            positions.append(int(item) % len(covariates))
        else:
            msg = (
                f"index must hold covariate names or 0-based positions < {len(covariates)}, "
                f"got {item!r}."
            )
            raise ValueError(msg)
    return positions


def _as_contrast_frame(contrast: Any, covariates: list[str]) -> pd.DataFrame:
    if isinstance(contrast, pd.DataFrame):
        missing = [c for c in covariates if c not in contrast.index]
        if missing or len(contrast.index) != len(covariates):
            msg = (
                f"The contrast matrix must have one row per covariate {covariates}; "
                f"missing {missing}."
            )
            raise ValueError(msg)
        return contrast.loc[covariates]
    if isinstance(contrast, Mapping | str) or (
        isinstance(contrast, Sequence) and all(isinstance(c, str) for c in contrast)
    ):
        return contrast_matrix(contrast, covariates)
    matrix = np.asarray(contrast, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.shape[0] != len(covariates):
        msg = (
            f"The contrast matrix has {matrix.shape[0]} rows, expected one per covariate "
            f"({len(covariates)})."
        )
        raise ValueError(msg)
    return pd.DataFrame(
        matrix, index=covariates, columns=[f"contrast{j + 1}" for j in range(matrix.shape[1])]
    )
