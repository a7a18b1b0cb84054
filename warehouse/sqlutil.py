"""Small helpers over DuckDB connections and results: the one ``transaction()``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def transaction(con) -> Iterator[None]:
    """``BEGIN`` … ``COMMIT``, or ``ROLLBACK`` on any exception: all of a block's writes or none."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def first(result):
    """The first row of a result (or None), reading the result to its end.

    duckdb 2.0 refuses ``register``/``unregister``/``create_function`` while a result
    is unfinished, and ``fetchone`` leaves it unfinished; these queries return at most
    one row, so reading them whole costs nothing.
    """
    rows = result.fetchall()
    return rows[0] if rows else None


def append_arrow(con, table: str, rows, verb: str = "INSERT", suffix: str = "") -> int:
    """``{verb} INTO table (cols) SELECT cols FROM rows`` for an Arrow table: a bulk load,
    never row by row (``verb`` "INSERT OR IGNORE", ``suffix`` an ON CONFLICT clause)."""
    name = f"_arrow_{table}"
    con.register(name, rows)
    try:
        cols = ", ".join(rows.column_names)
        con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM {name} {suffix}")
    finally:
        con.unregister(name)
    return rows.num_rows


def scalar(result):
    row = first(result)
    return None if row is None else row[0]
