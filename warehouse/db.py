"""Opening the warehouse: path resolution, migrations, views and UDFs.

``connect`` is the one way in: it returns a DuckDB connection whose schema is
current (numbered migrations from ``sql/schema``, views from ``sql/views``) and
whose Python UDFs are registered. UDFs are registered before anything else runs
on the connection: DuckDB refuses to register a function while a result is open.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from .errors import UserError
from .sqlutil import first

DEFAULT_DB = "dpledger.duckdb"
ENV_DB = "DPLEDGER_DB"

_MIGRATION_NAME = re.compile(r"^(\d{3})_[A-Za-z0-9_]+\.sql$")


def resolve_db_path(path: str | os.PathLike | None = None) -> Path:
    """The database file: ``path`` if given, else ``$DPLEDGER_DB``, else ``./dpledger.duckdb``."""
    if path is None or str(path) == "":
        path = os.environ.get(ENV_DB) or DEFAULT_DB
    return Path(path)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _sql_dir(sub: str) -> Path:
    # sql/ holds only .sql files (no __init__.py); it is installed beside warehouse/,
    # in the source tree and in site-packages alike.
    return Path(__file__).resolve().parent.parent / "sql" / sub


def migrations() -> list[Migration]:
    """The numbered schema migrations shipped in ``sql/schema``, in order."""
    found = []
    for entry in _sql_dir("schema").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers in sql/schema: {versions}")
    return found


def view_sources() -> dict[str, str]:
    """View name -> ``CREATE VIEW`` text, one view a file in ``sql/views``."""
    return {
        entry.name[:-4]: entry.read_text()
        for entry in sorted(_sql_dir("views").iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".sql")
    }


def _views_digest(views: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(views):
        h.update(name.encode() + b"\0" + views[name].encode() + b"\0")
    return h.hexdigest()


def latest_version() -> int:
    ms = migrations()
    return ms[-1].version if ms else 0


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        first(con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name = ?",
            [name],
        ))[0]
    )


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    if not _has_table(con, "schema_version"):
        return 0
    return first(con.execute("SELECT coalesce(max(version), 0) FROM schema_version"))[0]


def _meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    if not _has_table(con, "dpledger_meta"):
        return None
    row = first(con.execute("SELECT value FROM dpledger_meta WHERE key = ?", [key]))
    return row[0] if row else None


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def _view_order(views: dict[str, str]) -> list[str]:
    """View names so that each comes after the views its SQL reads (DuckDB binds a view
    when it is created, and a failed statement aborts the transaction, so order first)."""
    deps = {
        name: {
            other
            for other in views
            if other != name and re.search(rf"\b{re.escape(other)}\b", _strip_comments(text))
        }
        for name, text in views.items()
    }
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise RuntimeError(f"views in sql/views read each other in a cycle at {name}")
        visiting.add(name)
        for dep in sorted(deps[name]):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in sorted(views):
        visit(name)
    return order


def _create_views(con: duckdb.DuckDBPyConnection, views: dict[str, str]) -> None:
    for name in _view_order(views):
        con.execute(views[name])


def upgrade(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply pending migrations and refresh changed views; return what was done."""
    done = []
    current = schema_version(con)
    pending = [m for m in migrations() if m.version > current]
    if current > latest_version():
        raise UserError(
            f"the database has schema version {current}, newer than this dpledger "
            f"knows ({latest_version()}); upgrade dpledger"
        )
    for m in pending:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP DEFAULT current_timestamp)"
            )
            con.execute(m.sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [m.version, m.name])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        done.append(f"applied {m.name}")
    views = view_sources()
    digest = _views_digest(views)
    if _meta(con, "views_sha256") != digest:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("CREATE TABLE IF NOT EXISTS dpledger_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            _create_views(con, views)
            con.execute(
                "INSERT OR REPLACE INTO dpledger_meta VALUES ('views_sha256', ?)", [digest]
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        done.append(f"created {len(views)} views")
    return done


def _check_current(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    version = schema_version(con)
    if version == 0:
        raise UserError(f"{path} is not a dpledger database (run `dpledger init --db {path}`)")
    if version != latest_version() or _meta(con, "views_sha256") != _views_digest(view_sources()):
        raise UserError(
            f"{path} has schema version {version} but this dpledger expects "
            f"{latest_version()}; run `dpledger init --db {path}` to upgrade it"
        )


def _user_agent() -> str | None:
    """The user agent duckdb-engine gives its connections. DuckDB refuses a second
    connection to a file in one process with a different configuration, so
    ``connect`` uses the same one and a notebook can hold both at once."""
    try:
        import sqlalchemy
        from duckdb_engine import __version__
    except ImportError:
        return None
    return f"duckdb_engine/{__version__}(sqlalchemy/{sqlalchemy.__version__})"


def _open(db_path: Path, read_only: bool, config: dict) -> duckdb.DuckDBPyConnection:
    from .udfs import register_udfs

    agent = _user_agent()
    if agent and "custom_user_agent" not in config:
        config = {**config, "custom_user_agent": agent}

    try:
        con = duckdb.connect(str(db_path), read_only=read_only, config=config)
    except duckdb.Error as exc:
        msg = str(exc).splitlines()[0]
        if "lock" in msg.lower():
            raise UserError(f"database {db_path} is in use by another process ({msg})") from None
        raise UserError(f"cannot open database {db_path}: {msg}") from None
    try:
        register_udfs(con)
    except BaseException:
        con.close()
        raise
    return con


def connect(
    path: str | os.PathLike | None = None,
    read_only: bool = False,
    *,
    external_access: bool = True,
    config: dict | None = None,
    lake: str | os.PathLike | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open the warehouse with its schema current and the project's UDFs registered.

    ``read_only=True`` opens the file in DuckDB's read-only access mode (writes fail)
    and requires an existing, current database; ``external_access=False`` also stops
    SQL from reading or writing other files (``dpledger query`` without --allow-files).
    Read-write opening creates the file and applies pending migrations.

    ``lake=DIR`` attaches a Parquet lake instead: an in-memory warehouse whose tables
    are views over the lake's committed shards (and the database at ``path``, read-only,
    if it exists); see :func:`warehouse.lake.connect_lake`.
    """
    if lake is not None:
        from .lake import connect_lake

        existing = resolve_db_path(path)
        return connect_lake(lake, existing if existing.exists() else None)
    db_path = resolve_db_path(path)
    if read_only and not db_path.exists():
        raise UserError(f"no dpledger database at {db_path} (create it with `dpledger init --db {db_path}`)")
    if not read_only and not db_path.parent.exists():
        raise UserError(f"cannot create database {db_path}: folder {db_path.parent} does not exist")
    cfg = dict(config or {})
    if not external_access:
        cfg["enable_external_access"] = False
    con = _open(db_path, read_only, cfg)
    try:
        if read_only:
            _check_current(con, db_path)
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
    con = _open(db_path, False, {})
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
