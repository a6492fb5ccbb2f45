"""Argument checks shared by every public constructor and function (pure Python, no torch).

Each raises ``ValueError`` naming the argument, the value given and what is allowed, e.g.
``"`delta` must be in (0, 1), got 1.5."``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fail(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def check_positive(name: str, value: Any) -> float:
    """A finite number ``> 0``."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise _fail(name, "a finite number > 0", value)
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    """A finite number ``>= 0``."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise _fail(name, "a finite number >= 0", value)
    return float(value)


def check_open_unit(name: str, value: Any) -> float:
    """A number in ``(0, 1)`` (e.g. δ)."""
    if not _is_real(value) or not 0 < value < 1:
        raise _fail(name, "in (0, 1)", value)
    return float(value)


def check_rate(name: str, value: Any, allow_zero: bool = False) -> float:
    """A probability in ``(0, 1]`` (or ``[0, 1]`` with ``allow_zero``)."""
    ok = _is_real(value) and math.isfinite(value) and value <= 1 and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise _fail(name, "in [0, 1]" if allow_zero else "in (0, 1]", value)
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """An integer ``>= minimum`` (integral floats such as ``1e6`` are accepted)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and _is_real(value) and math.isfinite(value) and float(value).is_integer():
        ok = True
    if not ok or value < minimum:
        raise _fail(name, f"an integer >= {minimum}", value)
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """An integer ``>= 1``."""
    return check_int(name, value, 1)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """One of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise _fail(name, f"one of {allowed}", value)
    return value
