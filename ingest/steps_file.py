"""Generic import of per-point, per-step gradient norms written by any tool.

The file (CSV or Parquet) has one row per (step, point): columns ``step``,
``point_id``, ``grad_norm`` and optionally ``loss`` and ``sampled``; steps are whole
numbers below :data:`MAX_STEPS` (10^9), point ids in [0, 2^53 - 1], at most
:data:`readers.MAX_ROWS` rows a file (:mod:`ingest.readers`). The run's DP-SGD
parameters come from the command line; the run is created if new, and a file for an
existing run must agree with its stored parameters.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpledger.analysis import validate
from dpledger.analysis.validate import ParameterError, positive, whole
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.sqlutil import first

from . import load
from .readers import (
    MAX_INDEX,
    Source,
    bool_column,
    file_sha256,
    float_column,
    int_column,
    read_table,
    require_columns,
)

KIND = "steps"
REQUIRED = ["step", "point_id", "grad_norm"]
OPTIONAL = ["loss", "sampled"]
DEFAULT_DELTA = 1e-5


#: The most steps a run may have (:data:`analysis.validate.MAX_STEPS`); a file's steps are below it.
MAX_STEPS = validate.MAX_STEPS


def check_run_parameters(
    sample_rate: float | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    delta: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
) -> None:
    """Refuse impossible DP-SGD parameters, naming the parameter (a
    :class:`~dpledger.analysis.validate.ParameterError`), in the ranges
    :mod:`analysis.validate` documents (sample_rate, noise_multiplier, max_grad_norm,
    delta, steps); batch_size is a whole number of at least 1 whose training set
    (batch_size / sample_rate points) dpledger can number."""
    if sample_rate is not None:
        validate.sample_rate(sample_rate)
    if noise_multiplier is not None:
        validate.noise_multiplier(positive("noise_multiplier", noise_multiplier))
    if max_grad_norm is not None:
        validate.max_grad_norm(positive("max_grad_norm", max_grad_norm))
    if delta is not None:
        validate.delta(delta)
    if steps is not None:
        validate.steps(steps)
    if batch_size is not None:
        whole("batch_size", batch_size, 1, MAX_INDEX)
        if sample_rate is not None and batch_size / sample_rate > MAX_INDEX:
            raise ParameterError(f"batch_size {batch_size} at sample_rate {sample_rate} means a training set of "
                                 f"{batch_size / sample_rate:.3g} points, more than dpledger numbers",
                                 "batch_size", "sample_rate")


def parse(path: str | Path, run: str, norms_clipped: bool = False) -> tuple[pa.Table, Source]:
    table, src = read_table(path, columns=REQUIRED + OPTIONAL)
    require_columns(table, src, REQUIRED)
    if table.num_rows == 0:
        raise src.error("the file has no rows")
    n = table.num_rows
    cols = {
        # one dictionary entry, not n strings: the run is the same on every row
        "run_id": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([run])),
        "step": int_column(table, "step", src, minimum=0, maximum=MAX_STEPS - 1, what="step"),
        "point_id": int_column(table, "point_id", src, minimum=0, what="point id"),
        "grad_norm": float_column(table, "grad_norm", src, nonnegative=True, what="gradient norm"),
        "norm_clipped": pa.array(np.full(n, norms_clipped, dtype=bool)),
    }
    if "loss" in table.column_names:
        cols["loss"] = float_column(table, "loss", src, allow_null=True, what="loss")
    if "sampled" in table.column_names:
        cols["sampled"] = bool_column(table, "sampled", src)
    return pa.table(cols), src


def ingest_steps(
    con,
    path: str | Path,
    run: str,
    *,
    sample_rate: float | None = None,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    delta: float | None = None,
    dataset: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    norms_clipped: bool = False,
) -> dict:
    """Ingest one per-point, per-step file into run ``run`` (one transaction)."""
    if not run:
        raise UserError("run must not be empty", "run")
    check_run_parameters(sample_rate, noise_multiplier, max_grad_norm, delta, steps, batch_size)
    # hash the file on a thread while Arrow parses it (both release the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        sha_future = pool.submit(file_sha256, Path(path)) if Path(path).is_file() else None
        rows, src = parse(path, run, norms_clipped)
        sha = sha_future.result()
    if norms_clipped and max_grad_norm is not None:
        over = np.flatnonzero(rows.column("grad_norm").to_numpy() > max_grad_norm * (1 + 1e-4))
        if over.size:
            raise src.error(
                f"norm {rows.column('grad_norm')[int(over[0])].as_py()} exceeds max_grad_norm "
                f"{max_grad_norm} but the norms were said to be clipped",
                int(over[0]),
                "grad_norm",
                ("max_grad_norm",),
            )
    if steps is not None:
        step_col = rows.column("step").to_numpy()
        beyond = np.flatnonzero(step_col >= steps)
        if beyond.size:
            raise src.error(
                f"step {int(step_col[beyond[0]])} is beyond steps {steps} (the last step is {steps - 1})",
                int(beyond[0]),
                "step",
                ("steps",),
            )
    with load.write_transaction(con):
        seen = load.find_ingest(con, sha, KIND, run)
        if seen is not None:
            return load.skipped_result(src.path, seen)
        stored = load.get_run(con, run)
        if stored is None:
            missing = [
                name
                for name, v in (
                    ("sample_rate", sample_rate),
                    ("noise_multiplier", noise_multiplier),
                    ("max_grad_norm", max_grad_norm),
                )
                if v is None
            ]
            if missing:
                raise UserError(f"run '{run}' does not exist; give {', '.join(missing)} to create it", *missing)
        n_train = int(round(batch_size / sample_rate)) if batch_size and sample_rate else None
        load.ensure_run(
            con,
            {
                "run_id": run,
                "dataset": dataset,
                "sample_rate": sample_rate,
                "noise_multiplier": noise_multiplier,
                "max_grad_norm": max_grad_norm,
                "batch_size": batch_size,
                "n_train": n_train,
                "delta": delta if delta is not None else (DEFAULT_DELTA if stored is None else None),
                "steps": steps,
                "private": True,
                "source": KIND,
                "status": "finished",
                "config": {"steps_from": "--steps" if steps else "last recorded step + 1"},
            },
            str(src.path),
        )
        if dataset is not None:
            ids = pa.compute.unique(rows.column("point_id"))
            load.insert_points(
                con,
                pa.table(
                    {
                        "dataset": pa.array([dataset] * len(ids), pa.string()),
                        "point_id": ids,
                        "split": pa.array(["train"] * len(ids), pa.string()),
                    }
                ),
            )
        n = load.insert_facts(con, "point_steps", rows, src)
        last = first(con.execute("SELECT max(step) FROM point_steps WHERE run_id = ?", [run]))[0]
        load.extend_run_steps(con, run, last)
        load.record_ingest(con, sha, KIND, run, str(src.path), n, [run])
    return {"path": str(src.path), "status": "ingested", "rows": n, "runs": [run]}
