"""dpledger's warehouse: the DuckDB store (connect, schema, lake views, UDFs, tables, one
``transaction()``) and the jobs that compute derived tables from it (accounting, fits,
links, report frames, query, rank).

    >>> from dpledger import warehouse
    >>> con = warehouse.connect("dpledger.duckdb")                 # read-write, schema current
    >>> eng = warehouse.engine("dpledger.duckdb", read_only=True)  # SQLAlchemy, notebooks

Names load on first use (DuckDB, SQLAlchemy and scipy are not imported by
``import dpledger.warehouse.errors``).
"""

from __future__ import annotations

import importlib

_NAMES = {
    "DEFAULT_DB": "db", "ENV_DB": "db", "connect": "db", "init": "db", "resolve_db_path": "db",
    "engine": "engine", "UserError": "errors",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'dpledger.warehouse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
