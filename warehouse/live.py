"""Runs as they train: what ``dpledger watch`` shows and ``dpledger export tensorboard`` writes.

Layer: ``warehouse`` (pure reads: nothing here writes a table, a file or the grid
cache ``rdp_grid``). Every function takes a connection, normally the live read-only
one of :func:`dpledger.warehouse.db.connect` (the database and the committed shards of
the lake), so a run that another process is writing is read up to its committed step.

Per-example ε "so far" is the ``rdp`` rule's number for the steps done: each recorded
norm of a point stands for the steps until that point's next record (hold last), the
last one until the last committed step, composed on a coarse grid of r = s/C
(:data:`LIVE_GRID` cells: an *upper bound*, like ``dpledger account``'s tabulated
path, a little looser than its default 1,024 cells; ``dpledger account`` gives the
stored number). It is composed incrementally (:class:`RunningRdp`): per point, the
held ratio and the running RDP sum, to which a record that changes adds (steps since
the last change) × ρ(held ratio); reading it as of step T adds the open interval of the
held ratio. So a watch refresh reads only the rows committed since the last one, and
an export reads each row once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from dpledger.analysis import composition, grid as gridmod, rdp

from .query import worker_gone
from .runs import RunInfo, load_runs

LIVE_GRID = 256  # cells of r for the per-example ε so far (an upper bound; coarser than account's 1,024)
RECENT_STEPS = 50  # steps whose wall time gives the recent steps per second
QUANTILES = {"epsilon_min": 0.0, "epsilon_p05": 0.05, "epsilon_median": 0.5, "epsilon_p95": 0.95, "epsilon_max": 1.0}
_CHUNK = 1 << 14  # rows of (rows × orders) per-step RDP materialised at once


class RunningRdp:
    """Per-example composed RDP of one run under the hold-last rule, fed in step order.

    :meth:`add` takes the records of steps after every step already added (any number
    of steps at once, any order within); :meth:`composed` reads the composed RDP as of
    ``steps_done`` steps (the held ratio of each point counted up to step
    ``steps_done - 1``). The per-step RDP is the chord of ``table`` (an upper bound).
    """

    def __init__(self, table: gridmod.RdpTable, max_grad_norm: float):
        self.table, self.max_grad_norm = table, float(max_grad_norm)
        self.orders = np.asarray(table.orders, dtype=np.float64)
        self.point_ids = np.empty(0, dtype=np.int64)
        self.running = np.zeros((0, len(self.orders)))  # RDP of the closed intervals
        self.held_ratio = np.zeros(0)                    # the last recorded ratio of each point
        self.held_norm = np.zeros(0)                     # ... and its norm
        self.since = np.zeros(0, dtype=np.int64)         # step of that record
        self.first = np.zeros(0, dtype=np.int64)         # first recorded step
        self.min_ratio = np.zeros(0)                     # smallest ratio recorded (1: at the clip every time)
        self.last_step = -1                              # the last step with records
        self.fed = 0                                     # every record of the steps before this one is in (feed)

    def _rho(self, ratio: np.ndarray) -> np.ndarray:
        return gridmod.interpolate(self.table, ratio)

    def _grow(self, new_ids: np.ndarray) -> None:
        ids = np.union1d(self.point_ids, new_ids)
        if len(ids) == len(self.point_ids):
            return
        at = np.searchsorted(ids, self.point_ids)
        n = len(ids)

        def moved(old, fill, shape=()):
            out = np.full((n, *shape), fill, dtype=old.dtype)
            out[at] = old
            return out

        self.running = moved(self.running, 0.0, (len(self.orders),))
        self.held_ratio = moved(self.held_ratio, np.nan)
        self.held_norm = moved(self.held_norm, np.nan)
        self.since = moved(self.since, -1)
        self.first = moved(self.first, -1)
        self.min_ratio = moved(self.min_ratio, np.inf)
        self.point_ids = ids

    def add(self, point_id, step, grad_norm) -> None:
        """Records (arrays) of steps after :attr:`last_step`; a point recorded twice at one step keeps the last row."""
        point_id = np.asarray(point_id, dtype=np.int64)
        step = np.asarray(step, dtype=np.int64)
        norm = np.asarray(grad_norm, dtype=np.float64)
        if len(step) == 0:
            return
        if step.min() <= self.last_step:
            raise ValueError(f"records of step {int(step.min())} arrive after step {self.last_step}")
        self._grow(np.unique(point_id))
        idx = np.searchsorted(self.point_ids, point_id)
        ratio = composition.clipped_ratio(norm, self.max_grad_norm)
        np.minimum.at(self.min_ratio, idx, ratio)
        earliest = np.full(len(self.point_ids), np.iinfo(np.int64).max)
        np.minimum.at(earliest, idx, step)
        self.first = np.where((self.first < 0) & (earliest < np.iinfo(np.int64).max), earliest, self.first)
        # the held record of each point recorded now closes at its first new record: as a row of its own
        touched = np.unique(idx)
        held = touched[self.since[touched] >= 0]
        idx = np.concatenate([held, idx])
        step = np.concatenate([self.since[held], step])
        ratio = np.concatenate([self.held_ratio[held], ratio])
        norm = np.concatenate([self.held_norm[held], norm])
        order = np.lexsort((step, idx))
        idx, step, ratio, norm = idx[order], step[order], ratio[order], norm[order]
        last = np.ones(len(idx), dtype=bool)
        last[:-1] = idx[1:] != idx[:-1]
        closed = np.flatnonzero(~last)
        covers = (step[closed + 1] - step[closed]).astype(np.float64)
        for a in range(0, len(closed), _CHUNK):
            rows = closed[a:a + _CHUNK]
            contrib = self._rho(ratio[rows]) * covers[a:a + _CHUNK, None]
            starts = np.flatnonzero(np.r_[True, idx[rows][1:] != idx[rows][:-1]])
            self.running[idx[rows][starts]] += np.add.reduceat(contrib, starts, axis=0)
        ends = np.flatnonzero(last)
        p = idx[ends]
        self.held_ratio[p], self.held_norm[p], self.since[p] = ratio[ends], norm[ends], step[ends]
        self.last_step = int(max(self.last_step, step.max()))

    def composed(self, steps_done: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(point ids, composed RDP (points × orders), steps covered) as of ``steps_done`` steps."""
        if steps_done <= self.last_step:
            raise ValueError(f"steps_done {steps_done} is not after the last record (step {self.last_step})")
        out = self.running.copy()
        held = np.flatnonzero(self.since >= 0)
        for a in range(0, len(held), _CHUNK):
            rows = held[a:a + _CHUNK]
            out[rows] += self._rho(self.held_ratio[rows]) * (steps_done - self.since[rows])[:, None]
        covered = np.where(self.first >= 0, steps_done - self.first, 0).astype(np.float64)
        return self.point_ids, out * (1.0 + composition.ROUNDING_MARGIN), covered

    def epsilon(self, steps_done: int, delta: float) -> tuple[np.ndarray, np.ndarray]:
        """(point ids, per-example ε) as of ``steps_done`` steps."""
        pids, composed, _ = self.composed(steps_done)
        if len(pids) == 0:
            return pids, np.zeros(0)
        eps, _ = composition.epsilon(composed, delta, self.orders)
        return pids, eps

    def at_cap(self, steps_done: int) -> np.ndarray:
        """Whether each point was recorded at the clip (ratio 1) every time, from step 0: its ε is the run's."""
        return (self.first == 0) & (self.min_ratio >= 1.0)


@dataclass
class LiveCache:
    """What a sequence of refreshes keeps: grids per (q, σ, size), per-step RDP at the clip per
    (q, σ), and each watched run's :class:`RunningRdp` (records read once)."""

    tables: dict = field(default_factory=dict)
    at_clip: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)  # run_id -> (key, RunningRdp)

    def missing(self, runs: list[RunInfo], size: int = LIVE_GRID) -> list[RunInfo]:
        """The accountable runs whose grid or per-step RDP at the clip is not computed yet."""
        return [r for r in runs if accountable(r) and ((r.sample_rate, r.noise_multiplier, size) not in self.tables
                                                       or (r.sample_rate, r.noise_multiplier) not in self.at_clip)]

    def prepare(self, runs: list[RunInfo], size: int = LIVE_GRID) -> None:
        """Compute what ``runs`` need (seconds per new (q, σ)); needs no connection, so a caller
        can do it with the warehouse closed and hold a reader's connection only to read."""
        for r in self.missing(runs, size):
            self.table(r.sample_rate, r.noise_multiplier, size)
            self.clip_rdp(r.sample_rate, r.noise_multiplier)

    def table(self, q: float, sigma: float, size: int) -> gridmod.RdpTable:
        key = (q, sigma, size)
        if key not in self.tables:
            self.tables[key] = gridmod.tabulate(q, sigma, size, rdp.DEFAULT_ORDERS)
        return self.tables[key]

    def clip_rdp(self, q: float, sigma: float) -> np.ndarray:
        """RDP of one step at the clip (every example at C): what :func:`rdp.dp_epsilon` multiplies."""
        key = (q, sigma)
        if key not in self.at_clip:
            self.at_clip[key] = rdp.rdp_sgm(q, sigma, rdp.DEFAULT_ORDERS)
        return self.at_clip[key]

    def dp_epsilon(self, q: float, sigma: float, steps: int, delta: float) -> float:
        """:func:`rdp.dp_epsilon` with the per-step RDP cached (the same arithmetic)."""
        eps, _ = rdp.epsilon_from_rdp(self.clip_rdp(q, sigma) * steps, delta, rdp.DEFAULT_ORDERS)
        return float(eps)


def accountable(run: RunInfo) -> bool:
    """Whether the run has a noise to account (private, with q, σ > 0, C and δ)."""
    return bool(run.private) and all(v is not None for v in (run.sample_rate, run.noise_multiplier,
                                                             run.max_grad_norm, run.delta)) \
        and run.noise_multiplier > 0 and run.sample_rate > 0


def _status(con, run_ids: list[str]) -> dict:
    """status, committed and planned steps per run; a run marked running whose worker died on
    this host (killed, out of memory) is ``incomplete``, as ``dpledger runs`` says."""
    rows = con.execute(
        "SELECT run_id, status, committed_step, steps, CAST(config AS VARCHAR) FROM runs "
        "WHERE run_id IN (SELECT unnest(?))",
        [run_ids]).fetchall()
    return {r[0]: {"status": "incomplete" if r[1] == "running" and worker_gone(r[4]) else r[1],
                   "committed_step": r[2], "steps": r[3]} for r in rows}


def steps_done(con, run_id: str, status: str | None, committed_step, planned) -> int:
    """Steps whose rows are committed: ``committed_step + 1``; for a run written without a
    commit point (an import), every recorded step, or the planned steps once it is not running."""
    if committed_step is not None:
        return int(committed_step) + 1
    last = con.execute(
        "SELECT greatest((SELECT max(step) FROM steps WHERE run_id = $r), "
        "(SELECT max(step) FROM point_steps WHERE run_id = $r))", {"r": run_id}).fetchall()[0][0]
    done = -1 if last is None else int(last)
    if status != "running" and planned is not None:
        return max(int(planned), done + 1)
    return done + 1


def running_run_ids(con) -> list[str]:
    """The runs whose status is ``running``, sorted."""
    return [r[0] for r in con.execute("SELECT run_id FROM runs WHERE status = 'running' ORDER BY 1").fetchall()]


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def _recent(con, run_id: str, done: int) -> dict:
    rows = con.execute(
        "SELECT step, loss, wall_s FROM steps WHERE run_id = ? AND step < ? ORDER BY step DESC LIMIT ?",
        [run_id, done, RECENT_STEPS]).fetchall()
    evaluated = con.execute(
        "SELECT step, test_accuracy FROM steps WHERE run_id = ? AND step < ? AND test_accuracy IS NOT NULL "
        "AND NOT isnan(test_accuracy) ORDER BY step DESC LIMIT 1", [run_id, done]).fetchall()
    walls = [w for _, _, w in rows if w is not None and math.isfinite(w)]
    return {
        "loss": _finite(rows[0][1]) if rows else None,
        "loss_step": rows[0][0] if rows else None,
        "steps_per_s": len(walls) / sum(walls) if walls and sum(walls) > 0 else None,
        "test_accuracy": _finite(evaluated[0][1]) if evaluated else None,
        "test_accuracy_step": evaluated[0][0] if evaluated else None,
    }


def running_rdp(con, run: RunInfo, done: int, cache: LiveCache, size: int = LIVE_GRID) -> RunningRdp:
    """The run's :class:`RunningRdp` fed every record before step ``done`` (from the cache, plus
    the rows committed since; rebuilt if the run's parameters or records went backwards)."""
    key = (run.sample_rate, run.noise_multiplier, run.max_grad_norm, size)
    cached = cache.running.get(run.run_id)
    acc = cached[1] if cached is not None and cached[0] == key and cached[1].fed <= done else None
    if acc is None:
        acc = RunningRdp(cache.table(run.sample_rate, run.noise_multiplier, size), run.max_grad_norm)
    feed(con, run.run_id, acc, done)
    cache.running[run.run_id] = (key, acc)
    return acc


def feed(con, run_id: str, acc: RunningRdp, done: int, start: int | None = None) -> int:
    """Add the run's records of steps ``start`` (default: ``acc.fed``) to ``done - 1``; returns rows."""
    lo = acc.fed if start is None else start
    if lo >= done:
        return 0
    table = con.sql(
        "SELECT point_id, step, grad_norm FROM point_steps WHERE run_id = $r AND step >= $lo AND step < $hi "
        "AND grad_norm IS NOT NULL", params={"r": run_id, "lo": lo, "hi": done}).to_arrow_table()
    if table.num_rows:
        acc.add(table.column(0).to_numpy(), table.column(1).to_numpy(), table.column(2).to_numpy())
    acc.fed = max(acc.fed, done)
    return table.num_rows


def quantiles(eps: np.ndarray) -> dict:
    """min / 5% / median / 95% / max of per-example ε (None when there are no points)."""
    if len(eps) == 0:
        return {k: None for k in QUANTILES}
    values = np.quantile(eps, list(QUANTILES.values()))
    return {k: float(v) for k, v in zip(QUANTILES, values)}


def watch_frame(con, run_ids: list[str] | None = None, *, cache: LiveCache | None = None,
                grid: int = LIVE_GRID) -> list[dict]:
    """One refresh of ``dpledger watch``: a dict per run (the named ones, else the running ones).

    Fields: ``run_id``, ``status``, ``step`` (steps done: committed), ``steps`` (planned),
    ``steps_per_s`` (recent, from the steps' wall time), ``loss`` (of the last step),
    ``test_accuracy`` and ``test_accuracy_step`` (the last evaluation), ``delta``,
    ``epsilon`` (data-independent, of the steps done: :func:`rdp.dp_epsilon`),
    ``epsilon_planned`` (of the planned steps), ``points`` (with records),
    ``epsilon_min`` / ``epsilon_p05`` / ``epsilon_median`` / ``epsilon_p95`` /
    ``epsilon_max`` (per-example ε of the steps done: an upper bound on ``grid`` cells),
    ``points_at_cap`` (recorded at the clip every step: ε equal to ``epsilon``) and
    ``grid``. ε fields are None for a run without noise to account. Reads only;
    ``cache`` (a :class:`LiveCache`) carries the grids and the records read between
    refreshes.
    """
    cache = cache if cache is not None else LiveCache()
    ids = list(run_ids) if run_ids else running_run_ids(con)
    if not ids:
        return []
    runs = load_runs(con, ids)
    status = _status(con, ids)
    frame = []
    for run in runs:
        s = status[run.run_id]
        done = steps_done(con, run.run_id, s["status"], s["committed_step"], s["steps"])
        row = {"run_id": run.run_id, "status": s["status"], "step": done, "steps": s["steps"],
               **_recent(con, run.run_id, done), "delta": run.delta, "epsilon": None, "epsilon_planned": None,
               "points": None, **{k: None for k in QUANTILES}, "points_at_cap": None, "grid": grid}
        if accountable(run):
            q, sigma = run.sample_rate, run.noise_multiplier
            row["epsilon"] = cache.dp_epsilon(q, sigma, done, run.delta) if done else 0.0
            if s["steps"]:
                row["epsilon_planned"] = cache.dp_epsilon(q, sigma, int(s["steps"]), run.delta)
            if done:
                acc = running_rdp(con, replace(run, steps=done), done, cache, grid)
                _, eps = acc.epsilon(done, run.delta)
                row.update(points=len(eps), **quantiles(eps), points_at_cap=int(acc.at_cap(done).sum()))
        frame.append(row)
    return frame


# --- the series of a whole run, for the TensorBoard export ------------------------------------------

def sample_steps(steps_done: int, at_most: int) -> np.ndarray:
    """At most ``at_most`` steps of 0..steps_done-1, evenly spaced, the last one always in."""
    if steps_done <= 0:
        return np.zeros(0, dtype=np.int64)
    n = min(int(at_most), steps_done)
    return np.unique(np.round(np.linspace(steps_done - 1, 0, n)[::-1]).astype(np.int64))


def checkpoint_steps(con, run_id: str, steps_done: int) -> np.ndarray:
    """The run's checkpoint steps (``checkpoints``), or else its evaluated steps, before ``steps_done``."""
    rows = con.execute("SELECT DISTINCT step FROM checkpoints WHERE run_id = ? AND step < ? ORDER BY 1",
                       [run_id, steps_done]).fetchall()
    if not rows:
        rows = con.execute(
            "SELECT DISTINCT step FROM steps WHERE run_id = ? AND step < ? AND test_accuracy IS NOT NULL "
            "AND NOT isnan(test_accuracy) ORDER BY 1", [run_id, steps_done]).fetchall()
    return np.array([r[0] for r in rows], dtype=np.int64)


def run_series(con, run_id: str, *, max_points: int = 200, grid: int = LIVE_GRID,
               on_step=None) -> dict:
    """Everything ``dpledger export tensorboard`` writes for one run, as arrays (reads only).

    Returns ``{"run": RunInfo, "steps_done", "grid", "scalars": {tag: (steps, values)},
    "histograms": {tag: [(step, values), ...]}}``. A value at step t is the state after
    steps 0..t. Scalars: ``loss``, ``test_accuracy`` (evaluated steps), ``epsilon``
    (data-independent, every step), ``clipped_fraction`` (of each step's sampled recorded
    points, norm ≥ C), and at most ``max_points`` evenly spaced steps plus the checkpoints:
    the per-example ε quantiles (``epsilon_min`` ... ``epsilon_max``) and ``points_at_cap``.
    Histograms at the checkpoints (or evaluated steps): ``grad_norm`` (each point's last
    recorded norm) and ``epsilon`` (per-example). ``on_step(i, n)``: progress.
    """
    (run,) = load_runs(con, [run_id])
    s = _status(con, [run_id])[run_id]
    done = steps_done(con, run_id, s["status"], s["committed_step"], s["steps"])
    scalars, hists = {}, {"grad_norm": [], "epsilon": []}
    t = con.sql("SELECT step, loss, test_accuracy FROM steps WHERE run_id = $r AND step < $d ORDER BY step",
                params={"r": run_id, "d": done}).to_arrow_table()
    step = t.column("step").to_numpy()
    for name in ("loss", "test_accuracy"):
        v = t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        ok = np.isfinite(v)
        scalars[name] = (step[ok], v[ok])
    series = {"run": run, "steps_done": done, "grid": grid, "scalars": scalars, "histograms": hists}
    if not accountable(run) or done == 0:
        return series
    cache = LiveCache()
    steps_all = np.arange(done, dtype=np.int64)
    eps_run, _ = rdp.epsilon_from_rdp(cache.clip_rdp(run.sample_rate, run.noise_multiplier)[None, :]
                                      * (steps_all[:, None] + 1), run.delta, rdp.DEFAULT_ORDERS)
    scalars["epsilon"] = (steps_all, np.atleast_1d(eps_run).astype(np.float64))
    c = con.sql(
        "SELECT step, avg(CASE WHEN grad_norm >= $c THEN 1.0 ELSE 0.0 END) AS f FROM point_steps "
        "WHERE run_id = $r AND step < $d AND coalesce(sampled, true) AND grad_norm IS NOT NULL "
        "GROUP BY step ORDER BY step", params={"r": run_id, "d": done, "c": run.max_grad_norm}).to_arrow_table()
    scalars["clipped_fraction"] = (c.column(0).to_numpy(), c.column(1).to_numpy().astype(np.float64))
    checkpoints = checkpoint_steps(con, run_id, done)
    at = np.union1d(sample_steps(done, max_points), checkpoints)
    acc = RunningRdp(cache.table(run.sample_rate, run.noise_multiplier, grid), run.max_grad_norm)
    q = {k: [] for k in QUANTILES}
    cap = []
    marks = set(checkpoints.tolist())
    for i, t_step in enumerate(at):
        feed(con, run_id, acc, int(t_step) + 1)
        _, eps = acc.epsilon(int(t_step) + 1, run.delta)
        for k, v in quantiles(eps).items():
            q[k].append(np.nan if v is None else v)
        cap.append(float(acc.at_cap(int(t_step) + 1).sum()))
        if int(t_step) in marks:
            norms = acc.held_norm[acc.since >= 0]
            hists["grad_norm"].append((int(t_step), norms.copy()))
            hists["epsilon"].append((int(t_step), eps.copy()))
        if on_step is not None:
            on_step(i + 1, len(at))
    for k, v in q.items():
        scalars[k] = (at, np.asarray(v, dtype=np.float64))
    scalars["points_at_cap"] = (at, np.asarray(cap, dtype=np.float64))
    return series
