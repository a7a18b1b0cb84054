"""Writing rows into the warehouse: runs, facts, and the ingest ledger.

One file is one transaction: everything a file brings is written, or nothing is.
``point_steps`` has no primary key (an ART index over billions of rows would not fit
in memory), so uniqueness of (run_id, step, point_id) is checked here, within the
new rows and against the rows already stored for the same runs.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpledger.warehouse.errors import UserError
from dpledger.warehouse.runs import remember_epsilon
from dpledger.warehouse.sqlutil import append_arrow, first, scalar, transaction

from .atomic import fsync_path
from .digest import LEGACY_ALGORITHM, legacy_digest
from .readers import Source

# Run parameters that identify a run: a second file for the same run must agree.
RUN_PARAMS = (
    "dataset",
    "model",
    "seed",
    "n_train",
    "sample_rate",
    "batch_size",
    "noise_multiplier",
    "max_grad_norm",
    "lr",
    "epochs",
    "delta",
    "target_epsilon",
    "private",
    "steps",
)
RUN_COLUMNS = RUN_PARAMS + ("status", "source")

FACT_KEY = ("run_id", "step", "point_id")


def database_path(con: duckdb.DuckDBPyConnection) -> str:
    """The file of the connection's database (for messages)."""
    row = first(con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()"))
    return (row[0] if row else None) or "(in memory)"


def flush_database_file(path: str) -> None:
    """Write the database file's pages to disk ahead of the commit (best effort).

    A large load leaves most of its rows as written-but-unsynced pages of the database file;
    the commit's fsync then waits on the disk with the CPUs idle. Flushing them from a thread
    while the caller still has CPU work to do (hashing the file, the run's bookkeeping) leaves
    the commit little to wait for. It changes nothing DuckDB relies on: the OS may write those
    pages at any moment anyway, and only the commit makes them part of the database.
    """
    try:
        fsync_path(path)
    except OSError:
        pass


def _io_failure(exc: BaseException) -> BaseException | None:
    """The failed write (DuckDB's IO error, an OSError such as ENOSPC) behind ``exc``, if any:
    after one, DuckDB's own follow-up errors (an aborted transaction) are only echoes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (duckdb.IOException, OSError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def write_transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One transaction (:func:`warehouse.sqlutil.transaction`: all of it or none) in which
    a write the storage refuses (a full disk, a read-only file or folder) is a one-line
    :class:`UserError` naming the database, after the rollback."""
    where = database_path(con)
    try:
        with transaction(con):
            yield
    except (duckdb.Error, OSError) as exc:
        cause = _io_failure(exc)
        if cause is None:
            raise
        detail = " ".join(str(cause).split()) or type(cause).__name__
        raise UserError(f"cannot write to database {where} ({detail}); nothing of this file was written") from None


def skipped_result(path, seen: dict) -> dict:
    """The summary of a file whose contents were ingested before (``seen``: its ledger row)."""
    return {"path": str(path), "status": "skipped",
            "reason": f"already ingested on {seen['ingested_at']} from {seen['path']}",
            "rows": 0, "runs": seen["run_ids"]}


def find_ingest(con: duckdb.DuckDBPyConnection, digest: str, kind: str, target: str, path: Path | str) -> dict | None:
    """The ledger row of the file at ``path``, whose :func:`digest.file_digest` is ``digest``,
    ingested before as (kind, target); None if it was not. A ledger of an older dpledger
    holds SHA-256 digests: only when it has one for (kind, target) is the file's own
    SHA-256 computed, so a file ingested then is still a no-op now."""
    query = "SELECT path, rows, run_ids, ingested_at FROM ingests WHERE digest = ? AND kind = ? AND target = ?"
    row = first(con.execute(query, [digest, kind, target]))
    if row is None and scalar(con.execute(
            "SELECT count(*) FROM ingests WHERE kind = ? AND target = ? AND starts_with(digest, ?)",
            [kind, target, f"{LEGACY_ALGORITHM}:"])):
        row = first(con.execute(query, [legacy_digest(path), kind, target]))
    if row is None:
        return None
    return {"path": row[0], "rows": row[1], "run_ids": row[2], "ingested_at": str(row[3])}


def ingested_with_rows(con: duckdb.DuckDBPyConnection, kind: str, target: str, rows: int) -> bool:
    """Whether the ledger holds a file of ``rows`` rows for (kind, target): only such a
    file can be the same one again, so only then must its hash be known before loading."""
    return bool(scalar(con.execute(
        "SELECT count(*) FROM ingests WHERE kind = ? AND target = ? AND rows = ?", [kind, target, rows])))


def record_ingest(
    con: duckdb.DuckDBPyConnection, digest: str, kind: str, target: str, path: str, rows: int, run_ids: list[str]
) -> None:
    con.execute(
        "INSERT INTO ingests (digest, kind, target, path, rows, run_ids) VALUES (?, ?, ?, ?, ?, ?)",
        [digest, kind, target, path, rows, sorted(run_ids)],
    )


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def get_run(con: duckdb.DuckDBPyConnection, run_id: str) -> dict | None:
    cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
    row = first(cur)
    if row is None:
        return None
    return dict(zip([d[0] for d in cur.description], row))


def ensure_run(con: duckdb.DuckDBPyConnection, run: dict, where: str) -> bool:
    """Insert ``run`` if new (returns True); else check it agrees with the stored run.

    ``run`` holds ``run_id``, any of :data:`RUN_COLUMNS` and ``config`` (a dict).
    A parameter given in both places with different values is an error naming it;
    a parameter the stored run lacks is filled in.
    """
    run_id = run["run_id"]
    stored = get_run(con, run_id)
    if stored is None:
        cols = ["run_id"] + [c for c in RUN_COLUMNS if run.get(c) is not None] + ["config"]
        values = [run[c] for c in cols[:-1]] + [json.dumps(run.get("config") or {}, sort_keys=True)]
        con.execute(
            f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            values,
        )
        refresh_config_key(con, run_id)
        return True
    fill = {}
    for param in RUN_PARAMS:
        new = run.get(param)
        if new is None:
            continue
        old = stored.get(param)
        if old is None:
            fill[param] = new
        elif not _same(old, new):
            raise UserError(
                f"{where}: run '{run_id}' already exists with {param} = {old}, "
                f"which conflicts with {param} = {new}"
            )
    if fill:
        sets = ", ".join(f"{k} = ?" for k in fill)
        con.execute(f"UPDATE runs SET {sets}, updated_at = current_timestamp WHERE run_id = ?", [*fill.values(), run_id])
        refresh_config_key(con, run_id)
    return False


def refresh_config_key(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
    """Recompute ``runs.config_key`` (the macro of sql/schema/002) after a change."""
    con.execute(
        "UPDATE runs SET config_key = run_config_key(dataset, model, sample_rate, noise_multiplier, "
        "max_grad_norm, steps) WHERE run_id = ?",
        [run_id],
    )
    remember_epsilon(con, [run_id])  # reads look the run's ε up (warehouse.runs)


def extend_run_steps(con: duckdb.DuckDBPyConnection, run_id: str, last_step: int) -> None:
    """Make ``runs.steps`` cover the recorded steps (at least last_step + 1)."""
    con.execute(
        "UPDATE runs SET steps = greatest(coalesce(steps, 0), ?), updated_at = current_timestamp WHERE run_id = ?",
        [last_step + 1, run_id],
    )
    refresh_config_key(con, run_id)


def _key_columns(rows: pa.Table, key: tuple[str, ...]) -> list[np.ndarray]:
    """The key columns that vary, as non-negative int64 arrays (strings by code).

    A column with one value on every row (the run of a single-run file) cannot make
    two rows differ, so it is left out of the duplicate check.
    """
    cols = []
    for name in key:
        col = rows.column(name)
        if pa.types.is_integer(col.type):
            cols.append(np.asarray(col.to_numpy(), dtype=np.int64))
            continue
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        col = col.unify_dictionaries()  # one dictionary, so equal strings get equal codes
        if col.num_chunks == 0 or len(col.chunk(0).dictionary) <= 1:
            continue
        cols.append(np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in col.chunks])
                    .astype(np.int64))
    return cols


def first_duplicate(columns: list[np.ndarray]) -> tuple[int, int] | None:
    """(earlier row, later row) of the first repeated key, by the later row; or None.

    Keys are packed into one int64 where they fit, so the common case (rows already
    in key order) costs one comparison pass, and otherwise one sort.
    """
    n = len(columns[0]) if columns else 0
    if n < 2:
        return None
    spans = [int(c.max()) + 1 for c in columns]
    if np.prod([float(s) for s in spans]) < 2.0**62:
        packed = columns[0].copy()
        for col, span in zip(columns[1:], spans[1:]):
            packed *= span
            packed += col
        if bool(np.all(packed[1:] > packed[:-1])):
            return None
        order = np.argsort(packed, kind="stable")
        ordered = packed[order]
        same = ordered[1:] == ordered[:-1]
    else:
        order = np.lexsort(columns[::-1])
        same = np.ones(n - 1, dtype=bool)
        for col in columns:
            ordered = col[order]
            same &= ordered[1:] == ordered[:-1]
    if not same.any():
        return None
    later = order[1:][same]
    later_row = int(later[np.argmin(later)])
    match = np.ones(n, dtype=bool)
    for col in columns:
        match &= col == col[later_row]
    return int(np.flatnonzero(match)[0]), later_row


def insert_facts(
    con: duckdb.DuckDBPyConnection,
    table: str,
    rows: pa.Table,
    src: Source,
    key: tuple[str, ...] = FACT_KEY,
) -> int:
    """Insert ``rows`` (an Arrow table in the order of the source file's rows) into
    ``table``, refusing a key that repeats within the rows or that is stored already."""
    if rows.num_rows == 0:
        return 0
    cols = _key_columns(rows, key)
    dup = first_duplicate(cols)
    if dup is not None:
        earlier, later = dup
        what = ", ".join(f"{k} {rows.column(k)[later].as_py()}" for k in key)
        raise src.error(f"duplicate row ({what}); it first appears at {src.at(earlier)}", later)
    name = f"_new_{table}"
    con.register(name, rows)
    try:
        key_list = ", ".join(key)
        runs = pc.unique(rows.column("run_id")).to_pylist()
        runs = [r for r in runs if r is not None]
        stored = scalar(con.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE run_id IN (SELECT unnest(?)) LIMIT 1)", [runs]
        ))
        if stored:
            clash = first(con.execute(
                f"SELECT {key_list} FROM {name} SEMI JOIN "
                f"(SELECT {key_list} FROM {table} WHERE run_id IN (SELECT unnest(?))) t USING ({key_list}) LIMIT 1",
                [runs],
            ))
            if clash is not None:
                match = np.ones(rows.num_rows, dtype=bool)
                for k, value in zip(key, clash):
                    match &= np.asarray(pc.equal(rows.column(k), value).to_numpy(zero_copy_only=False), dtype=bool)
                row = int(np.flatnonzero(match)[0])
                what = ", ".join(f"{k} {v}" for k, v in zip(key, clash))
                raise src.error(f"row ({what}) is already in the warehouse table {table}", row)
        names = ", ".join(rows.column_names)
        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {name}")
    except BaseException:
        try:  # after a failed write DuckDB refuses even this until the rollback: keep the first error
            con.unregister(name)
        except duckdb.Error:
            pass
        raise
    con.unregister(name)
    return rows.num_rows


def append_rows(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> int:
    """Append rows the caller guarantees are new (a worker's own steps past its marker)."""
    return append_arrow(con, table, rows)


def insert_points(con: duckdb.DuckDBPyConnection, points: pa.Table) -> int:
    """Add points not yet known (dataset, point_id); existing points are kept as they are."""
    if points.num_rows == 0:
        return 0
    con.register("_new_points", points)
    try:
        cols = ", ".join(points.column_names)
        before = first(con.execute("SELECT count(*) FROM points"))[0]
        con.execute(f"INSERT OR IGNORE INTO points ({cols}) SELECT DISTINCT {cols} FROM _new_points")
        return first(con.execute("SELECT count(*) FROM points"))[0] - before
    finally:
        con.unregister("_new_points")
