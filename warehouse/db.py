"""Opening the warehouse: the database path, ``connect`` and ``init``.

``connect`` is the one way in: it returns a DuckDB connection whose schema is
current (:mod:`.schema`: numbered migrations from ``sql/schema``, views from
``sql/views``) and whose Python UDFs are registered (:mod:`.connection`), or, with
``lake=``, an in-memory warehouse over a Parquet lake (:mod:`.lake`).
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from .connection import open_connection, wait_seconds
from .errors import UserError
from .lake import connect_lake, has_runs
from .schema import check_current, schema_version, upgrade

DEFAULT_DB = "dpledger.duckdb"
ENV_DB = "DPLEDGER_DB"


def resolve_db_path(path: str | os.PathLike | None = None) -> Path:
    """The database file: ``path`` if given, else ``$DPLEDGER_DB``, else ``./dpledger.duckdb``."""
    if path is None or str(path) == "":
        path = os.environ.get(ENV_DB) or DEFAULT_DB
    return Path(path)


def default_lake(db_path: str | os.PathLike) -> Path:
    """The project's lake, where training processes write: ``lake/`` beside the database."""
    return Path(db_path).resolve().parent / "lake"


def connect(
    path: str | os.PathLike | None = None,
    read_only: bool = False,
    *,
    external_access: bool = True,
    config: dict | None = None,
    lake: str | os.PathLike | None = None,
    wait: float | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open the warehouse with its schema current and the project's UDFs registered.

    ``read_only=True`` is a reader's view, live: the database (DuckDB's read-only mode)
    *and* the committed shards of the project's lake (``lake/`` beside the database,
    where training processes write) that are not merged yet, as one in-memory warehouse
    of views (:func:`dpledger.warehouse.lake.connect_lake`); without a lake, the file
    itself. Either way no temporary directory (a read never spills to disk), and
    ``external_access=False`` stops SQL from reading files other than the lake's shards.
    Read-write opening creates the file and applies pending migrations; it sees the
    database only (merge the lake first: ``dpledger ingest shards``).

    ``lake=DIR`` names the lake explicitly (read-only or not). A database another process
    holds is waited for up to ``wait`` seconds (default ``$DPLEDGER_WAIT`` or 60 s), then
    refused with one line.
    """
    db_path = resolve_db_path(path)
    if wait is None:
        wait = wait_seconds()
    if lake is None and read_only and has_runs(default_lake(db_path)):
        lake = default_lake(db_path)
    if lake is not None:
        existing = db_path if db_path.exists() else None
        return connect_lake(lake, existing, read_only=read_only, allow_files=external_access, wait=wait)
    if read_only and not db_path.exists():
        raise UserError(f"no dpledger database at {db_path} (create it with `dpledger init` or dpledger.init())")
    if not read_only and not db_path.parent.exists():
        raise UserError(f"cannot create database {db_path}: folder {db_path.parent} does not exist")
    con = open_connection(db_path, read_only, dict(config or {}), wait=wait)
    try:
        # settings, not connect-time config: DuckDB refuses a second connection to a file
        # with another config in one process, and the temp folder can only be changed
        # while external access is still on
        if read_only:
            con.execute("SET temp_directory = ''")
        if not external_access:
            con.execute("SET enable_external_access = false")
        if read_only:
            check_current(con, db_path)
        else:
            upgrade(con)
    except BaseException:
        con.close()
        raise
    return con


def init(path: str | os.PathLike | None = None) -> dict:
    """Create or upgrade the database at ``path``; idempotent. Returns a summary."""
    db_path = resolve_db_path(path)
    if not db_path.parent.exists():
        raise UserError(f"cannot create database {db_path}: folder {db_path.parent} does not exist")
    existed = db_path.exists()
    con = open_connection(db_path, False, {}, wait=wait_seconds())
    try:
        before = schema_version(con)
        actions = upgrade(con)
        after = schema_version(con)
    finally:
        con.close()
    return {
        "db": str(db_path),
        "created": not existed,
        "schema_version_before": before,
        "schema_version": after,
        "actions": actions,
    }
