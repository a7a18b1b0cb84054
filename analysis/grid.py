r"""The fast, conservative path: per-step RDP tabulated on a grid of sensitivity ratios.

Layer: ``analysis`` (pure numeric code). Owns the table of (q, σ) on the grid, its
convexity check, its chords and their error bound; the histogram × table product that
composes with it is :mod:`analysis.composition`.

For one run, every example's per-step RDP at order α is a function of one number, its
clipped-norm ratio r = s/C ∈ [0, 1]: ρ_α(r) = RDP_SGM(q, σ/r, α). For integer α,
log A_α = log Σ_k w_k exp(u (k² - k)/(2σ²)) with u = r² is a log-sum-exp of *affine*
functions of u, hence convex (and increasing) in u — and therefore in r too. The table
holds ρ at the nodes r_j = j/G, and between two nodes the fast path takes the chord
*in u*: a row with r_j ≤ r ≤ r_{j+1} gets

    (1 - f) ρ(r_j) + f ρ(r_{j+1}),   f = (r² - r_j²)/(r_{j+1}² - r_j²) = ((rG)² - j²)/(2j + 1),

an *upper bound* (a chord of a convex function of u lies above it). It is never above
the chord in r between the same nodes (f ≤ (r - r_j)/(r_{j+1} - r_j)), and near 0, where
ρ ≈ c·r² = c·u, it is exact to first order: the chord in r from 0 to 1/G grew like r
while ρ grows like r², which overstated ε by up to 24% for points whose norms are all
tiny (q = 0.1, σ = 0.5); the chord in u is within ~2e-5 there. Composition over a run's
steps is then linear in a per-example histogram of these "tent" weights:
Σ_t ρ(r_t) ≤ Σ_j H_j ρ(r_j) = (H @ table), a (points × G+1) by (G+1 × orders) product.

Error bound. Where an order's ρ turns sharply (the log-sum-exp switches from its k = 0
term to its k = α term over less than a cell: large orders, small q), one cell's chord
can overstate that row's ρ many times over, and a point whose optimal order is there
(few steps, small ε) had ε 2.5% too high (q = 0.001, σ = 2, 100 steps at r ∈ [0.4, 0.5],
1,024 cells). So each table carries :attr:`RdpTable.excess`: per node n and order, the
largest amount E by which a chord of a cell next to n can exceed ρ. With S_j the slope
(in u) of cell j's chord and Δ its width, convexity puts ρ above both tangent bounds
v_j + S_{j-1}(u - u_j) and v_{j+1} + S_{j+1}(u - u_{j+1}), so in cell j

    chord - ρ ≤ E_j = (S_j - S_{j-1})(S_{j+1} - S_j) Δ / (S_{j+1} - S_{j-1})

(the last cell, with no right neighbour, takes (S_j - S_{j-1}) Δ). A row's tent weights
sum to 1 over its cell's two nodes, so H @ excess bounds the total overstatement of a
point's composed RDP: composed - H @ excess is a lower bound of the exact sum, and
:func:`analysis.composition.needs_exact` says which points' ε the two bounds do not pin
within a relative tolerance (the warehouse recomputes those exactly).

Fractional orders have no such closed-form argument, so every tabulated column is
checked for convexity in u (non-decreasing chord slopes, up to rounding); a column that
fails is replaced by the column of the next integer order, which is larger because RDP
is non-decreasing in α: still an upper bound, only looser (and its error bound is not
known, so its excess is inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .rdp import DEFAULT_ORDERS, rdp_of_sensitivity

DEFAULT_GRID = 1024
#: The most cells a table may have (the histogram holds points × (cells + 1) numbers).
MAX_GRID = 1 << 16


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

    @property
    def excess(self) -> np.ndarray:
        """Per node and order: the most a chord of a cell next to the node exceeds ρ (see the module docstring)."""
        if getattr(self, "_excess", None) is None:
            orders = [math.ceil(o) if float(o) in self.bounded_orders else o for o in self.orders]
            mid = rdp_of_sensitivity(self.sample_rate, self.noise_multiplier, midpoint_ratios(self.size), orders)
            # ρ = α q² u / (2σ²) + O(u²) at u = r² → 0 (the small-sensitivity expansion, every α):
            # the tangent at 0 bounds the first cell from below
            slope0 = np.asarray(orders, dtype=np.float64) * self.sample_rate ** 2 / (2 * self.noise_multiplier ** 2)
            e = node_excess(self.values, self.size, mid, slope0)
            for m, o in enumerate(self.orders):
                if float(o) in self.bounded_orders:
                    e[:, m] = np.inf
            self._excess = e
        return self._excess


def _slopes(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(chord slopes in u = r² of each cell, cell widths in u)."""
    u = np.square(np.arange(size + 1, dtype=np.float64) / size)
    du = np.diff(u)
    return np.diff(values, axis=0) / du[:, None], du


def convex_columns(values: np.ndarray, size: int | None = None, orders=None) -> np.ndarray:
    """True for each column convex in u = r² on the nodes r_j = j/size: non-decreasing chord
    slopes, up to rounding. The slack is a relative 1e-12 of the slopes plus, for
    fractional ``orders``, the fractional series' own noise: it sums terms near 1, so ρ is
    known to ~1e-15/(α-1) absolutely, which over a cell of width Δu moves a slope by that
    over Δu (the chords may sit that far below ρ: far below anything ε can show)."""
    size = values.shape[0] - 1 if size is None else size
    if values.shape[0] < 3:
        return np.ones(values.shape[1], dtype=bool)
    s, du = _slopes(values, size)
    slack = 1e-12 * (np.abs(s[1:]) + np.abs(s[:-1])) + 1e-300
    if orders is not None:
        orders = np.asarray(orders, dtype=np.float64)
        noise = np.where(orders % 1 != 0, 1e-15 / (orders - 1), 0.0)[None, :]
        slack = slack + 2 * noise * (1 / du[1:, None] + 1 / du[:-1, None])
    return np.all(s[1:] - s[:-1] >= -slack, axis=0)


def node_excess(values: np.ndarray, size: int, mid: np.ndarray | None = None,
                slope0: np.ndarray | None = None) -> np.ndarray:
    """Per node: what a row's tent weight there must carry so that H @ excess bounds the chords' excess
    (the largest of E_j over the node's cells, E_j the bound of cell j's chord minus ρ, module docstring).

    With ``mid`` (ρ at each cell's midpoint in u) the bound is tighter: D_j, the chord's
    excess at the midpoint, is known, and convexity puts ρ above the secant of each half
    extended into the other, so each half's excess is at most 2·A·h·D/(A·h + D) (A the
    slope jump at the cell's end, h half the width): between D and 2D. ``slope0``: a lower
    bound of each column's derivative in u at 0 (default 0: ρ rises).
    """
    s, du = _slopes(values, size)
    first = np.zeros((1, s.shape[1])) if slope0 is None else np.minimum(slope0, s[0])[None, :]
    left = np.vstack([first, s[:-1]])  # slope of the cell to the left
    a = np.maximum(s - left, 0.0)  # a slope that falls by rounding: a straight piece, no excess
    b = np.vstack([np.maximum(s[1:] - s[:-1], 0.0), np.full((1, s.shape[1]), np.inf)])  # last cell: no right side
    w = du[:, None]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if mid is None:
            cell = np.where(np.isinf(b), a * w, a * b * w / (a + b))
        else:
            d = np.maximum(0.5 * (values[:-1] + values[1:]) - mid, 0.0)
            ah, bh = a * w / 2, b * w / 2
            e_left = np.where(ah + d > 0, 2 * ah * d / (ah + d), 0.0)
            e_right = np.where(np.isinf(bh), 2 * d, np.where(bh + d > 0, 2 * bh * d / (bh + d), 0.0))
            cell = np.maximum(e_left, e_right)
    cell = np.nan_to_num(cell, nan=0.0)
    # A row at u = u_j + f·Δ also has excess <= A·(u - u_j) = A·Δ·f: a node pair (0, A·Δ) in
    # the tent weights. Where that is smaller (the first cell, whose chord is nearly the
    # tangent at 0) a row near the left node is charged almost nothing.
    ramp = a * w
    use_ramp = ramp < 2 * cell
    lo_node = np.where(use_ramp, 0.0, cell)
    hi_node = np.where(use_ramp, ramp, cell)
    out = np.zeros(values.shape)
    out[:-1] = lo_node
    out[1:] = np.maximum(out[1:], hi_node)
    return out * (1 + 1e-9) + 1e-300  # rounding of the differences above


def midpoint_ratios(size: int) -> np.ndarray:
    """r at each cell's midpoint in u = r²."""
    u = np.square(np.arange(size + 1, dtype=np.float64) / size)
    return np.sqrt(0.5 * (u[:-1] + u[1:]))


def tabulate(
    sample_rate: float, noise_multiplier: float, size: int = DEFAULT_GRID, orders=DEFAULT_ORDERS
) -> RdpTable:
    """Tabulate the per-step RDP of (q, σ) on ``size`` cells of r, checked convex."""
    from .validate import orders as check_orders, whole

    size = whole("grid", size, 1, MAX_GRID)
    orders = check_orders(orders)
    r = np.arange(size + 1) / size
    values = rdp_of_sensitivity(sample_rate, noise_multiplier, r, orders)
    ok = convex_columns(values, size, orders)
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
    """(bin j, weight on j, weight on j + 1) of each ratio: linear interpolation in u = r²,
    f = ((rG)² - j²)/(2j + 1) (the SQL view ``point_r_histogram`` computes the same)."""
    x = np.clip(np.asarray(ratio, dtype=np.float64), 0.0, 1.0) * size
    j = np.minimum(np.floor(x), size - 1)  # r = 1 sits in the last cell
    f = np.clip((x - j) * (x + j) / (2 * j + 1), 0.0, 1.0)
    return j.astype(np.int64), 1.0 - f, f


def interpolate(table: RdpTable, ratio) -> np.ndarray:
    """The chord value of the table at each ratio: shape (n, len(orders))."""
    j, lo, hi = tent_weights(ratio, table.size)
    return lo[:, None] * table.values[j] + hi[:, None] * table.values[j + 1]
