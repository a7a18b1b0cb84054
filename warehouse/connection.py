"""Opening DuckDB for the warehouse: the one place the project calls ``duckdb.connect``.

Store layer. Every connection gets the project's UDFs (registered before anything
else runs: DuckDB refuses to register a function while a result is open), the same
user agent as duckdb-engine (so a notebook may hold a connection and a SQLAlchemy
engine on one file at once), and no extension auto-install or auto-load (nothing
is ever fetched from the network because of a file's contents).
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, TypeVar

import duckdb

from .errors import UserError
from .udfs import register_udfs

# DuckDB would otherwise download and load an extension when a file or statement
# asks for one (a SQLite file passed as the database, say).
SAFE_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

# How long a command waits for a database another process holds (DuckDB allows one
# writing process per file, and no reader beside it): $DPLEDGER_WAIT seconds, default
# 60, at most a day.
ENV_WAIT = "DPLEDGER_WAIT"
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 86_400.0

log = logging.getLogger("dpledger")
T = TypeVar("T")


def wait_seconds() -> float:
    """The writer's wait for a busy database, from ``$DPLEDGER_WAIT`` (checked: 0 to a day)."""
    text = os.environ.get(ENV_WAIT)
    if text is None or text == "":
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= MAX_WAIT_S:
        raise UserError(f"${ENV_WAIT}={text}: give the seconds to wait for a busy database, 0 to {MAX_WAIT_S:g}")
    return value


def _in_use(message: str) -> bool:
    m = message.lower()
    return "could not set lock" in m or "conflicting lock" in m


@lru_cache(maxsize=1)
def _user_agent() -> str | None:
    """The user agent duckdb-engine gives its connections. DuckDB refuses a second
    connection to a file in one process with a different configuration, so
    ``connect`` uses the same one and a notebook can hold both at once. (Read from
    the installed versions: importing SQLAlchemy would cost every command 0.2 s.)"""
    try:
        engine, alchemy = version("duckdb-engine"), version("sqlalchemy")
    except PackageNotFoundError:
        return None
    return f"duckdb_engine/{engine}(sqlalchemy/{alchemy})"


def foreign_file(path: Path) -> str | None:
    """What an existing, non-empty file is when it is not a DuckDB database (DuckDB's
    files carry "DUCK" at byte 8), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    if not head or head[8:12] == b"DUCK":
        return None
    if head.startswith(b"SQLite format 3\0"):
        return "it is a SQLite database"
    return "its header is not DuckDB's"


def retry_in_use(action: Callable[[], T], db_path, wait: float) -> T:
    """``action()`` (an open or an ATTACH of ``db_path``), retried while another process holds
    the file: a growing pause (0.1 s doubling to 2 s) for up to ``wait`` seconds, said once
    (logger ``dpledger``); then, or on any other failure, a one-line :class:`UserError`."""
    deadline, pause, said = time.monotonic() + wait, 0.1, False
    while True:
        try:
            return action()
        except duckdb.Error as exc:
            msg = str(exc).splitlines()[0]
            if not _in_use(msg):
                raise UserError(f"cannot open database {db_path}: {msg}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {wait:g} s" if wait > 0 else ""
                raise UserError(f"database {db_path} is in use by another process{waited} ({msg})") from None
            if not said:
                log.warning("database %s is in use by another process; waiting up to %g s", db_path, wait)
                said = True
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2.0)


def open_connection(db_path: Path, read_only: bool, config: dict, wait: float = 0.0) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to ``db_path`` (``:memory:`` for none) with the UDFs registered;
    failures to open are one-line :class:`UserError`s.

    A file another process holds is retried with a growing pause (0.1 s doubling to
    2 s) for up to ``wait`` seconds, saying once (logger ``dpledger``) that it waits.
    """
    config = {**SAFE_CONFIG, **config}
    agent = _user_agent()
    if agent and "custom_user_agent" not in config:
        config["custom_user_agent"] = agent

    not_duckdb = foreign_file(db_path)
    if not_duckdb:
        raise UserError(f"{db_path} is not a DuckDB database file ({not_duckdb})")
    con = retry_in_use(lambda: duckdb.connect(str(db_path), read_only=read_only, config=config), db_path, wait)
    try:
        register_udfs(con)
    except BaseException:
        con.close()
        raise
    return con
