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

One writer per run: a :class:`ShardSink` holds the run's lock (:class:`RunLock`, the file
``writer.lock`` in the run's folder, made with ``O_CREAT | O_EXCL`` and holding the owner's
pid, host and process start time) from its first write of the run (or an explicit
:meth:`ShardSink.acquire`) until :meth:`ShardSink.finish` or :meth:`ShardSink.close`. A
second writer of the run gets :class:`RunLocked` ("locked by pid N on host H"): a sweep
skips the run, a training call fails with one line. A lock whose pid is dead on this host
(or was reused by another process since) is stale and taken over; a lock of another host
is never taken over (delete ``writer.lock`` by hand once that writer is known to be gone).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from dpledger.warehouse.db import connect
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.sqlutil import append_arrow, transaction

from . import load
from .atomic import atomic_write_bytes, atomic_write_parquet, fsync_path, remove_quietly

TABLES = ("point_steps", "steps", "evaluations", "checkpoints")
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
MAX_RUN_ID = 200  # a folder name is at most 255 bytes: run_id=<id>, and room for temporary names


def safe_run_id(run_id) -> str:
    """The one rule for run names (they name folders in the lake, ``run_id=<id>``, and appear in
    one-line messages): letters, digits and . _ + - only, not starting with . + or -, at most
    :data:`MAX_RUN_ID` characters. ``=`` (a Hive partition of its own in the lake: it broke
    every lake reader), ``/``, spaces, newlines and other control characters are refused."""
    if not isinstance(run_id, str) or not _SAFE.fullmatch(run_id) or len(run_id) > MAX_RUN_ID:
        shown = repr(run_id) if len(repr(run_id)) <= 80 else repr(run_id)[:77] + "..."
        raise UserError(f"run name {shown}: use letters, digits and . _ + - only (not = / spaces or "
                        f"control characters), starting with a letter, digit or _, at most {MAX_RUN_ID} "
                        "characters")
    return run_id


LOCK_NAME = "writer.lock"
_HELD: dict[str, str] = {}  # lock file -> token, for the run locks this process holds


class RunLocked(UserError):
    """Another writer holds the run's lock; ``owner`` says who ("locked by pid N on host H")."""

    def __init__(self, message: str, owner: str):
        super().__init__(message)
        self.owner = owner


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """The one-writer lock of a run folder: ``folder/writer.lock``."""

    STARTING_S = 30.0  # a lock file without its content yet: its writer is starting (or died doing so)

    def __init__(self, folder: Path, run_id: str):
        self.folder, self.run_id = Path(folder), run_id
        self.path = self.folder / LOCK_NAME
        self.token: str | None = None

    def _owner(self) -> dict | None:
        """The lock file's content (None: no lock file); ``{}`` if it is empty or unreadable."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            info = json.loads(data)
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def _alive(self, info: dict) -> bool:
        """Whether the lock's owner may still be writing (another host's always may)."""
        if not info:  # no content yet: a writer between creating and filling it, unless it is old
            try:
                return time.time() - self.path.stat().st_mtime < self.STARTING_S
            except OSError:
                return False
        if info.get("host") != socket.gethostname():
            return True
        pid = info.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        if pid == os.getpid():  # this process: live if one of its sinks holds it, stale if one failed to release it
            return _HELD.get(str(self.path)) == info.get("token")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # alive, another user's
        start = info.get("start")
        return not (start and _process_start(pid) not in (None, start))  # a reused pid is another process

    @staticmethod
    def describe(info: dict) -> str:
        if not info:
            return "locked by a writer that is starting"
        return f"locked by pid {info.get('pid')} on host {info.get('host')}"

    def _take_over(self, info: dict) -> None:
        """Remove the stale lock ``info`` was read from, unless another writer replaced it meanwhile:
        every taker holds ``flock`` on the stale file and checks it is still the one at the path."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another writer is taking it over; look again
            now = os.stat(self.path)
            mine = os.fstat(fd)
            if (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            try:
                same = (json.loads(data) if data else {}) == info
            except ValueError:
                same = info == {}
            if same:
                os.unlink(self.path)
        except FileNotFoundError:
            return
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLocked` naming its live owner."""
        if self.token is not None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write to the lake folder {self.folder}: {exc.strerror or exc}") from None
        token = uuid.uuid4().hex
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                           "token": token, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self._owner()
                if info is None:
                    continue  # released meanwhile
                if self._alive(info):
                    owner = self.describe(info)
                    raise RunLocked(f"run {self.run_id} in {self.folder.parent} is {owner} (another writer "
                                    f"of the run; its lock is {self.path})", owner) from None
                self._take_over(info)
                time.sleep(0.01)
                continue
            except OSError as exc:
                raise UserError(f"cannot write to the lake folder {self.folder}: {exc.strerror or exc}") from None
            try:
                os.write(fd, body)
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                _unlink_quietly(self.path)
                raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None
            os.close(fd)
            self.token = token
            _HELD[str(self.path)] = token
            return
        raise UserError(f"run {self.run_id}: could not take its lock {self.path} (writers keep replacing it)")

    def release(self) -> None:
        """Give the lock up (best effort: a lock left behind, e.g. in a read-only folder, is stale)."""
        if self.token is None:
            return
        token, self.token = self.token, None
        _HELD.pop(str(self.path), None)
        info = self._owner()
        if info and info.get("token") == token:
            _unlink_quietly(self.path)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


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
    """A :class:`Sink`: rows straight into the warehouse; one transaction per commit. A write
    the disk refuses (full, gone read-only) is one :class:`UserError` naming the database, the
    transaction rolled back: the run stays at its last commit and can be resumed."""

    def __init__(self, db_path):
        self.db_path = db_path
        self.con = connect(db_path)

    @contextmanager
    def _writing(self, what: str):
        try:
            yield
        except (duckdb.IOException, duckdb.OutOfMemoryException, duckdb.FatalException) as exc:
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise UserError(f"cannot {what} in {self.db_path}: {detail[:300]}") from None

    def committed_step(self, run_id: str) -> int | None:
        row = self.con.execute("SELECT committed_step FROM runs WHERE run_id = ?", [run_id]).fetchall()
        return row[0][0] if row else None

    def run_exists(self, run_id: str) -> bool:
        return bool(self.con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0])

    def stored_config(self, run_id: str) -> dict | None:
        row = self.con.execute("SELECT config FROM runs WHERE run_id = ?", [run_id]).fetchall()
        return json.loads(row[0][0]) if row and row[0][0] else None

    def begin(self, run: dict, points: pa.Table, membership: pa.Table | None) -> None:
        with self._writing(f"record run {run['run_id']}"), transaction(self.con):
            load.ensure_run(self.con, run, f"run {run['run_id']}")
            self.con.execute("UPDATE runs SET status = 'running', run_dir = ?, config = ?, updated_at = now() "
                             "WHERE run_id = ?", [run.get("run_dir"), json.dumps(run.get("config") or {}),
                                                  run["run_id"]])
            load.insert_points(self.con, points)
            if membership is not None and membership.num_rows:
                append_arrow(self.con, "membership", membership.select(["run_id", "point_id", "in_train"]),
                             verb="INSERT OR IGNORE")

    def commit(self, run_id: str, step: int, tables: dict[str, pa.Table]) -> None:
        with self._writing(f"commit step {step} of run {run_id}"), transaction(self.con):
            for name in TABLES:
                t = tables.get(name)
                if t is not None and t.num_rows:
                    load.append_rows(self.con, name, t)
            self.con.execute("UPDATE runs SET committed_step = ?, updated_at = now() WHERE run_id = ?",
                             [step, run_id])

    def finish(self, run_id: str, status: str) -> None:
        with self._writing(f"mark run {run_id} {status}"):
            self.con.execute("UPDATE runs SET status = ?, updated_at = now() WHERE run_id = ?", [status, run_id])

    def close(self) -> None:
        self.con.close()


class ShardSink:
    """A :class:`Sink`: rows as Parquet shards in a lake folder, committed by the run's manifest.

    Writes a run only while holding its :class:`RunLock` (taken on the first write, or by
    :meth:`acquire`; released by :meth:`finish` and :meth:`close`)."""

    def __init__(self, lake: str | os.PathLike, worker: str = "w0"):
        self.lake = Path(lake)
        self.worker = worker
        self._locks: dict[str, RunLock] = {}
        self._staged: dict[tuple[str, str], list] = {}  # (run, table) -> [ParquetWriter, temporary path, rows]
        try:
            self.lake.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the lake folder {self.lake}: {exc.strerror or exc}") from None

    def run_dir(self, run_id: str) -> Path:
        return self.lake / f"run_id={safe_run_id(run_id)}"

    def acquire(self, run_id: str) -> None:
        """Take the run's writer lock (:class:`RunLocked` if another live writer holds it)."""
        if run_id not in self._locks:
            lock = RunLock(self.run_dir(run_id), run_id)
            lock.acquire()
            self._locks[run_id] = lock

    def release(self, run_id: str) -> None:
        lock = self._locks.pop(run_id, None)
        if lock is not None:
            lock.release()

    def manifest(self, run_id: str) -> dict | None:
        path = self.run_dir(run_id) / "manifest.json"
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise UserError(f"{path}: not a manifest (no list of shards)")
        return manifest

    def committed_step(self, run_id: str) -> int | None:
        m = self.manifest(run_id)
        return None if m is None else m.get("committed_step")

    def run_exists(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / "run.json").exists()

    def stored_config(self, run_id: str) -> dict | None:
        path = self.run_dir(run_id) / "run.json"
        return json.loads(path.read_text()).get("config") if path.exists() else None

    def begin(self, run: dict, points: pa.Table, membership: pa.Table | None) -> None:
        self.acquire(run["run_id"])
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
        under another worker's name). Only ever called holding the run's lock: another
        writer's shard in flight is not a leftover."""
        d = self.run_dir(run_id)
        listed = {info["path"] for shard in self.manifest(run_id)["shards"] for info in shard["files"].values()}
        stale = list(d.glob(".*.tmp"))
        for name in TABLES:
            stale += [p for p in (d / name).glob("*") if f"{name}/{p.name}" not in listed
                      and (p.name.endswith(".tmp") or p.name.startswith("part-"))]
        for p in stale:
            p.unlink(missing_ok=True)

    def stage(self, run_id: str, tables: dict[str, pa.Table]) -> None:
        """Write rows ahead of their commit: appended (a row group each) to the temporary file of
        the table's next shard, ``<table>/.stage-<worker>-<random>.parquet.tmp``, made durable as
        it grows. The next :meth:`commit` closes it, renames it to its shard's name and lists it;
        until then no reader sees it, and a crash leaves only a temporary file, which
        :meth:`begin` of the resumed run removes (those steps run again)."""
        self.acquire(run_id)
        d = self.run_dir(run_id)
        try:
            for name in TABLES:
                t = tables.get(name)
                if t is None or not t.num_rows:
                    continue
                entry = self._staged.get((run_id, name))
                if entry is None:
                    (d / name).mkdir(exist_ok=True)
                    tmp = d / name / f".stage-{self.worker}-{uuid.uuid4().hex}.parquet.tmp"
                    entry = self._staged[(run_id, name)] = [pq.ParquetWriter(tmp, t.schema), tmp, 0]
                writer = entry[0]
                writer.write_table(t if t.schema == writer.schema else t.cast(writer.schema))
                entry[2] += t.num_rows
                fsync_path(entry[1])  # the commit then only has the tail to flush
        except OSError as exc:
            self.discard_staged(run_id)
            raise UserError(f"cannot write shards to {d}: {exc.strerror or exc}") from None

    def discard_staged(self, run_id: str) -> None:
        """Drop the rows staged for the run's next commit (their temporary files)."""
        for key in [k for k in self._staged if k[0] == run_id]:
            writer, tmp, _ = self._staged.pop(key)
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the file goes anyway
                pass
            remove_quietly(tmp)

    def _write_manifest(self, run_id: str, manifest: dict) -> None:
        atomic_write_bytes(self.run_dir(run_id) / "manifest.json", json.dumps(manifest, indent=1).encode())

    def commit(self, run_id: str, step: int, tables: dict[str, pa.Table]) -> None:
        self.acquire(run_id)
        d = self.run_dir(run_id)
        manifest = self.manifest(run_id)
        if manifest is None:
            raise UserError(f"run {run_id}: no manifest in {d} to commit to (begin the run first)")
        last = manifest.get("committed_step")
        if last is not None and step <= last:  # never out of order, never twice
            raise UserError(f"run {run_id}: step {step} is committed in {d} already (up to step {last}); "
                            "another writer has run it")
        seq = len(manifest["shards"])
        shard = {"seq": seq, "worker": self.worker, "committed_step": step, "files": {}}
        try:
            for name in TABLES:
                t = tables.get(name)
                staged = self._staged.pop((run_id, name), None)
                rel = f"{name}/part-{self.worker}-{seq:06d}.parquet"
                if staged is not None:  # rows staged ahead: the rest appended, then the file renamed into place
                    writer, tmp, rows = staged
                    try:
                        if t is not None and t.num_rows:
                            writer.write_table(t if t.schema == writer.schema else t.cast(writer.schema))
                            rows += t.num_rows
                        writer.close()
                        fsync_path(tmp)
                        os.replace(tmp, d / rel)
                    except BaseException:
                        remove_quietly(tmp)
                        raise
                    shard["files"][name] = {"path": rel, "rows": rows}
                    continue
                if t is None or not t.num_rows:
                    continue
                (d / name).mkdir(exist_ok=True)
                atomic_write_parquet(d / rel, t)
                shard["files"][name] = {"path": rel, "rows": t.num_rows}
            manifest["shards"].append(shard)
            manifest["committed_step"] = step
            self._write_manifest(run_id, manifest)
        except OSError as exc:
            for info in shard["files"].values():  # renamed into place, but the commit did not happen
                remove_quietly(d / info["path"])
            self.discard_staged(run_id)
            raise UserError(f"cannot write shards to {d}: {exc.strerror or exc}") from None

    def finish(self, run_id: str, status: str) -> None:
        self.discard_staged(run_id)  # rows never committed
        try:
            self.acquire(run_id)
            manifest = self.manifest(run_id)
            if manifest is None:
                return
            manifest["status"] = status
            try:
                self._write_manifest(run_id, manifest)
            except OSError as exc:
                raise UserError(f"cannot write {self.run_dir(run_id) / 'manifest.json'}: "
                                f"{exc.strerror or exc}") from None
        finally:
            self.release(run_id)

    def close(self) -> None:
        for run_id, _ in list(self._staged):
            self.discard_staged(run_id)
        for run_id in list(self._locks):
            self.release(run_id)


__all__ = ["LOCK_NAME", "TABLES", "DuckDBSink", "RunLock", "RunLocked", "ShardSink", "Sink", "safe_run_id"]
