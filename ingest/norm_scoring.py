"""Norm scoring (``dpledger norms``): per-point gradient norms scored from a run's saved checkpoints,
split by point ranges across tasks (local, or one Ray task per range).

For very large datasets, tracking every point at every step is costly; the studies
that introduced per-instance accounting instead score norms at checkpoints. A run
trained with ``track="none"`` (or a subset) saves a checkpoint at each evaluation;
this scores every point (or ``points``: the first N, or ids from a file) at each chosen checkpoint with
:class:`models.grad_norms.GradNormTracker`, in ranges of ``chunk`` points that can
run as separate tasks, and writes ``point_steps`` rows. The checkpoint of step t
holds the parameters after t's update, i.e. those of step t + 1, so its norms are
stored at step t + 1 (the last checkpoint, after the run's final step, stands for no
step and is skipped). Composition then holds each norm until the next checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from dpledger.models.grad_norms import GradNormTracker
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.sqlutil import first, transaction

from . import load
from .checkpoints import choose_checkpoints, require_files, stored_train_config
from .recorder import load_torch
from .ray_executor import map_tasks
from .readers import Source
from .worker import TrainConfig, build, load_data, tracked_points


def _score_range(cfg_dict: dict, checkpoints: list[tuple[int, str]], ids: np.ndarray, threads: int = 1) -> pa.Table:
    """Norms and losses of points ``ids`` at each checkpoint (one task's work)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = TrainConfig(**cfg_dict)
        ds = load_data(cfg)
        model = build(cfg, ds)
        x, y = ds.x_train[ids], ds.y_train[ids]
        parts = []
        with GradNormTracker(model, chunk_size=4096) as tracker:
            for step, path in checkpoints:
                model.load_state_dict(load_torch(path, "cpu", "checkpoint"))
                res = tracker(x, y)
                parts.append(pa.table({
                    "step": np.full(len(ids), step + 1, dtype=np.int64), "point_id": ids.astype(np.int64),
                    "grad_norm": res.norms.double().numpy(), "norm_clipped": np.zeros(len(ids), dtype=bool),
                    "loss": res.losses.double().numpy(),
                }))
        return pa.concat_tables(parts)
    finally:
        torch.set_num_threads(previous)


def score_norms(con, run_id: str, checkpoints: str = "all", points: str = "all", chunk: int = 50_000,
                executor: str = "local", address: str | None = None,
                on_range: Callable[[int, int], None] | None = None) -> dict:
    """Score the run's points at its checkpoints into ``point_steps``; returns a summary."""
    if chunk < 1:
        raise UserError(f"chunk {chunk} must be at least 1", "chunk")
    if executor not in ("local", "ray"):
        raise UserError(f"executor {executor}: expected local or ray", "executor")
    cfg = stored_train_config(con, run_id)
    steps = first(con.execute("SELECT steps FROM runs WHERE run_id = ?", [run_id]))[0]
    # a checkpoint after step t gives the norms of step t + 1: one at the run's last step has
    # nothing left to score, so "last" is the last checkpoint that has
    chosen = [(s, p) for s, p in choose_checkpoints(con, run_id, "all" if checkpoints == "last" else checkpoints)
              if s + 1 < int(steps)]
    if checkpoints == "last":
        chosen = chosen[-1:]
    if not chosen:
        raise UserError(f"run '{run_id}': no checkpoint before its last step to score")
    require_files(run_id, chosen)
    ds = load_data(cfg)
    members = np.arange(ds.n_train)
    member_rows = con.execute("SELECT point_id FROM membership WHERE run_id = ? AND in_train ORDER BY 1",
                              [run_id]).fetchall()
    if member_rows:
        members = np.array([r[0] for r in member_rows], dtype=np.int64)
    ids = tracked_points(points, members, ds.n_train)
    ranges = [ids[a:a + chunk] for a in range(0, len(ids), chunk)]
    cfg_dict = asdict(cfg)
    if executor == "ray":
        tables = map_tasks(_score_range, [(cfg_dict, chosen, r) for r in ranges], address=address)
    else:
        tables = []
        for i, r in enumerate(ranges):
            if on_range:
                on_range(i, len(ranges))
            tables.append(_score_range(cfg_dict, chosen, r, threads=torch.get_num_threads()))
    table = pa.concat_tables(tables)
    table = table.add_column(0, "run_id", pa.array([run_id] * table.num_rows, pa.string()))
    with transaction(con):
        try:
            load.insert_facts(con, "point_steps", table, Source(Path(f"<checkpoint norms of {run_id}>"), "parquet"))
        except UserError as exc:
            raise UserError(f"run '{run_id}' already has norms at these steps ({exc})") from None
    return {"run_id": run_id, "checkpoints": [s for s, _ in chosen], "steps": [s + 1 for s, _ in chosen],
            "points": int(len(ids)), "ranges": len(ranges), "rows": table.num_rows, "executor": executor}
