"""Import of the per-point CSV files that DP-SGD interpretability scripts write ("GLA format").

One row per (run, checkpoint step, point). Columns used (others are kept, per run, in
``runs.config``):

=================  ==========================================================
``distance (sum)``  clipped per-example gradient norm / ``batch_size``
``step``            training step of the checkpoint
``point``           training-point index
``sigma``           noise multiplier
``p``               Poisson sample rate
``cn``              clipping norm C
``batch_size``      configured (expected) batch size
``epochs`` ``eps`` ``seed`` ``dataset`` ``model`` ``lr`` ``dp``  run parameters
``correct``         the point is classified correctly at that checkpoint
``accuracy``        test accuracy at that checkpoint
``res_name``        run name (else the ``run`` parameter, else the file name)
=================  ==========================================================

The stored ``grad_norm`` is the clipped norm, ``distance (sum) * batch_size`` (at most
C), marked ``norm_clipped``. In the published study's code that product is
min(‖∇ℓ‖ / k, C), where k is the number of points whose losses were averaged into the
one gradient it measured (10 in the study): the per-example clipped norm is then
min(k × distance × batch_size, C). ``points_per_query=k`` rescales to it on ingest and
records k in ``runs.config`` (``--legacy-scaling`` reproduces the study's own costs only
from the file as written, k = 1). Values of a run parameter must agree on every row of the
run up to 1e-9 relative (the files print ``p`` with 16 or 18 digits on different rows;
the most precise spelling is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpledger.analysis.budget import steps_from_epochs
from dpledger.analysis.validate import ParameterError, in_range, whole
from dpledger.warehouse.sqlutil import append_arrow, first

from . import load
from .digest import file_digest
from .steps_file import MAX_STEPS, check_run_parameters
from .readers import (
    Source,
    bool_column,
    float_column,
    int_column,
    read_table,
    require_columns,
    string_column,
)

KIND = "gla-csv"
NORM = "distance (sum)"
REQUIRED = [NORM, "step", "point", "sigma", "p", "cn", "batch_size"]

# file column -> runs column, and its type
RUN_PARAM_COLUMNS = {
    "sigma": ("noise_multiplier", float),
    "p": ("sample_rate", float),
    "cn": ("max_grad_norm", float),
    "batch_size": ("batch_size", int),
    "epochs": ("epochs", float),
    "eps": ("target_epsilon", float),
    "seed": ("seed", int),
    "dataset": ("dataset", str),
    "model": ("model", str),
    "lr": ("lr", float),
    "dp": ("private", bool),
}
PER_ROW_COLUMNS = {NORM, "step", "point", "correct", "accuracy", "res_name"}

DEFAULT_DELTA = 1e-5
# A stored clipped norm may exceed C by float32 rounding (1/256 printed as 0.0039062518...).
CLIP_TOLERANCE = 1e-4


@dataclass
class ParsedRun:
    run: dict
    first_row: int


@dataclass
class ParsedFile:
    source: Source
    digest: str  # the ledger's (digest.file_digest)
    target: str
    runs: list[dict] = field(default_factory=list)
    points: pa.Table | None = None
    point_steps: pa.Table | None = None
    evaluations: pa.Table | None = None
    steps: pa.Table | None = None


def _most_precise(values: list[float]) -> float:
    return max(values, key=lambda v: len(repr(v)))


def _run_value(
    src: Source, table: pa.Table, column: str, kind: type, rows: np.ndarray, run_id: str
):
    """The one value ``column`` takes on the rows of a run (an error if they disagree)."""
    if kind is str:
        col = string_column(table, column).take(pa.array(rows)).to_pylist()
        distinct = sorted({v for v in col if v is not None})
        if len(distinct) > 1:
            i = rows[next(k for k, v in enumerate(col) if v != col[0])]
            raise src.error(f"run '{run_id}' has conflicting values {distinct[:3]}", int(i), column)
        return distinct[0] if distinct else None
    if kind is bool:
        col = bool_column(table, column, src).take(pa.array(rows)).to_pylist()
    else:
        col = float_column(table, column, src, allow_null=True).take(pa.array(rows)).to_pylist()
    present = [v for v in col if v is not None]
    if not present:
        return None
    ref = present[0]
    for k, v in enumerate(col):
        if v is None:
            continue
        if kind is bool:
            same = v == ref
        else:
            same = math.isclose(v, ref, rel_tol=1e-9, abs_tol=1e-15)
        if not same:
            raise src.error(
                f"run '{run_id}' has conflicting values ({ref} and {v} on the rows of one run)",
                int(rows[k]),
                column,
            )
    if kind is bool:
        return bool(ref)
    value = _most_precise(present)
    if kind is int:
        if value != int(value):
            raise src.error(f"{value} is not an integer", int(rows[0]), column)
        return int(value)
    return value


def _extra_value(table: pa.Table, column: str, rows: np.ndarray):
    values = table.column(column).take(pa.array(rows)).to_pylist()
    distinct = {v for v in values if v is not None}
    if len(distinct) <= 1:
        return ("constant", next(iter(distinct)) if distinct else None)
    return ("varying", None)


def _check_run(src: Source, run: dict, table: pa.Table, rows: np.ndarray) -> None:
    """The run's DP-SGD parameters in their documented ranges (:func:`steps_file.check_run_parameters`),
    an error at the run's first row and the column that holds the value."""
    column_of = {target: col for col, (target, _) in RUN_PARAM_COLUMNS.items()}
    private = run.get("private") is not False
    try:
        check_run_parameters(sample_rate=run.get("sample_rate"),
                             noise_multiplier=run.get("noise_multiplier") if private else None,
                             max_grad_norm=run.get("max_grad_norm"), batch_size=run.get("batch_size"))
        for name in ("epochs", "lr", "target_epsilon"):
            if run.get(name) is not None:
                in_range(name, run[name], 0, 1e12)
    except ParameterError as exc:
        name = exc.params[0] if exc.params else None
        raise src.error(str(exc), int(rows[0]), column_of.get(name)) from None


def parse(path: str | Path, run: str | None = None, delta: float | None = None,
          points_per_query: int = 1) -> ParsedFile:
    """Read and check one GLA CSV file; nothing is written. ``points_per_query``: see the module doc."""
    table, src = read_table(path, formats=("csv",))
    if table.num_rows == 0:
        raise src.error("the file has a header but no rows")
    require_columns(table, src, REQUIRED)
    n = table.num_rows
    parsed = ParsedFile(src, file_digest(src.path), target=run or "")

    # run of every row
    if run is not None:
        if "res_name" in table.column_names:
            names = sorted({v for v in string_column(table, "res_name").to_pylist() if v is not None})
            if len(names) > 1:
                raise src.error(
                    f"run gives one name but the file holds {len(names)} runs ({', '.join(names[:5])})",
                    None,
                    "res_name",
                    ("run",),
                )
        run_ids = pa.chunked_array([pa.array([run] * n, pa.string())])
    elif "res_name" in table.column_names:
        run_ids = string_column(table, "res_name")
        bad = pc.index(pc.is_null(run_ids), True).as_py()
        if bad >= 0:
            raise src.error("missing run name", bad, "res_name")
    else:
        stem = src.path.name.split(".")[0]
        run_ids = pa.chunked_array([pa.array([stem] * n, pa.string())])

    step = int_column(table, "step", src, minimum=0, maximum=MAX_STEPS - 1, what="step")
    point = int_column(table, "point", src, minimum=0, what="point index")
    dist = float_column(table, NORM, src, nonnegative=True, what="gradient distance")
    batch_size = float_column(table, "batch_size", src, what="batch size")
    bad = pc.index(pc.less_equal(batch_size, 0), True).as_py()
    if bad >= 0:
        raise src.error(f"batch size {batch_size[bad].as_py()} is not positive", bad, "batch_size")
    float_column(table, "sigma", src, nonnegative=True, what="noise multiplier")
    q = float_column(table, "p", src, what="sample rate")
    bad = pc.index(pc.or_(pc.less_equal(q, 0), pc.greater(q, 1)), True).as_py()
    if bad >= 0:
        raise src.error(f"sample rate {q[bad].as_py()} is outside (0, 1]", bad, "p")
    cn = float_column(table, "cn", src, what="clipping norm")
    bad = pc.index(pc.less_equal(cn, 0), True).as_py()
    if bad >= 0:
        raise src.error(f"clipping norm {cn[bad].as_py()} is not positive", bad, "cn")
    grad_norm = pc.multiply(dist, batch_size)
    over = pc.greater(grad_norm, pc.multiply(cn, 1 + CLIP_TOLERANCE))
    bad = pc.index(over, True).as_py()
    if bad >= 0:
        raise src.error(
            f"clipped norm {grad_norm[bad].as_py():.6g} (distance x batch_size) exceeds the "
            f"clipping norm {cn[bad].as_py()}",
            bad,
            NORM,
        )
    if points_per_query != 1:  # the study's norm of a mean over k points -> the per-example clipped norm
        grad_norm = pc.min_element_wise(pc.multiply(grad_norm, float(points_per_query)), cn)
    correct = bool_column(table, "correct", src) if "correct" in table.column_names else None
    accuracy = (
        float_column(table, "accuracy", src, allow_null=True, nonnegative=True, what="accuracy")
        if "accuracy" in table.column_names
        else None
    )

    # one run per distinct name
    rid = run_ids.to_numpy(zero_copy_only=False)
    names, first = np.unique(rid, return_index=True)
    extras = [c for c in table.column_names if c not in PER_ROW_COLUMNS and c not in RUN_PARAM_COLUMNS]
    for name in names[np.argsort(first)]:
        rows = np.flatnonzero(rid == name)
        r: dict = {"run_id": str(name), "source": KIND, "status": "finished"}
        for col, (target, kind) in RUN_PARAM_COLUMNS.items():
            if col in table.column_names:
                r[target] = _run_value(src, table, col, kind, rows, str(name))
        if r.get("private") is None:
            r["private"] = True
        r["delta"] = delta if delta is not None else DEFAULT_DELTA
        config: dict = {"file": src.path.name}
        varying = []
        for col in extras:
            state, value = _extra_value(table, col, rows)
            if state == "constant":
                config[col] = value
            else:
                varying.append(col)
        if varying:
            config["varying_columns"] = varying
        _check_run(src, r, table, rows)
        q_run, b_run = r["sample_rate"], r["batch_size"]
        r["n_train"] = int(round(b_run / q_run))
        last = int(pc.max(step.take(pa.array(rows))).as_py())
        if r.get("epochs"):
            r["steps"] = max(steps_from_epochs(r["epochs"], q_run), last + 1)
            if r["steps"] > MAX_STEPS:
                raise src.error(f"epochs {r['epochs']} at sample rate {q_run} is {r['steps']} steps, more than "
                                f"{MAX_STEPS}", int(rows[0]), "epochs")
            config["steps_from"] = "floor(epochs / sample_rate), at least last recorded step + 1"
        else:
            r["steps"] = last + 1
            config["steps_from"] = "last recorded step + 1"
        config["n_train_from"] = "round(batch_size / sample_rate)"
        config["points_per_query"] = points_per_query
        config["grad_norm_from"] = ("distance (sum) x batch_size" if points_per_query == 1 else
                                    f"min({points_per_query} x distance (sum) x batch_size, cn)")
        config["delta_from"] = "--delta" if delta is not None else "default 1e-5 (the file has no delta)"
        r["config"] = config
        parsed.runs.append(r)

    parsed.point_steps = pa.table(
        {
            "run_id": run_ids,
            "step": step,
            "point_id": point,
            "grad_norm": grad_norm,
            "norm_clipped": pa.chunked_array([pa.array(np.ones(n, dtype=bool))]),
        }
    )
    dataset_of = {r["run_id"]: r.get("dataset") for r in parsed.runs}
    point_ds = pa.array([dataset_of[x] for x in rid], pa.string())
    pts = pa.table({"dataset": point_ds, "point_id": point})
    pts = pts.filter(pc.is_valid(pts.column("dataset")))
    parsed.points = pa.table(
        {
            "dataset": pts.column("dataset"),
            "point_id": pts.column("point_id"),
            "split": pa.array(["train"] * pts.num_rows, pa.string()),
        }
    )
    if correct is not None:
        parsed.evaluations = pa.table(
            {"run_id": run_ids, "step": step, "point_id": point, "correct": correct}
        )
    if accuracy is not None:
        acc = pa.table({"run_id": run_ids, "step": step, "test_accuracy": accuracy})
        parsed.steps = acc.group_by(["run_id", "step"]).aggregate([("test_accuracy", "mean")]).rename_columns(
            ["run_id", "step", "test_accuracy"]
        )
    return parsed


def write(con, parsed: ParsedFile) -> dict:
    """Load one parsed file in one transaction; a file ingested before is a no-op."""
    src = parsed.source
    with load.write_transaction(con):
        seen = load.find_ingest(con, parsed.digest, KIND, parsed.target, src.path)
        if seen is not None:
            return load.skipped_result(src.path, seen)
        for r in parsed.runs:
            load.ensure_run(con, r, str(src.path))
        load.insert_points(con, parsed.points)
        rows = load.insert_facts(con, "point_steps", parsed.point_steps, src)
        if parsed.evaluations is not None:
            load.insert_facts(con, "evaluations", parsed.evaluations, src)
        if parsed.steps is not None:
            # a checkpoint split across two files of one run: keep the accuracy already stored
            append_arrow(con, "steps", parsed.steps, suffix="ON CONFLICT (run_id, step) DO UPDATE SET "
                         "test_accuracy = coalesce(steps.test_accuracy, excluded.test_accuracy)")
        for r in parsed.runs:
            last = first(con.execute("SELECT max(step) FROM point_steps WHERE run_id = ?", [r["run_id"]]))[0]
            load.extend_run_steps(con, r["run_id"], last)
        run_ids = [r["run_id"] for r in parsed.runs]
        load.record_ingest(con, parsed.digest, KIND, parsed.target, str(src.path), rows, run_ids)
    return {"path": str(src.path), "status": "ingested", "rows": rows, "runs": run_ids}


def ingest_gla_csv(con, paths: list[str | Path], run: str | None = None, delta: float | None = None,
                   points_per_query: int = 1) -> list[dict]:
    """Ingest GLA-format CSV files. Every file is read and checked before any is
    written; then each file is loaded in its own transaction. ``points_per_query`` k
    rescales the study's norms to per-example ones (module doc)."""
    if delta is not None:
        in_range("delta", delta, 0, 1, high_open=True)
    points_per_query = whole("points_per_query", points_per_query, 1, 1_000_000)
    parsed = [parse(p, run=run, delta=delta, points_per_query=points_per_query) for p in paths]
    return [write(con, p) for p in parsed]
