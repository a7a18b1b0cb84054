"""Where a training worker's rows go: straight into DuckDB, or into Parquet shards.

:class:`Sink` is the interface (a ``typing.Protocol``) the worker writes through.
Both sinks commit a batch of steps atomically together with a progress marker (the
last committed step), so a killed worker loses nothing it committed and a resumed
one neither duplicates nor skips rows:

* :class:`DuckDBSink` — one process, one database: each commit is one transaction
  (rows + ``runs.committed_step``).
* :class:`ShardSink` — many workers, one lake folder: each commit writes one Parquet
  file per table under ``lake/run_id=<id>/<table>/part-<worker>-<seq>.parquet``
  (temporary name, then rename: :mod:`ingest.atomic`), then replaces the run's
  ``manifest.json`` (again temporary name + rename). A shard exists for readers only once the manifest lists
  it; ``dpledger ingest shards`` merges committed shards into a database, idempotently.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from dpledger.warehouse.db import connect
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.sqlutil import append_arrow, transaction

from . import load
from .atomic import atomic_write_bytes, atomic_write_parquet, remove_quietly

TABLES = ("point_steps", "steps", "evaluations", "checkpoints")
_SAFE = re.compile(r"^[A-Za-z0-9._=+-]+$")


def safe_run_id(run_id: str) -> str:
    """Run ids name folders in the lake: letters, digits and . _ = + - only."""
    if not run_id or not _SAFE.match(run_id) or run_id in (".", ".."):
        raise UserError(f"run name {run_id!r}: use letters, digits and . _ = + - only")
    return run_id


class Sink(Protocol):
    """Where a training worker's rows go. A commit is atomic: its rows and the progress
    marker (the last committed step) become visible together, or not at all."""

    def committed_step(self, run_id: str) -> int | None:
        """The last step of ``run_id`` whose rows are committed (None: nothing committed yet)."""

    def run_exists(self, run_id: str) -> bool:
        """Whether the sink already holds run ``run_id`` (begun, committed or not)."""

    def stored_config(self, run_id: str) -> dict | None:
        """The ``config`` the run was begun with (its ``train`` options for a resume), or None."""

    def begin(self, run: dict, points: pa.Table, membership: pa.Table | None) -> None:
        """Record the run (its ``runs`` row as a dict, status running), its points and its
        membership rows; an existing run must agree with ``run``. Called again on resume."""

    def commit(self, run_id: str, step: int, tables: dict[str, pa.Table | None]) -> None:
        """Append the rows of :data:`TABLES` (a table may be None or empty) and set the
        committed step to ``step``, atomically."""

    def finish(self, run_id: str, status: str) -> None:
        """Set the run's status: ``finished`` or ``failed``."""

    def close(self) -> None:
        """Release what the sink holds (a database connection)."""


class DuckDBSink:
    """A :class:`Sink`: rows straight into the warehouse; one transaction per commit."""

    def __init__(self, db_path):
        self.con = connect(db_path)

    def committed_step(self, run_id: str) -> int | None:
        row = self.con.execute("SELECT committed_step FROM runs WHERE run_id = ?", [run_id]).fetchall()
        return row[0][0] if row else None

    def run_exists(self, run_id: str) -> bool:
        return bool(self.con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0])

    def stored_config(self, run_id: str) -> dict | None:
        row = self.con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchall()
        return json.loads(row[0][0]) if row and row[0][0] else None

    def begin(self, run: dict, points: pa.Table, membership: pa.Table | None) -> None:
        with transaction(self.con):
            load.ensure_run(self.con, run, f"run {run['run_id']}")
            self.con.execute("UPDATE runs SET status = 'running', run_dir = ?, config = ?, updated_at = now() "
                             "WHERE run_id = ?", [run.get("run_dir"), json.dumps(run.get("config") or {}),
                                                  run["run_id"]])
            load.insert_points(self.con, points)
            if membership is not None and membership.num_rows:
                append_arrow(self.con, "membership", membership.select(["run_id", "point_id", "in_train"]),
                             verb="INSERT OR IGNORE")

    def commit(self, run_id: str, step: int, tables: dict[str, pa.Table]) -> None:
        with transaction(self.con):
            for name in TABLES:
                t = tables.get(name)
                if t is not None and t.num_rows:
                    load.append_rows(self.con, name, t)
            self.con.execute("UPDATE runs SET committed_step = ?, updated_at = now() WHERE run_id = ?",
                             [step, run_id])

    def finish(self, run_id: str, status: str) -> None:
        self.con.execute("UPDATE runs SET status = ?, updated_at = now() WHERE run_id = ?", [status, run_id])

    def close(self) -> None:
        self.con.close()


class ShardSink:
    """A :class:`Sink`: rows as Parquet shards in a lake folder, committed by the run's manifest."""

    def __init__(self, lake: str | os.PathLike, worker: str = "w0"):
        self.lake = Path(lake)
        self.worker = worker
        try:
            self.lake.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the lake folder {self.lake}: {exc.strerror or exc}") from None

    def run_dir(self, run_id: str) -> Path:
        return self.lake / f"run_id={safe_run_id(run_id)}"

    def manifest(self, run_id: str) -> dict | None:
        path = self.run_dir(run_id) / "manifest.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def committed_step(self, run_id: str) -> int | None:
        m = self.manifest(run_id)
        return None if m is None else m.get("committed_step")

    def run_exists(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / "run.json").exists()

    def stored_config(self, run_id: str) -> dict | None:
        path = self.run_dir(run_id) / "run.json"
        return json.loads(path.read_text()).get("config") if path.exists() else None

    def begin(self, run: dict, points: pa.Table, membership: pa.Table | None) -> None:
        d = self.run_dir(run["run_id"])
        try:
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_parquet(d / "points.parquet", points)
            if membership is not None:
                atomic_write_parquet(d / "membership.parquet", membership)
            atomic_write_bytes(d / "run.json", json.dumps(run, sort_keys=True, default=str).encode())
            if self.manifest(run["run_id"]) is None:
                self._write_manifest(run["run_id"], {"run_id": run["run_id"], "committed_step": None,
                                                     "status": "running", "shards": []})
            self._drop_uncommitted(run["run_id"])
        except OSError as exc:
            raise UserError(f"cannot write to the lake folder {d}: {exc.strerror or exc}") from None

    def _drop_uncommitted(self, run_id: str) -> None:
        """Remove what a writer killed mid-commit left in the run's folder: temporary files,
        and shards renamed into place that the manifest never listed (a reader globbing the
        lake would count their rows; the resumed run writes those steps again, possibly
        under another worker's name)."""
        d = self.run_dir(run_id)
        listed = {info["path"] for shard in self.manifest(run_id)["shards"] for info in shard["files"].values()}
        stale = list(d.glob(".*.tmp"))
        for name in TABLES:
            stale += [p for p in (d / name).glob("*") if f"{name}/{p.name}" not in listed
                      and (p.name.endswith(".tmp") or p.name.startswith("part-"))]
        for p in stale:
            p.unlink(missing_ok=True)

    def _write_manifest(self, run_id: str, manifest: dict) -> None:
        atomic_write_bytes(self.run_dir(run_id) / "manifest.json", json.dumps(manifest, indent=1).encode())

    def commit(self, run_id: str, step: int, tables: dict[str, pa.Table]) -> None:
        d = self.run_dir(run_id)
        manifest = self.manifest(run_id)
        seq = len(manifest["shards"])
        shard = {"seq": seq, "worker": self.worker, "committed_step": step, "files": {}}
        try:
            for name in TABLES:
                t = tables.get(name)
                if t is None or not t.num_rows:
                    continue
                (d / name).mkdir(exist_ok=True)
                rel = f"{name}/part-{self.worker}-{seq:06d}.parquet"
                atomic_write_parquet(d / rel, t)
                shard["files"][name] = {"path": rel, "rows": t.num_rows}
            manifest["shards"].append(shard)
            manifest["committed_step"] = step
            self._write_manifest(run_id, manifest)
        except OSError as exc:
            for info in shard["files"].values():  # renamed into place, but the commit did not happen
                remove_quietly(d / info["path"])
            raise UserError(f"cannot write shards to {d}: {exc.strerror or exc}") from None

    def finish(self, run_id: str, status: str) -> None:
        manifest = self.manifest(run_id)
        manifest["status"] = status
        try:
            self._write_manifest(run_id, manifest)
        except OSError as exc:
            raise UserError(f"cannot write {self.run_dir(run_id) / 'manifest.json'}: {exc.strerror or exc}") from None

    def close(self) -> None:
        pass


__all__ = ["TABLES", "DuckDBSink", "ShardSink", "Sink", "safe_run_id"]
