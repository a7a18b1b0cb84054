"""The project's DuckDB Python UDFs, registered on every connection at connect time.

DuckDB refuses to register a function while a result is open on the connection, so
``warehouse.connect`` and ``warehouse.engine`` call :func:`register_udfs` before
running anything else. Type names are strings (duckdb 2.0 has no ``duckdb.typing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Udf:
    name: str
    function: Callable
    parameters: list[str]
    return_type: str
    doc: str


def udfs() -> list[Udf]:
    """Every UDF the views and users may call."""
    return []


def register_udfs(con) -> None:
    for udf in udfs():
        con.create_function(
            udf.name,
            udf.function,
            udf.parameters,
            udf.return_type,
            type="arrow",
            null_handling="special",
            side_effects=False,
        )
