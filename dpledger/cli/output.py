"""Rendering query results for the terminal: table, JSON, CSV."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
import json
import math
import sys

import pyarrow as pa

FORMATS = ("table", "json", "csv")


def _jsonable(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def records(table: pa.Table) -> list[dict]:
    return [{k: _jsonable(v) for k, v in row.items()} for row in table.to_pylist()]


def to_json(obj) -> str:
    if isinstance(obj, pa.Table):
        obj = records(obj)
    return json.dumps(_jsonable(obj), indent=2, default=str)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return str(value)


def to_csv(table: pa.Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row.values()])
    return out.getvalue()


def print_table(table: pa.Table, title: str | None = None, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=max(100, min(220, 12 * max(1, table.num_columns))))
    t = Table(title=title, show_lines=False)
    for name in table.column_names:
        t.add_column(name, overflow="fold")
    for row in table.to_pylist():
        t.add_row(*(_cell(v) for v in row.values()))
    console.print(t)
    console.print(f"[dim]{table.num_rows} row{'s' if table.num_rows != 1 else ''}[/dim]")


def emit(table: pa.Table, fmt: str, title: str | None = None) -> None:
    if fmt == "json":
        sys.stdout.write(to_json(table) + "\n")
    elif fmt == "csv":
        sys.stdout.write(to_csv(table))
    else:
        print_table(table, title)
