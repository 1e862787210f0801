"""Safe parsing of contrast expressions over design column names.

An expression such as ``"(cls1:trtB + cls2:trtB)/2"``, ``"B - A"`` or
``"cls[1]:trt[T.B] - cls[2]:trt[T.B]"`` is a linear combination of column names. Names may hold
brackets, colons, dots and parentheses (``log(libsize)``), so tokens are matched against the
known names (longest first) before any operator; the parser is a small recursive descent over
``+ - * /``, numbers and parentheses. Nothing is evaluated as code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def parse_contrast(expression: str, names: Sequence[str]) -> np.ndarray:
    """Coefficient vector (len(names),) of a linear contrast expression over ``names``."""
    if not isinstance(expression, str) or not expression.strip():
        msg = f"A contrast must be a non-empty string expression, got {expression!r}."
        raise ValueError(msg)
    parser = _Parser(expression, list(names))
    value = parser.parse()
    if np.ndim(value) == 0:
        msg = f"Contrast {expression!r} names no design column; known columns: {list(names)}."
        raise ValueError(msg)
    return np.asarray(value, dtype=np.float64)


class _Parser:
    def __init__(self, text: str, names: list[str]):
        self.text = text
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
        if value == "(":
            inner = self._sum()
            if self._peek() is None or self._take()[1] != ")":
                raise self._error("missing ')'")
            return inner
        raise self._error(f"unexpected {value!r}")
