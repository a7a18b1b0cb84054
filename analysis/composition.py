r"""The one composition path: per-step RDP of each example, summed over steps, to (ε, δ).

Layer: ``analysis`` (pure numeric code; imports no other project package). Owns the
clipped-norm ratio, the per-point histogram of ratios, the table × histogram product,
the exact per-row sum, and the conversion of composed RDP to ε at the optimal order.
The warehouse's accounting, :mod:`analysis.fits` and the report's cumulative curves
all compose through these functions.

DP-SGD step t charges example x the per-step RDP ρ_α(r_t) of the sampled Gaussian
with effective noise multiplier σ / r_t, where r_t = min(‖g_t(x)‖, C)/C
(:func:`clipped_ratio`). Composition sums it over the steps a run's records stand
for: R(x, α) = Σ_t w_t ρ_α(r_t), with w_t the steps a record covers (1 when norms
are recorded every step). Two ways to sum:

* fast (:class:`Histogram`): a tent-weighted histogram of r per point on the grid of
  :mod:`analysis.grid`, times the tabulated ρ (:func:`compose`): an upper bound,
  because the chords of a convex curve lie above it; the same histogram times the
  table's chord-error bound gives a lower bound (:meth:`Histogram.bounds`), and
  :func:`needs_exact` names the points whose ε the two do not pin within
  :data:`EXACT_RTOL` (callers recompute those with :class:`ExactSum`, so every fast ε
  is within 1e-4 relative of the exact one, and never below it);
* exact (:class:`ExactSum`): ρ evaluated at every distinct ratio of a batch.

Then ε(x) = min over α of the conversion of Balle et al. that Opacus's
``get_privacy_spent`` uses (:func:`epsilon`, i.e. :func:`analysis.rdp.epsilon_from_rdp`
over many points).
"""

from __future__ import annotations

import numpy as np

from .grid import RdpTable, tent_weights
from .rdp import DEFAULT_ORDERS, epsilon_from_rdp, rdp_of_sensitivity

__all__ = ["EXACT_RTOL", "bound_gap", "ROUNDING_MARGIN", "ExactSum", "Histogram", "clipped_ratio", "compose", "cumulative",
           "epsilon", "epsilon_from_rdp", "needs_exact", "step_rdp"]

# The matrix product rounds; composed RDP is raised by this relative margin so the
# fast path stays above the exact value despite floating-point error.
ROUNDING_MARGIN = 1e-12

#: A point's fast ε is recomputed exactly unless the grid's bounds pin it within this
#: relative gap: (ε_up - ε_low)/ε_up <= 0.9999e-4 means ε_up <= ε_exact·(1 + 1e-4).
EXACT_RTOL = 0.9999e-4

# Rows of per-step RDP (× orders) materialised at once by the exact sum.
_EXACT_ROWS = 1 << 15


def clipped_ratio(grad_norm, max_grad_norm) -> np.ndarray:
    """r = min(norm, C) / C ∈ [0, 1]: the example's sensitivity relative to the clip C."""
    c = np.asarray(max_grad_norm, dtype=np.float64)
    return np.minimum(np.asarray(grad_norm, dtype=np.float64), c) / c


def _weights(idx: np.ndarray, covers) -> np.ndarray:
    return np.ones(len(idx)) if covers is None else np.asarray(covers, dtype=np.float64)


try:  # a bounds-unchecked C++ loop B[i, j] += w: ~3x faster than np.add.at, no per-batch temporaries
    from scipy.sparse._sparsetools import coo_todense as _coo_todense
except ImportError:  # a scipy without it: np.add.at, the same sums
    _coo_todense = None


def scatter_add(out: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray,
                checked: bool = False) -> None:
    """``out[rows[i], cols[i]] += weights[i]`` for every i, duplicates summed, in place.

    ``out``: a C-contiguous 2-D array of ``weights``'s dtype. The indices are checked to
    lie inside ``out`` first (the fast loop does not check them), unless ``checked``: the
    caller has proven them in range."""
    n = len(rows)
    if n == 0:
        return
    if len(cols) != n or len(weights) != n:
        raise ValueError("rows, cols and weights differ in length")
    if not checked and (rows.min() < 0 or rows.max() >= out.shape[0] or cols.min() < 0
                        or cols.max() >= out.shape[1]):
        raise IndexError(f"an index lies outside the {out.shape} histogram")
    if _coo_todense is not None and out.flags.c_contiguous and weights.dtype == out.dtype:
        _coo_todense(out.shape[0], out.shape[1], n, rows, cols, weights, out.reshape(-1), 0)
    else:
        np.add.at(out, (rows, cols), weights)


def tent_cells(ratio, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell j, f) of each ratio as :func:`analysis.grid.tent_weights` computes them (the same
    operations, so the same bits), in place on a float copy of ``ratio``: the row's weight is
    1 - f on node j and f on node j + 1. Raises on a NaN ratio (it has no cell)."""
    x = np.array(ratio, dtype=np.float64, copy=True)
    np.clip(x, 0.0, 1.0, out=x)
    if np.isnan(x.sum()):
        raise ValueError("a ratio is NaN: a gradient norm is not a number")
    x *= size
    j = np.floor(x)
    np.minimum(j, size - 1, out=j)  # r = 1 sits in the last cell
    f = x - j
    x += j
    f *= x                          # (x - j)(x + j)
    x[:] = j
    x *= 2
    x += 1
    f /= x                          # / (2j + 1)
    np.clip(f, 0.0, 1.0, out=f)
    return j.astype(np.int64), f


class Histogram:
    """Tent-weighted histogram of r per point on ``size`` cells: shape (n_points, size + 1).

    A row with r·size = j + f adds (1 - f)·covers to bin j and f·covers to bin j + 1, so
    ``compose(h.values, table)`` is the sum of the table's chords at the rows' ratios.
    Feed it batches with :meth:`add`; ``covered`` counts the steps each point's rows
    stand for.

    Held as one complex number per (point, cell j): the real part sums the weights on
    node j, the imaginary part those on node j + 1, so each row costs one scatter into
    memory (the histogram of 10,000 points is larger than the cache: the scatter is the
    cost); :attr:`values` adds the imaginary parts onto the next node.
    """

    def __init__(self, n_points: int, size: int):
        self.n_points, self.size = int(n_points), int(size)
        self._cells = np.zeros((self.n_points, self.size), dtype=np.complex128)
        self._values = None
        self.covered = np.zeros(self.n_points)

    def add(self, idx: np.ndarray, ratio: np.ndarray, covers: np.ndarray | None = None) -> None:
        """Rows of point index ``idx`` with ratio ``ratio``, each standing for ``covers`` steps (default 1)."""
        self.add_prepared(self.prepare(idx, ratio, covers))

    def prepare(self, idx: np.ndarray, ratio: np.ndarray, covers: np.ndarray | None = None) -> tuple:
        """:meth:`add`'s elementwise half (cells and weights of the rows), touching no state: a
        reader thread may run it while :meth:`add_prepared` scatters the previous batch."""
        idx = np.asarray(idx, dtype=np.int64)
        j, f = tent_cells(ratio, self.size)  # 0 <= j < size by construction
        if len(j) != len(idx):
            raise ValueError("idx and ratio differ in length")
        # the rows per point: bincount refuses a negative index, and a longer result names
        # an index past the last point; so this is the scatter's range check too
        try:
            counts = np.bincount(idx, minlength=self.n_points) if len(idx) else np.zeros(self.n_points, np.int64)
        except ValueError:  # a negative index
            counts = None
        if counts is None or len(counts) > self.n_points:
            raise IndexError(f"a point index lies outside the {self.n_points} points of the histogram")
        w = np.empty(len(j), dtype=np.complex128)
        if covers is None:
            np.subtract(1.0, f, out=w.real)
            w.imag = f
            covered = counts
        else:
            covers = np.asarray(covers, dtype=np.float64)
            np.multiply(1.0 - f, covers, out=w.real)
            np.multiply(f, covers, out=w.imag)
            covered = np.bincount(idx, weights=covers, minlength=self.n_points)
        return idx, j, w, covered

    def add_prepared(self, prepared: tuple) -> None:
        """:meth:`add`'s scatter half, of what :meth:`prepare` returned (indices checked there)."""
        idx, j, w, covered = prepared
        scatter_add(self._cells, idx, j, w, checked=True)
        self.covered += covered
        self._values = None

    @property
    def values(self) -> np.ndarray:
        """Shape (n_points, size + 1): the weights on each node."""
        if self._values is None:
            v = np.zeros((self.n_points, self.size + 1))
            v[:, :-1] = self._cells.real
            v[:, 1:] += self._cells.imag
            self._values = v
        return self._values

    def rdp(self, table: RdpTable) -> np.ndarray:
        """Composed RDP per point and order of the table: an upper bound of the exact sum."""
        if table.size != self.size:
            raise ValueError(f"the table has {table.size} cells, the histogram {self.size}")
        return compose(self.values, table)

    def bounds(self, table: RdpTable) -> tuple[np.ndarray, np.ndarray]:
        """(upper, lower) bounds of the exact composed RDP per point and order (module docstring).

        Read straight from the complex cells, viewed as floats (re_0, im_0, re_1, im_1, ...)
        per point: ``values @ T`` is ``cells @ T2`` with T2's rows 2j = T_j and 2j+1 = T_{j+1},
        so one matrix product over the histogram gives both the chords' sum and the
        excess, with no (n_points, size + 1) copy."""
        if table.size != self.size:
            raise ValueError(f"the table has {table.size} cells, the histogram {self.size}")
        both = np.concatenate([table.values, table.excess], axis=1)  # (size + 1, 2 orders)
        paired = np.empty((2 * self.size, both.shape[1]))
        paired[0::2] = both[:-1]
        paired[1::2] = both[1:]
        out = self._cells.view(np.float64) @ paired
        k = table.values.shape[1]
        upper = out[:, :k] * (1.0 + ROUNDING_MARGIN)
        return upper, _lower_from(upper, out[:, k:])


def lower_bound(hist: np.ndarray, table: RdpTable, upper: np.ndarray) -> np.ndarray:
    """A lower bound of the exact sum: the chords' sum less the histogram times the table's excess."""
    return _lower_from(upper, hist @ table.excess)


def _lower_from(upper: np.ndarray, excess: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        low = upper / (1.0 + ROUNDING_MARGIN) - excess
    return np.maximum(np.nan_to_num(low, nan=0.0, neginf=0.0), 0.0) * (1.0 - ROUNDING_MARGIN)


def bound_gap(upper: np.ndarray, lower: np.ndarray, delta: float, orders) -> np.ndarray:
    """Per point, (ε(upper) - ε(lower)) / ε(upper): how far above the exact ε the fast one may be, relatively."""
    eps_up, _ = epsilon(upper, delta, orders)
    eps_low, _ = epsilon(lower, delta, orders)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(eps_up > 0, (eps_up - eps_low) / np.abs(eps_up), 0.0)


def needs_exact(upper: np.ndarray, lower: np.ndarray, delta: float, orders, rtol: float = EXACT_RTOL) -> np.ndarray:
    """True for each point whose ε from ``upper`` may exceed its exact ε by more than ``rtol`` relative:
    the exact ε lies between the ε of ``lower`` and that of ``upper``."""
    return bound_gap(upper, lower, delta, orders) > rtol


def compose(hist: np.ndarray, table: RdpTable) -> np.ndarray:
    """Composed RDP per point and order from a tent histogram: an upper bound."""
    return (hist @ table.values) * (1.0 + ROUNDING_MARGIN)


def step_rdp(q: float, noise_multiplier: float, ratio, orders=DEFAULT_ORDERS) -> np.ndarray:
    """Exact per-step RDP of each row's ratio: shape (rows, orders), one evaluation per distinct ratio."""
    uniq, inv = np.unique(np.asarray(ratio, dtype=np.float64), return_inverse=True)
    return rdp_of_sensitivity(q, noise_multiplier, uniq, orders)[inv.ravel()]


class ExactSum:
    """The exact sum Σ covers·ρ(r) per point and order, fed by batches like :class:`Histogram`."""

    def __init__(self, n_points: int, q: float, noise_multiplier: float, orders=DEFAULT_ORDERS):
        self.q, self.noise_multiplier = q, noise_multiplier
        self.orders = np.asarray(orders, dtype=np.float64)
        self.values = np.zeros((int(n_points), len(self.orders)))
        self.covered = np.zeros(int(n_points))

    def add(self, idx: np.ndarray, ratio: np.ndarray, covers: np.ndarray | None = None) -> None:
        idx = np.asarray(idx, dtype=np.int64)
        weight = _weights(idx, covers)
        uniq, inv = np.unique(np.asarray(ratio, dtype=np.float64), return_inverse=True)
        inv = inv.ravel()
        per_step = rdp_of_sensitivity(self.q, self.noise_multiplier, uniq, self.orders)
        for a in range(0, len(idx), _EXACT_ROWS):  # bounded memory: rows × orders at a time
            sel = slice(a, a + _EXACT_ROWS)
            np.add.at(self.values, idx[sel], per_step[inv[sel]] * weight[sel, None])
        np.add.at(self.covered, idx, weight)

    def rdp(self) -> np.ndarray:
        return self.values


def cumulative(per_step: np.ndarray, covers=None) -> np.ndarray:
    """Running composed RDP after each row of one point's (rows, orders) per-step RDP."""
    per_step = np.asarray(per_step, dtype=np.float64)
    if covers is not None:
        per_step = per_step * np.asarray(covers, dtype=np.float64)[:, None]
    return np.cumsum(per_step, axis=0)


def epsilon(composed, delta: float, orders=DEFAULT_ORDERS) -> tuple[np.ndarray, np.ndarray]:
    """(ε, optimal order) per row of composed RDP (rows, orders): arrays of shape (rows,)."""
    eps, best = epsilon_from_rdp(composed, delta, orders)
    return np.atleast_1d(eps), np.atleast_1d(best)
