"""Read-only querying of the warehouse (``dpledger query``, ``dpledger runs``): user values are
bound parameters, never pasted into SQL."""

from __future__ import annotations

import json
import os
import socket

import duckdb
import pyarrow as pa

from .db import connect
from .errors import UserError

def run_query(
    sql: str,
    params: dict | None = None,
    path: str | os.PathLike | None = None,
    allow_files: bool = False,
    lake: str | os.PathLike | None = None,
) -> pa.Table:
    """Run one SELECT statement ``sql`` on a read-only warehouse, binding ``params`` ($name).

    The read path writes nothing, anywhere: the statement must be a single SELECT
    (no ATTACH, COPY, EXPORT, SET, PRAGMA, CREATE, INSTALL/LOAD, ...); the database
    is opened in DuckDB's read-only mode with no temporary directory and the
    configuration locked; reading other files is refused unless ``allow_files``.
    Like every read, it sees the database and the committed shards of the project's lake
    not merged yet (see :func:`dpledger.warehouse.db.connect`); ``lake`` names another lake.
    """
    con = connect(path, read_only=True, external_access=allow_files, lake=lake)
    if not con.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0]:
        con.execute("SET lock_configuration = true")
    try:
        single_select(con, sql)
        try:
            return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            raise UserError(_query_error(exc), "allow_files") from None
    finally:
        con.close()


def single_select(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one SELECT statement (DuckDB's parser says which)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise UserError(f"query: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise UserError(f"query: give one SELECT statement at a time (got {len(statements)} statements)")
    kind = str(statements[0].type).rpartition(".")[2]
    if kind != "SELECT":
        raise UserError(f"query: the warehouse is read-only here; only a SELECT statement may run (got {kind})")


def _query_error(exc: duckdb.Error) -> str:
    first = str(exc).splitlines()[0]
    if "read-only mode" in first or "read_only" in first.lower():
        return f"query: the database is open read-only; write statements are refused ({first})"
    if "file system operations are disabled" in first or "external access" in first.lower():
        return f"query: reading or writing files from SQL is off; allow_files lets it ({first})"
    return f"query: {first}"


RUNS_SQL = """
SELECT r.run_id, r.dataset, r.model, r.seed, r.sample_rate, r.noise_multiplier, r.max_grad_norm,
       r.batch_size, r.epochs, r.steps, r.delta, r.target_epsilon, r.private, r.status, r.source,
       coalesce(ps.rows, 0) AS point_step_rows,
       coalesce(ps.points, 0) AS points_tracked,
       coalesce(ps.steps_recorded, 0) AS steps_recorded,
       -- the share of the run's steps that recorded norms stand for (hold-last: from the
       -- first recorded step on); below 1 when norms were scored only from a checkpoint on
       CASE WHEN r.steps > 0 AND ps.first_step IS NOT NULL
            THEN greatest(r.steps - ps.first_step, 0) / r.steps END AS covered,
       CASE WHEN r.private THEN m.epsilon END AS epsilon,
       coalesce(ev.rows, 0) AS evaluation_rows,
       r.created_at
FROM runs r
-- the ε writers remembered (warehouse.runs.remember_epsilon); list_runs computes the
-- rest through the run_epsilon view, so a plain listing evaluates no RDP
LEFT JOIN dp_epsilon_memo m
  ON m.sample_rate = r.sample_rate AND m.noise_multiplier = r.noise_multiplier
 AND m.steps = r.steps AND m.delta = r.delta
LEFT JOIN (SELECT run_id, count(*) AS rows, count(DISTINCT point_id) AS points,
                  count(DISTINCT step) AS steps_recorded, min(step) AS first_step
           FROM point_steps GROUP BY run_id) ps USING (run_id)
LEFT JOIN (SELECT run_id, count(*) AS rows FROM evaluations GROUP BY run_id) ev USING (run_id)
ORDER BY r.run_id
"""


def worker_gone(config) -> bool:
    """A run still marked running whose worker process, on this host, no longer exists."""
    try:
        worker = json.loads(config).get("worker") if config else None
    except ValueError:
        return False
    if not worker or worker.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError):
        return False
    return False


def list_runs(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Every run with its parameters, its data-independent ε (``epsilon``, RDP at the run's δ),
    the covered share of its steps, and row counts. A run marked running whose worker
    died (killed, out of memory) shows as ``incomplete``: resume it with ``train --resume``."""
    table = con.sql(RUNS_SQL).to_arrow_table()
    missing = [r for r, p, e in zip(*(table.column(c).to_pylist() for c in ("run_id", "private", "epsilon")))
               if p and e is None]
    if missing:  # runs the memo lacks (an older dpledger's, a live lake run's): the view computes them
        found = dict(con.execute("SELECT run_id, epsilon FROM run_epsilon WHERE run_id IN (SELECT unnest(?))",
                                 [missing]).fetchall())
        eps = [found.get(r, e) for r, e in zip(table.column("run_id").to_pylist(),
                                                table.column("epsilon").to_pylist())]
        table = table.set_column(table.column_names.index("epsilon"), "epsilon", pa.array(eps, pa.float64()))
    configs = dict(con.execute("SELECT run_id, CAST(config AS VARCHAR) FROM runs WHERE status = 'running'").fetchall())
    if not configs:
        return table
    status = [("incomplete" if s == "running" and worker_gone(configs.get(r)) else s)
              for r, s in zip(table.column("run_id").to_pylist(), table.column("status").to_pylist())]
    return table.set_column(table.column_names.index("status"), "status", pa.array(status, pa.string()))
