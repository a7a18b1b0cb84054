r"""The fast, conservative path: per-step RDP tabulated on a grid of sensitivity ratios.

Layer: ``analysis`` (pure numeric code). Owns the table of (q, σ) on the grid, its
convexity check and its chords; the histogram × table product that composes with it
is :mod:`analysis.composition`.

For one run, every example's per-step RDP at order α is a function of one number, its
clipped-norm ratio r = s/C ∈ [0, 1]: ρ_α(r) = RDP_SGM(q, σ/r, α). For integer α,
log A_α(r) = log Σ_k w_k exp(r² (k² - k)/(2σ²)) is a log-sum-exp of convex functions
of r, hence convex (and increasing); so the chord between two grid points lies above
the curve, and linear interpolation on the grid r_j = j/G is an *upper bound*.
Composition over a run's steps is then linear in a per-example histogram of r with
"tent" weights: a step with r = (j + f)/G adds (1 - f) to bin j and f to bin j + 1, and
Σ_t ρ(r_t) <= Σ_j H_j ρ(r_j) = (H @ table). This is a (points × G+1) by (G+1 × orders)
matrix product instead of one RDP evaluation per (row, order).

Fractional orders have no such closed-form argument, so every tabulated column is
checked for convexity (non-negative second differences); a column that fails is
replaced by the column of the next integer order, which is larger because RDP is
non-decreasing in α: still an upper bound, only looser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .rdp import DEFAULT_ORDERS, rdp_of_sensitivity

DEFAULT_GRID = 1024


@dataclass
class RdpTable:
    """Per-step RDP on r_j = j / size, j = 0..size; ``values[j, m]`` at ``orders[m]``."""

    sample_rate: float
    noise_multiplier: float
    size: int
    orders: np.ndarray
    values: np.ndarray
    bounded_orders: list[float] = field(default_factory=list)  # replaced by the next integer order

    @property
    def ratios(self) -> np.ndarray:
        return np.arange(self.size + 1) / self.size


def convex_columns(values: np.ndarray) -> np.ndarray:
    """True for each column whose second differences are all >= 0."""
    if values.shape[0] < 3:
        return np.ones(values.shape[1], dtype=bool)
    d2 = values[2:] - 2 * values[1:-1] + values[:-2]
    return np.all(d2 >= 0, axis=0)


def tabulate(
    sample_rate: float, noise_multiplier: float, size: int = DEFAULT_GRID, orders=DEFAULT_ORDERS
) -> RdpTable:
    """Tabulate the per-step RDP of (q, σ) on ``size`` cells of r, checked convex."""
    if size < 1:
        raise ValueError(f"grid size {size} must be at least 1")
    orders = np.asarray(orders, dtype=np.float64)
    r = np.arange(size + 1) / size
    values = rdp_of_sensitivity(sample_rate, noise_multiplier, r, orders)
    ok = convex_columns(values)
    bounded = []
    for m in np.flatnonzero(~ok):
        ceiling = float(math.ceil(orders[m]))
        if ceiling == orders[m]:  # an integer order is convex in theory; numerics say no
            raise ArithmeticError(
                f"per-step RDP at integer order {orders[m]} is not convex on the grid "
                f"(q={sample_rate}, sigma={noise_multiplier}); cannot bound it by interpolation"
            )
        values[:, m] = rdp_of_sensitivity(sample_rate, noise_multiplier, r, [ceiling])[:, 0]
        bounded.append(float(orders[m]))
    return RdpTable(sample_rate, noise_multiplier, size, orders, values, bounded)


def tent_weights(ratio: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin j, weight on j, weight on j + 1) of each ratio for linear interpolation."""
    x = np.clip(np.asarray(ratio, dtype=np.float64), 0.0, 1.0) * size
    j = np.minimum(np.floor(x), size - 1).astype(np.int64)  # r = 1 sits in the last cell
    f = x - j
    return j, 1.0 - f, f


def interpolate(table: RdpTable, ratio) -> np.ndarray:
    """The chord value of the table at each ratio: shape (n, len(orders))."""
    j, lo, hi = tent_weights(ratio, table.size)
    return lo[:, None] * table.values[j] + hi[:, None] * table.values[j + 1]
