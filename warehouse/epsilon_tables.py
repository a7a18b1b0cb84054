"""The rows every accounting rule writes: ``accountings``, ``point_epsilon``, and the run summary.

Layer: ``warehouse`` (a derived-table job's writers; the conversion to ε is
:func:`analysis.composition.epsilon`). The rules (:mod:`warehouse.account_rdp`,
:mod:`warehouse.account_gla`; :mod:`warehouse.account_pld` writes its own ε rows) write
through these, inside their own transaction.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dpledger.analysis import composition, rdp, validate
from dpledger.analysis.validate import ParameterError

from .coverage import FILL
from .errors import UserError
from .runs import RunInfo
from .sqlutil import append_arrow

#: Composition labels of ``point_epsilon``/``accountings``: ``rdp`` (per-step sum, Rényi DP),
#: ``gla`` (Thudi et al.) and ``pld`` (the same per-step sum as rdp, accounted by privacy loss
#: distributions: :mod:`warehouse.account_pld`).
RULES = ("rdp", "gla", "pld")


def check_rule(rule: str) -> None:
    """Raise unless ``rule`` is one of :data:`RULES`."""
    if rule not in RULES:
        raise UserError(f"rule {rule}: expected one of {', '.join(RULES)}", "rule")


def check_delta(delta: float | None, name: str = "delta", *params: str) -> None:
    """Raise unless ``delta`` (when given) is in (0, 1) (:func:`analysis.validate.delta`); ``name``
    says whose delta it is."""
    if delta is not None:
        try:
            validate.delta(delta, name)
        except ParameterError as exc:
            raise UserError(str(exc), *params) from None


def write_accounting(con, run_id: str, rule: str, delta: float, exact: bool, size: int | None, orders,
                     holder_p=None, max_order=None, legacy=False, bounded=None, fill: str = FILL) -> None:
    """Replace the ``accountings`` row of (run, rule): how its per-example ε was computed."""
    con.execute("DELETE FROM accountings WHERE run_id = ? AND rule = ?", [run_id, rule])
    con.execute(
        "INSERT INTO accountings (run_id, rule, delta, exact, grid_size, orders, fill, holder_p, max_order, "
        "legacy_scaling, bounded_orders) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [run_id, rule, delta, exact, size, [float(o) for o in orders], fill, holder_p, max_order, legacy,
         [float(b) for b in (bounded or [])]],
    )


def write_point_epsilon(con, run_id: str, rule: str, pids, composed, covered, delta, exact,
                        orders) -> tuple[np.ndarray, int]:
    """Replace the ``point_epsilon`` rows of (run, rule) from composed RDP curves; (ε, points at an edge order).

    ``exact``: one flag for all rows, or one per point (the fast path recomputes a few exactly)."""
    eps, best = composition.epsilon(composed, delta, orders)
    edge = rdp.order_at_edge(best, orders) if len(orders) > 1 else np.zeros(len(best), dtype=bool)
    con.execute("DELETE FROM point_epsilon WHERE run_id = ? AND rule = ?", [run_id, rule])
    rows = pa.table({
        "run_id": pa.array([run_id] * len(pids), pa.string()),
        "point_id": pa.array(np.asarray(pids, dtype=np.int64)),
        "rule": pa.array([rule] * len(pids), pa.string()),
        "epsilon": pa.array(eps, pa.float64()),
        "best_order": pa.array(best, pa.float64()),
        "delta": pa.array(np.full(len(pids), delta)),
        "exact": pa.array(np.broadcast_to(np.asarray(exact, dtype=bool), (len(pids),))),
        "steps_covered": pa.array(np.rint(covered).astype(np.int64)),
        "order_at_edge": pa.array(np.asarray(edge, dtype=bool)),
        "rdp": pa.array(list(composed), pa.list_(pa.float64())),
    })
    append_arrow(con, "point_epsilon", rows)
    return eps, int(np.sum(edge))


def summary(run: RunInfo, rule: str, eps: np.ndarray, covered: np.ndarray, exact: bool, delta: float,
            notes: list[str]) -> dict:
    """What ``account`` returns for one run: ε min/median/max beside the run's data-independent ε."""
    data_indep = rdp.dp_epsilon(run.sample_rate, run.noise_multiplier, int(run.steps), delta)[0]
    finite = eps[np.isfinite(eps)]
    return {
        "run_id": run.run_id, "rule": rule, "points": int(len(eps)), "exact": exact, "delta": delta,
        "steps": int(run.steps),
        "epsilon_min": float(finite.min()) if finite.size else None,
        "epsilon_median": float(np.median(finite)) if finite.size else None,
        "epsilon_max": float(finite.max()) if finite.size else None,
        "run_epsilon": float(data_indep),
        "points_partially_covered": int(np.sum(covered < run.steps)),
        # above the run's data-independent ε (beyond rounding): none under rdp; gla's bound can be looser
        "points_above_run_epsilon": int(np.sum(finite > data_indep * (1 + 1e-9))),
        "notes": notes,
    }


class NotAccounted(UserError):
    """A job needs per-example ε that ``account`` has not computed yet (``run_id`` None: for a selection)."""

    def __init__(self, run_id: str | None, rule: str, which: str | None = None):
        what = f"run '{run_id}'" if run_id is not None else which
        super().__init__(f"{what} has no per-example epsilon under rule {rule}; account it first")
        self.run_id, self.rule = run_id, rule


def require_accounted(con, run_id: str, rule: str) -> None:
    """Raise :class:`NotAccounted` unless ``point_epsilon`` holds rows of (run, rule)."""
    if not con.execute("SELECT count(*) FROM point_epsilon WHERE run_id = ? AND rule = ?",
                       [run_id, rule]).fetchall()[0][0]:
        raise NotAccounted(run_id, rule)
