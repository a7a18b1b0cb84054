"""``dpledger fit``: approximation fits of a run's per-step clipped-norm ratios
between recorded checkpoints (:mod:`analysis.fits`), stored in ``fits`` with their
holdout errors; and the fills that ``dpledger account --fill METHOD`` composes."""

from __future__ import annotations

import json

import numpy as np

from dpledger.analysis import fits

from .errors import UserError

#: composing a dense fill: points per chunk (chunk x steps ratios in memory at once)
FILL_CELLS = 20_000_000


def run_records(con, run) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Point ids and, per point, its recorded steps and ratios r = min(norm, C)/C."""
    rows = con.sql(
        "SELECT point_id, step, least(grad_norm, $c) / $c AS ratio FROM point_steps WHERE run_id = $run "
        "ORDER BY point_id, step", params={"run": run.run_id, "c": float(run.max_grad_norm)},
    ).fetchnumpy()
    pids, start = np.unique(rows["point_id"], return_index=True)
    bounds = list(start) + [len(rows["point_id"])]
    steps = [rows["step"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    values = [rows["ratio"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return pids, steps, values


def fitted(con, run, method: str, seed: int = 0) -> tuple[np.ndarray, "fits.Fit"]:
    if method not in fits.METHODS:
        raise UserError(f"--fill {method}: expected one of {', '.join(fits.METHODS)}")
    pids, steps, values = run_records(con, run)
    try:
        return pids, fits.fit(method, steps, values, seed=seed)
    except ValueError as exc:
        raise UserError(f"run '{run.run_id}': cannot fit {method}: {exc}") from None


def dense_chunks(f: "fits.Fit", n_points: int, n_steps: int):
    """(point indices, ratios over steps 0..n_steps-1) in chunks that fit in memory."""
    per = max(1, FILL_CELLS // max(1, n_steps))
    for a in range(0, n_points, per):
        idx = np.arange(a, min(n_points, a + per))
        yield idx, f.fill(n_steps, points=idx)


def fit_run(con, run_id: str, method: str, holdout: int | None = None, seed: int = 0) -> dict:
    """Fit ``method`` to a run's records (and evaluate it by holding out every k-th); store it."""
    from .accounting import _require_params, load_runs

    if method not in fits.METHODS:
        raise UserError(f"--method {method}: expected one of {', '.join(fits.METHODS)}")
    if holdout is not None and holdout < 2:
        raise UserError(f"--holdout {holdout} must be at least 2")
    (run,) = load_runs(con, [run_id])
    _require_params(run)
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
    con.execute("DELETE FROM fits WHERE run_id = ? AND method = ? AND holdout_k = ?", [run_id, method, k])
    con.execute("INSERT INTO fits (run_id, method, holdout_k, n_points, n_records, params, metrics) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [run_id, method, k, len(pids), n_records, json.dumps(f.params, default=float),
                 json.dumps(metrics, default=float) if metrics is not None else None])
    return {"run_id": run_id, "method": method, "holdout_k": k, "n_points": int(len(pids)),
            "n_records": n_records, "metrics": metrics}
