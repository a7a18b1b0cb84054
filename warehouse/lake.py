"""A Parquet lake queried in place: the warehouse's tables and views over the committed
shards of ``lake/run_id=<id>/``, without loading them into a DuckDB file.

:func:`connect_lake` returns an in-memory DuckDB connection with the full schema and
UDFs, where ``point_steps``, ``steps``, ``evaluations``, ``checkpoints``, ``points``
and ``membership`` are views over ``read_parquet([...], hive_partitioning = true)``
of the files each run's ``manifest.json`` lists (a file the manifest does not list —
a writer killed mid-commit — is never read), ``runs`` holds the runs' ``run.json``,
and every view of ``sql/views`` (``point_epsilon_sql``, ``mia_score``, ...) runs over
them. ``dpledger account --lake`` composes per-example ε over the lake the same way.
DuckDB streams Parquet, so scans run out of core; ``memory_limit`` and
``temp_directory`` bound what joins and sorts may hold in memory before spilling.

With ``db`` the warehouse file is attached read-only: every table holds the database's
rows plus the rows of the committed shards the database has not merged yet (its
``ingests`` ledger says which it has), and a run's ``runs`` row comes from the lake when
the lake has the run (its live status and committed step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from .connection import open_connection, retry_in_use
from .errors import UserError
from .schema import latest_version, upgrade

FACT_COLUMNS = {
    "point_steps": ["run_id", "step", "point_id", "grad_norm", "norm_clipped", "loss", "sampled"],
    "steps": ["run_id", "step", "epoch", "batch_size", "loss", "lr", "wall_s", "peak_mem_bytes", "test_accuracy",
              "track_s"],
    "evaluations": ["run_id", "step", "point_id", "loss", "correct", "margin", "confidence_logit"],
    "checkpoints": ["run_id", "step", "path"],
}
RUN_FILES = {
    "points": ["dataset", "point_id", "label", "split", "attrs", "thumbnail"],
    "membership": ["run_id", "point_id", "in_train"],
}
RUN_COLUMNS = ["run_id", "dataset", "model", "seed", "n_train", "sample_rate", "batch_size", "noise_multiplier",
               "max_grad_norm", "lr", "epochs", "steps", "delta", "target_epsilon", "private", "status", "source",
               "run_dir", "committed_step"]


def run_file(run_dir: Path, rel, named_in: str | os.PathLike) -> Path:
    """``run_dir / rel``, a file of a run's folder in the lake that ``named_in`` (a manifest, or
    the run folder itself) names; refused with one line unless it is a relative path that
    stays, symlinks resolved, inside the run's own folder, itself a folder of the lake (not a
    link out of it). The one rule for every file a reader or a merge takes from a lake."""
    run_dir = Path(run_dir)
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel):
        raise UserError(f"{named_in}: file {rel!r} is not a path inside the run folder {run_dir}; refused")
    try:
        root = run_dir.resolve()
        lake = run_dir.parent.resolve()
        resolved = (run_dir / rel).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UserError(f"{named_in}: file {rel!r} cannot be resolved ({exc}); refused") from None
    if root.parent != lake:
        raise UserError(f"{run_dir}: the run folder leads out of the lake {run_dir.parent} (to {root}); refused")
    if resolved == root or not resolved.is_relative_to(root):
        raise UserError(f"{named_in}: file {rel!r} leads out of the run folder {run_dir} (to {resolved}); refused")
    return run_dir / rel


def listed_files(run_dir: Path, manifest, manifest_path: str | os.PathLike) -> list[tuple[str, Path, object]]:
    """(table, path, rows) of every file ``manifest`` (read from ``manifest_path``) lists, in
    order; each path checked by :func:`run_file`, a malformed entry refused with one line."""
    shards = manifest.get("shards", []) if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise UserError(f"{manifest_path}: not a manifest (no list of shards)")
    out = []
    for i, shard in enumerate(shards):
        files = shard.get("files", {}) if isinstance(shard, dict) else None
        if not isinstance(files, dict):
            raise UserError(f"{manifest_path}: shard {i} has no table of files")
        for table, info in files.items():
            if not isinstance(info, dict):
                raise UserError(f"{manifest_path}: shard {i}, table {table!r}: not a file entry")
            out.append((table, run_file(run_dir, info.get("path"), manifest_path), info.get("rows")))
    return out


def lake_runs(lake: str | os.PathLike) -> list[dict]:
    """Each committed run of the lake: its run.json, manifest and committed files (each file
    checked by :func:`run_file`: nothing outside the run's own folder is read)."""
    lake = Path(lake)
    if not lake.is_dir():
        raise UserError(f"{lake}: no such lake folder")
    runs = []
    for d in sorted(p for p in lake.iterdir() if p.is_dir() and p.name.startswith("run_id=")):
        if not (d / "manifest.json").exists() or not (d / "run.json").exists():
            continue
        manifest_path, run_path = run_file(d, "manifest.json", d), run_file(d, "run.json", d)
        try:
            manifest = json.loads(manifest_path.read_text())
            run = json.loads(run_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{d}: unreadable run.json or manifest.json ({exc})") from None
        files: dict[str, list[str]] = {t: [] for t in FACT_COLUMNS}
        for table, path, _ in listed_files(d, manifest, manifest_path):
            if table in files:
                files[table].append(str(path))
        for table in RUN_FILES:
            if (d / f"{table}.parquet").exists():
                files[table] = [str(run_file(d, f"{table}.parquet", d))]
        runs.append({"dir": d, "run": run, "manifest": manifest, "files": files})
    return runs


def _columns(files: list[str], required: set[str]) -> set[str]:
    """Columns the files have (a shard written without an optional column lacks it; every
    file's footer is read, and one lacking a ``required`` column — NOT NULL in the schema —
    is refused, never read as NULLs); with ``hive_partitioning`` the run_id of the folder
    name is always there."""
    import pyarrow.parquet as pq

    names = {"run_id"}
    for f in files:
        try:
            have = set(pq.read_schema(f).names) | {"run_id"}
        except (OSError, ValueError) as exc:
            raise UserError(f"{f}: not a readable Parquet shard ({str(exc).splitlines()[0]})") from None
        missing = sorted(required - have)
        if missing:
            raise UserError(f"{f}: the shard lacks column {missing[0]}, which the table requires; refused")
        names |= have
    return names


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def has_runs(lake: str | os.PathLike) -> bool:
    """Whether ``lake`` is a folder holding at least one committed run (a manifest)."""
    lake = Path(lake)
    return lake.is_dir() and any(lake.glob("run_id=*/manifest.json"))


def connect_lake(lake: str | os.PathLike, db: str | os.PathLike | None = None, *,
                 memory_limit: str | None = None, temp_directory: str | os.PathLike | None = None,
                 threads: int | None = None, read_only: bool = False,
                 allow_files: bool = False, wait: float = 0.0) -> duckdb.DuckDBPyConnection:
    """An in-memory warehouse whose data tables are views over the lake (see the module doc).

    ``read_only=True`` is the reader's connection (``dpledger query --lake``): no
    temporary directory, the configuration locked, and, unless ``allow_files``, file
    access limited to reading exactly the shard files the views list, and every other
    table of the database (accountings, point_epsilon, curvature, ...) visible as a view
    of the attached file. (What statements may run is the caller's part:
    :func:`dpledger.warehouse.query.run_query` runs a single SELECT.) ``wait``: seconds
    to wait for a database another process holds.
    """
    runs = lake_runs(lake)
    config = {"temp_directory": ""} if read_only else {}
    if memory_limit:
        config["memory_limit"] = memory_limit
    if temp_directory:
        config["temp_directory"] = str(temp_directory)
    if threads:
        config["threads"] = threads
    con = open_connection(Path(":memory:"), False, config)
    try:
        upgrade(con)  # the schema, in memory
        attached = False
        if db is not None:
            if not Path(db).exists():
                raise UserError(f"no dpledger database at {db}")
            quoted = str(db).replace("'", "''")
            retry_in_use(lambda: con.execute(f"ATTACH '{quoted}' AS wh (READ_ONLY)"), db, wait)
            attached = True
            theirs = con.execute("SELECT coalesce(max(version), 0) FROM wh.main.schema_version").fetchall()[0][0]
            if theirs != latest_version():
                raise UserError(f"{db} has schema version {theirs} but this dpledger expects {latest_version()}; "
                                "upgrade it with `dpledger init` or dpledger.init()")
        # shards the database has merged already (its ingest ledger: run, table, file name):
        # their rows are read from the database, every other committed shard from the lake
        merged = set()
        if attached:
            merged = {(run_id, kind.partition(":")[2], Path(path).name) for run_id, kind, path in con.execute(
                "SELECT target, kind, path FROM wh.main.ingests WHERE kind LIKE 'shard:%'").fetchall()}
        views = {}
        for table, cols in {**FACT_COLUMNS, **RUN_FILES}.items():
            files = [f for r in runs for f in r["files"].get(table, [])
                     if (r["run"]["run_id"], table, Path(f).name) not in merged]
            parts = []
            if files:
                schema = con.execute(
                    "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                    "WHERE table_schema = 'main' AND table_name = ?", [table]).fetchall()
                types = {name: kind for name, kind, _ in schema}
                present = _columns(files, {name for name, _, nullable in schema if nullable == "NO"})
                select = [c if c in present else f"CAST(NULL AS {types[c]}) AS {c}" for c in cols]
                parts.append(f"SELECT {', '.join(select)} FROM read_parquet({_sql_list(files)}, "
                             f"hive_partitioning = true, union_by_name = true)")
            if attached:
                parts.append(f"SELECT {', '.join(cols)} FROM wh.main.{table}")
            if parts:
                views[table] = " UNION ALL ".join(parts)
        con.execute("BEGIN TRANSACTION")
        for table, sql in views.items():
            if table == "points":  # every run stores its dataset's points: one row each, with a thumbnail if any has
                sql = (f"SELECT DISTINCT ON (dataset, point_id) * FROM ({sql}) "
                       f"ORDER BY dataset, point_id, thumbnail IS NULL")
            elif table == "membership":  # a run's file and its merged copy
                sql = f"SELECT DISTINCT * FROM ({sql})"
            con.execute(f"DROP TABLE main.{table}")
            con.execute(f"CREATE VIEW main.{table} AS {sql}")
        for r in runs:
            row = {c: r["run"].get(c) for c in RUN_COLUMNS}
            row["status"] = r["manifest"].get("status", row.get("status"))
            row["committed_step"] = r["manifest"].get("committed_step")
            cols = [c for c in RUN_COLUMNS if row.get(c) is not None]
            con.execute(f"INSERT INTO runs ({', '.join(cols)}, config) VALUES ({', '.join('?' for _ in cols)}, ?)",
                        [row[c] for c in cols] + [json.dumps(r["run"].get("config") or {})])
        if attached:
            con.execute("INSERT INTO runs SELECT * FROM wh.main.runs WHERE run_id NOT IN (SELECT run_id FROM runs)")
            if read_only:  # the reader sees the database's other tables as they are
                for (table,) in con.execute(
                        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                        "AND schema_name = 'main' AND table_name NOT IN (SELECT unnest(?)) ORDER BY 1",
                        [["runs", *views]]).fetchall():
                    cols = ", ".join(r[0] for r in con.execute(
                        "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
                        "AND schema_name = 'main' AND table_name = ? ORDER BY column_index", [table]).fetchall())
                    con.execute(f"DROP TABLE main.{table}")
                    con.execute(f"CREATE VIEW main.{table} AS SELECT {cols} FROM wh.main.{table}")
        con.execute("UPDATE runs SET config_key = run_config_key(dataset, model, sample_rate, noise_multiplier, "
                    "max_grad_norm, steps)")
        con.execute("COMMIT")
        if read_only:
            if not allow_files:
                readable = sorted({f for r in runs for fs in r["files"].values() for f in fs})
                con.execute("SET allowed_paths = ?", [readable])
                con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con
