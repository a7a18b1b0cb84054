"""Parameter checks shared by every entry point (CLI, Python API, SQL UDFs).

Each check returns the value as a Python number or raises :class:`ParameterError`,
whose message names the parameter as the library spells it (``sample_rate``); the
CLI maps those names to its flags (``--sample-rate``). Ranges are finite and
documented here, once.
"""

from __future__ import annotations

import math


class ParameterError(ValueError):
    """A parameter outside its documented range.

    ``params`` names the parameters the message speaks of, so a front end can
    say them its own way (the CLI prints ``--sample-rate`` for ``sample_rate``).
    """

    def __init__(self, message: str, *params: str):
        super().__init__(message)
        self.params = params


def finite(name: str, value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} {value!r} is not a number", name) from None
    if not math.isfinite(x):
        raise ParameterError(f"{name} {value} must be finite", name)
    return x


def in_range(name: str, value, low: float, high: float, *, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a float in the interval (low, high] (the ends as the flags say)."""
    x = finite(name, value)
    if (x <= low if low_open else x < low) or (x >= high if high_open else x > high):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ParameterError(f"{name} {value} is outside {left}{low:g}, {high:g}{right}", name)
    return x


def positive(name: str, value) -> float:
    """A finite, strictly positive float."""
    x = finite(name, value)
    if not x > 0:
        raise ParameterError(f"{name} {value} must be positive", name)
    return x


def whole(name: str, value, low: int = 1, high: int | None = None) -> int:
    """An integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
            isinstance(value, float) and value.is_integer()):
        raise ParameterError(f"{name} {value!r} must be a whole number", name)
    n = int(value)
    if n < low or (high is not None and n > high):
        where = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise ParameterError(f"{name} {value} must be {where}", name)
    return n
