"""A trained run's saved checkpoints, and the options that rebuild its model.

What both checkpoint scorers (:mod:`ingest.norm_scoring`, :mod:`ingest.curvature_scoring`)
start from: the run's ``train`` options stored in ``runs.config`` by
``dpledger train``, and the checkpoints it saved at each evaluation (the
``checkpoints`` table).
"""

from __future__ import annotations

import json
from pathlib import Path

from dpledger.warehouse.errors import UserError
from dpledger.warehouse.runs import require_run
from dpledger.warehouse.sqlutil import first

from .worker import TrainConfig


def stored_train_config(con, run_id: str) -> TrainConfig:
    """The options ``run_id`` was trained with (an unknown run, or one not made by
    ``dpledger train``, is a UserError)."""
    require_run(con, run_id)
    config = first(con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]))[0]
    opts = (json.loads(config) if config else {}).get("train")
    if not opts:
        raise UserError(f"run '{run_id}' was not made by `dpledger train`: no model to rebuild")
    return TrainConfig.from_dict(opts, f"run {run_id}")


def choose_checkpoints(con, run_id: str, which: str) -> list[tuple[int, str]]:
    """(step, path) of the run's checkpoints: ``all``, the ``last``, or a comma-separated
    list of steps, in step order (for ``all`` and ``last``) or as listed."""
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
        raise UserError(f"checkpoints {which}: expected all, last or a comma-separated list of steps",
                        "checkpoints") from None
    have = dict(rows)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise UserError(f"checkpoints: run '{run_id}' has no checkpoint at step {missing[0]} "
                        f"(steps: {', '.join(str(s) for s, _ in rows[:10])})", "checkpoints")
    return [(s, have[s]) for s in wanted]


def require_files(run_id: str, chosen: list[tuple[int, str]]) -> None:
    """A UserError naming the first chosen checkpoint file that is missing."""
    for _, path in chosen:
        if not Path(path).exists():
            raise UserError(f"checkpoint {path} of run '{run_id}' is missing")


__all__ = ["choose_checkpoints", "require_files", "stored_train_config"]
