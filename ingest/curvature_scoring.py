"""Curvature scoring (``dpledger curvature``): a run's saved checkpoints scored for input-loss curvature.

For each chosen checkpoint the model is rebuilt from the run's stored options,
loaded, and :func:`models.curvature.input_curvature` scores the run's tracked and
evaluated points; each checkpoint's values go to ``curvature`` (the view
``point_curvature`` averages them, as the papers average across training).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from dpledger.models.curvature import input_curvature
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.sqlutil import transaction

from . import load
from .checkpoints import choose_checkpoints, require_files, stored_train_config
from .recorder import load_torch
from .worker import build, load_data


def score_run(con, run_id: str, checkpoints: str = "all", n_probes: int = 10, h: float = 1e-3, seed: int = 0,
              batch: int = 256, on_checkpoint: Callable[[int, int, int], None] | None = None) -> dict:
    """Score the run's points at each chosen checkpoint; returns a summary."""
    if n_probes < 1:
        raise UserError(f"n_probes {n_probes} must be at least 1", "n_probes")
    if not h > 0:
        raise UserError(f"h {h} must be positive", "h")
    cfg = stored_train_config(con, run_id)
    chosen = choose_checkpoints(con, run_id, checkpoints)
    require_files(run_id, chosen)
    ds = load_data(cfg)
    ids = np.array(sorted({r[0] for r in con.execute(
        "SELECT DISTINCT point_id FROM point_steps WHERE run_id = ? UNION SELECT DISTINCT point_id FROM evaluations "
        "WHERE run_id = ?", [run_id, run_id]).fetchall()}), dtype=np.int64)
    if ids.size == 0:
        raise UserError(f"run '{run_id}' has no tracked or evaluated points to score")
    x, y = ds.x_train[ids], ds.y_train[ids]
    model = build(cfg, ds)
    rows = []
    for i, (step, path) in enumerate(chosen):
        if on_checkpoint:
            on_checkpoint(step, i, len(chosen))
        model.load_state_dict(load_torch(path, "cpu", f"checkpoint of run {run_id!r}"))
        traces, scores = [], []
        for a in range(0, len(ids), batch):
            c = input_curvature(model, x[a:a + batch], y[a:a + batch], n_probes=n_probes, h=h, seed=seed)
            traces.append(c.trace.double().numpy())
            scores.append(c.score.double().numpy())
        rows.append(pa.table({
            "run_id": pa.array([run_id] * len(ids), pa.string()), "step": np.full(len(ids), step, dtype=np.int64),
            "point_id": ids, "curvature": np.concatenate(traces), "n_probes": np.full(len(ids), n_probes, np.int32),
            "h": np.full(len(ids), h), "score": np.concatenate(scores), "seed": np.full(len(ids), seed, np.int32),
        }))
    table = pa.concat_tables(rows)
    with transaction(con):
        con.execute("DELETE FROM curvature WHERE run_id = ? AND step IN (SELECT unnest(?))",
                    [run_id, [s for s, _ in chosen]])
        load.append_rows(con, "curvature", table)
    return {"run_id": run_id, "checkpoints": [s for s, _ in chosen], "points": int(len(ids)),
            "rows": table.num_rows, "n_probes": n_probes, "h": h,
            "mean_curvature": float(np.mean(table.column("curvature").to_numpy()))}
