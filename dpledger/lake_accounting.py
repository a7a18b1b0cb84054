"""Per-example ε over a Parquet lake, in place (``dpledger account --lake LAKE``).

A face workflow: it ties the lake reader, the accounting job, the Ray executor and
the loader together. The runs are composed over the lake's committed shards
(:func:`dpledger.warehouse.lake.connect_lake`:
DuckDB streams the Parquet, out of core), one run at a time or one Ray task per run
(``executor="ray"``), and the results (``accountings``, ``point_epsilon``,
``config_epsilon``) are written to the database with the runs and their points, so
``rank``, ``report`` and SQL find them without the per-step rows being loaded.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpledger.ingest import load
from dpledger.ingest.ray_executor import map_tasks
from dpledger.warehouse.accounting import account
from dpledger.warehouse.config_epsilon import refresh_config_epsilon
from dpledger.warehouse.db import connect
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.lake import connect_lake, lake_runs
from dpledger.warehouse.runs import unknown_run
from dpledger.warehouse.sqlutil import transaction

RESULT_TABLES = ("accountings", "point_epsilon", "config_epsilon")


def _account_runs(lake: str, run_ids: list[str], options: dict) -> tuple[list[dict], dict[str, pa.Table]]:
    con = connect_lake(lake, memory_limit=options.pop("memory_limit", None),
                       temp_directory=options.pop("temp_directory", None))
    try:
        summaries = account(con, run_ids, **options)
        return summaries, {t: con.sql(f"SELECT * FROM {t}").to_arrow_table() for t in RESULT_TABLES}
    finally:
        con.close()


def account_lake(lake: str | Path, db, run_ids: list[str] | None = None, *, executor: str = "local",
                 address: str | None = None, memory_limit: str | None = "4GB", temp_directory=None,
                 **options) -> list[dict]:
    """Account the lake's runs (all by default) and store the results in ``db``."""
    runs = {r["run"]["run_id"]: r for r in lake_runs(lake)}
    wanted = list(run_ids) if run_ids else sorted(runs)
    missing = [r for r in wanted if r not in runs]
    if missing:
        raise unknown_run(missing[0], sorted(runs)[:8], f" in lake {lake}")
    if not wanted:
        raise UserError(f"{lake}: no committed runs")
    base = {**options, "memory_limit": memory_limit, "temp_directory": str(temp_directory) if temp_directory else None}
    if executor == "local" or options.get("rule") == "gla":
        # gla composes whole configurations at once: one task for all
        parts = [_account_runs(str(lake), wanted, dict(base))]
    elif executor == "ray":
        parts = map_tasks(_account_runs, [(str(lake), [r], dict(base)) for r in wanted], address=address)
    else:
        raise UserError(f"executor {executor}: expected local or ray", "executor")
    summaries = [s for part in parts for s in part[0]]
    results = {t: pa.concat_tables([p[1][t] for p in parts]) for t in RESULT_TABLES}
    con = connect(db)
    try:
        with transaction(con):
            for run_id in wanted:
                item = runs[run_id]
                run = dict(item["run"])
                load.ensure_run(con, run, str(item["dir"] / "run.json"))
                con.execute("UPDATE runs SET status = ?, committed_step = ? WHERE run_id = ?",
                            [item["manifest"].get("status"), item["manifest"].get("committed_step"), run_id])
                points = item["dir"] / "points.parquet"
                if points.exists():
                    load.insert_points(con, pq.read_table(points))
            keys = {r[0] for r in con.execute("SELECT config_key FROM runs WHERE run_id IN (SELECT unnest(?))",
                                              [wanted]).fetchall()}
            con.execute("DELETE FROM accountings WHERE run_id IN (SELECT unnest(?)) AND rule = ?",
                        [wanted, options.get("rule", "rdp")])
            con.execute("DELETE FROM point_epsilon WHERE run_id IN (SELECT unnest(?)) AND rule = ?",
                        [wanted, options.get("rule", "rdp")])
            con.execute("DELETE FROM config_epsilon WHERE config_key IN (SELECT unnest(?)) AND rule = ?",
                        [sorted(keys), options.get("rule", "rdp")])
            rule = options.get("rule", "rdp")
            for table in RESULT_TABLES:
                # per-run tasks each saw only their run: the across-run rdp figures are redone below
                if results[table].num_rows and not (table == "config_epsilon" and rule == "rdp"):
                    load.append_rows(con, table, results[table])
            if rule == "rdp":
                for key in sorted(keys):
                    refresh_config_epsilon(con, key, "rdp")
    finally:
        con.close()
    return summaries


__all__ = ["account_lake"]
