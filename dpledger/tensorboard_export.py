"""A run of the ledger as TensorBoard event files (``dpledger export tensorboard``).

The numbers are :func:`dpledger.warehouse.live.run_series` (read-only); this module only
writes them with ``torch.utils.tensorboard.SummaryWriter`` (the optional extra
``dpledger[tensorboard]``), into ``LOGDIR/<run_id>/`` so that ``tensorboard --logdir
LOGDIR`` shows each exported run by name. A value at step t is the state after steps
0..t (the data-independent ε of t + 1 steps).
"""

from __future__ import annotations

import os
from pathlib import Path

from dpledger.warehouse.errors import UserError

INSTALL_HINT = "pip install 'dpledger[tensorboard]'"

# tags: the series of run_series -> the tag TensorBoard shows
SCALAR_TAGS = {
    "loss": "train/loss",
    "test_accuracy": "eval/test_accuracy",
    "epsilon": "privacy/epsilon",
    "epsilon_min": "privacy/epsilon_example_min",
    "epsilon_p05": "privacy/epsilon_example_p05",
    "epsilon_median": "privacy/epsilon_example_median",
    "epsilon_p95": "privacy/epsilon_example_p95",
    "epsilon_max": "privacy/epsilon_example_max",
    "points_at_cap": "privacy/points_at_cap",
    "clipped_fraction": "clipping/clipped_fraction",
}
HISTOGRAM_TAGS = {"grad_norm": "clipping/grad_norm", "epsilon": "privacy/epsilon_example"}


def summary_writer():
    """``SummaryWriter``, or one line saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch says "TensorBoard logging requires TensorBoard ..."
        raise UserError(f"the TensorBoard export needs tensorboard, which is not installed: {INSTALL_HINT}") from None
    return SummaryWriter


def export_tensorboard(con, run_id: str, logdir: str | os.PathLike, *, max_points: int = 200,
                       overwrite: bool = False, on_step=None) -> dict:
    """Write ``run_id``'s scalars and histograms as TensorBoard events under ``logdir/<run_id>``.

    Scalars (per step): ``train/loss``, ``eval/test_accuracy`` (evaluated steps),
    ``privacy/epsilon`` (data-independent, of the steps so far), ``clipping/clipped_fraction``
    (of the step's sampled recorded points, norm ≥ C); at most ``max_points`` evenly spaced
    steps plus the checkpoints: ``privacy/epsilon_example_{min,p05,median,p95,max}``
    (per-example ε so far, an upper bound on a 256-cell grid) and ``privacy/points_at_cap``.
    Histograms at the checkpoints (or evaluated steps): ``clipping/grad_norm`` (each point's
    last recorded norm) and ``privacy/epsilon_example``. Reads the warehouse only; refuses a
    folder that already holds event files unless ``overwrite`` (which removes those files
    only). Returns a summary: the folder, steps, and the points written per tag.
    """
    from dpledger.warehouse.live import run_series

    if max_points < 1:
        raise UserError(f"max_points {max_points}: expected at least 1", "max_points")
    writer_cls = summary_writer()
    out = Path(logdir) / run_id
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    old = sorted(out.glob("events.out.tfevents.*")) if out.is_dir() else []
    if old and not overwrite:
        raise UserError(f"{out} already holds TensorBoard event files (an earlier export?); "
                        f"remove them or export again with overwrite", "overwrite")
    series = run_series(con, run_id, max_points=max_points, on_step=on_step)  # before writing anything
    for f in old:
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    counts = {"scalars": {}, "histograms": {}}
    writer = writer_cls(log_dir=str(out))
    try:
        for name, (steps, values) in series["scalars"].items():
            tag = SCALAR_TAGS[name]
            written = 0
            for step, value in zip(steps.tolist(), values.tolist()):
                if value == value:  # NaN: nothing to show
                    writer.add_scalar(tag, value, global_step=int(step))
                    written += 1
            counts["scalars"][tag] = written
        for name, items in series["histograms"].items():
            tag = HISTOGRAM_TAGS[name]
            for step, values in items:
                if len(values):
                    writer.add_histogram(tag, values, global_step=int(step))
            counts["histograms"][tag] = sum(1 for _, v in items if len(v))
        writer.flush()
    finally:
        writer.close()
    run = series["run"]
    return {"run_id": run_id, "logdir": str(out), "steps": series["steps_done"], "grid": series["grid"],
            "delta": run.delta, **counts}
