"""The ``rdp`` rule over the warehouse: each run's per-step RDP composed per example.

Layer: ``warehouse`` (a derived-table job). Owns the tabulated grid of a (q, σ) in
``rdp_grid`` (:func:`ensure_grid`) and the three ways of composing one run: the fast
tabulated upper bound, the exact sum, and a dense fill between checkpoints
(``--fill``). The numbers are :mod:`analysis.composition`'s; the rows are read by
:mod:`warehouse.coverage` and written by :mod:`warehouse.epsilon_tables`.

What the number means: summed over one run's recorded norms it is the
*output-specific individual* privacy of Yu et al. (TMLR 2023), a statement about that
training trajectory, which the per-step norms depend on.
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from dpledger.analysis import composition, fits, grid as gridmod, rdp

from .coverage import FILL, coverage, stream
from .epsilon_tables import summary, write_accounting, write_point_epsilon
from .errors import UserError
from .fit_table import fitted
from .runs import RunInfo
from .sqlutil import append_arrow, scalar, transaction


#: Steps (rows) recomputed on the exact path per run at most, to pin loose fast-path ε:
#: the exact path evaluates ~1,500-3,000 rows a second.
REFINE_STEPS = 5_000


def ensure_grid(con, sample_rate: float, noise_multiplier: float, size: int) -> gridmod.RdpTable:
    """The tabulated per-step RDP of (q, σ) on ``size`` cells, from ``rdp_grid`` or computed and stored."""
    return PendingGrid(con, sample_rate, noise_multiplier, size, background=False).result(con)


class PendingGrid:
    """:func:`ensure_grid`'s table, read from ``rdp_grid`` now or tabulated (with its error
    bound, :attr:`analysis.grid.RdpTable.excess`) in a thread while the caller streams the
    run's rows: both take about a second, and the rows' histogram leaves the other core
    mostly idle. :meth:`result` waits for it and stores a new table in ``rdp_grid``."""

    def __init__(self, con, sample_rate: float, noise_multiplier: float, size: int, background: bool = True):
        self.sample_rate, self.noise_multiplier, self.size = sample_rate, noise_multiplier, int(size)
        self.orders = np.asarray(rdp.DEFAULT_ORDERS, dtype=np.float64)
        self._key = [sample_rate, noise_multiplier, self.size]
        n = scalar(con.execute(f"SELECT count(*) FROM rdp_grid WHERE {self._WHERE}", self._key))
        self._new = n != (self.size + 1) * len(self.orders)
        self._table: gridmod.RdpTable | None = None
        self._error: BaseException | None = None
        if not self._new:
            got = con.sql(
                f"SELECT alpha, j, rho, bounded FROM rdp_grid WHERE {self._WHERE} ORDER BY alpha, j", params=self._key
            ).to_arrow_table()
            values = got.column("rho").to_numpy().reshape(len(self.orders), self.size + 1).T.copy()
            bounded = sorted(set(got.filter(got.column("bounded")).column("alpha").to_pylist()))
            self._table = gridmod.RdpTable(sample_rate, noise_multiplier, self.size, self.orders, values, bounded)
        self._thread = threading.Thread(target=self._compute, name="dpledger-grid", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    _WHERE = "sample_rate = ? AND noise_multiplier = ? AND grid_size = ?"

    def _compute(self) -> None:
        try:
            if self._table is None:
                self._table = gridmod.tabulate(self.sample_rate, self.noise_multiplier, self.size, self.orders)
            self._table.excess  # noqa: B018 - computed here, off the caller's thread
        except BaseException as exc:  # noqa: BLE001 - raised by result()
            self._error = exc

    def result(self, con) -> gridmod.RdpTable:
        """The table (stored in ``rdp_grid`` if it was new); ``con`` must be free (no open stream)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif self._table is None and self._error is None:
            self._compute()
        if self._error is not None:
            raise self._error
        table = self._table
        if self._new:
            sample_rate, noise_multiplier, size, orders = self.sample_rate, self.noise_multiplier, self.size, self.orders
            con.execute(f"DELETE FROM rdp_grid WHERE {self._WHERE}", self._key)
            alpha = np.repeat(orders[None, :], size + 1, axis=0)
            j = np.repeat(np.arange(size + 1)[:, None], len(orders), axis=1)
            bounded = np.isin(alpha, table.bounded_orders)
            rows = pa.table({
                "sample_rate": np.full(alpha.size, sample_rate), "noise_multiplier": np.full(alpha.size, noise_multiplier),
                "grid_size": np.full(alpha.size, size, dtype=np.int32), "alpha": alpha.ravel(),
                "j": j.ravel().astype(np.int32), "rho": table.values.ravel(), "bounded": bounded.ravel(),
            })
            append_arrow(con, "rdp_grid", rows)
            self._new = False
        return table


def _first_step(cov) -> int:
    """The first recorded step of a dense or uniform run (each of its points covers the steps from it on)."""
    return 0 if cov.shape == "dense" else int(cov.step_covers["steps"][0])


def compose_recorded(con, run: RunInfo, table: gridmod.RdpTable | PendingGrid | None,
                     delta: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(point ids, composed RDP, steps covered, indices of points refined, bound) of the run's records, hold-last.

    On ``table`` with ``delta``: the points whose ε the grid's bounds do not pin within
    :data:`analysis.composition.EXACT_RTOL` are recomputed exactly, loosest first, as long
    as they cover at most :data:`REFINE_STEPS` steps in all; ``bound`` is the largest
    relative amount by which any remaining point's ε may exceed its exact value (0 when
    exact). A :class:`PendingGrid` is awaited after the rows are binned."""
    cov = coverage(con, run)
    n = len(cov.point_ids)
    if table is not None:
        acc = composition.Histogram(n, table.size)
        batch_rows = 1 << 20
    else:
        acc = composition.ExactSum(n, run.sample_rate, run.noise_multiplier, rdp.DEFAULT_ORDERS)
        batch_rows = 1 << 15
    # a thread reads the next batches from DuckDB and computes their cells while this one scatters them
    if table is not None:
        for prepared in stream(con, run, cov, batch_rows=batch_rows, steps=False, prefetch=True, prepare=acc.prepare):
            acc.add_prepared(prepared)
    else:
        for idx, _step, ratio, covers in stream(con, run, cov, batch_rows=batch_rows, steps=False, prefetch=True):
            acc.add(idx, ratio, covers)
    if cov.shape != "ragged" and n and not np.all(acc.covered == cov.run_steps - _first_step(cov)):
        # every point at the same steps covers the same steps; anything else is a repeated (run, step, point) row
        raise UserError(f"run '{run.run_id}' has repeated (step, point) rows in point_steps; "
                        f"each point's norm of a step is recorded once")
    if table is None:
        return cov.point_ids, acc.rdp(), acc.covered, np.arange(n), 0.0
    if isinstance(table, PendingGrid):
        table = table.result(con)
    composed, lower = acc.bounds(table)
    if not delta:
        return cov.point_ids, composed, acc.covered, np.zeros(0, dtype=np.int64), float("nan")
    gap = composition.bound_gap(composed, lower, delta, table.orders)
    flagged = np.flatnonzero(gap > composition.EXACT_RTOL)
    flagged = flagged[np.argsort(-gap[flagged], kind="stable")]
    refine = flagged[np.cumsum(acc.covered[flagged]) <= REFINE_STEPS]  # the exact path: ~1,500 rows/s
    if len(refine):
        exact = composition.ExactSum(n, run.sample_rate, run.noise_multiplier, table.orders)
        for idx, _step, ratio, covers in stream(con, run, cov, batch_rows=1 << 15, only=cov.point_ids[refine]):
            exact.add(idx, ratio, covers)
        composed[refine] = exact.rdp()[refine]
        gap[refine] = 0.0
    return cov.point_ids, composed, acc.covered, refine, float(gap.max()) if gap.size else 0.0


def compose_filled(con, run: RunInfo, method: str, table: gridmod.RdpTable | None):
    """(point ids, composed RDP, steps covered) of a dense fill of every step 0..T-1 (analysis.fits)."""
    pids, f = fitted(con, run, method)
    steps = int(run.steps)
    composed = fits.compose_fill(f, steps, table=table, q=run.sample_rate, noise_multiplier=run.noise_multiplier,
                                 orders=rdp.DEFAULT_ORDERS)
    return pids, composed, np.full(len(pids), float(steps))


def account_rdp(con, run: RunInfo, delta: float, exact: bool, size: int, fill: str = "step") -> dict:
    """Compose one run under the rdp rule, replace its rows, and return its summary."""
    orders = np.asarray(rdp.DEFAULT_ORDERS)
    notes = [FILL if fill == "step" else f"fill {fill}: per-step ratios between records from analysis.fits "
                                          f"(held at the first/last record outside them)"]
    with transaction(con):
        refined, bound = np.zeros(0, dtype=np.int64), 0.0
        if fill != "step":
            table = None if exact else ensure_grid(con, run.sample_rate, run.noise_multiplier, size)
            pids, composed, covered = compose_filled(con, run, fill, table)
        else:
            # the grid is tabulated while the rows stream
            pending = None if exact else PendingGrid(con, run.sample_rate, run.noise_multiplier, size)
            pids, composed, covered, refined, bound = compose_recorded(con, run, pending, delta)
            table = None if exact else pending.result(con)
        if len(refined) and not exact:
            notes.append(f"{len(refined)} points recomputed exactly: the grid's error bound did not pin their epsilon "
                         f"within {composition.EXACT_RTOL:g} relative")
        if bound > composition.EXACT_RTOL:
            notes.append(f"tabulated upper bound: epsilon may be up to {bound:.2g} (relative) above exact for some "
                         f"points (the grid's own error bound); a larger grid or exact accounting pins it")
        bounded = table.bounded_orders if table is not None else []
        if bounded:
            notes.append(f"orders {bounded} were not convex on the grid and are bounded by the next integer order")
        write_accounting(con, run.run_id, "rdp", delta, exact, None if exact else size, orders, bounded=bounded,
                         fill=FILL if fill == "step" else fill)
        per_point_exact = np.full(len(pids), bool(exact))
        per_point_exact[refined] = True
        eps, edge = write_point_epsilon(con, run.run_id, "rdp", pids, composed, covered, delta, per_point_exact,
                                        orders)
    if edge:
        notes.append(f"{edge} points have their optimal order at the edge of the order list "
                     f"({orders[0]:g} or {orders[-1]:g}); their epsilon is an upper bound that more orders could tighten")
    return summary(run, "rdp", eps, covered, exact, delta, notes)
