"""``dpledger curvature``: score a run's saved checkpoints for input-loss curvature.

For each chosen checkpoint the model is rebuilt from the run's stored options,
loaded, and :func:`analysis.curvature.input_curvature` scores the run's tracked and
evaluated points; each checkpoint's values go to ``curvature`` (the view
``point_curvature`` averages them, as the papers average across training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from dpledger.warehouse.errors import UserError

from . import load
from .worker import TrainConfig, build, load_data


def _checkpoints(con, run_id: str, which: str) -> list[tuple[int, str]]:
    rows = con.execute("SELECT step, path FROM checkpoints WHERE run_id = ? ORDER BY step", [run_id]).fetchall()
    if not rows:
        raise UserError(f"run '{run_id}' has no saved checkpoints (runs made by `dpledger train` save them "
                        "at each evaluation)")
    if which == "all":
        return rows
    if which == "last":
        return rows[-1:]
    try:
        wanted = [int(s) for s in which.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--checkpoints {which}: expected all, last or a comma-separated list of steps") from None
    have = dict(rows)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise UserError(f"--checkpoints: run '{run_id}' has no checkpoint at step {missing[0]} "
                        f"(steps: {', '.join(str(s) for s, _ in rows[:10])})")
    return [(s, have[s]) for s in wanted]


def score_run(con, run_id: str, checkpoints: str = "all", n_probes: int = 10, h: float = 1e-3, seed: int = 0,
              batch: int = 256, on_checkpoint: Callable[[int, int, int], None] | None = None) -> dict:
    """Score the run's points at each chosen checkpoint; returns a summary."""
    from dpledger.analysis.curvature import input_curvature

    if n_probes < 1:
        raise UserError(f"--probes {n_probes} must be at least 1")
    if not h > 0:
        raise UserError(f"--h {h} must be positive")
    row = con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchall()
    if not row:
        known = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1 LIMIT 8").fetchall()]
        raise UserError(f"unknown run '{run_id}' (runs: {', '.join(known) or 'none yet'})")
    import json

    opts = (json.loads(row[0][0]) if row[0][0] else {}).get("train")
    if not opts:
        raise UserError(f"run '{run_id}' was not made by `dpledger train`: no model to rebuild")
    cfg = TrainConfig.from_dict(opts, f"run {run_id}")
    chosen = _checkpoints(con, run_id, checkpoints)
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
        if not Path(path).exists():
            raise UserError(f"checkpoint {path} of run '{run_id}' is missing")
        model.load_state_dict(torch.load(path, map_location="cpu"))
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
    with load.transaction(con):
        con.execute("DELETE FROM curvature WHERE run_id = ? AND step IN (SELECT unnest(?))",
                    [run_id, [s for s, _ in chosen]])
        load.append_rows(con, "curvature", table)
    return {"run_id": run_id, "checkpoints": [s for s, _ in chosen], "points": int(len(ids)),
            "rows": table.num_rows, "n_probes": n_probes, "h": h,
            "mean_curvature": float(np.mean(table.column("curvature").to_numpy()))}
