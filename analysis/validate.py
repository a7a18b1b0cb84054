"""Parameter checks shared by every entry point (CLI, Python API, SQL UDFs): the one
place where the documented ranges live.

Each check returns the value as a Python number or raises :class:`ParameterError`,
whose message names the parameter as the library spells it (``sample_rate``); the
CLI maps those names to its flags (``--sample-rate``). Ranges are finite and
documented here, once:

======================  ==========================================  =====================================
parameter               range                                       why
======================  ==========================================  =====================================
``sample_rate`` q       [1e-12, 1]  (:data:`SAMPLE_RATE`)            below 1e-12 the per-step RDP
                                                                    (~ α q² / σ²) underflows toward
                                                                    subnormal numbers and the grid's
                                                                    convexity check fails on rounding
``noise_multiplier`` σ  [1e-3, 1e6] (:data:`NOISE_MULTIPLIER`)       below ~1e-154 σ² underflows to 0
                                                                    (the fractional-order series then
                                                                    never ends); 1e-3 already gives ε in
                                                                    the millions after one step, so
                                                                    nothing useful is lost; above 1e6
                                                                    every ε is below 1e-10
effective noise         [1e-3, inf] (:func:`effective_noise`)         σ / r for clipped-norm ratio r ∈ (0, 1];
multiplier (rdp_sgm)                                                inf means a zero-sensitivity step
``max_grad_norm`` C     [1e-12, 1e12] (:data:`MAX_GRAD_NORM`)        finite and positive (C = inf made
                                                                    every ratio 0: every ε tiny)
``delta`` δ             (0, 1), open at both ends                   log δ must be finite and negative
``steps`` T             whole, [0 or 1, 1e9] (:data:`MAX_STEPS`)     bounded work and memory
RDP ``order`` α         [1.01, 1e4] (:data:`ORDERS`)                 the integer formula sums α + 1 terms;
                                                                    as α → 1 the fractional series needs
                                                                    ever more terms and (α-1)·RDP loses
                                                                    its digits (at α = 1.0001 it took 16 s
                                                                    and was 50% off)
``ratio`` r = s/C       [0, 1]                                      a clipped norm is at most C
======================  ==========================================  =====================================

The fractional-order series of :mod:`analysis.rdp` needs at most ~90,000 terms
anywhere in this box (the worst corner is q = 0.5, σ = 1e4, α = 1.1); it is cut at
:data:`MAX_SERIES_TERMS` with an error, so no input can make it loop for ever.
"""

from __future__ import annotations

import math

import numpy as np

#: q ∈ [SAMPLE_RATE[0], SAMPLE_RATE[1]].
SAMPLE_RATE = (1e-12, 1.0)
#: σ of a run ∈ [NOISE_MULTIPLIER[0], NOISE_MULTIPLIER[1]]; effective noise multipliers
#: (σ / r) may be larger, and inf for a step with zero sensitivity.
NOISE_MULTIPLIER = (1e-3, 1e6)
#: C ∈ [MAX_GRAD_NORM[0], MAX_GRAD_NORM[1]].
MAX_GRAD_NORM = (1e-12, 1e12)
#: Steps of a run are at most this many.
MAX_STEPS = 10**9
#: RDP orders α ∈ [ORDERS[0], ORDERS[1]].
ORDERS = (1.01, 10_000.0)
MAX_ORDER = ORDERS[1]
#: The fractional-order series stops with an error after this many terms.
MAX_SERIES_TERMS = 1_000_000


class ParameterError(ValueError):
    """A parameter outside its documented range.

    ``params`` names the parameters the message speaks of, so a front end can
    say them its own way (the CLI prints ``--sample-rate`` for ``sample_rate``).
    """

    def __init__(self, message: str, *params: str):
        super().__init__(message)
        self.params = params


def finite(name: str, value) -> float:
    if isinstance(value, bool):
        raise ParameterError(f"{name} {value!r} is not a number", name)
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
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
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) and not (
            isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()):
        raise ParameterError(f"{name} {value!r} must be a whole number", name)
    n = int(value)
    if n < low or (high is not None and n > high):
        where = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise ParameterError(f"{name} {value} must be {where}", name)
    return n


# ------------------------------------------------------------------ the mechanism's parameters


def sample_rate(value, name: str = "sample_rate") -> float:
    """q ∈ [1e-12, 1] (:data:`SAMPLE_RATE`)."""
    return in_range(name, value, *SAMPLE_RATE, low_open=False)


def noise_multiplier(value, name: str = "noise_multiplier") -> float:
    """σ of a run ∈ [1e-3, 1e6] (:data:`NOISE_MULTIPLIER`)."""
    return in_range(name, value, *NOISE_MULTIPLIER, low_open=False)


def max_grad_norm(value, name: str = "max_grad_norm") -> float:
    """C ∈ [1e-12, 1e12] (:data:`MAX_GRAD_NORM`)."""
    return in_range(name, value, *MAX_GRAD_NORM, low_open=False)


def delta(value, name: str = "delta") -> float:
    """δ ∈ (0, 1)."""
    return in_range(name, value, 0.0, 1.0, high_open=True)


def steps(value, name: str = "steps", low: int = 1) -> int:
    """A whole number of steps in [low, 1e9] (:data:`MAX_STEPS`)."""
    return whole(name, value, low, MAX_STEPS)


def order(value, name: str = "order") -> float:
    """One RDP order α ∈ [1.01, 1e4] (:data:`ORDERS`)."""
    return in_range(name, value, *ORDERS, low_open=False)


def orders(values, name: str = "orders") -> np.ndarray:
    """A non-empty list of RDP orders, each in [1.01, 1e4], as a float64 array."""
    try:
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError):
        raise ParameterError(f"{name} {values!r} are not numbers", name) from None
    if arr.ndim != 1 or arr.size == 0:
        raise ParameterError(f"{name} must be a non-empty list of numbers", name)
    bad = ~(np.isfinite(arr) & (arr >= ORDERS[0]) & (arr <= ORDERS[1]))
    if bad.any():
        raise ParameterError(f"{name}: {arr[bad][0]:g} is outside [{ORDERS[0]:g}, {ORDERS[1]:g}]", name)
    return arr


def effective_noise(values, name: str = "noise_multiplier") -> np.ndarray:
    """Effective noise multipliers σ / r as a float64 array: each in [1e-3, inf] (inf: zero sensitivity)."""
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    bad = np.isnan(arr) | (arr < NOISE_MULTIPLIER[0])
    if bad.any():
        raise ParameterError(f"{name} {arr[bad][0]:g} is outside [{NOISE_MULTIPLIER[0]:g}, inf]", name)
    return arr


def ratios(values, name: str = "ratio") -> np.ndarray:
    """Clipped-norm ratios r = min(norm, C)/C as a float64 array, each in [0, 1]."""
    arr = np.asarray(values, dtype=np.float64)
    bad = ~((arr >= 0) & (arr <= 1))
    if bad.any():
        raise ParameterError(f"{name} {arr[bad].ravel()[0]:g} is outside [0, 1]", name)
    return arr


def mechanism(q, sigma, max_norm=None, delta_=None, n_steps=None, *, steps_low: int = 1) -> tuple:
    """Check a DP-SGD mechanism's parameters together (those given); return them as numbers."""
    out = [sample_rate(q), noise_multiplier(sigma)]
    out.append(max_grad_norm(max_norm) if max_norm is not None else None)
    out.append(delta(delta_) if delta_ is not None else None)
    out.append(steps(n_steps, low=steps_low) if n_steps is not None else None)
    return tuple(out)
