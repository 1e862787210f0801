"""Safe parsing of contrast expressions over design column names and conditions.

An expression such as ``"(cls1:trtB + cls2:trtB)/2"``, ``"B - A"`` or
``"cls[1]:trt[T.B] - cls[2]:trt[T.B]"`` is a linear combination of column names. Names may hold
brackets, colons, dots and parentheses (``log(libsize)``), so tokens are matched against the
known names (longest first) before any operator; a name may also be quoted in backticks, as in
formulaic's constraints (```cls[1]:trt[T.B]```). The parser is a small recursive descent over
``+ - * /``, numbers and parentheses. Nothing is evaluated as code.

``cond(trt="B", cls="1")`` is the design row of a hypothetical cell with those values, as in
pertpy's formulaic-contrasts: ``cond(trt="B") - cond(trt="A")`` is the treatment effect.
Variables not given are averaged: factors over all their levels (equal weights), numeric
variables at their mean over the cells. (formulaic-contrasts uses the reference level of an
unspecified factor instead; averaging gives the mean effect over, e.g., the cell types.)

formulaic's own constraint parser (``formulaic.utils.constraints.LinearConstraints``) was
considered: it needs backticks around names holding ``:`` or brackets, which every interaction
column does (``cls[1]:trt[T.B]``), and has no ``cond``; so this parser accepts its backtick
quoting but keeps names unquoted too, with errors that name the bad part.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_COND = re.compile(r"cond\s*\(")
_KEYWORD = re.compile(r"\s*(`[^`]+`|[A-Za-z_][A-Za-z0-9_.]*)\s*=\s*")
_VALUE = re.compile(r"""\s*("[^"]*"|'[^']*'|[^,()\s]+)\s*""")

#: ``cond(**values)`` -> design row; see :class:`DesignConditions`.
Cond = Callable[[Mapping[str, Any]], np.ndarray]


def parse_contrast(
    expression: str, names: Sequence[str], *, cond: Cond | None = None
) -> np.ndarray:
    """Coefficient vector (len(names),) of a linear contrast expression over ``names``.

    ``cond`` evaluates ``cond(...)`` terms (a :class:`DesignConditions`); without it they are
    an error.
    """
    if not isinstance(expression, str) or not expression.strip():
        msg = f"A contrast must be a non-empty string expression, got {expression!r}."
        raise ValueError(msg)
    parser = _Parser(expression, list(names), cond)
    value = parser.parse()
    if np.ndim(value) == 0:
        msg = f"Contrast {expression!r} names no design column; known columns: {list(names)}."
        raise ValueError(msg)
    value = np.asarray(value, dtype=np.float64)
    if not value.any():
        msg = f"Contrast {expression!r} is zero for every design column: it tests nothing."
        raise ValueError(msg)
    return value


def contrasts_within(
    data: Any,
    factor: str,
    reference: str,
    within: str | None = None,
    *,
    levels: Sequence[str] | None = None,
) -> dict[str, str]:
    """Named contrasts "each level of ``factor`` vs ``reference``", within each group of ``within``.

    The expressions use ``cond(...)``, so they hold for any fixed formula over these
    variables; pass the result to :func:`scflashmm.tl.flashmm_de` (``contrasts=``) or
    :func:`scflashmm.get.flashmm_df` (``contrast=``).

    Parameters
    ----------
    data
        An AnnData (its ``obs``) or the cell metadata.
    factor
        The condition column, e.g. ``"trt"``.
    reference
        Its control level, e.g. ``"A"``.
    within
        Optional grouping column, e.g. the cell type ``"cls"``: one contrast per group.
    levels
        The levels of ``factor`` to compare with ``reference``; default all others.

    Returns
    -------
    ``{name: expression}``, e.g. ``{"B vs A in cls 1": 'cond(trt="B", cls="1") -
    cond(trt="A", cls="1")', ...}`` (levels in their categorical order, else sorted).

    Examples
    --------
    >>> import pandas as pd
    >>> obs = pd.DataFrame({"trt": ["A", "B", "A", "B"], "cls": ["1", "1", "2", "2"]})
    >>> contrasts_within(obs, "trt", "A", "cls")["B vs A in cls 2"]
    'cond(trt="B", cls="2") - cond(trt="A", cls="2")'
    """
    obs = getattr(data, "obs", data)
    if not isinstance(obs, pd.DataFrame):
        msg = f"data must be an AnnData or a DataFrame, got {type(data).__name__}."
        raise TypeError(msg)
    own = _levels(obs, factor, "factor")
    if str(reference) not in own:
        msg = f"reference {reference!r} is not a level of {factor!r}; its levels: {own}."
        raise ValueError(msg)
    if levels is None:
        compared = [lv for lv in own if lv != str(reference)]
    else:
        compared = [str(lv) for lv in levels]
        bad = [lv for lv in compared if lv not in own or lv == str(reference)]
        if bad:
            msg = f"levels {bad} are not levels of {factor!r} other than {reference!r}: {own}."
            raise ValueError(msg)
    if not compared:
        msg = f"{factor!r} has no level besides the reference {reference!r}."
        raise ValueError(msg)
    groups: list[str | None] = [None]
    if within is not None:
        groups = list(_levels(obs, within, "within"))
    out: dict[str, str] = {}
    for group in groups:
        extra = "" if group is None else f", {within}={_quote(group)}"
        where = "" if group is None else f" in {within} {group}"
        for level in compared:
            out[f"{level} vs {reference}{where}"] = (
                f"cond({factor}={_quote(level)}{extra}) - cond({factor}={_quote(reference)}{extra})"
            )
    return out


def _levels(obs: pd.DataFrame, column: str, what: str) -> list[str]:
    if column not in obs.columns:
        msg = f"{what}={column!r} is not a column of the cell metadata."
        raise ValueError(msg)
    if not column.isidentifier():
        msg = f"{what}={column!r} must be a plain name (letters, digits, '_') to use in cond()."
        raise ValueError(msg)
    col = obs[column]
    if isinstance(col.dtype, pd.CategoricalDtype):
        return [str(c) for c in col.cat.remove_unused_categories().cat.categories]
    return sorted({str(v) for v in col.dropna()})


def _quote(level: Any) -> str:
    text = str(level)
    if '"' in text:
        return f"'{text}'"
    return f'"{text}"'


class _Parser:
    def __init__(self, text: str, names: list[str], cond: Cond | None = None):
        self.text = text
        self.cond = cond
        self.names = sorted(set(names), key=len, reverse=True)
        self.index = {name: j for j, name in enumerate(names)}
        self.size = len(names)
        self.tokens = self._tokenize()
        self.pos = 0

    def _error(self, what: str) -> ValueError:
        return ValueError(f"Malformed contrast {self.text!r}: {what}.")

    def _tokenize(self) -> list[tuple[str, Any]]:
        tokens: list[tuple[str, Any]] = []
        i, text = 0, self.text
        while i < len(text):
            if text[i].isspace():
                i += 1
                continue
            if (match := _COND.match(text, i)) is not None:
                i = self._condition(match.end(), tokens)
                continue
            if text[i] == "`":
                stop = text.find("`", i + 1)
                quoted = text[i + 1 : stop]
                if stop < 0 or quoted not in self.index:
                    msg = (
                        f"Unknown name {text[i : stop + 1 if stop >= 0 else None]!r} in contrast "
                        f"{self.text!r}; known design columns: {list(self.index)}."
                    )
                    raise ValueError(msg)
                tokens.append(("name", quoted))
                i = stop + 1
                continue
            name = next((nm for nm in self.names if text.startswith(nm, i)), None)
            if name is not None:
                tokens.append(("name", name))
                i += len(name)
                continue
            number = _NUMBER.match(text, i)
            if number:
                tokens.append(("number", float(number.group())))
                i = number.end()
                continue
            if text[i] in "+-*/()":
                tokens.append(("op", text[i]))
                i += 1
                continue
            rest = re.match(r"[^\s+\-*/()]+", text[i:])
            word = rest.group() if rest else text[i]
            msg = (
                f"Unknown name {word!r} in contrast {self.text!r}; known design columns: "
                f"{list(self.index)}."
            )
            raise ValueError(msg)
        return tokens

    def _condition(self, i: int, tokens: list[tuple[str, Any]]) -> int:
        """Read ``name=value, ...)`` of a ``cond(`` at ``i``; append its design row."""
        start, text = i, self.text
        values: dict[str, Any] = {}
        while True:
            if text[i:].lstrip().startswith(")"):
                i = text.index(")", i) + 1
                break
            key = _KEYWORD.match(text, i)
            value = _VALUE.match(text, key.end()) if key else None
            if key is None or value is None or not value.group(1):
                part = text[start:i].strip() or text[i : i + 20]
                msg = (
                    f"Malformed cond(...) in contrast {self.text!r} after {part!r}: write "
                    'cond(variable="level", ...), e.g. cond(trt="B").'
                )
                raise ValueError(msg)
            name = key.group(1).strip("`")
            raw = value.group(1)
            if raw[0] in "\"'":
                item: Any = raw[1:-1]
            else:
                try:
                    item = float(raw)
                except ValueError:
                    item = raw
            if name in values:
                msg = f"cond(...) in contrast {self.text!r} gives {name!r} twice."
                raise ValueError(msg)
            values[name] = item
            i = value.end()
            if i < len(text) and text[i] == ",":
                i += 1
            elif i >= len(text) or text[i] != ")":
                msg = f"Malformed cond(...) in contrast {self.text!r}: missing ')'."
                raise ValueError(msg)
        if self.cond is None:
            msg = (
                f"cond(...) in contrast {self.text!r} needs the cell metadata and the fixed "
                "formula: use it in scflashmm.tl.flashmm_de(contrasts=...) or "
                "scflashmm.get.flashmm_df(contrast=...)."
            )
            raise ValueError(msg)
        try:
            row = np.asarray(self.cond(values), dtype=np.float64)
        except ValueError as exc:
            msg = f"In contrast {self.text!r}, {text[start - 5 : i]!r}: {exc}"
            raise ValueError(msg) from exc
        tokens.append(("row", row))
        return i

    def _peek(self) -> tuple[str, Any] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> tuple[str, Any]:
        token = self._peek()
        if token is None:
            raise self._error("unexpected end")
        self.pos += 1
        return token

    def parse(self) -> np.ndarray | float:
        value = self._sum()
        if (token := self._peek()) is not None:
            raise self._error(f"unexpected {token[1]!r}")
        return value

    def _sum(self) -> np.ndarray | float:
        value = self._product()
        while (token := self._peek()) and token[1] in ("+", "-"):
            self._take()
            right = self._product()
            if np.ndim(value) != np.ndim(right):
                raise self._error("a constant cannot be added to a design column")
            value = value + right if token[1] == "+" else value - right
        return value

    def _product(self) -> np.ndarray | float:
        value = self._unary()
        while (token := self._peek()) and token[1] in ("*", "/"):
            self._take()
            right = self._unary()
            if token[1] == "/":
                if np.ndim(right) != 0:
                    raise self._error("division by a design column is not linear")
                if right == 0:
                    raise self._error("division by zero")
                value = value / right
            else:
                if np.ndim(value) and np.ndim(right):
                    raise self._error("a product of two design columns is not linear")
                value = value * right
        return value

    def _unary(self) -> np.ndarray | float:
        kind, value = self._take()
        if kind == "op" and value in ("+", "-"):
            operand = self._unary()
            return operand if value == "+" else -operand
        if kind == "number":
            return value
        if kind == "name":
            vector = np.zeros(self.size)
            vector[self.index[value]] = 1.0
            return vector
        if kind == "row":
            return value.copy()
        if value == "(":
            inner = self._sum()
            if self._peek() is None or self._take()[1] != ")":
                raise self._error("missing ')'")
            return inner
        raise self._error(f"unexpected {value!r}")


class DesignConditions:
    """``cond(**values)``: the mean design row of hypothetical cells with the values given.

    Parameters
    ----------
    obs
        The cell metadata the design was built from.
    fixed
        The fixed-effects formula.
    x_columns
        The design column names, in the order of the returned rows.

    Variables not given are averaged: factors over all their levels (equal weights, the grid
    of all combinations of the unspecified factors), numeric variables at their mean. The
    formula is evaluated with formulaic's model spec of the fit, so transforms
    (``log(libsize)``) and codings are those of the design.
    """

    _MAX_ROWS = 100_000

    def __init__(self, obs: pd.DataFrame, fixed: str, x_columns: Sequence[str]):
        self.obs, self.fixed, self.x_columns = obs, fixed, [str(c) for c in x_columns]
        self._spec: Any = None

    def _prepare(self) -> None:
        from ._design import _materialize, _parse_formula, _prepare_obs

        parsed = _parse_formula(self.fixed, what="fixed formula")
        variables = set(parsed.required_variables)
        what = dict.fromkeys(variables, "fixed formula")
        self.data = _prepare_obs(self.obs, variables, factors=set(), what=what)
        mm = _materialize(parsed, self.data, self.fixed, what="fixed formula", output="pandas")
        if [str(c) for c in mm.columns] != self.x_columns:
            msg = "The cell metadata no longer gives the design of the fit (cells changed?)."
            raise ValueError(msg)
        self._spec = mm.model_spec

    def __call__(self, values: Mapping[str, Any]) -> np.ndarray:
        """Return the design row (len(x_columns),) of ``cond(**values)``."""
        if self._spec is None:
            self._prepare()
        data = self.data
        unknown = [v for v in values if v not in data.columns]
        if unknown:
            msg = (
                f"{unknown[0]!r} is not a variable of the fixed formula {self.fixed!r}; "
                f"its variables: {sorted(data.columns)}."
            )
            raise ValueError(msg)
        grid: dict[str, list[Any]] = {}
        for var in data.columns:
            col = data[var]
            if isinstance(col.dtype, pd.CategoricalDtype):
                levels = list(col.cat.categories)
                if var in values:
                    wanted = values[var]
                    hits = [lv for lv in levels if str(lv) == str(wanted)]
                    if not hits and isinstance(wanted, float) and wanted.is_integer():
                        hits = [lv for lv in levels if str(lv) == str(int(wanted))]
                    if not hits:
                        msg = f"{wanted!r} is not a level of {var!r}; its levels: {levels}."
                        raise ValueError(msg)
                    levels = hits
                grid[var] = levels
            elif var in values:
                if not isinstance(values[var], float):
                    msg = f"{var!r} is numeric: give a number, got {values[var]!r}."
                    raise ValueError(msg)
                grid[var] = [values[var]]
            else:
                grid[var] = [float(np.mean(col.to_numpy(dtype=np.float64)))]
        size = int(np.prod([len(v) for v in grid.values()]))
        if size > self._MAX_ROWS:
            msg = f"averaging over {size} combinations of levels; give more variables."
            raise ValueError(msg)
        rows = pd.DataFrame(list(itertools.product(*grid.values())), columns=list(grid))
        for var in grid:
            if isinstance(data[var].dtype, pd.CategoricalDtype):
                rows[var] = pd.Categorical(rows[var], categories=data[var].cat.categories)
        with np.errstate(divide="ignore", invalid="ignore"):
            mm = self._spec.get_model_matrix(rows, output="pandas")
        row = mm[self.x_columns].to_numpy(dtype=np.float64).mean(axis=0)
        if not np.isfinite(row).all():
            msg = "the design row is not finite (a numeric value outside a transform's domain?)."
            raise ValueError(msg)
        return row
