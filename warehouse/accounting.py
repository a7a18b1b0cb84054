"""Per-example privacy accounting over the warehouse: ``dpledger account``, ``rank``, ``budget``.

The numeric work lives in :mod:`analysis` (pure functions); this module reads the
rows through the SQL views of ``sql/views``, calls it, and writes ``accountings``,
``point_epsilon`` and ``config_epsilon`` in one transaction per run.

What the numbers mean (also in the report): summed over one run's recorded norms,
the ``rdp`` rule gives the *output-specific individual* privacy of Yu et al.
(TMLR 2023): a statement about that training trajectory, which the per-step norms
depend on. The ``gla`` rule (Thudi et al., USENIX Security 2024) bounds the
per-instance guarantee in expectation over training runs. Neither replaces the
data-independent ε of the run (``run_epsilon``), which is shown beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpledger.analysis import gla, grid as gridmod, rdp

from .errors import UserError
from .sqlutil import append_arrow, scalar

RULES = ("rdp", "gla")
ACCOUNTANTS = ("rdp", "prv", "gdp")
FILL = "hold-last: each recorded norm stands for the steps until the next recorded step of that point"


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    sample_rate: float | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    steps: int | None
    delta: float | None
    private: bool
    batch_size: int | None
    n_train: int | None
    config_key: str | None


def _check_delta(delta: float | None, flag: str = "--delta") -> None:
    if delta is not None and not (0 < delta < 1):
        raise UserError(f"{flag} {delta} is outside (0, 1)")


def load_runs(con, run_ids: list[str] | None = None) -> list[RunInfo]:
    """The runs to account: those named (each must exist), or every run with norms."""
    cols = ("run_id, sample_rate, noise_multiplier, max_grad_norm, steps, delta, coalesce(private, true), "
            "batch_size, n_train, config_key")
    if run_ids:
        rows = con.execute(f"SELECT {cols} FROM runs WHERE run_id IN (SELECT unnest(?))", [list(run_ids)]).fetchall()
        found = {r[0] for r in rows}
        missing = [r for r in run_ids if r not in found]
        if missing:
            known = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1 LIMIT 8").fetchall()]
            raise UserError(f"unknown run '{missing[0]}' (runs: {', '.join(known) or 'none yet'})")
        order = {r: i for i, r in enumerate(run_ids)}
        rows.sort(key=lambda r: order[r[0]])
    else:
        rows = con.execute(
            f"SELECT {cols} FROM runs WHERE run_id IN (SELECT DISTINCT run_id FROM point_steps) ORDER BY run_id"
        ).fetchall()
    return [RunInfo(*r) for r in rows]


def _require_params(run: RunInfo) -> None:
    missing = [name for name, v in (("sample_rate", run.sample_rate), ("noise_multiplier", run.noise_multiplier),
                                    ("max_grad_norm", run.max_grad_norm), ("steps", run.steps)) if v is None]
    if missing:
        raise UserError(f"run '{run.run_id}' has no {', '.join(missing)}; it cannot be accounted")


def ensure_grid(con, sample_rate: float, noise_multiplier: float, size: int) -> gridmod.RdpTable:
    """The tabulated per-step RDP of (q, σ) on ``size`` cells, from ``rdp_grid`` or computed and stored."""
    orders = np.asarray(rdp.DEFAULT_ORDERS, dtype=np.float64)
    key = [sample_rate, noise_multiplier, size]
    where = "sample_rate = ? AND noise_multiplier = ? AND grid_size = ?"
    n = scalar(con.execute(f"SELECT count(*) FROM rdp_grid WHERE {where}", key))
    if n != (size + 1) * len(orders):
        con.execute(f"DELETE FROM rdp_grid WHERE {where}", key)
        table = gridmod.tabulate(sample_rate, noise_multiplier, size, orders)
        alpha = np.repeat(orders[None, :], size + 1, axis=0)
        j = np.repeat(np.arange(size + 1)[:, None], len(orders), axis=1)
        bounded = np.isin(alpha, table.bounded_orders)
        rows = pa.table({
            "sample_rate": np.full(alpha.size, sample_rate), "noise_multiplier": np.full(alpha.size, noise_multiplier),
            "grid_size": np.full(alpha.size, size, dtype=np.int32), "alpha": alpha.ravel(),
            "j": j.ravel().astype(np.int32), "rho": table.values.ravel(), "bounded": bounded.ravel(),
        })
        append_arrow(con, "rdp_grid", rows)
        return table
    got = con.sql(
        f"SELECT alpha, j, rho, bounded FROM rdp_grid WHERE {where} ORDER BY alpha, j", params=key
    ).to_arrow_table()
    values = got.column("rho").to_numpy().reshape(len(orders), size + 1).T.copy()
    bounded = sorted(set(got.filter(got.column("bounded")).column("alpha").to_pylist()))
    return gridmod.RdpTable(sample_rate, noise_multiplier, size, orders, values, bounded)


def _point_ids(con, run_ids: list[str]) -> np.ndarray:
    return con.sql(
        "SELECT DISTINCT point_id FROM point_steps WHERE run_id IN (SELECT unnest($runs)) ORDER BY point_id",
        params={"runs": run_ids},
    ).to_arrow_table().column(0).to_numpy()


@dataclass
class _Coverage:
    """How a run's recorded norms cover its steps (the shapes of sql/views/point_step_coverage.sql)."""

    shape: str               # dense / uniform / ragged
    point_ids: np.ndarray    # sorted
    step_covers: dict | None  # uniform: step -> steps it stands for


def _coverage(con, run: RunInfo) -> _Coverage:
    n_rows, n_points, n_steps, first, last = con.execute(
        "SELECT count(*), count(DISTINCT point_id), count(DISTINCT step), min(step), max(step) "
        "FROM point_steps WHERE run_id = ?", [run.run_id]).fetchall()[0]
    pids = _point_ids(con, [run.run_id])
    run_steps = max(int(run.steps or 0), int(last) + 1)
    if n_rows != n_points * n_steps:
        return _Coverage("ragged", pids, None)
    if first == 0 and n_steps == run_steps:
        return _Coverage("dense", pids, None)
    steps = con.sql("SELECT DISTINCT step FROM point_steps WHERE run_id = $run ORDER BY step",
                    params={"run": run.run_id}).to_arrow_table().column(0).to_numpy()
    covers = np.diff(np.append(steps, run_steps))
    return _Coverage("uniform", pids, {"steps": steps, "covers": covers})


def _stream(con, run: RunInfo, cov: _Coverage, batch_rows: int = 1 << 20):
    """Batches of (point index, ratio r = min(norm, C)/C, steps covered) for one run.

    The same numbers as the view point_step_coverage, read without joining the fact
    table to anything for the dense and uniform shapes (a string join per row costs
    more than the whole histogram); ragged runs go through the view's window.
    """
    c = float(run.max_grad_norm)
    if cov.shape == "ragged":
        sql = ("SELECT point_id, step, grad_norm, covers FROM point_step_coverage WHERE run_id = $run")
    else:
        sql = "SELECT point_id, step, grad_norm FROM point_steps WHERE run_id = $run"
    pids = cov.point_ids
    contiguous = len(pids) > 0 and pids[-1] - pids[0] + 1 == len(pids)
    reader = con.sql(sql, params={"run": run.run_id}).to_arrow_reader(batch_size=batch_rows)
    try:
        for batch in reader:
            pid = batch.column(0).to_numpy()
            idx = pid - pids[0] if contiguous else np.searchsorted(pids, pid)
            ratio = np.minimum(batch.column(2).to_numpy(), c) / c
            if cov.shape == "dense":
                covers = None
            elif cov.shape == "uniform":
                at = np.searchsorted(cov.step_covers["steps"], batch.column(1).to_numpy())
                covers = cov.step_covers["covers"][at].astype(np.float64)
            else:
                covers = batch.column(3).to_numpy().astype(np.float64)
            yield idx, ratio, covers
    finally:
        reader.close()


def _compose_rdp_fast(con, run: RunInfo, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, gridmod.RdpTable]:
    table = ensure_grid(con, run.sample_rate, run.noise_multiplier, size)
    cov = _coverage(con, run)
    n = len(cov.point_ids)
    hist = np.zeros(n * (size + 1))
    covered = np.zeros(n)
    for idx, ratio, covers in _stream(con, run, cov):
        j, lo, hi = gridmod.tent_weights(ratio, size)
        flat = idx * (size + 1) + j
        if covers is not None:
            lo, hi = lo * covers, hi * covers
        hist += np.bincount(flat, weights=lo, minlength=hist.size)
        hist += np.bincount(flat + 1, weights=hi, minlength=hist.size)
        covered += np.bincount(idx, weights=covers, minlength=n)
    composed = gridmod.compose(hist.reshape(n, size + 1), table)
    return cov.point_ids, composed, covered, table


def _compose_rdp_exact(con, run: RunInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    orders = rdp.DEFAULT_ORDERS
    cov = _coverage(con, run)
    composed = np.zeros((len(cov.point_ids), len(orders)))
    covered = np.zeros(len(cov.point_ids))
    for idx, ratio, covers in _stream(con, run, cov, batch_rows=1 << 15):
        covers = np.ones(len(idx)) if covers is None else covers
        uniq, inv = np.unique(ratio, return_inverse=True)
        per_step = rdp.rdp_of_sensitivity(run.sample_rate, run.noise_multiplier, uniq, orders)
        np.add.at(composed, idx, per_step[inv.ravel()] * covers[:, None])
        np.add.at(covered, idx, covers)
    return cov.point_ids, composed, covered


def _write_accounting(con, run_id: str, rule: str, delta: float, exact: bool, size: int | None, orders,
                      holder_p=None, max_order=None, legacy=False, bounded=None) -> None:
    con.execute("DELETE FROM accountings WHERE run_id = ? AND rule = ?", [run_id, rule])
    con.execute(
        "INSERT INTO accountings (run_id, rule, delta, exact, grid_size, orders, fill, holder_p, max_order, "
        "legacy_scaling, bounded_orders) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [run_id, rule, delta, exact, size, [float(o) for o in orders], FILL, holder_p, max_order, legacy,
         [float(b) for b in (bounded or [])]],
    )


def _write_point_epsilon(con, run_id: str, rule: str, pids, composed, covered, delta, exact, orders) -> np.ndarray:
    eps, best = rdp.epsilon_from_rdp(composed, delta, orders)
    eps, best = np.atleast_1d(eps), np.atleast_1d(best)
    edge = rdp.order_at_edge(best, orders) if len(orders) > 1 else np.zeros(len(best), dtype=bool)
    con.execute("DELETE FROM point_epsilon WHERE run_id = ? AND rule = ?", [run_id, rule])
    rows = pa.table({
        "run_id": pa.array([run_id] * len(pids), pa.string()),
        "point_id": pa.array(np.asarray(pids, dtype=np.int64)),
        "rule": pa.array([rule] * len(pids), pa.string()),
        "epsilon": pa.array(eps, pa.float64()),
        "best_order": pa.array(best, pa.float64()),
        "delta": pa.array(np.full(len(pids), delta)),
        "exact": pa.array(np.full(len(pids), exact)),
        "steps_covered": pa.array(np.rint(covered).astype(np.int64)),
        "order_at_edge": pa.array(np.asarray(edge, dtype=bool)),
        "rdp": pa.array(list(composed), pa.list_(pa.float64())),
    })
    append_arrow(con, "point_epsilon", rows)
    return eps, int(np.sum(edge))


def _summary(run: RunInfo, rule: str, eps: np.ndarray, covered: np.ndarray, exact: bool, delta: float,
             notes: list[str]) -> dict:
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
        "notes": notes,
    }


def _compose_filled(con, run: RunInfo, method: str, exact: bool, size: int):
    """Compose a dense fill of every step 0..T-1 (analysis.fits) instead of hold-last."""
    from .fitting import dense_chunks, fitted

    pids, f = fitted(con, run, method)
    steps = int(run.steps)
    orders = rdp.DEFAULT_ORDERS
    table = None if exact else ensure_grid(con, run.sample_rate, run.noise_multiplier, size)
    composed = np.zeros((len(pids), len(orders)))
    for idx, ratios in dense_chunks(f, len(pids), steps):
        if exact:
            uniq, inv = np.unique(ratios, return_inverse=True)
            per_step = rdp.rdp_of_sensitivity(run.sample_rate, run.noise_multiplier, uniq, orders)
            counts = np.zeros((len(idx), len(uniq)))
            np.add.at(counts, (np.repeat(np.arange(len(idx)), steps), inv.ravel()), 1.0)
            composed[idx] = counts @ per_step
        else:
            local = np.repeat(np.arange(len(idx)), steps)
            hist = gridmod.histogram(local, ratios.ravel(), np.ones(ratios.size), len(idx), size)
            composed[idx] = gridmod.compose(hist, table)
    return pids, composed, np.full(len(pids), float(steps)), table


def _account_rdp(con, run: RunInfo, delta: float, exact: bool, size: int, fill: str = "step") -> dict:
    orders = np.asarray(rdp.DEFAULT_ORDERS)
    notes = [FILL if fill == "step" else f"fill {fill}: per-step ratios between records from analysis.fits "
                                          f"(held at the first/last record outside them)"]
    con.execute("BEGIN TRANSACTION")
    try:
        _write_accounting(con, run.run_id, "rdp", delta, exact, None if exact else size, orders)
        if fill != "step":
            con.execute("UPDATE accountings SET fill = ? WHERE run_id = ? AND rule = 'rdp'", [fill, run.run_id])
            pids, composed, covered, table = _compose_filled(con, run, fill, exact, size)
            bounded = table.bounded_orders if table is not None else []
        elif exact:
            pids, composed, covered = _compose_rdp_exact(con, run)
            bounded = []
        else:
            pids, composed, covered, table = _compose_rdp_fast(con, run, size)
            bounded = table.bounded_orders
            if bounded:
                _write_accounting(con, run.run_id, "rdp", delta, exact, size, orders, bounded=bounded)
                notes.append(f"orders {bounded} were not convex on the grid and are bounded by the next integer order")
        eps, edge = _write_point_epsilon(con, run.run_id, "rdp", pids, composed, covered, delta, exact, orders)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    if edge:
        notes.append(f"{edge} points have their optimal order at the edge of the order list "
                     f"({orders[0]:g} or {orders[-1]:g}); their epsilon is an upper bound that more orders could tighten")
    return _summary(run, "rdp", eps, covered, exact, delta, notes)


def _gla_ratios(norm: np.ndarray, ridx: np.ndarray, runs: list[RunInfo], legacy: bool) -> np.ndarray:
    """Each row's sensitivity ratio; ``ridx`` is the row's position in ``runs``."""
    if legacy:  # the study's s: clipped norm / batch size, not divided by C
        bs = np.array([r.batch_size or np.nan for r in runs], dtype=np.float64)[ridx]
        if np.any(np.isnan(bs)):
            raise UserError("--legacy-scaling needs the runs' batch_size")
        return norm / bs
    c = np.array([r.max_grad_norm for r in runs], dtype=np.float64)[ridx]
    return np.minimum(norm, c) / c


def _account_gla_config(con, runs: list[RunInfo], delta_override: float | None, legacy: bool) -> tuple[list[dict], dict]:
    """gla over the runs of one configuration: per-run ε and the ε of the expectation."""
    base = runs[0]
    steps = int(base.steps)
    q, sigma = base.sample_rate, base.noise_multiplier
    rows = con.sql(
        "SELECT run_id, point_id, step, grad_norm FROM point_steps WHERE run_id IN (SELECT unnest($runs)) "
        "ORDER BY point_id, run_id, step",
        params={"runs": [r.run_id for r in runs]},
    ).to_arrow_table()
    ridx = pc.index_in(rows.column("run_id"), value_set=pa.array([r.run_id for r in runs])).to_numpy()
    ratio = _gla_ratios(rows.column("grad_norm").to_numpy(), ridx, runs, legacy)
    point = rows.column("point_id").to_numpy()
    step = rows.column("step").to_numpy()
    last_step = int(step.max())
    p = gla.holder_p(last_step)
    alpha0s = np.asarray(gla.LEGACY_ALPHA0 if legacy else gla.DEFAULT_ALPHA0, dtype=np.float64)
    cap = gla.LEGACY_MAX_ORDER if legacy else None
    schedules = np.stack([gla.order_schedule(a, p, steps, cap) for a in alpha0s])  # (n_a0, T)
    needed = np.unique(schedules)
    pos = np.searchsorted(needed, schedules)
    weights = gla.holder_weights(p, steps)
    pids, pstart = np.unique(point, return_index=True)
    pend = np.append(pstart[1:], len(point))
    n_runs = len(runs)
    per_run = np.zeros((n_runs, len(pids), len(alpha0s)))
    expected = np.zeros((len(pids), len(alpha0s)))
    covered = np.zeros((n_runs, len(pids)))
    present = np.zeros((n_runs, len(pids)), dtype=bool)
    grid_steps = np.arange(steps)
    for k, (a, b) in enumerate(zip(pstart, pend)):
        filled = np.full((n_runs, steps), np.nan)
        for r in range(n_runs):
            sel = slice(a, b)
            mine = ridx[sel] == r
            if not mine.any():
                continue
            s_steps = step[sel][mine]
            s_ratio = ratio[sel][mine]
            at = np.searchsorted(s_steps, grid_steps, side="right") - 1
            ok = at >= 0
            filled[r, ok] = s_ratio[at[ok]]
            covered[r, k] = ok.sum()
            present[r, k] = True
        uniq, inv = np.unique(np.nan_to_num(filled, nan=-1.0), return_inverse=True)
        inv = inv.reshape(filled.shape)
        u = np.where(uniq < 0, 0.0, uniq)
        if legacy:
            table = np.stack([gla.legacy_step_terms(q, sigma, u, np.full(u.shape, a_), p) for a_ in needed])
        else:
            table = np.stack([gla.step_terms(q, sigma, u, np.full(u.shape, a_), p) for a_ in needed])
        missing = np.isnan(filled)
        for m in range(len(alpha0s)):
            terms = table[pos[m][None, :], inv]  # (runs, T)
            terms[missing] = np.nan
            per_run[:, k, m] = gla.compose(terms, weights, alpha0s[m])
            lme = gla.log_mean_exp(terms, axis=0)
            expected[k, m] = gla.compose(lme[None, :], weights, alpha0s[m])[0]
    summaries = []
    for r, run in enumerate(runs):
        delta = delta_override or run.delta
        _check_delta(delta, "run delta")
        keep = present[r]
        con.execute("BEGIN TRANSACTION")
        try:
            _write_accounting(con, run.run_id, "gla", delta, True, None, alpha0s, holder_p=p, max_order=cap,
                              legacy=legacy)
            eps, _ = _write_point_epsilon(con, run.run_id, "gla", pids[keep], per_run[r][keep], covered[r][keep],
                                          delta, True, alpha0s)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        notes = [FILL, f"Hoelder exponent p = {p:g} (3 x last recorded step), alpha_0 in {list(map(int, alpha0s))}"
                       + (", legacy scaling (clipped norm / batch size, orders capped at 50)" if legacy else "")]
        summaries.append(_summary(run, "gla", eps, covered[r][keep], True, delta, notes))
    delta = delta_override or base.delta
    eps_exp, best_exp = rdp.epsilon_from_rdp(expected, delta, alpha0s)
    results = {"point_ids": pids, "epsilon_expected": np.atleast_1d(eps_exp), "best_order_expected": np.atleast_1d(best_exp),
               "delta": delta}
    return summaries, results


def refresh_config_epsilon(con, config_key: str, rule: str, gla_expected: dict | None = None) -> None:
    """Per point over the accounted runs of one configuration: mean/min/max ε and the ε of the expectation."""
    tbl = con.sql(
        "SELECT pe.point_id, pe.epsilon, pe.rdp, pe.delta, a.orders FROM point_epsilon pe "
        "JOIN runs r USING (run_id) JOIN accountings a ON a.run_id = pe.run_id AND a.rule = pe.rule "
        "WHERE r.config_key = $key AND pe.rule = $rule ORDER BY pe.point_id",
        params={"key": config_key, "rule": rule},
    ).to_arrow_table()
    con.execute("DELETE FROM config_epsilon WHERE config_key = ? AND rule = ?", [config_key, rule])
    if tbl.num_rows == 0:
        return
    point = tbl.column("point_id").to_numpy()
    eps = tbl.column("epsilon").to_numpy()
    deltas = tbl.column("delta").to_numpy()
    pids, start, counts = np.unique(point, return_index=True, return_counts=True)
    out = {"point_id": pids, "n_runs": counts.astype(np.int32)}
    out["epsilon_mean"] = np.add.reduceat(eps, start) / counts
    out["epsilon_min"] = np.minimum.reduceat(eps, start)
    out["epsilon_max"] = np.maximum.reduceat(eps, start)
    delta = float(deltas.min())  # runs of one configuration normally share delta; the smallest is the safe side
    if rule == "rdp":
        orders = np.asarray(tbl.column("orders")[0].as_py())
        curves = np.stack(tbl.column("rdp").to_numpy(zero_copy_only=False))
        mean_curve = np.add.reduceat(curves, start, axis=0) / counts[:, None]
        e, b = rdp.epsilon_from_rdp(mean_curve, delta, orders)
        out["epsilon_expected"], out["best_order_expected"] = np.atleast_1d(e), np.atleast_1d(b)
    else:
        lookup = dict(zip(gla_expected["point_ids"].tolist(), range(len(gla_expected["point_ids"])))) if gla_expected else {}
        idx = [lookup.get(int(p)) for p in pids]
        out["epsilon_expected"] = np.array([gla_expected["epsilon_expected"][i] if i is not None else np.nan for i in idx])
        out["best_order_expected"] = np.array([gla_expected["best_order_expected"][i] if i is not None else np.nan for i in idx])
        delta = gla_expected["delta"] if gla_expected else delta
    rows = pa.table({
        "config_key": pa.array([config_key] * len(pids), pa.string()),
        "rule": pa.array([rule] * len(pids), pa.string()),
        "point_id": pa.array(pids.astype(np.int64)),
        "n_runs": pa.array(out["n_runs"]),
        "epsilon_mean": pa.array(out["epsilon_mean"], pa.float64()),
        "epsilon_min": pa.array(out["epsilon_min"], pa.float64()),
        "epsilon_max": pa.array(out["epsilon_max"], pa.float64()),
        "epsilon_expected": pa.array(out["epsilon_expected"], pa.float64()),
        "best_order_expected": pa.array(out["best_order_expected"], pa.float64()),
        "delta": pa.array(np.full(len(pids), delta)),
    })
    append_arrow(con, "config_epsilon", rows)


def account(
    con,
    run_ids: list[str] | None = None,
    rule: str = "rdp",
    delta: float | None = None,
    exact: bool = False,
    grid: int = gridmod.DEFAULT_GRID,
    legacy_scaling: bool = False,
    on_run: Callable[[str, int, int], None] | None = None,
    fill: str = "step",
) -> list[dict]:
    """Compute per-example ε for runs (all runs with norms by default) under ``rule``.

    ``rdp`` composes each run's per-step RDP (fast tabulated upper bound, or
    ``exact``); ``gla`` composes whole configurations (all runs sharing dataset,
    model, q, σ, C and steps) with the Hölder rule of :mod:`analysis.gla`. Returns one
    summary per run; fills ``point_epsilon``, ``accountings`` and ``config_epsilon``.
    """
    if rule not in RULES:
        raise UserError(f"--rule {rule}: expected one of {', '.join(RULES)}")
    _check_delta(delta)
    if not isinstance(grid, int) or grid < 2:
        raise UserError(f"--grid {grid} must be an integer of at least 2")
    if legacy_scaling and rule != "gla":
        raise UserError("--legacy-scaling goes with --rule gla")
    from dpledger.analysis.fits import METHODS

    if fill not in METHODS:
        raise UserError(f"--fill {fill}: expected one of {', '.join(METHODS)}")
    if fill != "step" and rule != "rdp":
        raise UserError("--fill goes with --rule rdp (gla composes its own per-step terms)")
    runs = load_runs(con, run_ids)
    summaries: list[dict] = []
    private = []
    for run in runs:
        if not run.private:
            summaries.append({"run_id": run.run_id, "rule": rule, "skipped": "not private (--disable-dp baseline)"})
            continue
        _require_params(run)
        _check_delta(delta or run.delta, f"run '{run.run_id}' delta")
        private.append(run)
    if rule == "rdp":
        for i, run in enumerate(private):
            if on_run:
                on_run(run.run_id, i, len(private))
            summaries.append(_account_rdp(con, run, delta or run.delta, exact, grid, fill))
            con.execute("BEGIN TRANSACTION")
            refresh_config_epsilon(con, run.config_key, "rdp")
            con.execute("COMMIT")
    else:
        by_config: dict[str, list[RunInfo]] = {}
        for run in private:
            by_config.setdefault(run.config_key, [])
        if by_config:
            # gla composes in expectation over a configuration: bring in the named runs' siblings
            siblings = con.execute(
                "SELECT run_id FROM runs WHERE config_key IN (SELECT unnest(?)) AND coalesce(private, true) "
                "AND run_id IN (SELECT DISTINCT run_id FROM point_steps) ORDER BY run_id",
                [list(by_config)],
            ).fetchall()
            for run in load_runs(con, [s[0] for s in siblings]):
                _require_params(run)
                by_config[run.config_key].append(run)
        done = 0
        for key, group in by_config.items():
            if on_run:
                on_run(", ".join(r.run_id for r in group), done, len(private))
            sums, expected = _account_gla_config(con, group, delta, legacy_scaling)
            summaries.extend(sums)
            con.execute("BEGIN TRANSACTION")
            refresh_config_epsilon(con, key, "gla", expected)
            con.execute("COMMIT")
            done += len(group)
    return summaries


def rank(con, run_id: str, rule: str = "rdp", lowest: int | None = None, highest: int | None = None) -> pa.Table:
    """The run's points by per-example ε: lowest first (default) or highest first."""
    if rule not in RULES:
        raise UserError(f"--rule {rule}: expected one of {', '.join(RULES)}")
    if lowest is not None and highest is not None:
        raise UserError("give --lowest N or --highest N, not both")
    for flag, n in (("--lowest", lowest), ("--highest", highest)):
        if n is not None and n < 1:
            raise UserError(f"{flag} {n} must be at least 1")
    if not scalar(con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id])):
        known = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1 LIMIT 8").fetchall()]
        raise UserError(f"unknown run '{run_id}' (runs: {', '.join(known) or 'none yet'})")
    if not scalar(con.execute("SELECT count(*) FROM point_epsilon WHERE run_id = ? AND rule = ?", [run_id, rule])):
        raise UserError(f"run '{run_id}' has no per-example epsilon under rule {rule}; "
                        f"run `dpledger account --run {run_id} --rule {rule}` first")
    by = "rank_highest" if highest is not None else "rank_lowest"
    limit = highest if highest is not None else lowest
    return con.sql(
        f"SELECT point_id, label, epsilon, {by} AS rank, run_epsilon, ratio, best_order "
        f"FROM point_rank WHERE run_id = $run AND rule = $rule ORDER BY {by} LIMIT $n",
        params={"run": run_id, "rule": rule, "n": limit if limit is not None else 2**62},
    ).to_arrow_table()


def steps_from_epochs(epochs: float, sample_rate: float) -> int:
    """epochs × ⌈1/q⌉, as Opacus's ``compute_dp_sgd_privacy`` script counts steps."""
    per_epoch = math.ceil(1 / sample_rate - 1e-9)
    return int(math.ceil(epochs * per_epoch - 1e-9))


def budget(
    sample_rate: float,
    delta: float,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "rdp",
    target_epsilon: float | None = None,
) -> dict:
    """ε of DP-SGD with (q, σ, steps, δ), or σ for a target ε, with no training.

    ``rdp`` uses :mod:`analysis.rdp` (orders :data:`analysis.rdp.DEFAULT_ORDERS`);
    ``prv`` and ``gdp`` use Opacus's accountants. A target ε gives σ by Opacus's
    ``get_noise_multiplier``.
    """
    if not (0 < sample_rate <= 1):
        raise UserError(f"--sample-rate {sample_rate} is outside (0, 1]")
    if not (0 < delta < 1):
        raise UserError(f"--delta {delta} is outside (0, 1)")
    if accountant not in ACCOUNTANTS:
        raise UserError(f"--accountant {accountant}: expected one of {', '.join(ACCOUNTANTS)}")
    if (steps is None) == (epochs is None):
        raise UserError("give --steps or --epochs (one of them)")
    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps} must be at least 1")
    if epochs is not None and not epochs > 0:
        raise UserError(f"--epochs {epochs} must be positive")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise UserError("give --noise-multiplier (for epsilon) or --target-epsilon (for the noise multiplier)")
    if noise_multiplier is not None and not noise_multiplier > 0:
        raise UserError(f"--noise-multiplier {noise_multiplier} must be positive")
    if target_epsilon is not None and not target_epsilon > 0:
        raise UserError(f"--target-epsilon {target_epsilon} must be positive")
    n_steps = steps if steps is not None else steps_from_epochs(epochs, sample_rate)
    out = {"accountant": accountant, "sample_rate": sample_rate, "steps": n_steps, "delta": delta}
    if target_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        kwargs = {"alphas": list(rdp.DEFAULT_ORDERS)} if accountant == "rdp" else {}
        try:
            sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                         steps=n_steps, accountant=accountant, **kwargs)
        except ValueError as exc:
            raise UserError(f"--target-epsilon {target_epsilon}: {exc}") from None
        out["target_epsilon"] = target_epsilon
        noise_multiplier = float(sigma)
    out["noise_multiplier"] = noise_multiplier
    if accountant == "rdp":
        eps, order = rdp.dp_epsilon(sample_rate, noise_multiplier, n_steps, delta)
        out["epsilon"], out["order"] = float(eps), float(order)
    else:
        from opacus.accountants import create_accountant

        acc = create_accountant(mechanism=accountant)
        acc.history = [(noise_multiplier, sample_rate, n_steps)]
        out["epsilon"] = float(acc.get_epsilon(delta=delta))
    return out
