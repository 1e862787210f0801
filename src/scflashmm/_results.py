"""Where a fit's results live in an AnnData: the ``varm`` key names and the ``uns`` schema.

:func:`scflashmm.tl.flashmm_de` writes, :mod:`scflashmm.get` and :mod:`scflashmm.pl` read;
all three take the names from here. With ``key = key_added`` (default ``"flashmm"``):

===============================  ============================================================
``varm[f"{key}_coef"]``          fixed effects (genes x design columns); ``_se``, ``_t``, ``_p``
``varm[f"{key}_theta"]``         variance components (one column per random term, then
                                 ``"residual"``); ``_se_theta`` their standard errors
``varm[f"{key}_diag"]``          ``niter``, ``converged``, ``max_abs_dlogL``, ``logLik``
``varm[f"{key}_cov"]``           covariance of the fixed effects, array (genes, p, p)
``varm[f"{key}_df"]``            df per coefficient (Satterthwaite or Kenward-Roger)
``varm[f"{key}_contrast_coef"]`` contrasts (one column per name); ``_se``, ``_t``, ``_p``,
                                 and ``_df`` with per-test df
``varm[f"{key}_moderation"]``    ``tau``, ``tau_moderated`` (only with ``moderate``)
``varm[f"{key}_stats_xy"]``      ``X'Y`` (genes x design columns); ``_stats_zy`` ``Z'Y``
                                 (genes, q) and ``_stats_yy`` ``|y|^2`` (with ``store_stats``)
``uns[key]``                     :data:`UNS_FIELDS`
===============================  ============================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "COEF_TABLES",
    "CONTRAST_TABLES",
    "DEFAULT_KEY",
    "DIAG_COLUMNS",
    "MODERATION",
    "RESIDUAL",
    "UNS_FIELDS",
    "UNS_PARAMS",
    "check_h5ad_name",
    "results_uns",
    "varm_key",
]

#: Default ``key_added`` of :func:`scflashmm.tl.flashmm_de`.
DEFAULT_KEY = "flashmm"

#: Suffixes of the per-coefficient tables (columns: design columns).
COEF_TABLES = ("coef", "se", "t", "p")
#: Suffixes of the per-contrast tables (columns: contrast names).
CONTRAST_TABLES = ("contrast_coef", "contrast_se", "contrast_t", "contrast_p")
#: Suffix of the variance components, their standard errors, diagnostics, covariance of beta.
THETA, SE_THETA, DIAG, COV = "theta", "se_theta", "diag", "cov"
#: Suffixes of the Satterthwaite degrees of freedom of coefficients and contrasts.
DF, CONTRAST_DF = "df", "contrast_df"
#: Suffix of the moderated between-sample variances (``moderate=True``).
MODERATION = "moderation"
#: Suffix of the log2 fold changes of normalised means (``effect_size=True``).
LOG2FC = "log2fc"
#: Suffixes of the stored gene-wise summary statistics (``store_stats=True``).
STATS_XY, STATS_ZY, STATS_YY = "stats_xy", "stats_zy", "stats_yy"
#: Name of the residual variance's column in the ``theta`` tables.
RESIDUAL = "residual"
#: Columns of the ``diag`` table.
DIAG_COLUMNS = ("niter", "converged", "max_abs_dlogL", "logLik", "singular")

#: Keys of ``uns[key]["params"]``: the options of the fit, as given.
UNS_PARAMS = (
    "fixed", "random", "method", "df", "nonnegative", "moderate", "layer", "is_counts",
    "epsilon", "max_iter", "theta0", "chunk_size", "store_stats",
)  # fmt: skip
#: Keys of ``uns[key]`` (``contrast_matrix`` only when contrasts were given, ``moderation``
#: only with ``moderate``, ``stats`` only with ``store_stats``).
UNS_FIELDS = (
    "params", "x_columns", "random_terms", "random_formulas", "d", "z_columns",
    "contrast_names", "contrast_expressions", "contrast_matrix", "n_cells", "n_genes", "df",
    "n_nonconverged", "n_degenerate", "n_singular", "moderation", "stats", "varm_keys",
    "version",
)  # fmt: skip


def check_h5ad_name(name: object, what: str) -> str:
    """Return ``name`` if h5ad can store it as a key (else raise ValueError naming ``what``).

    Refused: non-strings, ``""``, names with ``"/"`` or a NUL character, and ``"_index"``
    (reserved by anndata).
    """
    if not isinstance(name, str) or not name or "/" in name or "\x00" in name:
        msg = (
            f"{what} must be a non-empty string without '/' or NUL characters (it becomes an "
            f"h5ad key), got {name!r}."
        )
        raise ValueError(msg)
    if name == "_index":
        msg = f"{what} cannot be '_index' (reserved by anndata in h5ad files)."
        raise ValueError(msg)
    return name


def varm_key(key: str, what: str) -> str:
    """Return the ``varm`` key of table ``what`` (``"coef"``, :data:`THETA` ...) of fit ``key``."""
    return f"{key}_{what}"


def results_uns(adata: AnnData, key: str) -> dict[str, Any]:
    """Return ``adata.uns[key]`` of a flashmm fit, or raise a KeyError that says how to get one."""
    if key not in adata.uns or varm_key(key, "coef") not in adata.varm:
        msg = (
            f"No flashmm results under key {key!r}: run scflashmm.tl.flashmm_de(adata, ...,"
            f" key_added={key!r}) first."
        )
        raise KeyError(msg)
    return adata.uns[key]
