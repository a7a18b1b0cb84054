r"""Filling per-step clipped-norm ratios between recorded checkpoints, and judging the fills.

Layer: ``analysis`` (pure numeric code). Owns :func:`fit` (one entry for every method,
``METHODS``), composing a fill over a run's steps (:func:`compose_fill`, through
:mod:`analysis.composition`) and the holdout evaluation. The methods live in
``fill_interp`` (step, linear, pchip), ``fill_offset`` and ``fill_nn``.

DP-SGD charges example x at step t the per-step RDP ρ(r_t) of its clipped-norm ratio
r_t = min(‖g_t(x)‖, C)/C ∈ [0, 1] (:func:`analysis.rdp.rdp_of_sensitivity`), summed over
every step 0..T-1. Norms are often recorded only at checkpoints t_0 < t_1 < … < t_{n-1}
of each point, so r_t must be *filled* in between before composing. Every fill here maps
(point, step) → r ∈ [0, 1]; outside a point's records it holds the (fitted) value at its
first record before t_0 and at its last record after t_{n-1}.

Methods (``METHODS``):

* ``step`` — hold the last record (piecewise constant, right-continuous):
  r(t) = r_i for t_i <= t < t_{i+1}. This is what the warehouse has always done.
* ``linear`` — r(t) = r_i + (r_{i+1} - r_i)(t - t_i)/(t_{i+1} - t_i).
* ``pchip`` — the monotone piecewise-cubic Hermite interpolant of Fritsch and Carlson
  (:class:`scipy.interpolate.PchipInterpolator`) through each point's records: on each
  interval r(t) = Σ_{m=0..3} c_m (t - t_i)^{3-m} with c_3 = r_i. It overshoots nothing (a
  monotone run of records stays monotone, and each interval stays between its two
  records), so it stays in [0, 1] on its own. Points sharing the same recorded steps are
  interpolated together (one scipy call per distinct step pattern).

  These three reproduce every record exactly and are evaluated by the same vectorised
  code: the coefficients of every interval of every point are stored in one flat array,
  and a query (p, t) finds its interval by one binary search on the key p·S + t.

* ``offset`` — a shared shape plus a per-point offset, in logit space:

      logit r_{p}(t) = f(t) + a_p,     f piecewise linear on knots κ_1 < … < κ_K,

  fitted jointly by least squares over all points' records
  min_{f, a} Σ_{p,i} (logit r̃_{p,i} - f(t_{p,i}) - a_p)² + λ (N/K) Σ_j (f_{j-1} - 2f_j + f_{j+1})²,
  r̃ = clip(r, ε, 1-ε), with the gauge Σ_p a_p = 0 (so f is the "typical point"). The
  offsets are eliminated (a_p = mean_i of that point's residuals) and the K×K Schur
  system for f is solved directly. Knots are the distinct recorded steps, or ``knots``
  quantiles of them when there are more. A point with 2 records (or 1) gets a_p from
  those alone and borrows f's shape from all the others: the point of the method.

  Why logit and not log r: (i) logit is a bijection of (0, 1) onto ℝ, so every offset
  gives an admissible ratio, while an additive offset in log r pushes points with a
  large offset above 1, and the clip at 1 then cuts the curve flat; (ii) for small r,
  logit r = log r + O(r), so where per-step costs are small the offset is the same
  *multiplicative* gradient-scale factor that log space would give (per-example
  gradient norms of one model differ mostly by a scale); (iii) near the clip
  (r → 1) logit saturates just as min(‖g‖, C)/C does, instead of treating a clipped
  record (true ratio ≥ 1, censored) as an exact measurement of log r = 0. The price is
  the clamp ε (default 1e-6) for records that are exactly 0 or 1; it is an option.

* ``nn`` — a small neural regressor (torch, CPU, seeded): an MLP with two hidden layers
  (SiLU) maps [u, u², sin(πku), cos(πku) for k = 1..K_f, the point's mean record, a learned
  per-point embedding e_p] to a logit, r = sigmoid(·), with u = (t - t_min)/(t_max - t_min)
  over all records. Trained by Adam on the squared error in r over the recorded
  checkpoints (full batch, or random mini-batches of ``batch_size`` when there are more
  records), cosine-decayed learning rate. A regression: it does not pass through the
  records. Torch runs on ``threads`` (default 1) threads inside the fit and restores the
  caller's setting and global RNG state. Evaluation splits the first layer into a
  per-step and a per-point part, so a dense fill costs about the second layer: ~1.8 M
  (point, step) cells/s on one core here (10,000 points × 9,360 steps in ~50 s).
  Measured at 10,000 points × 50 records: fit ~10 s; ``holdout`` (two fits, three dense
  fills, compositions) ~130 s, against ~40 s for ``linear`` or ``offset``.

Evaluation (:func:`holdout`, :func:`compare`): every k-th record of every point
(index i with i % k == k - 1, never a point's first or last record) is held out, the
method is fitted on the rest, and the held-out ratios are predicted. Reported:

* per-step cost errors at one order α (``cost_order``, default 8): |ρ_α(r̂) - ρ_α(r)| —
  mean and max absolute over every held-out record, and mean and max relative to
  ρ_α(r) *only* over the records whose true cost is at least ``cost_floor`` (1%) of a
  full-norm step's (``cost_mre_above_floor``, ``cost_max_rel_above_floor``; None when no
  record is above it). Relative errors over all records are not reported: a true r of
  1e-10 has a cost near 1e-22, so one such record predicted anything but tiny made them
  ~1e37, a number that says nothing;
* per-point ε errors: each point's fill over steps 0..n_steps-1 is composed with the
  tabulated fast path of :mod:`analysis.composition` (tent histogram of r × the RDP table: a
  conservative upper bound, within ~1e-5 of exact at 1,024 cells) and converted with
  :func:`analysis.rdp.epsilon_from_rdp`; the fit without the held-out records is
  compared with (a) the same method fitted on all records (``eps_*``) and (b) the
  ``step`` fill of all records (``eps_step_*``).
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import numpy as np

from . import composition, grid as gridmod, rdp
from .fill_interp import fit_interp
from .fill_nn import fit_nn
from .fill_offset import fit_offset
from .fill_records import Fit, records

__all__ = ["COST_ORDER", "FILL_CELLS", "METHODS", "METRICS", "Fit", "compare", "compose_fill", "fill_chunks", "fit",
           "format_table", "held_out_mask", "holdout", "point_epsilons"]

METHODS = ("step", "linear", "pchip", "offset", "nn")

#: Default order of the per-step cost errors in :func:`holdout`.
COST_ORDER = 8.0

#: Points × steps of a dense fill held in memory at once when composing it.
FILL_CELLS = 1 << 22

#: The error metrics of :func:`holdout`, in the order to show them: (key, column header).
METRICS = (
    ("r_mae", "r MAE"),
    ("cost_mae", "cost MAE"),
    ("cost_max_abs", "cost max error"),
    ("cost_mre_above_floor", "cost MRE above floor"),
    ("cost_max_rel_above_floor", "cost max rel. error above floor"),
    ("eps_mae", "ε MAE"),
    ("eps_max_abs", "ε max error"),
    ("eps_mre", "ε MRE"),
    ("eps_max_rel", "ε max rel. error"),
    ("eps_step_mae", "ε MAE vs step fill"),
    ("eps_step_max_abs", "ε max error vs step fill"),
    ("eps_full_mean", "mean ε (all records)"),
    ("fit_seconds", "fit seconds"),
)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown fill method {method!r}; choose one of {', '.join(METHODS)}")


def fit(method: str, steps, values, *, seed: int = 0, **options) -> Fit:
    """Fit ``method`` to each point's records.

    ``steps``/``values``: (n_points, n_records) arrays, or lists of 1-D arrays (ragged),
    steps strictly increasing per point, values (clipped-norm ratios) in [0, 1].
    Options: ``offset`` — ``eps`` (1e-6, the logit clamp), ``knots`` (64, the most knots of
    the shared curve), ``smooth`` (1e-6, λ of the second-difference penalty); ``nn`` —
    ``hidden`` (64), ``embed_dim`` (8), ``n_fourier`` (4), ``n_iter`` (600 Adam steps),
    ``lr`` (1e-2), ``batch_size`` (4096), ``weight_decay`` (1e-5), ``threads`` (1); ``seed``
    makes ``nn`` reproducible (the other methods are deterministic). ``step``, ``linear``
    and ``pchip`` take no options. Raises ValueError on bad input, naming the point.
    """
    _check_method(method)
    rec = records(steps, values)
    if method in ("step", "linear", "pchip"):
        return fit_interp(method, rec, options)
    if method == "offset":
        return fit_offset(rec, options)
    return fit_nn(rec, int(seed), options)


# --------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=8)
def _table(q: float, noise_multiplier: float, size: int, orders: tuple) -> gridmod.RdpTable:
    """The tabulated per-step RDP, cached: :func:`compare` reuses it for every method."""
    return gridmod.tabulate(q, noise_multiplier, size, np.asarray(orders))


def fill_chunks(f: Fit, n_steps: int, cells: int = FILL_CELLS):
    """(point indices, their dense r over steps 0..n_steps-1) about ``cells`` cells at a time."""
    per = max(1, cells // max(1, n_steps))
    for a in range(0, f.n_points, per):
        pts = np.arange(a, min(f.n_points, a + per))
        yield pts, f.fill(n_steps, points=pts)


def compose_fill(f: Fit, n_steps: int, *, table: gridmod.RdpTable | None = None, q: float | None = None,
                 noise_multiplier: float | None = None, orders=None) -> np.ndarray:
    """Composed RDP of each point's fill over steps 0..n_steps-1: shape (n_points, orders).

    With ``table`` the fast path of :mod:`analysis.composition` (tent histogram × table, an
    upper bound, over the table's orders); without, the exact sum at (``q``,
    ``noise_multiplier``, ``orders``). Points are filled a few million cells at a time.
    """
    orders = table.orders if table is not None else np.asarray(rdp.DEFAULT_ORDERS if orders is None else orders)
    composed = np.empty((f.n_points, len(orders)))
    for pts, r in fill_chunks(f, int(n_steps)):
        local = np.repeat(np.arange(len(pts)), r.shape[1])
        if table is not None:
            acc = composition.Histogram(len(pts), table.size)
            acc.add(local, r.ravel())
            composed[pts] = acc.rdp(table)
        else:
            acc = composition.ExactSum(len(pts), q, noise_multiplier, orders)
            acc.add(local, r.ravel())
            composed[pts] = acc.rdp()
    return composed


def _epsilons(f: Fit, n_steps: int, table: gridmod.RdpTable, delta: float) -> np.ndarray:
    """Per-point ε of the fill over steps 0..n_steps-1 (tabulated fast path)."""
    return composition.epsilon(compose_fill(f, n_steps, table=table), delta, table.orders)[0]


def _check_run(n_steps, q, noise_multiplier, delta) -> None:
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if not 0 < q <= 1:
        raise ValueError(f"sample rate q={q} is outside (0, 1]")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} is outside (0, 1)")


def point_epsilons(f: Fit, n_steps: int, *, q: float, noise_multiplier: float, delta: float, orders=None,
                   grid_size: int = gridmod.DEFAULT_GRID) -> np.ndarray:
    """Per-point ε of a fill composed over steps 0..n_steps-1: shape (n_points,).

    The warehouse's fast path: a tent histogram of each point's filled r times the RDP
    table of (q, σ) on ``grid_size`` cells (an upper bound, within ~1e-5 of exact at 1,024
    cells), converted at ``delta`` over ``orders`` (default :data:`analysis.rdp.DEFAULT_ORDERS`).
    Points are filled a few million (point, step) cells at a time, so memory stays bounded.
    """
    _check_run(n_steps, q, noise_multiplier, delta)
    orders = rdp.DEFAULT_ORDERS if orders is None else orders
    table = _table(float(q), float(noise_multiplier), int(grid_size), tuple(float(o) for o in np.atleast_1d(orders)))
    return _epsilons(f, int(n_steps), table, delta)


def _errors(pred: np.ndarray, true: np.ndarray, prefix: str) -> dict:
    err = np.abs(pred - true)
    nz = true != 0
    rel = err[nz] / np.abs(true[nz])
    return {
        f"{prefix}_mae": float(err.mean()) if err.size else None,
        f"{prefix}_max_abs": float(err.max()) if err.size else None,
        f"{prefix}_mre": float(rel.mean()) if rel.size else None,
        f"{prefix}_max_rel": float(rel.max()) if rel.size else None,
    }


def held_out_mask(rec_counts: Sequence[int], k: int) -> np.ndarray:
    """Flat mask of held-out records: index i % k == k-1, never a point's first or last."""
    out = []
    for n in rec_counts:
        i = np.arange(n)
        out.append((i % k == k - 1) & (i > 0) & (i < n - 1))
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def holdout(method: str, steps, values, k: int, *, q: float, noise_multiplier: float, n_steps: int,
            delta: float, orders=None, seed: int = 0, cost_order: float = COST_ORDER,
            grid_size: int = gridmod.DEFAULT_GRID, cost_floor: float = 0.01, **options) -> dict:
    """Hold out every k-th record of every point, refit, and measure the cost and ε errors.

    ``orders`` are the RDP orders of the ε composition (default :data:`analysis.rdp.DEFAULT_ORDERS`);
    ``cost_order`` the single order of the per-step cost errors; ``options`` go to :func:`fit`.
    Relative cost errors are reported only over held-out records whose true cost is at least
    ``cost_floor`` × the cost of a full-norm step (r = 1): ``cost_*_above_floor`` (None if
    there is none). Returns plain floats/ints/None, the metrics in the order of
    :data:`METRICS` (see the module docstring for what each number is).
    """
    _check_method(method)
    if isinstance(k, bool) or int(k) != k or k < 2:
        raise ValueError(f"k must be an integer >= 2 (every k-th record is held out), got {k}")
    k = int(k)
    _check_run(n_steps, q, noise_multiplier, delta)
    if not cost_order > 1:
        raise ValueError(f"cost_order must be > 1, got {cost_order}")
    if not cost_floor >= 0:
        raise ValueError(f"cost_floor must be >= 0, got {cost_floor}")
    n_steps = int(n_steps)
    orders = np.asarray(rdp.DEFAULT_ORDERS if orders is None else orders, dtype=np.float64)

    rec = records(steps, values)
    s_rows, v_rows = rec.per_point()
    mask = held_out_mask(rec.counts, k)
    n_held = int(mask.sum())
    if n_held == 0:
        raise ValueError(f"nothing to hold out with k={k}: no point has a record with index i % k == k-1 "
                         "other than its first or last")
    keep_s = [s[~mask[a:b]] for s, a, b in zip(s_rows, rec.start[:-1], rec.start[1:])]
    keep_v = [v[~mask[a:b]] for v, a, b in zip(v_rows, rec.start[:-1], rec.start[1:])]

    t0 = time.perf_counter()
    f_train = fit(method, keep_s, keep_v, seed=seed, **options)
    fit_seconds = time.perf_counter() - t0
    pred = f_train.predict(rec.point[mask], rec.steps[mask])
    true = rec.values[mask]

    c = rdp.rdp_of_sensitivity(q, noise_multiplier, np.concatenate([pred, true]), [cost_order])[:, 0]
    c_pred, c_true = c[:n_held], c[n_held:]

    f_full = fit(method, s_rows, v_rows, seed=seed, **options)
    f_step = f_full if method == "step" else fit("step", s_rows, v_rows)
    table = _table(float(q), float(noise_multiplier), int(grid_size), tuple(float(o) for o in orders))
    eps_train = _epsilons(f_train, n_steps, table, delta)
    eps_full = _epsilons(f_full, n_steps, table, delta)
    eps_step = eps_full if method == "step" else _epsilons(f_step, n_steps, table, delta)

    full_cost = float(rdp.rdp_of_sensitivity(q, noise_multiplier, np.array([1.0]), [cost_order])[0, 0])
    big = c_true >= cost_floor * full_cost
    cost_all = _errors(c_pred, c_true, "cost")
    floored = _errors(c_pred[big], c_true[big], "cost")
    eps_err = _errors(eps_train, eps_full, "eps")
    step_err = _errors(eps_train, eps_step, "eps_step")
    metrics = {
        "r_mae": float(np.mean(np.abs(pred - true))),
        "cost_mae": cost_all["cost_mae"], "cost_max_abs": cost_all["cost_max_abs"],
        "cost_mre_above_floor": floored["cost_mre"], "cost_max_rel_above_floor": floored["cost_max_rel"],
        **{key: eps_err[key] for key in ("eps_mae", "eps_max_abs", "eps_mre", "eps_max_rel")},
        "eps_step_mae": step_err["eps_step_mae"], "eps_step_max_abs": step_err["eps_step_max_abs"],
        "eps_full_mean": float(np.mean(eps_full)),
        "fit_seconds": float(fit_seconds),
    }
    out = {"method": method, "k": k, "held_out": n_held, "n_points": rec.n_points,
           "n_records": int(rec.steps.size), "cost_order": float(cost_order), "cost_floor": float(cost_floor),
           "held_out_above_floor": int(big.sum())}
    out.update({key: metrics[key] for key, _ in METRICS})
    out.update({
        "eps_step_mre": step_err["eps_step_mre"], "eps_step_max_rel": step_err["eps_step_max_rel"],
        "eps_holdout_mean": float(np.mean(eps_train)),
        "eps_step_full_mean": float(np.mean(eps_step)),
    })
    return out


def compare(steps, values, k: int, *, methods: Sequence[str] = METHODS, **kw) -> list[dict]:
    """:func:`holdout` for every method (same held-out records), one dict each."""
    for m in methods:
        _check_method(m)
    return [holdout(m, steps, values, k, **kw) for m in methods]


def format_table(rows: list[dict], columns: Sequence[str] = ("method", "k", "held_out", *(k for k, _ in METRICS))) -> str:
    """A plain-text table of :func:`compare`'s rows, headed by the :data:`METRICS` labels."""
    labels = dict(METRICS)

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    heads = [labels.get(c, c) for c in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
