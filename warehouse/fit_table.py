"""``dpledger fit``: approximation fits of a run's per-step clipped-norm ratios between
recorded checkpoints, stored in the ``fits`` table with their holdout errors; and the
fitted fills that ``dpledger account --fill METHOD`` composes.

Layer: ``warehouse`` (a derived-table job). The fits themselves are :mod:`analysis.fits`;
this module reads a run's records and writes ``fits``.
"""

from __future__ import annotations

import json

import numpy as np

from dpledger.analysis import fits
from dpledger.analysis.composition import clipped_ratio

from .errors import UserError
from .runs import RunInfo, load_run, require_params
from .sqlutil import transaction


def check_method(method: str, param: str) -> None:
    """Raise unless ``method`` is one of :data:`analysis.fits.METHODS` (``param``: the parameter it came as)."""
    if method not in fits.METHODS:
        raise UserError(f"{param} {method}: expected one of {', '.join(fits.METHODS)}", param)


def run_records(con, run: RunInfo) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Point ids and, per point, its recorded steps and ratios r = min(norm, C)/C."""
    rows = con.sql("SELECT point_id, step, grad_norm FROM point_steps WHERE run_id = $run ORDER BY point_id, step",
                   params={"run": run.run_id}).fetchnumpy()
    ratio = clipped_ratio(rows["grad_norm"], run.max_grad_norm)
    pids, start = np.unique(rows["point_id"], return_index=True)
    bounds = list(start) + [len(rows["point_id"])]
    steps = [rows["step"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    values = [ratio[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return pids, steps, values


def fitted(con, run: RunInfo, method: str, seed: int = 0) -> tuple[np.ndarray, fits.Fit]:
    """The run's point ids and ``method`` fitted to their records."""
    check_method(method, "fill")
    pids, steps, values = run_records(con, run)
    try:
        return pids, fits.fit(method, steps, values, seed=seed)
    except ValueError as exc:
        raise UserError(f"run '{run.run_id}': cannot fit {method}: {exc}") from None


def fit_run(con, run_id: str, method: str, holdout: int | None = None, seed: int = 0) -> dict:
    """Fit ``method`` to a run's records (and evaluate it by holding out every k-th); store it."""
    check_method(method, "method")
    if holdout is not None and holdout < 2:
        raise UserError(f"holdout {holdout} must be at least 2", "holdout")
    run = load_run(con, run_id)
    require_params(run)
    pids, steps, values = run_records(con, run)
    if not len(pids):
        raise UserError(f"run '{run_id}' has no recorded norms to fit")
    try:
        f = fits.fit(method, steps, values, seed=seed)
        metrics = None
        if holdout is not None:
            metrics = fits.holdout(method, steps, values, holdout, q=run.sample_rate,
                                   noise_multiplier=run.noise_multiplier, n_steps=int(run.steps),
                                   delta=run.delta, seed=seed)
    except ValueError as exc:
        raise UserError(f"run '{run_id}': {method}: {exc}") from None
    n_records = int(sum(len(s) for s in steps))
    k = holdout or 0
    with transaction(con):
        con.execute("DELETE FROM fits WHERE run_id = ? AND method = ? AND holdout_k = ?", [run_id, method, k])
        con.execute("INSERT INTO fits (run_id, method, holdout_k, n_points, n_records, params, metrics) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [run_id, method, k, len(pids), n_records, json.dumps(f.params, default=float),
                     json.dumps(metrics, default=float) if metrics is not None else None])
    return {"run_id": run_id, "method": method, "holdout_k": k, "n_points": int(len(pids)),
            "n_records": n_records, "metrics": metrics}
