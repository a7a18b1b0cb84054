"""Generic import of per-point, per-step gradient norms written by any tool.

The file (CSV or Parquet) has one row per (step, point): columns ``step``,
``point_id``, ``grad_norm`` and optionally ``loss`` and ``sampled``; steps are whole
numbers below :data:`MAX_STEPS` (10^9), point ids in [0, 2^53 - 1], at most
:data:`readers.MAX_ROWS` rows a file (:mod:`ingest.readers`). The run's DP-SGD
parameters come from the command line; the run is created if new, and a file for an
existing run must agree with its stored parameters.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpledger.analysis import validate
from dpledger.analysis.validate import ParameterError, positive, whole
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.runs import prepare_epsilon
from dpledger.warehouse.sqlutil import first, scalar

from . import load
from .digest import BackgroundDigest, file_digest
from .readers import (
    MAX_INDEX,
    Source,
    bool_column,
    float_column,
    int_column,
    parquet_int_range,
    parquet_schema,
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
    """Ingest one per-point, per-step file into run ``run`` (one transaction).

    A Parquet file whose columns have the expected types takes the fast path
    (:func:`_ingest_parquet`): DuckDB reads it once, checking every row as it inserts,
    while threads hash the file and check its keys. Anything that path refuses (a bad
    row, a repeated key, a read error) rolls it back, and the careful path (Arrow: read,
    check, then insert) ingests the file or names the first bad row, file, row and column.
    """
    if not run:
        raise UserError("run must not be empty", "run")
    check_run_parameters(sample_rate, noise_multiplier, max_grad_norm, delta, steps, batch_size)
    params = {"sample_rate": sample_rate, "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm,
              "delta": delta, "dataset": dataset, "steps": steps, "batch_size": batch_size}
    clip = max_grad_norm if norms_clipped else None
    plan = _fast_plan(con, Path(path), run, steps, clip, norms_clipped)
    if plan is not None:
        try:
            try:
                return _ingest_parquet(con, plan, run, params)
            except _NotGrid:  # rolled back: the keys are checked on a thread instead
                return _ingest_parquet(con, _fast_plan(con, Path(path), run, steps, clip, norms_clipped, False),
                                       run, params)
        except _Recheck:
            pass  # rolled back, nothing written: the careful path names what is wrong
    return _ingest_arrow(con, path, run, params, norms_clipped)


def _check_new_run(run: str, stored: dict | None, p: dict) -> None:
    """A run not stored yet needs its DP-SGD parameters."""
    if stored is None:
        missing = [name for name in ("sample_rate", "noise_multiplier", "max_grad_norm") if p[name] is None]
        if missing:
            raise UserError(f"run '{run}' does not exist; give {', '.join(missing)} to create it", *missing)


def _ensure_run(con, run: str, stored: dict | None, p: dict, where: str, steps_value: int | None = None) -> None:
    """Create run ``run`` (its parameters given) or check ``p`` agrees with the stored one.
    ``steps_value``: the steps to store for a new run (default: ``--steps``)."""
    _check_new_run(run, stored, p)
    sample_rate, batch_size, steps = p["sample_rate"], p["batch_size"], p["steps"]
    n_train = int(round(batch_size / sample_rate)) if batch_size and sample_rate else None
    load.ensure_run(
        con,
        {
            "run_id": run,
            "dataset": p["dataset"],
            "sample_rate": sample_rate,
            "noise_multiplier": p["noise_multiplier"],
            "max_grad_norm": p["max_grad_norm"],
            "batch_size": batch_size,
            "n_train": n_train,
            "delta": p["delta"] if p["delta"] is not None else (DEFAULT_DELTA if stored is None else None),
            "steps": steps if steps_value is None else steps_value,
            "private": True,
            "source": KIND,
            "status": "finished",
            "config": {"steps_from": "--steps" if steps else "last recorded step + 1"},
        },
        where,
    )


# ---------------------------------------------------------------------------------- the fast path


class _Recheck(Exception):
    """The fast path met something (a bad row, a repeated key, a read error) that the
    careful path is to name; raised inside the transaction, so it is rolled back."""


class _NotGrid(Exception):
    """The rows are not the (step, point) grid in row-major order that the footer suggested."""


_ROW_FAILED = "dpledger: a row failed its check"
_NOT_GRID = "dpledger: the keys are not a row-major grid"

#: Characters DuckDB's read_parquet takes as a glob pattern: such a path takes the careful path.
_GLOB = frozenset("*?[]{}")


@dataclass(frozen=True)
class _Plan:
    path: Path  # as given (the ledger and messages name it so)
    rows: int
    sql: str
    params: dict
    grid: tuple[int, int, int, int] | None  # (first step, last step, first point, points a step)


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _grid(meta, rows: int) -> tuple[int, int, int, int] | None:
    """(first step, last step, first point, points a step) where the footer's statistics
    say the file could be every point at every step of a range (rows = steps x points)."""
    steps, points = parquet_int_range(meta, "step"), parquet_int_range(meta, "point_id")
    if steps is None or points is None or steps[0] < 0 or points[0] < 0:
        return None
    width = points[1] - points[0] + 1
    if width <= 0 or (steps[1] - steps[0] + 1) * width != rows:
        return None
    return steps[0], steps[1], points[0], width


def _fast_plan(con, path: Path, run: str, steps: int | None, clip: float | None, norms_clipped: bool,
               use_grid: bool = True) -> _Plan | None:
    """The one INSERT ... SELECT that loads a Parquet file with the checks of the careful
    path as SQL (a failed check is DuckDB's ``error()``, which aborts the statement); None
    where the file is not a plain Parquet file of the expected column types.

    Where the footer suggests a grid (every point of a range at every step of a range),
    the same scan also proves the keys distinct: each row's key, numbered in row-major
    order (``(step - s0) * points + (point_id - p0)``, point ids within the range), must be
    its row number in the file; distinct row numbers make distinct keys, whatever the
    footer claimed. A file that is no such grid fails that check (``_NotGrid``) and is
    loaded again with its keys checked on a thread (:func:`_file_keys`)."""
    if any(c in _GLOB for c in str(path)):
        return None
    got = parquet_schema(path, REQUIRED + OPTIONAL)
    if got is None:
        return None
    schema, rows = got[0], got[1]
    types = {f.name: f.type for f in schema}
    if rows == 0 or any(c not in types for c in REQUIRED):
        return None
    floats = (pa.float32(), pa.float64())
    if not (pa.types.is_integer(types["step"]) and pa.types.is_integer(types["point_id"])
            and types["grad_norm"] in floats
            and types.get("loss", pa.float64()) in floats
            and types.get("sampled", pa.bool_()) == pa.bool_()):
        return None
    if not scalar(con.execute("SELECT current_setting('enable_external_access')")):
        return None
    grid = _grid(got[2], rows) if use_grid else None
    last_step = min(MAX_STEPS, steps) - 1 if steps is not None else MAX_STEPS - 1
    if grid is not None:
        s0, _, p0, width = grid
        if s0 + (rows - 1) // width > last_step or p0 + width - 1 > MAX_INDEX:
            grid = None  # no such grid of allowed keys: the rows are checked one by one, and refused
    # NaN and infinities by isfinite(), never by comparisons: DuckDB folds a comparison that
    # the footer's min/max prove, and Parquet leaves NaN out of those. Ranges of whole
    # numbers (and NULLs, by the footer's null counts) are, like every DuckDB query on the
    # file, taken from the statistics where they settle them.
    checks = ["isfinite(grad_norm)", "grad_norm >= 0"]
    if clip is not None:
        checks.append("grad_norm <= $clip")
    if "loss" in types:
        checks.append("(loss IS NULL OR isfinite(loss))")
    source = f"read_parquet({_sql_string(os.path.abspath(path))})"
    keys_ok = "true"
    if grid is None:
        checks[:0] = [f"step BETWEEN 0 AND {last_step}", f"point_id BETWEEN 0 AND {MAX_INDEX}"]
    else:
        # row i holds key (s0 + i // width, p0 + i % width): the key's row-major number is the
        # row number, point ids within [p0, p0 + width). It also keeps every step within
        # [s0, s0 + (rows - 1) // width] and every point id within the range, checked above.
        keys_ok = (f"CASE WHEN point_id BETWEEN {p0} AND {p0 + width - 1} AND step::BIGINT * {width} "
                   f"+ point_id::BIGINT = file_row_number + {s0 * width + p0} THEN true ELSE error('{_NOT_GRID}') END")
        source = f"read_parquet({_sql_string(os.path.abspath(path))}, file_row_number = true)"
    select = {"run_id": "$run", "step": "step::BIGINT", "point_id": "point_id::BIGINT",
              "grad_norm": "grad_norm::DOUBLE", "norm_clipped": "$clipped"}
    if "loss" in types:
        select["loss"] = "loss::DOUBLE"
    if "sampled" in types:
        select["sampled"] = "sampled"
    # a row that fails a check stops the statement (DuckDB's error()); the careful path
    # then says which row and why. The filter runs before the casts of the projection.
    sql = (f"INSERT INTO point_steps ({', '.join(select)}) SELECT {', '.join(select.values())} FROM {source} "
           f"WHERE CASE WHEN {' AND '.join(checks)} THEN {keys_ok} ELSE error('{_ROW_FAILED}') END")
    params = {"run": run, "clipped": bool(norms_clipped)}
    if clip is not None:
        params["clip"] = float(clip) * (1 + 1e-4)
    return _Plan(path, rows, sql, params, grid)


@dataclass(frozen=True)
class _Keys:
    duplicate: bool
    first_step: int
    last_step: int
    point_ids: pa.Array | None  # the distinct point ids, when the points table is to learn them


def _file_keys(path: Path, want_ids: bool) -> _Keys:
    """Whether a (step, point_id) key repeats within the file, and its step range.

    Files written in key order (the usual case) are proven free of repeats in one
    streaming pass: the packed keys ``step * 2^33 + point_id`` (a function of the key,
    wrapping or not) strictly increase, so no two are equal, so no two keys are. Any other
    file is sorted (:func:`load.first_duplicate`). The answer only counts once DuckDB
    has checked the rows (steps and point ids in range, none missing)."""
    ordered, prev, lo, hi, ids = True, None, None, None, []
    batches = pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=["step", "point_id"], use_threads=False)
    with np.errstate(over="ignore"):
        for batch in batches:
            if batch.num_rows == 0:
                continue
            step = pc.cast(batch.column(0), pa.int64(), safe=False).to_numpy(zero_copy_only=False)
            point = pc.cast(batch.column(1), pa.int64(), safe=False).to_numpy(zero_copy_only=False)
            if want_ids:
                ids.append(point)
            if ordered:
                packed = (step << 33) + point
                ordered = bool((packed[1:] > packed[:-1]).all()) and (prev is None or packed[0] > prev)
                prev = packed[-1]
            b_lo, b_hi = int(step.min()), int(step.max())  # not step[0], step[-1]: point ids may pass 2^33
            lo = b_lo if lo is None else min(lo, b_lo)
            hi = b_hi if hi is None else max(hi, b_hi)
    if ordered:
        duplicate = False
    else:
        table = pq.read_table(path, columns=["step", "point_id"], use_threads=False)
        duplicate = load.first_duplicate([pc.cast(table.column(c), pa.int64(), safe=False).to_numpy()
                                          for c in ("step", "point_id")]) is not None
    point_ids = pc.unique(pa.array(np.concatenate(ids))) if want_ids else None
    return _Keys(duplicate, lo, hi, point_ids)


def _result(future: Future):
    """A helper thread's answer; its failure (an unreadable file, say) is the careful path's to report."""
    try:
        return future.result()
    except Exception as exc:
        raise _Recheck(str(exc)) from exc


def _warm_epsilon(row: dict, keys_future: Future) -> None:
    """Compute, on a thread while DuckDB loads the rows, the run's data-independent ε that
    the run's bookkeeping (``runs.remember_epsilon``, when the steps are extended) asks for
    after the load: the UDF then finds it computed (``runs.prepare_epsilon``). Best effort:
    a miss only means the UDF computes it itself."""
    try:
        steps = max(row["steps"] or 0, keys_future.result().last_step + 1)
        if row["sample_rate"] is not None and row["noise_multiplier"] is not None and row["delta"] is not None:
            prepare_epsilon(row["sample_rate"], row["noise_multiplier"], steps, row["delta"])
    except Exception:
        pass


def _check_stored(con, path: Path, run: str, keys: _Keys) -> int | None:
    """Refuse (``_Recheck``) a key of the file already stored for ``run``; return the run's
    last stored step (None: no rows). Only a stored step range that overlaps the file's is joined."""
    lo, hi = first(con.execute("SELECT min(step), max(step) FROM point_steps WHERE run_id = ?", [run]))
    if lo is None or hi < keys.first_step or lo > keys.last_step:
        return hi
    clash = first(con.execute(
        f"SELECT 1 FROM read_parquet({_sql_string(os.path.abspath(path))}) f SEMI JOIN (SELECT step, point_id "
        "FROM point_steps WHERE run_id = ? AND step BETWEEN ? AND ?) t USING (step, point_id) LIMIT 1",
        [run, keys.first_step, keys.last_step]))
    if clash is not None:
        raise _Recheck("a key of the file is stored already")
    return hi


def _ingest_parquet(con, plan: _Plan, run: str, p: dict) -> dict:
    """Load ``plan``'s file in one DuckDB scan; ``_Recheck`` (rolled back) when anything is off."""
    path = plan.path
    database = load.database_path(con)
    hasher = None
    with ThreadPoolExecutor(max_workers=3) as pool, load.write_transaction(con):
        try:
            # A file ingested before has the same number of rows: only then is the hash needed
            # before the load (a no-op); otherwise it is computed alongside, at low priority
            if load.ingested_with_rows(con, KIND, run, plan.rows):
                digest = file_digest(path)
                seen = load.find_ingest(con, digest, KIND, run, path)
                if seen is not None:
                    if p["steps"] is not None or "clip" in plan.params:
                        raise _Recheck("the careful path checks the rows against --steps before the ledger")
                    return load.skipped_result(path, seen)
            else:
                digest, hasher = None, _start_hash(path)
            return _load_parquet(con, pool, plan, run, p, digest, hasher, database)
        finally:
            if hasher is not None:
                hasher.close()


def _start_hash(path: Path) -> BackgroundDigest:
    try:
        return BackgroundDigest(path)
    except OSError as exc:  # unreadable: the careful path says so
        raise _Recheck(str(exc)) from exc


def _load_parquet(con, pool: ThreadPoolExecutor, plan: _Plan, run: str, p: dict, digest: str | None,
                  hasher: BackgroundDigest | None, database: str) -> dict:
    path = plan.path
    if plan.grid is not None:  # the keys are proven distinct by the load itself
        s0, s1, p0, width = plan.grid
        ids = pa.array(np.arange(p0, p0 + width, dtype=np.int64)) if p["dataset"] is not None else None
        keys_future = Future()
        keys_future.set_result(_Keys(False, s0, s1, ids))
    else:
        keys_future = pool.submit(_file_keys, path, p["dataset"] is not None)
    stored = load.get_run(con, run)
    _check_new_run(run, stored, p)
    if stored is not None:  # parameters that conflict with the stored run's are refused before the load
        _ensure_run(con, run, stored, p, str(path))
        mechanism = load.get_run(con, run)
    else:  # a new run is stored after the load, with its steps (one round of the run's bookkeeping)
        mechanism = {"sample_rate": p["sample_rate"], "noise_multiplier": p["noise_multiplier"],
                     "delta": p["delta"] if p["delta"] is not None else DEFAULT_DELTA, "steps": p["steps"]}
    warm = pool.submit(_warm_epsilon, mechanism, keys_future)
    last_stored = _check_stored(con, path, run, _result(keys_future)) if stored is not None else None
    try:
        n = scalar(con.execute(plan.sql, plan.params))
    except duckdb.Error as exc:  # a failed check, or a read or write error: the careful path tells
        if _NOT_GRID in str(exc) and _ROW_FAILED not in str(exc):
            raise _NotGrid() from exc
        raise _Recheck(str(exc)) from exc
    # the rows' pages go to disk while the CPUs finish the hash and the bookkeeping
    flushed = pool.submit(load.flush_database_file, database) if os.path.isfile(database) else None
    keys = _result(keys_future)
    if keys.duplicate or n != plan.rows:
        raise _Recheck("a key repeats within the file")
    last = max(keys.last_step, last_stored if last_stored is not None else -1)
    warm.result()
    if stored is None:
        _ensure_run(con, run, None, p, str(path), steps_value=max(p["steps"] or 0, last + 1))
    else:
        load.extend_run_steps(con, run, last)
    if p["dataset"] is not None:
        load.insert_points(con, pa.table({
            "dataset": pa.array([p["dataset"]] * len(keys.point_ids), pa.string()),
            "point_id": keys.point_ids,
            "split": pa.array(["train"] * len(keys.point_ids), pa.string()),
        }))
    if digest is None:
        try:
            digest = hasher.result()
        except OSError as exc:
            raise _Recheck(str(exc)) from exc
    load.record_ingest(con, digest, KIND, run, str(path), n, [run])
    if flushed is not None:
        flushed.result()
    return {"path": str(path), "status": "ingested", "rows": n, "runs": [run]}


# ---------------------------------------------------------------------------------- the careful path


def _ingest_arrow(con, path: str | Path, run: str, p: dict, norms_clipped: bool) -> dict:
    """Read the whole file into Arrow, check every row (naming the first bad one), then insert."""
    max_grad_norm, steps, dataset = p["max_grad_norm"], p["steps"], p["dataset"]
    # hash the file on a thread while Arrow parses it (both release the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest_future = pool.submit(file_digest, Path(path)) if Path(path).is_file() else None
        rows, src = parse(path, run, norms_clipped)
        digest = digest_future.result()
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
        seen = load.find_ingest(con, digest, KIND, run, src.path)
        if seen is not None:
            return load.skipped_result(src.path, seen)
        stored = load.get_run(con, run)
        _ensure_run(con, run, stored, p, str(src.path))
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
        load.record_ingest(con, digest, KIND, run, str(src.path), n, [run])
    return {"path": str(src.path), "status": "ingested", "rows": n, "runs": [run]}
