"""Workflows that tie the layers together: train into a database, sweep then merge.

The face's job: each function here is what one CLI command does, callable from a
notebook with the same result (a sweep run from Python leaves its rows in the
database, not only in the lake).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dpledger.ingest.shards import ingest_shards
from dpledger.ingest.sinks import DuckDBSink
from dpledger.ingest.sweep import MAX_RUNS, check_executor, load_config
from dpledger.ingest.sweep import run as run_sweep
from dpledger.ingest.worker import TrainConfig, validate
from dpledger.ingest.worker import train as train_with_sink
from dpledger.warehouse.db import connect, default_lake, resolve_db_path
from dpledger.warehouse.lake import has_runs


def train(cfg: TrainConfig, db=None, *, resume: bool = False,
          on_progress: Callable[[dict], None] | None = None) -> dict:
    """Train one DP-SGD run (``cfg``) recording into the database ``db``; returns its summary.

    ``resume=True`` continues run ``cfg.run`` from its last committed step. Checkpoints
    and resume state go to ``runs/`` beside the database.
    """
    db_path = resolve_db_path(db)
    if not resume:
        validate(cfg)  # bad options fail before a database is created
    sink = DuckDBSink(db_path)
    try:
        summary = train_with_sink(cfg, sink, resume=resume, db_dir=db_path.resolve().parent, on_progress=on_progress)
    finally:
        sink.close()
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
