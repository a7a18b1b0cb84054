"""``dpledger ingest shards LAKE``: merge the committed Parquet shards of a lake into a
database, idempotently.

A lake holds one folder per run, ``run_id=<id>/``, written by :class:`ingest.sinks.ShardSink`:
``run.json`` (the run's parameters), ``points.parquet``, optionally
``membership.parquet``, the shards ``<table>/part-<worker>-<seq>.parquet`` and
``manifest.json``, which lists the committed shards. Files the manifest does not
list (what a crash can leave: a temporary file, a shard renamed into place but never
listed, a writer's lock) are not read. Every file is taken through
:func:`dpledger.warehouse.lake.run_file`, the readers' own rule: a manifest path (or a
symlink) leading out of the run's folder is refused with one line.

Every listed file is read and checked before anything is written, and the whole
merge is one transaction: a missing, truncated or wrong-schema shard is named in a
one-line error and the database is left as it was. Shards merged before (same
content digest, :mod:`.digest`) are skipped, so merging twice changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpledger.warehouse.errors import UserError
from dpledger.warehouse.lake import listed_files, run_file
from dpledger.warehouse.sqlutil import append_arrow, transaction

from . import load
from .digest import file_digest
from .readers import Source, bool_column, float_column, int_column

# the columns a shard of each table must have: the table's NOT NULL columns but run_id
# (tests/test_lake_safety.py checks them against the schema)
REQUIRED = {
    "point_steps": {"step", "point_id", "grad_norm", "norm_clipped"},
    "steps": {"step"},
    "evaluations": {"step", "point_id"},
    "checkpoints": {"step", "path"},
}
KIND = "shard"


def _read(path: Path, required: set[str]) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"{path}: not a readable Parquet shard ({str(exc).splitlines()[0]})") from None
    missing = sorted(required - set(table.column_names))
    if missing:
        raise UserError(f"{path}: wrong schema, missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}")
    if "grad_norm" in table.column_names:  # the same checks as any ingested file
        src = Source(path, "parquet")
        float_column(table, "grad_norm", src, nonnegative=True, what="gradient norm")
        int_column(table, "step", src, minimum=0, what="step")
        int_column(table, "point_id", src, minimum=0, what="point id")
    if "norm_clipped" in required:
        bool_column(table, "norm_clipped", src, allow_null=False)
    return table


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None


@dataclass(frozen=True)
class _Shards(load.Source):
    """The shards of one table of a run, merged as one table: a row is named by its file."""

    parts: tuple = ()  # (path, index of its first row in the merged table), in order

    def at(self, row_index: int | None = None, column: str | None = None) -> str:
        if row_index is None or not self.parts:
            return super().at(row_index, column)
        path, first = next((p, i) for p, i in reversed(self.parts) if i <= row_index)
        return load.Source(path, "parquet").at(row_index - first, column)


def _runs(lake: Path) -> list[Path]:
    if not lake.exists():
        raise UserError(f"{lake}: no such lake folder")
    if not lake.is_dir():
        raise UserError(f"{lake}: not a folder")
    return sorted(p for p in lake.iterdir() if p.is_dir() and p.name.startswith("run_id="))


def plan(lake: str | Path) -> list[dict]:
    """Read and check every committed file of the lake; nothing is written."""
    lake = Path(lake)
    out = []
    for d in _runs(lake):
        manifest_path = d / "manifest.json"
        if not manifest_path.exists():
            continue  # a run that never committed anything
        manifest, run = _read_json(run_file(d, "manifest.json", d)), _read_json(run_file(d, "run.json", d))
        if run.get("run_id") != d.name.split("=", 1)[1]:
            raise UserError(f"{d / 'run.json'}: run_id {run.get('run_id')!r} does not match its folder")
        files = []
        for table, path, listed_rows in listed_files(d, manifest, manifest_path):
            if table not in REQUIRED:
                raise UserError(f"{manifest_path}: unknown table {table!r}")
            if not path.exists():
                raise UserError(f"{path}: listed in {manifest_path} but missing")
            rows = _read(path, REQUIRED[table])
            if rows.num_rows != listed_rows:
                raise UserError(f"{path}: {rows.num_rows} rows, but the manifest says {listed_rows}")
            files.append({"table": table, "path": path, "rows": rows})
        points = _read(run_file(d, "points.parquet", d), {"dataset", "point_id"}) \
            if (d / "points.parquet").exists() else None
        membership = _read(run_file(d, "membership.parquet", d), {"run_id", "point_id", "in_train"}) \
            if (d / "membership.parquet").exists() else None
        out.append({"dir": d, "run": run, "manifest": manifest, "files": files, "points": points,
                    "membership": membership})
    return out


def ingest_shards(con, lake: str | Path) -> list[dict]:
    """Merge a lake into the database in one transaction; returns one summary per run."""
    runs = plan(lake)
    results = []
    with transaction(con):
        for item in runs:
            run = dict(item["run"])
            run_id = run["run_id"]
            load.ensure_run(con, run, str(item["dir"] / "run.json"))
            con.execute("UPDATE runs SET run_dir = coalesce(run_dir, ?), config = ? WHERE run_id = ? "
                        "AND (run_dir IS NULL OR CAST(config AS VARCHAR) IS DISTINCT FROM ?)",
                        [run.get("run_dir"), json.dumps(run.get("config") or {}), run_id,
                         json.dumps(run.get("config") or {})])
            if item["points"] is not None:
                load.insert_points(con, item["points"])
            if item["membership"] is not None and item["membership"].num_rows:
                append_arrow(con, "membership", item["membership"].select(["run_id", "point_id", "in_train"]),
                             verb="INSERT OR IGNORE")
            new: dict[str, list[pa.Table]] = {}
            paths: dict[str, list[Path]] = {}
            skipped = 0
            for f in item["files"]:
                digest = file_digest(f["path"])
                if load.find_ingest(con, digest, f"{KIND}:{f['table']}", run_id, f["path"]) is not None:
                    skipped += 1
                    continue
                rows = f["rows"]
                if "run_id" in rows.column_names:
                    rows = rows.drop(["run_id"])
                rows = rows.add_column(0, "run_id", pa.array([run_id] * rows.num_rows, pa.string()))
                new.setdefault(f["table"], []).append(rows)
                paths.setdefault(f["table"], []).append(f["path"])
                load.record_ingest(con, digest, f"{KIND}:{f['table']}", run_id, str(f["path"]), rows.num_rows, [run_id])
            counts = {}
            for table, parts in new.items():
                merged = pa.concat_tables(parts, promote_options="default")
                starts = [0]
                for part in parts[:-1]:
                    starts.append(starts[-1] + part.num_rows)
                src = _Shards(item["dir"] / table, "parquet", tuple(zip(paths[table], starts)))
                if table in ("point_steps", "evaluations"):
                    counts[table] = load.insert_facts(con, table, merged, src)
                else:
                    counts[table] = append_arrow(con, table, merged, suffix="ON CONFLICT (run_id, step) DO NOTHING")
            manifest = item["manifest"]
            con.execute("UPDATE runs SET committed_step = ?, status = ?, updated_at = now() WHERE run_id = ? "
                        "AND (committed_step IS DISTINCT FROM ? OR status IS DISTINCT FROM ?)",
                        [manifest.get("committed_step"), manifest.get("status", "running"), run_id,
                         manifest.get("committed_step"), manifest.get("status", "running")])
            results.append({"run_id": run_id, "status": manifest.get("status"),
                            "committed_step": manifest.get("committed_step"),
                            "rows": counts.get("point_steps", 0), "files_skipped": skipped,
                            "files_merged": sum(len(p) for p in new.values())})
    return results
