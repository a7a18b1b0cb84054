"""Reading user files into Arrow tables, and checking their columns.

Every check names the file, the row (1-based data row; for CSV also the line, the
header being line 1) and the column, so a user can find the value in an editor.
The fast path is Arrow's typed readers; only when a check fails do we look closer
at the offending values to say which row is wrong.

Limits, checked before a file is read whole (a small compressed file can expand to
gigabytes): at most :data:`MAX_ROWS` rows a file (Parquet: from its metadata; CSV: counted
while streaming, so at most that many rows are ever held) and, for Parquet, at most
:data:`MAX_BYTES` of uncompressed column data. Split larger files (by step range, say);
each is ingested in its own transaction. Integers that index things (point ids) are at
most :data:`MAX_INDEX` = 2^53 - 1: every such value then stays exact through any path
that holds it as a float64 (CSV values like ``200.0``, JSON, pandas, SQL averages), and
``+ 1`` never overflows; steps are below :data:`analysis.validate.MAX_STEPS` (10^9).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dpledger.warehouse.errors import UserError

#: Most rows one CSV or Parquet file may hold.
MAX_ROWS = 20_000_000
#: Most uncompressed bytes of the columns read from one Parquet file (from its metadata).
MAX_BYTES = 2 << 30
#: Largest point id (2^53 - 1, the largest integer every float64 holds exactly).
MAX_INDEX = 2**53 - 1

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Source:
    """A file being read; formats locations for error messages."""

    path: Path
    format: str  # "csv" or "parquet"

    def at(self, row_index: int | None = None, column: str | None = None) -> str:
        where = []
        if row_index is not None:
            line = f" (line {row_index + 2})" if self.format == "csv" else ""
            where.append(f"row {row_index + 1}{line}")
        if column is not None:
            where.append(f"column '{column}'")
        return str(self.path) + (": " + ", ".join(where) if where else "")

    def error(self, message: str, row_index: int | None = None, column: str | None = None,
              params: tuple[str, ...] = ()) -> UserError:
        """A UserError at this file's row and column; ``params``: the parameters the message names."""
        return UserError(f"{self.at(row_index, column)}: {message}", *params)


def file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":
            return "parquet"
    raise UserError(f"{path}: not a CSV or Parquet file (expected a .csv or .parquet name)")


def read_table(path: str | Path, formats: tuple[str, ...] = ("csv", "parquet"), *,
               columns: list[str] | None = None, max_rows: int | None = None,
               max_bytes: int | None = None) -> tuple[pa.Table, Source]:
    """Read a CSV or Parquet file whole into an Arrow table.

    ``columns``: the columns a file may have (any other is refused, for Parquet before
    anything is read). A file of more than ``max_rows`` rows (or, Parquet, of more than
    ``max_bytes`` uncompressed bytes in those columns) is refused before it is read whole
    (defaults: :data:`MAX_ROWS`, :data:`MAX_BYTES`).
    """
    max_rows = MAX_ROWS if max_rows is None else max_rows
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a file")
    fmt = file_format(path)
    src = Source(path, fmt)
    if fmt not in formats:
        raise src.error(f"expected a {' or '.join(f.upper() for f in formats)} file")
    try:
        if fmt == "parquet":
            table = _read_parquet(path, src, columns, max_rows, max_bytes)
        else:
            table = _read_csv(path, src, max_rows)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as exc:
        what = "Parquet" if fmt == "parquet" else "CSV"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise src.error(f"not a readable {what} file ({detail})") from None
    if fmt == "csv":
        _check_csv_header(table, src)
    if columns is not None:
        unknown = [c for c in table.column_names if c not in columns]
        if unknown:
            raise src.error(f"unexpected column '{unknown[0]}' (the columns are {', '.join(columns)})")
    return table, src


def _too_many_rows(src: Source, rows: int | None, max_rows: int) -> UserError:
    count = f" ({rows:,})" if rows is not None else ""
    return src.error(f"more than {max_rows:,} rows{count}, the most one file may hold; "
                     "split it into smaller files (by step range, say)")


def _read_parquet(path: Path, src: Source, columns: list[str] | None, max_rows: int, max_bytes: int) -> pa.Table:
    """Check the row count and uncompressed size in the metadata, then read."""
    meta = pq.read_metadata(path)
    names = [meta.schema.column(i).path.split(".")[0] for i in range(meta.num_columns)]
    if columns is not None:
        unknown = [c for c in dict.fromkeys(names) if c not in columns]
        if unknown:
            raise src.error(f"unexpected column '{unknown[0]}' (the columns are {', '.join(columns)})")
    if meta.num_rows > max_rows:
        raise _too_many_rows(src, meta.num_rows, max_rows)
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    if size > max_bytes:
        raise src.error(f"{size:,} bytes of data uncompressed, more than the {max_bytes:,} one file may "
                        "hold; split it into smaller files")
    return pq.read_table(path)


def parquet_schema(path: Path, columns: list[str], max_rows: int | None = None,
                   max_bytes: int | None = None) -> tuple[pa.Schema, int, pq.FileMetaData] | None:
    """The Arrow schema, row count and footer of a Parquet file that :func:`read_table`
    would read without complaint (flat columns, all in ``columns``, within the row and
    byte limits); None for anything else (not Parquet, unreadable, nested, too big), for
    which :func:`read_table` gives the message. Reads the footer only."""
    max_rows = MAX_ROWS if max_rows is None else max_rows
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    try:
        if not path.is_file() or file_format(path) != "parquet":
            return None
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (UserError, pa.ArrowException, OSError, ValueError):
        return None
    names = schema.names
    if (len(names) != meta.num_columns or len(set(names)) != len(names)
            or any(c not in columns for c in names)):
        return None  # nested, repeated or unknown columns
    if meta.num_rows > max_rows:
        return None
    if sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)) > max_bytes:
        return None
    return schema, meta.num_rows, meta


def parquet_int_range(meta: pq.FileMetaData, column: str) -> tuple[int, int] | None:
    """(min, max) of an integer column over the row groups, from the footer's statistics;
    None where a row group lacks them or counts a null. A hint only: nothing that
    relies on it may trust it without checking the rows."""
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    if column not in names or meta.num_row_groups == 0:
        return None
    k = names.index(column)
    lo = hi = None
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(k).statistics
        if stats is None or not stats.has_min_max or stats.null_count != 0:
            return None
        if not isinstance(stats.min, int) or not isinstance(stats.max, int):
            return None
        lo = stats.min if lo is None else min(lo, stats.min)
        hi = stats.max if hi is None else max(hi, stats.max)
    return lo, hi


def _read_csv(path: Path, src: Source, max_rows: int) -> pa.Table:
    """Stream the file in blocks, counting rows: at most ``max_rows`` are ever held."""
    reader = pacsv.open_csv(
        path,
        parse_options=pacsv.ParseOptions(newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True, null_values=["", "NULL", "null"]),
    )
    batches, rows = [], 0
    for batch in reader:
        rows += batch.num_rows
        if rows > max_rows:
            raise _too_many_rows(src, None, max_rows)
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=reader.schema)


def _check_csv_header(table: pa.Table, src: Source) -> None:
    names = table.column_names
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise src.error(f"column '{dup}' appears twice in the header")
    for name in names:
        if "\x00" in name:
            raise src.error("not a CSV file (binary data in the header)")


def require_columns(table: pa.Table, src: Source, required: list[str]) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        have = ", ".join(table.column_names[:12]) + (" ..." if table.num_columns > 12 else "")
        raise src.error(
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)}"
            f" (the file has: {have})"
        )


def _first(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first true value of a boolean array, or None."""
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return pc.index(mask, True).as_py()


def _to_float(col: pa.ChunkedArray, src: Source, name: str) -> pa.ChunkedArray:
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_decimal(col.type):
        return col.cast(pa.float64())
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        values = col.to_numpy(zero_copy_only=False)
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                float(v)
            except ValueError:
                raise src.error(f"'{v}' is not a number", i, name) from None
        return pc.cast(col, pa.float64())
    if pa.types.is_null(col.type):
        return col.cast(pa.float64())
    raise src.error(f"expected numbers, found {col.type}", None, name)


def float_column(
    table: pa.Table,
    name: str,
    src: Source,
    *,
    nonnegative: bool = False,
    allow_null: bool = False,
    allow_nan: bool = False,
    what: str = "value",
) -> pa.ChunkedArray:
    """A numeric column as float64, checked: finite, present, optionally >= 0."""
    col = _to_float(table.column(name), src, name)
    if not allow_null:
        bad = _first(col.is_null())
        if bad is not None:
            raise src.error(f"missing {what}", bad, name)
    bad = _first(pc.is_nan(col))
    if bad is not None and not allow_nan:
        raise src.error(f"{what} is NaN", bad, name)
    bad = _first(pc.is_inf(col))
    if bad is not None:
        raise src.error(f"{what} is infinite ({col[bad].as_py()})", bad, name)
    if nonnegative:
        bad = _first(pc.less(col, 0))
        if bad is not None:
            raise src.error(f"{what} is negative ({col[bad].as_py()})", bad, name)
    return col


def _first_beyond(values: pa.ChunkedArray, compare, bound: int) -> int | None:
    """First row where ``compare(value, bound)`` holds, comparing in the column's own type
    (Arrow would cast a uint64 column to int64 to compare it with a Python int)."""
    try:
        scalar = pa.scalar(bound, values.type)
    except (OverflowError, pa.ArrowInvalid):
        return None  # the type cannot hold the bound: no value of it is beyond it
    return _first(compare(values, scalar))


def int_column(
    table: pa.Table, name: str, src: Source, *, minimum: int | None = None, maximum: int = MAX_INDEX,
    what: str = "value",
) -> pa.ChunkedArray:
    """An integer column as int64, in [minimum, maximum]; integral floats (200.0) are accepted.

    The range is checked before any cast, so a uint64 or a float beyond int64 is an error
    naming its row, not an overflow."""
    raw = table.column(name)
    if pa.types.is_integer(raw.type):
        bad = _first(raw.is_null())
        if bad is not None:
            raise src.error(f"missing {what}", bad, name)
        values = raw
    else:
        values = float_column(table, name, src, what=what)
        frac = pc.not_equal(pc.floor(values), values)
        bad = _first(frac)
        if bad is not None:
            raise src.error(f"{what} {values[bad].as_py()} is not an integer", bad, name)
    bad = _first_beyond(values, pc.greater, maximum)
    if bad is not None:
        value = values[bad].as_py()
        value = int(value) if isinstance(value, float) else value
        raise src.error(f"{what} {value} is above {maximum}, the largest allowed", bad, name)
    if minimum is not None:
        bad = _first_beyond(values, pc.less, minimum)
        if bad is not None:
            value = values[bad].as_py()
            value = int(value) if isinstance(value, float) else value
            raise src.error(f"{what} {value} is below {minimum}", bad, name)
    return values.cast(pa.int64())


_TRUE = {"true", "t", "1", "yes", "y", "1.0"}
_FALSE = {"false", "f", "0", "no", "n", "0.0"}


def bool_column(table: pa.Table, name: str, src: Source, *, allow_null: bool = True) -> pa.ChunkedArray:
    """A boolean column: true/false, or 0/1."""
    raw = table.column(name)
    if pa.types.is_boolean(raw.type):
        col = raw
    elif pa.types.is_integer(raw.type) or pa.types.is_floating(raw.type):
        values = raw.cast(pa.float64())
        bad = _first(pc.and_(pc.not_equal(values, 0.0), pc.not_equal(values, 1.0)))
        if bad is not None:
            raise src.error(f"{values[bad].as_py()} is not a boolean (expected 0/1 or true/false)", bad, name)
        col = pc.equal(values, 1.0)
    elif pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type):
        lowered = pc.utf8_lower(pc.utf8_trim_whitespace(raw))
        is_true = pc.is_in(lowered, value_set=pa.array(sorted(_TRUE)))
        is_false = pc.is_in(lowered, value_set=pa.array(sorted(_FALSE)))
        bad = _first(pc.and_(pc.invert(pc.or_(is_true, is_false)), pc.is_valid(raw)))
        if bad is not None:
            raise src.error(f"'{raw[bad].as_py()}' is not a boolean (expected 0/1 or true/false)", bad, name)
        col = pc.if_else(pc.is_valid(raw), is_true, pa.scalar(None, pa.bool_()))
    elif pa.types.is_null(raw.type):
        col = raw.cast(pa.bool_())
    else:
        raise src.error(f"expected booleans, found {raw.type}", None, name)
    if not allow_null:
        bad = _first(col.is_null())
        if bad is not None:
            raise src.error("missing value", bad, name)
    return col


def string_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    col = table.column(name)
    return col if pa.types.is_string(col.type) else col.cast(pa.string())

