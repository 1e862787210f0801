"""lme4-style random-effects terms: parsing and the random-effects design ``Z``.

Supported forms, alone or added with ``+``::

    (1 | g)                 random intercept per level of g
    (1 | g1) + (1 | g2)     crossed factors
    (1 | a/b)               nested: (1 | a) + (1 | a:b)
    (1 | a:b)               an interaction as grouping factor
    (1 + x | g), (x | g)    correlated intercept and slope (unstructured covariance)
    (0 + x | g), (-1+x | g) slope only
    (1 + x || g)            uncorrelated: split as lme4 does into (1 | g) + (0 + x | g)

Slope variables must be numeric columns (factor slopes such as ``(0 + celltype | donor)`` are not
supported). Parsing is a small tokenizer over names, never ``eval``. Column names that are not
identifiers can be quoted with backticks.

``Z`` follows lme4's layout: terms in the order written (nested terms expanded in place), and
within a term level-major, i.e. for each level its intercept then its slopes. (lme4 itself
additionally sorts terms by decreasing number of levels; the fit does not depend on the order.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._core.structure import CovarianceStructure, RandomTermStructure

__all__ = ["RandomDesign", "RandomTerm", "parse_random_terms", "random_design"]

INTERCEPT = "(Intercept)"
_NAME = r"(?:`[^`]+`|[A-Za-z_.][A-Za-z0-9_.]*)"


@dataclass(frozen=True)
class RandomTerm:
    """One parsed random-effects term.

    Attributes
    ----------
    group
        Columns whose interaction is the grouping factor (one for ``(1|g)``).
    effects
        ``"(Intercept)"`` and/or the names of numeric slope columns, in the order written
        (intercept first).
    correlated
        Unstructured covariance between the effects (``|``) or diagonal (``||``, after
        splitting each term has one effect, so this only matters for terms built by hand).
    source
        The text of the term as written.
    """

    group: tuple[str, ...]
    effects: tuple[str, ...]
    correlated: bool = True
    source: str = ""

    @property
    def group_name(self) -> str:
        """Name of the grouping factor, ``"a:b"`` for an interaction."""
        return ":".join(self.group)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and backticks."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(text):
        if ch == "`":
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth < 0:
                msg = f"Unbalanced parentheses in random-effects formula {text!r}."
                raise ValueError(msg)
        elif not quoted and depth == 0 and ch == sep:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0 or quoted:
        msg = f"Unbalanced parentheses or backticks in random-effects formula {text!r}."
        raise ValueError(msg)
    parts.append(text[start:])
    return parts


def _unquote(name: str) -> str:
    return name[1:-1] if name.startswith("`") else name


def _parse_effects(lhs: str, term: str) -> tuple[str, ...]:
    """Left of the bar: ``1``, ``0``, ``-1`` and slope names joined by ``+``."""
    token = re.compile(rf"\s*([+-]?)\s*({_NAME}|\d+)\s*")
    pos, first, intercept, slopes = 0, True, True, []
    while pos < len(lhs) or first:
        m = token.match(lhs, pos)
        if m is None or (not first and not m.group(1)):
            _bad_term(term, "the left of '|' must be 1, 0 or numeric column names joined by '+'")
        sign, tok = m.group(1), m.group(2)
        pos, first = m.end(), False
        if tok in ("0", "1"):
            intercept = tok == "1" and sign != "-"
        elif tok.isdigit():
            _bad_term(term, f"{tok!r} is not 0 or 1")
        elif sign == "-":
            _bad_term(term, f"removing a slope ('-{tok}') is not supported")
        elif _unquote(tok) not in slopes:
            slopes.append(_unquote(tok))
    effects = ((INTERCEPT,) if intercept else ()) + tuple(slopes)
    if not effects:
        _bad_term(term, "it has no effect (neither an intercept nor a slope)")
    return effects


def _parse_groups(rhs: str, term: str) -> list[tuple[str, ...]]:
    """Right of the bar: ``g``, ``a:b`` or nested ``a/b`` (= ``a`` then ``a:b``)."""
    nested = [p.strip() for p in _split_top(rhs, "/")]
    out: list[tuple[str, ...]] = []
    prefix: tuple[str, ...] = ()
    for part in nested:
        names = [p.strip() for p in _split_top(part, ":")]
        if not all(re.fullmatch(_NAME, n) for n in names):
            _bad_term(
                term, f"{part!r} is not a grouping factor (column names joined by ':' or '/')"
            )
        prefix = prefix + tuple(_unquote(n) for n in names)
        out.append(prefix)
    return out


def _bad_term(term: str, why: str) -> NoReturn:
    msg = f"Cannot parse random-effects term {term.strip()!r}: {why}."
    raise ValueError(msg)


def parse_random_terms(formula: str) -> list[RandomTerm]:
    """Parse lme4-style random-effects terms.

    Parameters
    ----------
    formula
        Terms such as ``"(1 + time | donor) + (1 | batch)"`` (see the module docstring); an
        optional leading ``~`` is ignored.

    Returns
    -------
    The terms in ``Z``'s order, nested terms expanded and ``||`` terms split (one effect each).
    """
    if not isinstance(formula, str):
        msg = f"Random-effects terms must be a string; got {type(formula).__name__}."
        raise TypeError(msg)
    text = formula.strip()
    if text.startswith("~"):
        text = text[1:]
    if not text.strip():
        msg = "Empty random-effects formula."
        raise ValueError(msg)
    terms: list[RandomTerm] = []
    for raw in _split_top(text, "+"):
        src = raw.strip()
        if not (src.startswith("(") and src.endswith(")")):
            _bad_term(src or raw, "a term is written '(effects | group)'")
        inner = src[1:-1]
        bars = [m.start() for m in re.finditer(r"\|", inner)]
        if len(bars) == 1:
            lhs, rhs, correlated = inner[: bars[0]], inner[bars[0] + 1 :], True
        elif len(bars) == 2 and bars[1] == bars[0] + 1:
            lhs, rhs, correlated = inner[: bars[0]], inner[bars[1] + 1 :], False
        else:
            _bad_term(src, "expected exactly one '|' or '||'")
        effects = _parse_effects(lhs, src)
        for group in _parse_groups(rhs, src):
            if correlated or len(effects) == 1:
                terms.append(RandomTerm(group, effects, True, src))
            else:
                terms.extend(RandomTerm(group, (e,), True, src) for e in effects)
    return terms


@dataclass(frozen=True)
class RandomDesign:
    """The random-effects design of a set of cells.

    Attributes
    ----------
    Z
        Sparse CSC matrix (cells, q), columns level-major within each term.
    z_names
        Column names ``"group[level]:effect"`` (q).
    levels
        Level names of each term's grouping factor.
    structure
        The :class:`~scflashmm._core.structure.CovarianceStructure` of ``G``.
    terms
        The parsed terms.
    """

    Z: sp.csc_matrix
    z_names: tuple[str, ...]
    levels: tuple[tuple[str, ...], ...]
    structure: CovarianceStructure
    terms: tuple[RandomTerm, ...]


def _grouping_codes(data: pd.DataFrame, term: RandomTerm) -> tuple[np.ndarray, list[str]]:
    """Integer codes and level names of the (interaction of the) grouping columns.

    Levels are the observed categories in category order (sorted values for non-categorical
    columns); an interaction's levels are the observed combinations, first column slowest.
    """
    codes_list, names_list = [], []
    for col in term.group:
        s = data[col]
        if s.isna().any():
            msg = f"Grouping column {col!r} of random term {term.source!r} has missing values."
            raise ValueError(msg)
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.cat.remove_unused_categories()
            codes_list.append(s.cat.codes.to_numpy().astype(np.int64))
            names_list.append([str(c) for c in s.cat.categories])
        else:
            uniq, inv = np.unique(s.to_numpy(), return_inverse=True)
            codes_list.append(inv.astype(np.int64).ravel())
            names_list.append([str(u) for u in uniq])
    combo = np.stack(codes_list, axis=1)
    uniq, inv = np.unique(combo, axis=0, return_inverse=True)
    names = [":".join(names_list[j][c] for j, c in enumerate(row)) for row in uniq]
    return inv.ravel(), names


def random_design(terms: str | list[RandomTerm], data: pd.DataFrame) -> RandomDesign:
    """Build ``Z`` and the covariance structure of lme4-style terms.

    Parameters
    ----------
    terms
        A random-effects formula (:func:`parse_random_terms`) or parsed terms.
    data
        One row per cell with the grouping and slope columns.

    Returns
    -------
    The :class:`RandomDesign`.

    Raises
    ------
    ValueError
        A missing column, a slope column that is not numeric, a grouping factor with one level,
        or a term with at least as many random effects as cells (not identifiable).
    """
    parsed = parse_random_terms(terms) if isinstance(terms, str) else list(terms)
    n = len(data)
    blocks: list = []
    names: list[str] = []
    levels: list = []
    structs: list = []
    for term in parsed:
        for col in (*term.group, *(e for e in term.effects if e != INTERCEPT)):
            if col not in data.columns:
                msg = f"Column {col!r} of random term {term.source!r} is not in the cell table."
                raise KeyError(msg)
        slopes = []
        for e in term.effects:
            if e == INTERCEPT:
                slopes.append(np.ones(n))
                continue
            s = data[e]
            if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
                msg = (
                    f"Slope {e!r} of random term {term.source!r} is not numeric "
                    f"(dtype {s.dtype}); factor slopes are not supported: use a numeric column "
                    "or one term per level."
                )
                raise ValueError(msg)
            v = s.to_numpy(dtype=float)
            if not np.all(np.isfinite(v)):
                msg = f"Slope {e!r} of random term {term.source!r} has missing or infinite values."
                raise ValueError(msg)
            slopes.append(v)
        codes, lv = _grouping_codes(data, term)
        n_t = len(term.effects)
        if len(lv) < 2:
            msg = (
                f"Grouping factor {term.group_name!r} of random term {term.source!r} has "
                f"{len(lv)} level; a random effect needs at least 2."
            )
            raise ValueError(msg)
        if len(lv) * n_t >= n:
            msg = (
                f"Random term {term.source!r} has {len(lv) * n_t} random effects for {n} cells: "
                "at least as many as observations, so its variance cannot be identified."
            )
            raise ValueError(msg)
        E = np.stack(slopes, axis=1)  # (n, n_t)
        rows = np.repeat(np.arange(n), n_t)
        cols = (codes[:, None] * n_t + np.arange(n_t)[None, :]).ravel()
        blocks.append(sp.csc_matrix((E.ravel(), (rows, cols)), shape=(n, len(lv) * n_t)))
        g = term.group_name
        names.extend(f"{g}[{level}]:{e}" for level in lv for e in term.effects)
        levels.append(tuple(lv))
        structs.append(RandomTermStructure(g, len(lv), term.effects, term.correlated))
    Z = sp.hstack(blocks, format="csc")
    Z.eliminate_zeros()
    return RandomDesign(
        Z, tuple(names), tuple(levels), CovarianceStructure(tuple(structs)), tuple(parsed)
    )
