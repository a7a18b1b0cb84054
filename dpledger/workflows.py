"""Workflows that tie the layers together: train into a database, sweep then merge.

The face's job: each function here is what one CLI command does, callable from a
notebook with the same result (a sweep run from Python leaves its rows in the
database, not only in the lake).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dpledger.ingest.shards import ingest_shards
from dpledger.ingest.sinks import DuckDBSink, ShardSink
from dpledger.ingest.sweep import MAX_RUNS, check_executor, load_config
from dpledger.ingest.sweep import run as run_sweep
from dpledger.ingest.worker import TrainConfig, default_run_name, validate
from dpledger.ingest.worker import train as train_with_sink
from dpledger.warehouse.db import connect, default_lake, resolve_db_path
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.lake import has_runs


SINKS = ("lake", "database")


def train(cfg: TrainConfig, db=None, *, resume: bool = False, sink: str = "lake",
          on_progress: Callable[[dict], None] | None = None) -> dict:
    """Train one DP-SGD run (``cfg``) recording into the warehouse ``db``; returns its summary.

    The rows go as committed Parquet shards to the project's lake (``lake/`` beside the
    database; the run's lock makes it the only writer), so readers are never locked out
    while it trains; when it ends they are merged into the database. If the database is
    held too long by another process, the run stays safe in the lake (``merged`` False in
    the summary) and the next command that merges takes it. ``sink="database"`` writes
    straight into the database instead (holding it while training). ``resume=True`` continues run
    ``cfg.run`` from its last committed step. Checkpoints and resume state go to ``runs/``
    beside the database.
    """
    if sink not in SINKS:
        raise UserError(f"sink {sink}: expected one of {', '.join(SINKS)}", "sink")
    db_path = resolve_db_path(db)
    if not resume:
        validate(cfg)  # bad options fail before a database is created
    lake = default_lake(db_path)
    run_id = cfg.run or default_run_name(cfg)
    con = connect(db_path)  # the database now: a bad path fails before training
    try:
        in_database = bool(con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0])
    finally:
        con.close()
    in_lake = (lake / f"run_id={run_id}" / "manifest.json").exists()
    if in_database and not in_lake and not resume and sink == "lake":
        raise UserError(f"run '{run_id}' exists already; use resume {run_id} or another run name", "resume")
    if sink == "database" or (resume and in_database and not in_lake):  # resumed where it was recorded
        writer = DuckDBSink(db_path)
    else:
        writer = ShardSink(lake, worker="train")
    try:
        summary = train_with_sink(cfg, writer, resume=resume, db_dir=db_path.resolve().parent,
                                  on_progress=on_progress)
    finally:
        writer.close()
    summary = {**summary, "merged": True}
    if isinstance(writer, ShardSink):
        try:
            connect_merged(db_path).close()
        except UserError as exc:
            summary.update(merged=False, merge_error=str(exc))
    return {**summary, **run_epsilon(db_path, summary["run_id"])}


def connect_merged(db=None, *, on_merge: Callable[[Path, int], None] | None = None):
    """A read-write connection to the database with the project's lake (``lake/`` beside it)
    merged in first: every committed shard not merged yet (idempotent; a run still being
    written is merged up to its last commit and again later). What commands that compute
    from the rows (account, fit, ...) open."""
    db_path = resolve_db_path(db)
    con = connect(db_path)
    lake = default_lake(db_path)
    if has_runs(lake):
        try:
            rows = sum(r["rows"] for r in ingest_shards(con, lake))
        except BaseException:
            con.close()
            raise
        if rows and on_merge:
            on_merge(lake, rows)
    return con


def run_epsilon(db, run_id: str) -> dict:
    """The run's data-independent ε (every example at the clipping norm, every step), as stored
    parameters give it: ``{"epsilon", "epsilon_order", "delta", "private"}`` (ε None for a
    non-private run)."""
    con = connect(db, read_only=True)
    try:
        row = con.execute("SELECT r.private, r.delta, e.epsilon, e.best_order FROM runs r "
                          "JOIN run_epsilon e USING (run_id) WHERE run_id = ?", [run_id]).fetchall()
    finally:
        con.close()
    private, delta, eps, order = row[0] if row else (None, None, None, None)
    return {"private": private, "delta": delta, "epsilon": eps, "epsilon_order": order}


def sweep(config: str | Path | list[TrainConfig], db=None, *, lake: str | Path | None = None,
          executor: str = "local", workers: int = 1, address: str | None = None, max_runs: int = MAX_RUNS,
          on_done: Callable[[dict, int, int], None] | None = None) -> dict:
    """Train a grid of runs (a TOML file, or configs) into a Parquet lake, then merge it into ``db``.

    The lake defaults to ``lake/`` beside the database. A grid of more than ``max_runs``
    runs is refused before anything is expanded. Returns ``{"runs": [...], "merged": [...],
    "lake": ..., "db": ...}``; failed runs are in ``runs`` with their error.
    """
    check_executor(executor, workers, address)
    configs = config if isinstance(config, list) else load_config(config, max_runs=max_runs)
    db_path = resolve_db_path(db)
    lake_dir = Path(lake) if lake is not None else db_path.resolve().parent / "lake"
    connect(db_path).close()  # a bad database path fails now, not after training
    results = run_sweep(configs, lake_dir, executor, workers, address, on_done=on_done)
    con = connect(db_path)
    try:
        merged = ingest_shards(con, lake_dir)
    finally:
        con.close()
    return {"runs": results, "merged": merged, "lake": str(lake_dir), "db": str(db_path)}
