"""The tight (PLD) accountant over the warehouse: ``dpledger account --accountant pld``.

Layer: ``warehouse`` (a derived-table job). Composes the same per-step sum as the
``rdp`` rule — each of a run's steps is a Poisson-subsampled Gaussian with noise
multiplier σ/r_t(x) — by privacy loss distributions instead of Rényi DP
(:mod:`analysis.pld`), and stores the result as the third composition label
``rule = 'pld'`` in ``point_epsilon`` and ``accountings`` (beside ``rdp`` and ``gla``;
``rdp`` and ``best_order`` are NULL, ``exact`` false, ``steps_covered`` as for rdp).
The rows are read with the hold-last coverage rule of :mod:`warehouse.coverage`, the
per-point histogram counts whole steps (r rounded *up* to the geometric grid of
:func:`analysis.pld.geometric_grid`), and one :func:`analysis.pld.pld_table` per
(q, σ) is shared by the runs accounted in one call.

What the number means (:data:`PLD_MEANING`): a tighter description of the realised
trajectory, not a budget to enforce — composing PLDs point by point is not a valid
privacy filter under fully adaptive composition (Koskela, Tobaben & Honkela, ICLR
2023), whereas the RDP number is backed by Feldman & Zrnic's Rényi filter.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dpledger.analysis import pld

from .coverage import FILL, coverage, stream
from .epsilon_tables import write_accounting
from .runs import RunInfo
from .sqlutil import append_arrow, transaction

#: One sentence: what the PLD per-example ε means and what it does not.
PLD_MEANING = (
    "The PLD per-example epsilon is a tighter description of the realised training trajectory, not a budget to "
    "enforce: composing privacy loss distributions point by point is not a valid privacy filter under fully "
    "adaptive composition (Koskela, Tobaben & Honkela, ICLR 2023), whereas the RDP number is backed by Feldman & "
    "Zrnic's Renyi filter."
)

_TABLES: dict = {}


def table_for(sample_rate: float, noise_multiplier: float, tables: dict | None = None) -> pld.PldTable:
    """The shared :class:`analysis.pld.PldTable` of (q, σ) in ``tables`` (built on first use)."""
    tables = _TABLES if tables is None else tables
    key = (float(sample_rate), float(noise_multiplier))
    if key not in tables:
        tables[key] = pld.pld_table(*key)
    return tables[key]


def run_epsilon_pld(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """The run's data-independent PLD ε (every example at the clip at every step)."""
    return pld.data_independent_epsilon_pld(float(sample_rate), float(noise_multiplier), int(steps), float(delta))


def histogram(con, run: RunInfo, grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point ids, (n_points, G + 1) whole-step counts, steps covered) of the run's records, hold-last."""
    cov = coverage(con, run)
    hist = pld.PldHistogram(len(cov.point_ids), grid)
    for idx, _step, ratio, covers in stream(con, run, cov):
        hist.add(idx, ratio, None if covers is None else np.rint(covers))
    counts = hist.values
    return cov.point_ids, counts, counts.sum(axis=1)


def _write_rows(con, run_id: str, pids, eps, covered, delta: float) -> None:
    con.execute("DELETE FROM point_epsilon WHERE run_id = ? AND rule = 'pld'", [run_id])
    n = len(pids)
    append_arrow(con, "point_epsilon", pa.table({
        "run_id": pa.array([run_id] * n, pa.string()),
        "point_id": pa.array(np.asarray(pids, dtype=np.int64)),
        "rule": pa.array(["pld"] * n, pa.string()),
        "epsilon": pa.array(np.asarray(eps, dtype=np.float64), pa.float64()),
        "best_order": pa.array([None] * n, pa.float64()),
        "delta": pa.array(np.full(n, float(delta))),
        "exact": pa.array(np.zeros(n, dtype=bool)),
        "steps_covered": pa.array(np.rint(covered).astype(np.int64)),
        "order_at_edge": pa.array(np.zeros(n, dtype=bool)),
        "rdp": pa.array([None] * n, pa.list_(pa.float64())),
    }))


def error_notes(res: pld.PldResult, h: float, r_min: float = pld.DEFAULT_R_MIN) -> list[str]:
    """The error budget of a composition, as sentences (each term keeps ε an upper bound)."""
    live = res.fft_length > 0
    rho = float(res.grid_rounding.max()) if res.grid_rounding.size else 0.0
    below = int(res.below_grid.sum())
    intervals = sorted({float(x) for x in res.interval[live]}) or [h]
    tail = float(res.delta_tail.max()) if res.delta_tail.size else 0.0
    notes = [
        f"PLD error budget (each term keeps epsilon an upper bound): grid rounding: every clipped-norm ratio r rounded "
        f"up by at most the factor 1 + {rho:.3g}"
        + (f" ({below} steps with 0 < r <= {r_min:.3g} charged as r = {r_min:.3g})" if below else "")
        + f"; value discretisation: Connect-the-Dots on loss grids of width {', '.join(f'{x:g}' for x in intervals)}"
        f" (a priori at most steps x width above exact, measured far less); delta tail: at most {tail:.2g} of delta "
        f"spent on truncated tails",
    ]
    return notes


def account_pld(con, runs: list[RunInfo], delta: float | None, tables: dict | None = None) -> list[dict]:
    """Compose each run under the PLD accountant, replace its ``pld`` rows, and return one summary a run.

    ``delta``: the δ of ε (default: each run's). ``tables``: PLD tables of (q, σ) shared
    across the runs of this call (a fresh dict by default).
    """
    tables = {} if tables is None else tables
    out = []
    for run in runs:
        d = float(delta or run.delta)
        table = table_for(run.sample_rate, run.noise_multiplier, tables)
        pids, counts, covered = histogram(con, run, table.grid)
        res = pld.compose(table, counts, d)
        eps = res.epsilon
        with transaction(con):
            write_accounting(con, run.run_id, "pld", d, False, int(table.size), [], fill=FILL)
            _write_rows(con, run.run_id, pids, eps, covered, d)
        run_eps = run_epsilon_pld(run.sample_rate, run.noise_multiplier, int(run.steps), d)
        finite = eps[np.isfinite(eps)]
        notes = [FILL, *error_notes(res, table.value_discretization_interval, float(table.grid[0]))]
        out.append({
            "run_id": run.run_id, "rule": "pld", "accountant": "pld", "points": int(len(eps)), "exact": False,
            "delta": d, "steps": int(run.steps),
            "epsilon_min": float(finite.min()) if finite.size else None,
            "epsilon_median": float(np.median(finite)) if finite.size else None,
            "epsilon_max": float(finite.max()) if finite.size else None,
            "run_epsilon": run_eps,
            "points_partially_covered": int(np.sum(covered < run.steps)),
            "points_above_run_epsilon": int(np.sum(finite > run_eps * (1 + 1e-9))),
            "meaning": PLD_MEANING,
            "grid_rounding": float(res.grid_rounding.max()) if res.grid_rounding.size else 0.0,
            "discretisation_intervals": sorted({float(x) for x in res.interval[res.fft_length > 0]}),
            "delta_tail": float(res.delta_tail.max()) if res.delta_tail.size else 0.0,
            "notes": notes,
        })
    return out
