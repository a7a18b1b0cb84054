"""The warehouse's schema: numbered migrations (``sql/schema/NNN_*.sql``) and the views
(``sql/views/*.sql``, one a file), applied in order and recorded in ``schema_version``.

Store layer: this module reads the ``.sql`` files shipped in ``dpledger/sql`` and
applies them to an open connection; it never opens one itself.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from .errors import UserError
from .runs import remember_epsilon
from .sqlutil import first, transaction

_MIGRATION_NAME = re.compile(r"^(\d{3})_[A-Za-z0-9_]+\.sql$")


def sql_dir(sub: str) -> Path:
    """``schema`` or ``views`` of the ``dpledger.sql`` folder: beside this package, in the
    source tree (``sql/``) and in an installed wheel (``dpledger/sql/``) alike."""
    return Path(__file__).resolve().parent.parent / "sql" / sub


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The numbered schema migrations shipped in ``sql/schema``, in order."""
    found = []
    for entry in sql_dir("schema").iterdir():
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
        for entry in sorted(sql_dir("views").iterdir(), key=lambda e: e.name)
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
        raise newer_than_known(current)
    if current == 0:
        theirs = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' ORDER BY 1 LIMIT 6").fetchall()]
        if theirs:  # another application's database: never alter its tables
            raise UserError(f"{current_path(con)} is not a dpledger database (it holds tables of another "
                            f"application: {', '.join(theirs)}); give dpledger a database of its own")
    for m in pending:
        with transaction(con):
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP DEFAULT current_timestamp)"
            )
            con.execute(m.sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [m.version, m.name])
        done.append(f"applied {m.name}")
    if pending and _has_table(con, "runs"):
        with transaction(con):  # runs stored before the memo existed (006): remember their ε once
            remember_epsilon(con)
    views = view_sources()
    digest = _views_digest(views)
    if _meta(con, "views_sha256") != digest:
        with transaction(con):
            con.execute("CREATE TABLE IF NOT EXISTS dpledger_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            _create_views(con, views)
            con.execute("INSERT OR REPLACE INTO dpledger_meta VALUES ('views_sha256', ?)", [digest])
        done.append(f"created {len(views)} views")
    return done


def newer_than_known(version: int) -> UserError:
    return UserError(f"the database has schema version {version}, newer than this dpledger knows "
                     f"({latest_version()}); upgrade dpledger (pip install -U dpledger)")


def current_path(con: duckdb.DuckDBPyConnection) -> str:
    """The file of the connection's current database (``:memory:`` for none)."""
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    return (row[0][0] if row else None) or ":memory:"


def check_current(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Refuse a database a read-only open cannot use as it is (empty, older or newer schema)."""
    version = schema_version(con)
    if version > latest_version():
        raise newer_than_known(version)
    if version == 0:
        raise UserError(f"{path} is not a dpledger database (create it with `dpledger init` or dpledger.init())")
    if version != latest_version():
        raise UserError(f"{path} has schema version {version} but this dpledger expects {latest_version()}; "
                        "upgrade it with `dpledger init` or dpledger.init()")
    if _meta(con, "views_sha256") != _views_digest(view_sources()):
        raise UserError(f"{path} holds the views of another dpledger version; "
                        "refresh them with `dpledger init` or dpledger.init() (the data is kept)")
