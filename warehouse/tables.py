"""SQLAlchemy Core declarations of the warehouse tables, made from the SQL schema.

duckdb-engine 0.17 cannot reflect tables from duckdb 2.0, so the tables are declared
here — not by hand (a second definition to keep in step) but by applying
``sql/schema`` to an in-memory database once and reading its catalog: every table
of the schema becomes a ``Table`` of :data:`metadata` and a name of this module
(``tables.runs``, ``tables.point_steps``, ...), column for column, with its primary
key and NOT NULL columns.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Double, Integer, LargeBinary, MetaData, String, Table
from sqlalchemy.types import ARRAY, TypeEngine

from .connection import open_connection
from .schema import upgrade

# DuckDB type -> SQLAlchemy type; a schema type missing here fails at import (and in the tests)
TYPES: dict[str, TypeEngine | type] = {
    "VARCHAR": String, "BIGINT": BigInteger, "INTEGER": Integer, "DOUBLE": Double, "BOOLEAN": Boolean,
    "TIMESTAMP": DateTime, "BLOB": LargeBinary, "JSON": JSON,
}


def sqlalchemy_type(duckdb_type: str):
    if duckdb_type.endswith("[]"):
        return ARRAY(sqlalchemy_type(duckdb_type[:-2]))
    try:
        return TYPES[duckdb_type]
    except KeyError:
        raise TypeError(f"no SQLAlchemy type for DuckDB type {duckdb_type}") from None


def declare(metadata: MetaData) -> dict[str, Table]:
    """A ``Table`` for every table ``sql/schema`` creates, in ``metadata``."""
    con = open_connection(Path(":memory:"), False, {})
    try:
        upgrade(con)
        columns = con.execute(
            "SELECT c.table_name, c.column_name, c.data_type, c.is_nullable FROM duckdb_columns() c "
            "JOIN duckdb_tables() t USING (database_name, schema_name, table_name) "
            "WHERE c.schema_name = 'main' ORDER BY c.table_name, c.column_index").fetchall()
        keys = {(table, col) for table, cols in con.execute(
            "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
            "WHERE schema_name = 'main' AND constraint_type = 'PRIMARY KEY'").fetchall() for col in cols}
    finally:
        con.close()
    by_table: dict[str, list[Column]] = {}
    for table, column, kind, nullable in columns:
        key = (table, column) in keys
        by_table.setdefault(table, []).append(
            Column(column, sqlalchemy_type(kind), primary_key=key, nullable=bool(nullable) and not key))
    return {name: Table(name, metadata, *cols) for name, cols in by_table.items()}


metadata = MetaData()
globals().update(declare(metadata))
