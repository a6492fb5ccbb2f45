"""Argument checks shared by the public constructors: each error names the argument, the value
given and what is allowed."""
from __future__ import annotations

import math
from typing import Any, Iterable


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_positive(name: str, value: Any) -> float:
    """``value > 0`` (finite)."""
    if not _is_number(value) or value <= 0 or math.isinf(value):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    """``value >= 0`` (finite)."""
    if not _is_number(value) or value < 0 or math.isinf(value):
        raise ValueError(f"`{name}` must be a non-negative finite number, got {value!r}.")
    return float(value)


def check_open_unit(name: str, value: Any) -> float:
    """``0 < value < 1``."""
    if not _is_number(value) or not 0 < value < 1:
        raise ValueError(f"`{name}` must be in the open interval (0, 1), got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value
