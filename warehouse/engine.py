"""A SQLAlchemy engine over the warehouse, for notebooks and pandas/polars."""

from __future__ import annotations

import os

import sqlalchemy as sa
from sqlalchemy import event

from .connection import SAFE_CONFIG
from .db import connect, resolve_db_path
from .udfs import register_udfs


def engine(path: str | os.PathLike | None = None, read_only: bool = True) -> sa.Engine:
    """``duckdb:///path`` with the project's UDFs registered on every pooled connection.

    The database is first opened once through :func:`dpledger.connect`, so a
    read-write engine sees a current schema and a read-only one fails with a clear
    message on a missing or outdated database.
    """
    db_path = resolve_db_path(path)
    connect(db_path, read_only=read_only).close()
    eng = sa.create_engine(
        f"duckdb:///{db_path}",
        connect_args={"read_only": read_only, "config": dict(SAFE_CONFIG)},
    )

    @event.listens_for(eng, "connect")
    def _register(dbapi_connection, _record):  # pragma: no cover - exercised via tests
        register_udfs(dbapi_connection)

    return eng
