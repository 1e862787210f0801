"""Option types and their checks, in one place for the core, ``tl`` and the CLI.

Every public entry point validates its options with these functions, so that one option gets
one error message wherever it is given.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import numpy as np

Method = Literal["REML", "ML"]
DfMethod = Literal["residual", "satterthwaite", "kenward-roger"]
#: Convergence criterion of Fisher scoring: FLASHMM's absolute score, or the score of the
#: standardised response (invariant to the units of y; docs/model.md, Convergence).
Criterion = Literal["flashmm", "relative"]

# Relative tolerance of every rank check on a design (singular values of a column-scaled
# matrix below this, relative to the largest, count as zero).
RANK_RTOL = 1e-10


def check_choice(value: Any, name: str, choices: Any) -> str:
    """Return ``value`` if it is one of ``choices`` (a ``Literal`` type or a tuple of strings)."""
    allowed = get_args(choices) or tuple(choices)
    if not isinstance(value, str) or value not in allowed:
        names = list(map(repr, allowed))
        listed = " or ".join(names) if len(names) == 2 else f"one of {', '.join(names)}"
        msg = f"{name} must be {listed}, got {value!r}."
        raise ValueError(msg)
    return value


def check_method(method: Any) -> Method:
    """Return ``method`` if it is ``"REML"`` or ``"ML"``."""
    return check_choice(method, "method", Method)  # type: ignore[return-value]


def check_df(df: Any, method: Any = None) -> DfMethod:
    """Return ``df`` if it names a degrees-of-freedom method (usable with ``method``, if given).

    Kenward-Roger is defined for REML fits only.
    """
    out = check_choice(df, "df", DfMethod)
    if out == "kenward-roger" and method == "ML":
        msg = (
            "df='kenward-roger' needs method='REML': the Kenward-Roger adjustment is defined "
            "for REML estimates (use df='satterthwaite' with ML)."
        )
        raise ValueError(msg)
    return out  # type: ignore[return-value]


def check_criterion(criterion: Any) -> Criterion:
    """Return ``criterion`` if it is ``"flashmm"`` or ``"relative"``."""
    return check_choice(criterion, "criterion", Criterion)  # type: ignore[return-value]


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int if it is a positive integer (``True`` and ``1.5`` are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        msg = f"{name} must be a positive integer, got {value!r}."
        raise TypeError(msg)
    if not math.isfinite(value) or int(value) != value or value < 1:
        msg = f"{name} must be a positive integer, got {value!r}."
        raise ValueError(msg)
    return int(value)


def check_positive_float(value: Any, name: str) -> float:
    """Return ``value`` as a float if it is a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        msg = f"{name} must be a positive number, got {value!r}."
        raise TypeError(msg)
    if not (math.isfinite(value) and value > 0):
        msg = f"{name} must be a finite positive number, got {value!r}."
        raise ValueError(msg)
    return float(value)


def check_theta0(theta0: Any, k: int, *, nonnegative: bool = False) -> np.ndarray | None:
    """Return start values ``(s_1 .. s_k, s_0)`` as floats, or None.

    They must be finite, the residual variance ``s_0`` positive (``V = s_0 I`` at the start is
    then positive definite whatever the components, since FLASHMM allows negative components)
    and, with ``nonnegative``, the components ``s_1 .. s_k`` at least 0.
    """
    if theta0 is None:
        return None
    try:
        start = np.asarray(theta0, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        msg = f"theta0 must be numbers, got {theta0!r}."
        raise TypeError(msg) from exc
    if start.shape != (k + 1,):
        msg = (
            f"theta0 must have k + 1 = {k + 1} values (one per component, residual last), "
            f"got {start.size}."
        )
        raise ValueError(msg)
    if not np.isfinite(start).all():
        msg = f"theta0 must be finite, got {start.tolist()}."
        raise ValueError(msg)
    if start[-1] <= 0:
        msg = f"theta0's residual variance (last value) must be positive, got {start[-1]!r}."
        raise ValueError(msg)
    if nonnegative and np.any(start[:-1] < 0):
        msg = (
            "theta0's variance components must be >= 0 with nonnegative=True, got "
            f"{start[:-1].tolist()}."
        )
        raise ValueError(msg)
    return start
