"""Formula layer: model formulas over ``adata.obs`` -> fixed design ``X`` and random design ``Z``.

The model fitted for every gene is ``y = X beta + Z b + e`` with ``Z = [Z_1 .. Z_k]`` and
``b_i ~ N(0, s_i I_{q_i})`` (docs/model.md, Notation). This module builds ``X`` (dense, cells x p),
``Z`` (sparse CSR, cells x q), the block sizes ``d = (q_1 .. q_k)`` and the column names, with
`formulaic <https://matthewwardrop.github.io/formulaic/>`_ evaluated over a cell-metadata table.

Factors
-------
Every variable a formula uses is taken from ``obs``. Categorical columns keep their category
order (unused categories are dropped, as R's ``factor()`` drops absent levels); string/object
columns become categoricals whose levels are the sorted unique strings, i.e. code-point order,
which is R's order under the C locale that FLASHMM's reference outputs were produced with
(``P1, P10, P2``; uppercase before lowercase). Numeric columns are numeric; boolean columns
are left to formulaic (a 0/1 numeric column). A random term given as a bare column name is
always treated as a factor (so integer sample ids work).

Column names
------------
The names are formulaic's (``cls[1]``, ``trt[T.B]``, ``cls[1]:trt[T.B]``, ``log(libsize)``,
``Intercept``); they are the names users write in contrasts. R's ``model.matrix`` names the same
columns ``cls1``, ``trtB``, ``cls1:trtB``, ``log(libsize)``, ``(Intercept)`` (the tests match
the two spellings to compare with FLASHMM's reference outputs). Two differences besides the
spelling:

* inside an interaction, R orders the variables by their first appearance in the formula while
  formulaic keeps the order written in the term (``~trt + cls:trt``: R says ``trtA:cls2``,
  formulaic ``cls[T.2]:trt[A]``), so interaction names are matched as sets of factors;
* for such formulas the *order* of interaction columns can differ too (R varies the first
  factor fastest), so columns must be matched by name, never by position.

Only treatment (``[T.level]``) and full-dummy (``[level]``) encodings have an R spelling there;
other contrast codings (``C(x, contr.sum)`` ...) keep formulaic's name.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

__all__ = [
    "Design",
    "fixed_design",
    "make_design",
    "random_design",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Design:
    """Encoded fixed and random designs for one set of cells.

    Attributes
    ----------
    X
        Fixed-effects design, dense float64, cells x p.
    x_columns
        The p fixed-effect column names (formulaic names).
    Z
        Random-effects design, CSR float64, cells x q: one block per random term.
    d
        Number of columns of each block (``sum(d) == q``).
    z_columns
        The q random-effect column names.
    random_terms
        One name per random term (``"sam"`` for ``"sam"`` or ``"~0+sam"``).
    fixed
        The fixed formula as given.
    random
        The random formulas, normalised (a bare column name ``sam`` becomes ``"~0+sam"``);
        for lme4-style terms, each parsed term as written.
    structure
        For lme4-style terms (``"(1 + time | donor)"``), the
        :class:`~scflashmm._core.structure.CovarianceStructure` of ``G`` (``d`` then holds the
        number of columns of each term); None for the component forms.
    """

    X: np.ndarray
    x_columns: list[str]
    Z: sparse.csr_matrix
    d: list[int]
    z_columns: list[str]
    random_terms: list[str]
    fixed: str
    random: list[str] = field(default_factory=list)
    structure: Any = None


# --------------------------------------------------------------------------------------------
# formula parsing and data preparation
# --------------------------------------------------------------------------------------------


def _clean_formulaic_message(exc: BaseException) -> str:
    """Return formulaic's error message on one line, without terminal colour codes."""
    text = _ANSI.sub("", str(exc))
    # formulaic marks the offending span with these two characters
    text = text.replace("\u29db", "[").replace("\u29da", "]")
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    if len(parts) > 1:
        return f"{parts[0]} (at: {' '.join(parts[1:])})"
    return parts[0] if parts else type(exc).__name__


def _parse_formula(formula: str, *, what: str) -> Any:
    """Parse a one-sided formula with formulaic; raise ValueError with context on failure."""
    from formulaic import Formula
    from formulaic.errors import FormulaicError

    if not isinstance(formula, str):
        msg = f"The {what} must be a formula string, got {type(formula).__name__}."
        raise TypeError(msg)
    if not formula.strip():
        msg = f"The {what} is empty."
        raise ValueError(msg)
    try:
        parsed = Formula(formula)
    except (FormulaicError, SyntaxError, ValueError) as exc:
        msg = f"Cannot parse the {what} {formula!r}: {_clean_formulaic_message(exc)}"
        raise ValueError(msg) from exc
    if hasattr(parsed, "lhs") or not hasattr(parsed, "required_variables"):
        msg = (
            f"The {what} {formula!r} must be one-sided (no response on the left of '~'): "
            "the responses are the genes."
        )
        raise ValueError(msg)
    if type(parsed).__name__ != "SimpleFormula":
        msg = (
            f"The {what} {formula!r} has several parts ('|'): lme4's '(1|sam)' syntax is not "
            "used here; give random terms separately (random='sam' or '~0+sam')."
        )
        raise ValueError(msg)
    return parsed


def _formula_variables(formula: str, obs: pd.DataFrame) -> set[str]:
    """Return the columns of ``obs`` that ``formula`` uses as variables.

    formulaic's ``required_variables`` misses variables inside stateful transforms
    (``scale(x)``) and splits backticked names at dots (```orig.ident``` -> ``orig``), so the
    formula text is searched instead: a column is used when it appears in backticks, or as a
    name that is not called (``log(x)`` uses ``x``, not a column named ``log``), not an
    attribute (``np.log``) and not a keyword (``degree=2``). Variables that are not columns
    are reported by formulaic when the formula is evaluated.
    """
    used = set()
    for column in obs.columns:
        name = str(column)
        if f"`{name}`" in formula:
            used.add(name)
        elif name.isidentifier() and re.search(
            rf"(?<![\w.`]){re.escape(name)}(?![\w`.])(?!\s*\()(?!\s*=(?!=))", formula
        ):
            used.add(name)
    for name in sorted(used):
        if name.isidentifier() and re.search(rf"(?<![\w.`]){re.escape(name)}\s*[(.]", formula):
            msg = (
                f"The formula {formula!r} uses {name!r} both as a column of adata.obs and as "
                f"a function or module ({name}(...) or {name}.), which the column hides. "
                "Rename the column, e.g. "
                f"adata.obs = adata.obs.rename(columns={{{name!r}: '{name}_'}})."
            )
            raise ValueError(msg)
    return used


def _as_factor(col: pd.Series) -> pd.Categorical:
    """Categorical with R's level order: category order kept, else sorted unique values."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        return col.cat.remove_unused_categories().array
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        # R's factor() of a number sorts numerically; the level labels are the numbers
        return pd.Categorical(col, categories=np.sort(col.unique()))
    values = col.astype(str)
    return pd.Categorical(values, categories=sorted(values.unique()))


def _available(attrs: dict[str, Any]) -> str:
    avail = list(map(str, attrs.get("obs_columns", [])))
    shown = ", ".join(repr(a) for a in avail[:20]) + (" ..." if len(avail) > 20 else "")
    return f"Available columns: {shown or 'none'}."


def check_no_missing(col: pd.Series, label: str, *, advice: str) -> None:
    """Raise naming the first cell where the obs column ``col`` is missing.

    ``label`` completes ``adata.obs[...``, e.g. ``"'sam'] (used in the random terms)"``.
    """
    na = col.isna().to_numpy()
    if na.any():
        first = col.index[np.flatnonzero(na)[0]]
        msg = (
            f"adata.obs[{label} has {int(na.sum())} missing value(s), e.g. in cell {first!r}. "
            f"{advice} those cells before fitting."
        )
        raise ValueError(msg)


def _prepare_obs(
    obs: pd.DataFrame, variables: set[str], *, factors: set[str], what: dict[str, str]
) -> pd.DataFrame:
    """Select, check and convert the obs columns used by the formulas."""
    missing = sorted(v for v in variables if v not in obs.columns)
    if missing:
        where = ", ".join(f"{v!r} (in the {what[v]})" for v in missing)
        avail = list(map(str, obs.columns))
        shown = ", ".join(repr(a) for a in avail[:20]) + (" ..." if len(avail) > 20 else "")
        msg = f"adata.obs has no column {where}. Available columns: {shown or 'none'}."
        raise ValueError(msg)
    data = {}
    for v in sorted(variables):
        col = obs[v]
        check_no_missing(col, f"{v!r}] (used in the {what[v]})", advice="Drop or fill")
        if v in factors or isinstance(col.dtype, pd.CategoricalDtype):
            data[v] = _as_factor(col)
        elif pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            data[v] = col.to_numpy()
        else:
            data[v] = _as_factor(col)
    out = pd.DataFrame(data, index=obs.index)
    out.attrs["obs_columns"] = list(map(str, obs.columns))
    return out


def _materialize(parsed: Any, data: pd.DataFrame, formula: str, *, what: str, output: str) -> Any:
    from formulaic import model_matrix
    from formulaic.errors import FormulaicError

    try:
        # non-finite results (log of 0 ...) are reported by the caller with the column named
        with np.errstate(divide="ignore", invalid="ignore"):
            return model_matrix(parsed, data, na_action="raise", output=output)
    except (FormulaicError, ValueError, TypeError, NameError, AttributeError) as exc:
        text = _clean_formulaic_message(exc)
        missing = re.search(
            r"name '([^']+)' is not defined|`([^`]+)` is not present in the dataset", text
        )
        if missing:
            name = missing[1] or missing[2]
            msg = (
                f"adata.obs has no column {name!r} (in the {what}) for {formula!r}, and it is "
                "not a function formulaic knows. Columns whose names are not Python names are "
                f"written in backticks, e.g. `orig.ident`. {_available(data.attrs)}"
            )
            raise ValueError(msg) from exc
        msg = f"Cannot evaluate the {what} {formula!r}: {text}"
        raise ValueError(msg) from exc


def _term_name(parsed: Any, formula: str) -> str:
    terms = [str(t) for t in parsed if str(t) != "1"]
    if terms:
        return "+".join(terms)
    return formula.replace("~", "").strip()


def _normalize_random(random: str | Sequence[str], obs: pd.DataFrame) -> list[tuple[str, bool]]:
    """Return [(formula, is_bare_name)] for each random term."""
    if isinstance(random, str):
        random = [random]
    elif not isinstance(random, Sequence) or isinstance(random, bytes):
        msg = f"random must be a column name, a formula or a list of them, got {type(random)!r}."
        raise TypeError(msg)
    random = list(random)
    if not random:
        msg = "random must name at least one random term, e.g. random='sam' or '~0+sam'."
        raise ValueError(msg)
    out = []
    for r in random:
        if not isinstance(r, str):
            msg = f"Each random term must be a string, got {type(r).__name__}: {r!r}."
            raise TypeError(msg)
        if "~" in r:
            out.append((r, False))
        else:
            name = r.strip()
            if name not in obs.columns:
                avail = ", ".join(repr(str(a)) for a in list(obs.columns)[:20])
                msg = (
                    f"The random term {r!r} is not a column of adata.obs and not a formula "
                    f"(formulas start with '~', e.g. '~0+{name}'). Available columns: "
                    f"{avail or 'none'}."
                )
                raise ValueError(msg)
            out.append((f"~0+`{name}`" if not name.isidentifier() else f"~0+{name}", True))
    return out


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def _check_rank(X: np.ndarray, names: list[str], formula: str) -> None:
    """Raise ValueError naming the collinear columns if X is not of full column rank."""
    n, p = X.shape
    norms = np.sqrt(np.einsum("ij,ij->j", X, X))
    zero = [names[j] for j in np.flatnonzero(norms == 0)]
    if zero:
        msg = (
            f"The fixed design {formula!r} is rank deficient: column(s) "
            f"{', '.join(map(repr, zero))} are zero for every cell."
        )
        raise ValueError(msg)
    if n < p:
        msg = (
            f"The fixed design {formula!r} has {p} columns but there are only {n} cells; "
            "it cannot be of full column rank."
        )
        raise ValueError(msg)
    # QR of the column-scaled design, then SVD of the small triangular factor
    r = np.linalg.qr(X / norms, mode="r")
    _, s, vt = np.linalg.svd(r)
    tol = s.max() * max(n, p) * np.finfo(float).eps
    null = vt[s <= tol]
    if len(null):
        involved = np.flatnonzero(np.abs(null).max(axis=0) > 1e-8)
        cols = ", ".join(repr(names[j]) for j in involved)
        msg = (
            f"The fixed design {formula!r} is rank deficient (rank {p - len(null)} < {p} "
            f"columns): the columns {cols} are linearly dependent (confounded), so their "
            "effects cannot be told apart. Remove or recode one of the terms involved."
        )
        raise ValueError(msg)


def _check_confounding(design: Design) -> None:
    """Raise if a random block lies in the span of the fixed design or of the residual."""
    X, Z = design.X, design.Z
    xx = X.T @ X
    zx = np.asarray(Z.T @ X)
    zz = (Z.T @ Z).toarray()
    a_zx = np.linalg.solve(xx, zx.T)  # p x q
    zrz_diag = np.diag(zz) - np.einsum("qp,pq->q", zx, a_zx)
    start = 0
    for term, q in zip(design.random_terms, design.d, strict=True):
        block = slice(start, start + q)
        start += q
        total = np.diag(zz)[block].sum()
        if total <= 0:
            msg = f"The random term {term!r} is zero for every cell."
            raise ValueError(msg)
        if zrz_diag[block].sum() <= 1e-9 * total:
            msg = (
                f"The random term {term!r} is confounded with the fixed effects: its columns "
                f"lie in the span of the fixed design {design.fixed!r}, so its variance is "
                f"not identifiable. Remove {term!r} from the fixed formula (or from random)."
            )
            raise ValueError(msg)
        zzb = zz[block, block]
        if np.allclose(zzb, np.eye(q)) and Z.shape[0] == q:
            msg = (
                f"The random term {term!r} has one level per cell, so it is confounded with "
                "the residual variance."
            )
            raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# public builders
# --------------------------------------------------------------------------------------------


def fixed_design(formula: str, obs: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Encode a fixed-effects formula over a cell table.

    Parameters
    ----------
    formula
        One-sided formula, e.g. ``"~0+log(libsize)+cls+cls:trt"``.
    obs
        Cell metadata (``adata.obs``); one row per cell.

    Returns
    -------
    The design ``X`` (dense float64, cells x p, full column rank) and its column names.

    Raises
    ------
    ValueError
        On syntax errors (formulaic's message with context), a missing column (named),
        missing values, non-finite encoded values, or a rank-deficient design (the
        collinear columns are named).
    """
    parsed = _parse_formula(formula, what="fixed formula")
    variables = _formula_variables(formula, obs)
    data = _prepare_obs(
        obs, variables, factors=set(), what=dict.fromkeys(variables, "fixed formula")
    )
    mm = _materialize(parsed, data, formula, what="fixed formula", output="pandas")
    names = [str(c) for c in mm.columns]
    X = np.ascontiguousarray(mm.to_numpy(dtype=np.float64))
    if X.shape[1] == 0:
        msg = f"The fixed formula {formula!r} encodes to no columns."
        raise ValueError(msg)
    bad = ~np.isfinite(X)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        i = int(np.flatnonzero(bad[:, j])[0])
        msg = (
            f"The fixed design column {names[j]!r} of {formula!r} has {int(bad[:, j].sum())} "
            f"non-finite value(s), e.g. in cell {obs.index[i]!r} (log of 0?)."
        )
        raise ValueError(msg)
    _check_rank(X, names, formula)
    return X, names


def random_design(
    random: str | Sequence[str], obs: pd.DataFrame
) -> tuple[sparse.csr_matrix, list[int], list[str], list[str], list[str]]:
    """Encode the random-effects terms over a cell table.

    Parameters
    ----------
    random
        A column name (``"sam"``: one random intercept per level, i.e. ``"~0+sam"``), a
        one-sided formula (``"~0+sam"``, used as written, as FLASHMM does) or a list of them,
        one variance component each.
    obs
        Cell metadata (``adata.obs``).

    Returns
    -------
    ``(Z, d, term_names, column_names, formulas)``: ``Z`` is CSR float64, cells x q, the
    blocks concatenated in the order given; ``d`` the number of columns of each block.

    Raises
    ------
    ValueError
        On a missing column, missing values, syntax errors, duplicate terms, or a term that
        encodes to fewer than two columns (e.g. a factor with a single level).
    """
    terms = _normalize_random(random, obs)
    blocks, d, term_names, columns, formulas = [], [], [], [], []
    for formula, bare in terms:
        what = f"random term {formula!r}"
        parsed = _parse_formula(formula, what="random formula")
        variables = _formula_variables(formula, obs)
        data = _prepare_obs(
            obs,
            variables,
            factors=variables if bare else set(),
            what=dict.fromkeys(variables, what),
        )
        name = _term_name(parsed, formula)
        if name in term_names:
            msg = f"The random term {name!r} is given twice."
            raise ValueError(msg)
        if not bare and any(str(t) == "1" for t in parsed):
            msg = (
                f"The random formula {formula!r} has an intercept, so its columns are an "
                f"intercept and contrasts, not one indicator per level; a random intercept per "
                f"level is written '~0+{name}' (or just {name!r}). Using it as written."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
        mm = _materialize(parsed, data, formula, what="random formula", output="sparse")
        Zi = sparse.csr_matrix(mm, dtype=np.float64)
        names = [str(c) for c in mm.model_spec.column_names]
        if Zi.shape[1] < 2:
            factor_vars = [v for v in variables if isinstance(data[v].dtype, pd.CategoricalDtype)]
            if factor_vars:
                levels = {v: list(map(str, data[v].cat.categories)) for v in factor_vars}
                detail = "; ".join(f"{v!r} has levels {lv}" for v, lv in levels.items())
                msg = (
                    f"The random term {name!r} has a single level ({detail}); a variance "
                    "component needs a factor with at least two levels."
                )
            else:
                msg = (
                    f"The random term {formula!r} encodes to {Zi.shape[1]} column(s); a "
                    "variance component needs at least two (a factor with two or more levels). "
                    f"If {name!r} holds numeric group ids, pass the bare name {name!r} or "
                    f"'~0+C({name})'."
                )
            raise ValueError(msg)
        if not np.isfinite(Zi.data).all():
            msg = f"The random design of {formula!r} has non-finite values."
            raise ValueError(msg)
        blocks.append(Zi)
        d.append(Zi.shape[1])
        term_names.append(name)
        columns.extend(names)
        formulas.append(formula)
    Z = sparse.hstack(blocks, format="csr", dtype=np.float64)
    return Z, d, term_names, columns, formulas


def make_design(obs: pd.DataFrame, fixed: str, random: str | Sequence[str]) -> Design:
    """Encode both designs and check that the model is identifiable.

    Parameters
    ----------
    obs
        Cell metadata (``adata.obs``).
    fixed
        Fixed-effects formula (see :func:`fixed_design`).
    random
        Random terms (see :func:`random_design`).

    Returns
    -------
    The :class:`Design`.

    Raises
    ------
    ValueError
        As :func:`fixed_design` and :func:`random_design`; also if there are no cells, or a
        random term is confounded with the fixed effects (its columns in the span of ``X``)
        or with the residual (one level per cell).
    """
    if not isinstance(obs, pd.DataFrame):
        msg = f"obs must be a pandas DataFrame, got {type(obs).__name__}."
        raise TypeError(msg)
    if obs.shape[0] == 0:
        msg = "There are no cells (obs has zero rows)."
        raise ValueError(msg)
    X, x_columns = fixed_design(fixed, obs)
    if is_lme4_random(random):
        return _lme4_design(obs, X, x_columns, fixed, random)
    Z, d, terms, z_columns, formulas = random_design(random, obs)
    design = Design(
        X=X,
        x_columns=x_columns,
        Z=Z,
        d=d,
        z_columns=z_columns,
        random_terms=terms,
        fixed=fixed,
        random=formulas,
    )
    _check_confounding(design)
    return design


def is_lme4_random(random: Any) -> bool:
    """Return True for lme4-style terms: a string, or strings, with ``|`` in them.

    Raises
    ------
    ValueError
        A list that mixes lme4-style terms with column names or ``~`` formulas.
    """
    items = [random] if isinstance(random, str) else random
    if not isinstance(items, Sequence) or isinstance(items, bytes):
        return False
    bars = [isinstance(r, str) and "|" in r for r in items]
    if any(bars) and not all(bars):
        msg = (
            f"random mixes lme4-style terms with other forms: {list(items)!r}; write all "
            "terms the lme4 way, e.g. '(1 | sam) + (1 | batch)'."
        )
        raise ValueError(msg)
    return bool(bars) and all(bars)


def _lme4_design(
    obs: pd.DataFrame, X: np.ndarray, x_columns: list[str], fixed: str, random: Any
) -> Design:
    """Build the :class:`Design` of lme4-style random terms (:mod:`scflashmm._random_terms`)."""
    from ._random_terms import random_design as lme4_random_design

    formula = random if isinstance(random, str) else " + ".join(random)
    try:
        rd = lme4_random_design(formula, obs)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    st = rd.structure
    labels = [
        t.group if t.effects == ("(Intercept)",) else f"{t.group}: {' + '.join(t.effects)}"
        for t in st.terms
    ]
    design = Design(
        X=X,
        x_columns=x_columns,
        Z=sparse.csr_matrix(rd.Z, dtype=np.float64),
        d=[t.q for t in st.terms],
        z_columns=list(rd.z_names),
        random_terms=labels,
        fixed=fixed,
        random=[t.source for t in rd.terms],
        structure=st,
    )
    _check_lme4_confounding(design, rd.terms)
    from ._core.structured import check_memory

    check_memory(st, X.shape[1])
    return design


def _check_lme4_confounding(design: Design, terms: Sequence[Any]) -> None:
    """Raise if the columns of one effect of a term lie in the span of the fixed design."""
    X, Z, st = design.X, design.Z, design.structure
    xx = X.T @ X
    zx = np.asarray(Z.T @ X)
    zz_diag = np.asarray(Z.multiply(Z).sum(axis=0)).ravel()
    zrz_diag = zz_diag - np.einsum("qp,pq->q", zx, np.linalg.solve(xx, zx.T))
    for t, term, lo in zip(st.terms, terms, st.offsets[:-1], strict=True):
        for a, effect in enumerate(t.effects):
            cols = lo + a + t.n_effects * np.arange(t.n_levels)
            total = zz_diag[cols].sum()
            if total <= 0 or zrz_diag[cols].sum() <= 1e-9 * total:
                msg = (
                    f"The effect {effect!r} of random term {term.source!r} (grouping "
                    f"{t.group!r}) is collinear with the fixed design {design.fixed!r}: its "
                    "columns lie in the span of X, so its variance is not identifiable. Remove "
                    "it from the fixed formula or from the random term."
                )
                raise ValueError(msg)
