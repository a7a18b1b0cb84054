"""The lake's integrity against what other processes and files can do to it.

* Manifest paths (and symlinks) leading out of a run's folder are refused by the merge
  (``ingest shards``) and by the lake's readers (``query --lake``), with one line naming
  the manifest and the path: one rule, :func:`dpledger.warehouse.lake.run_file`.
* One writer per run: a second writer of a run another live process holds skips it
  (sweep) or fails with one line (training into the lake); a stale lock (dead pid) is
  taken over; the lake stays mergeable and merges to one uninterrupted run's rows.
* Run names that break the lake (``a=b``: a Hive partition of its own) or one-line
  messages (newlines, control characters) are refused by ``safe_run_id``, the one rule.
* A merge waits for a database another process holds, and a merge that fails midway
  leaves the database as it was; a shard lacking ``norm_clipped`` is one line, nothing
  merged; a full disk during a train commit is one line, nothing half committed, and
  the run resumes.

Runs are tiny (digits, logreg, 60 training points, batch 20: 3 steps, a commit each).
Lakes live in folders named ``L`` (never ``lake/`` beside a database: reads of a database
see the lake beside it too).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import REPO, query_rows as _q, table_snapshot

CFG = dict(dataset="digits", model="logreg", epochs=1, n_train=60, n_test=20, batch_size=20,
           noise_multiplier=1.0, track="6", commit_every=1)
STEPS, TRACKED = 3, 6
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
TRAIN_FLAGS = ["--dataset", "digits", "--model", "logreg", "--n-train", "60", "--n-test", "20", "--epochs", "1",
               "--batch-size", "20", "--noise-multiplier", "1.0", "--track", "6", "--commit-every", "1"]


def _train_into_lake(lake: Path, run: str, **overrides) -> dict:
    from dpledger.ingest.sinks import ShardSink
    from dpledger.ingest.worker import TrainConfig, train

    sink = ShardSink(lake)
    try:
        return train(TrainConfig(run=run, run_dir=str(lake / f"run_id={run}"), **{**CFG, **overrides}), sink)
    finally:
        sink.close()


def _error(r) -> str:
    """The one error line of a CLI result (progress lines, '<phase>...', aside)."""
    lines = [line for line in r.err.strip().splitlines() if not line.endswith("...")]
    assert r.rc == 2, r
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err
    return lines[0]


def _sweep_config(path: Path, prefix: str, seeds=(0,), **extra) -> Path:
    opts = {**CFG, "run": prefix, **extra}
    lines = ["[base]"] + [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    lines += ["[grid]", f"seed = {json.dumps(list(seeds))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _db(folder: Path) -> Path:
    """A database path in its own folder (made), away from any lake."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "w.duckdb"


def _rows(db: Path, run: str | None = None) -> list[tuple]:
    where = f"WHERE run_id = '{run}'" if run else ""
    return _q(db, f"SELECT run_id, step, point_id, grad_norm, norm_clipped, loss, sampled FROM point_steps "
                  f"{where} ORDER BY ALL")


@pytest.fixture(scope="module")
def clean_lake(tmp_path_factory) -> Path:
    """A lake with two finished runs, a and b."""
    root = tmp_path_factory.mktemp("clean")
    for run, seed in (("a", 0), ("b", 1)):
        _train_into_lake(root / "L", run, seed=seed)
    return root / "L"


@pytest.fixture
def lake(clean_lake, tmp_path) -> Path:
    out = tmp_path / "L"
    shutil.copytree(clean_lake, out, symlinks=True)
    return out


# ----------------------------------------------------------------------------- manifest paths


def _list_extra_shard(run_dir: Path, rel: str) -> None:
    """List ``rel`` in the run's manifest as one more point_steps shard (of 6 rows)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["shards"].append({"seq": 99, "worker": "w9", "committed_step": manifest["committed_step"],
                               "files": {"point_steps": {"path": rel, "rows": TRACKED}}})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def _foreign_shard(lake: Path, where: Path) -> Path:
    """A valid point_steps shard of 6 rows whose keys clash with nothing (steps 100+): merged as
    gladly as any, if the merge reads it."""
    t = pq.read_table(lake / "run_id=a" / "point_steps" / "part-w0-000000.parquet")
    t = t.set_column(t.column_names.index("step"), "step", pc.add(t.column("step"), 100))
    where.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, where)
    return where


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "other-run", "linked-run-folder"])
def test_a_path_out_of_the_run_folder_is_refused_by_the_merge_and_the_readers(lake, tmp_path, cli, how):
    run_dir = lake / "run_id=a"
    outside = _foreign_shard(lake, tmp_path / "elsewhere" / "x.parquet")
    named = run_dir / "manifest.json"
    if how == "dotdot":
        rel = "../../elsewhere/x.parquet"
        _list_extra_shard(run_dir, rel)
    elif how == "absolute":
        rel = str(outside)
        _list_extra_shard(run_dir, rel)
    elif how == "symlink":
        rel = "point_steps/part-w9-000099.parquet"
        (run_dir / rel).symlink_to(outside)
        _list_extra_shard(run_dir, rel)
    elif how == "other-run":  # inside the lake, but another run's folder
        _foreign_shard(lake, lake / "run_id=b" / "point_steps" / "part-w9-000099.parquet")
        rel = "../run_id=b/point_steps/part-w9-000099.parquet"
        _list_extra_shard(run_dir, rel)
    else:  # the run folder itself a symlink to a folder outside the lake
        shutil.move(str(run_dir), tmp_path / "elsewhere" / "run_id=a")
        run_dir.symlink_to(tmp_path / "elsewhere" / "run_id=a")
        rel, named = None, run_dir

    db = _db(tmp_path / "db")
    assert cli("init", "--db", db).rc == 0
    before = table_snapshot(db)
    line = _error(cli("ingest", "shards", lake, "--db", db))
    assert str(named) in line and "refused" in line, line
    if rel is not None:
        assert repr(rel) in line, line
    assert table_snapshot(db) == before  # nothing merged, not even run b

    line = _error(cli("query", "select count(*) AS n from point_steps", "--lake", lake))
    assert str(named) in line and "refused" in line, line


def test_the_rule_is_one_definition(tmp_path):
    from dpledger.warehouse.errors import UserError
    from dpledger.warehouse.lake import listed_files, run_file

    d = tmp_path / "L" / "run_id=r"
    (d / "point_steps").mkdir(parents=True)
    assert run_file(d, "point_steps/part-w0-000000.parquet", d) == d / "point_steps" / "part-w0-000000.parquet"
    for bad in ("", ".", "..", "../x", "/etc/passwd", "point_steps/../../x", None, 7, "a\x00b"):
        with pytest.raises(UserError, match="refused") as info:
            run_file(d, bad, d / "manifest.json")
        assert "\n" not in str(info.value)
    for bad in ([1], {"shards": {}}, {"shards": [3]}, {"shards": [{"files": {"point_steps": "x"}}]}):
        with pytest.raises(UserError):
            listed_files(d, bad, d / "manifest.json")


# ----------------------------------------------------------------------------- one writer per run

# The first writer: a sweep (in a fresh process) that pauses after its first commit until the
# parent says go, holding the run's lock meanwhile.
_FIRST_WRITER = r"""
import sys, time
from pathlib import Path
config, lake, db, paused, go = sys.argv[1:6]
import dpledger.ingest.sinks as sinks
from dpledger.cli import main
real_commit = sinks.ShardSink.commit
def commit(self, run_id, step, tables):
    real_commit(self, run_id, step, tables)
    if step == 0:
        Path(paused).touch()
        deadline = time.time() + 240
        while not Path(go).exists() and time.time() < deadline:
            time.sleep(0.02)
sinks.ShardSink.commit = commit
sys.exit(main(["sweep", config, "--lake", lake, "--db", db, "--json"]))
"""


def test_a_second_sweep_of_a_run_another_process_writes_skips_it(tmp_path, cli):
    lake = tmp_path / "L"
    config = _sweep_config(tmp_path / "s.toml", "t")
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", _FIRST_WRITER, str(config), str(lake),
                              str(_db(tmp_path / "first")), str(paused), str(go)],
                             cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not paused.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "the first writer never committed"
            time.sleep(0.05)
        run_dir = lake / "run_id=t-s0"
        owner = json.loads((run_dir / "writer.lock").read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        manifest = (run_dir / "manifest.json").read_bytes()

        # the same sweep again, while the first holds the run: the run is skipped, the lake untouched
        r = cli("sweep", config, "--lake", lake, "--db", _db(tmp_path / "second"), "--json")
        assert r.rc == 0, r
        [summary] = r.json()["runs"]
        assert summary["status"] == "skipped"
        assert summary["skipped"] == f"locked by pid {first.pid} on host {socket.gethostname()}"
        assert (run_dir / "manifest.json").read_bytes() == manifest
        assert json.loads((run_dir / "writer.lock").read_text()) == owner  # still the first writer's

        # training the run into the lake through the API: one line, nothing written
        from dpledger.ingest.sinks import ShardSink
        from dpledger.ingest.worker import TrainConfig, train
        from dpledger.warehouse.errors import UserError

        with pytest.raises(UserError) as info:
            train(TrainConfig(run="t-s0"), ShardSink(lake), resume=True)
        assert f"locked by pid {first.pid} on host" in str(info.value) and "\n" not in str(info.value)
        assert (run_dir / "manifest.json").read_bytes() == manifest
    finally:
        go.touch()
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert [r["status"] for r in json.loads(out)["runs"]] == ["finished"]
    assert not (run_dir / "writer.lock").exists()

    # the lake merges to exactly one uninterrupted run's rows
    db, ref = _db(tmp_path / "m"), _db(tmp_path / "ref")
    assert cli("ingest", "shards", lake, "--db", db).rc == 0
    _train_into_lake(tmp_path / "L2", "t-s0", seed=0)
    assert cli("ingest", "shards", tmp_path / "L2", "--db", ref).rc == 0
    assert len(_rows(db)) == STEPS * TRACKED
    assert _rows(db) == _rows(ref)
    assert [s["committed_step"] for s in json.loads((run_dir / "manifest.json").read_text())["shards"]] == [0, 1, 2]


def _lock_file(run_dir: Path, **info) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "writer.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "token": "x", **info}))
    return path


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, cli):
    lake = tmp_path / "L"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = _lock_file(lake / "run_id=t-s0", pid=dead.pid)
    r = cli("sweep", _sweep_config(tmp_path / "s.toml", "t"), "--lake", lake, "--db", _db(tmp_path / "d"),
            "--json")
    assert r.rc == 0, r
    assert [x["status"] for x in r.json()["runs"]] == ["finished"]
    assert not lock.exists()
    assert _q(_db(tmp_path / "d"), "SELECT count(*) FROM point_steps") == [(STEPS * TRACKED,)]


def test_lock_rules(tmp_path):
    from dpledger.ingest.sinks import RunLock, RunLocked

    d = tmp_path / "run_id=r"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # a live pid on this host holds it; another host's lock is never taken over
        for info in ({"pid": live.pid}, {"pid": 1, "host": "some-other-host"}):
            lock = _lock_file(d, **info)
            with pytest.raises(RunLocked, match=f"locked by pid {info['pid']} on host"):
                RunLock(d, "r").acquire()
            assert json.loads(lock.read_text())["pid"] == info["pid"]
    finally:
        live.kill()
        live.wait()
    # the same pid, but a process started at another time: the pid was reused, the lock is stale
    _lock_file(d, pid=os.getpid(), start="1")
    RunLock.acquire(held := RunLock(d, "r"))
    with pytest.raises(RunLocked, match=f"locked by pid {os.getpid()} on host"):  # held in this process
        RunLock(d, "r").acquire()
    held.release()
    assert not (d / "writer.lock").exists()
    # a lock file still empty: its writer is starting, unless it has been so for a long time
    (d / "writer.lock").write_bytes(b"")
    with pytest.raises(RunLocked, match="starting"):
        RunLock(d, "r").acquire()
    old = time.time() - 3600
    os.utime(d / "writer.lock", (old, old))
    held = RunLock(d, "r")
    held.acquire()
    assert json.loads((d / "writer.lock").read_text())["pid"] == os.getpid()
    held.release()


def test_commits_never_go_out_of_order(tmp_path):
    """What two writers appending to one manifest did (steps out of order, overlapping
    shards): refused at the commit, whoever gets the lock."""
    from dpledger.ingest.sinks import ShardSink
    from dpledger.warehouse.errors import UserError

    lake = tmp_path / "L"
    _train_into_lake(lake, "r")
    sink = ShardSink(lake, worker="w1")
    manifest = (lake / "run_id=r" / "manifest.json").read_bytes()
    with pytest.raises(UserError, match="step 1 is committed .* already"):
        sink.commit("r", 1, {})
    sink.close()
    assert (lake / "run_id=r" / "manifest.json").read_bytes() == manifest
    assert not (lake / "run_id=r" / "writer.lock").exists()


def test_what_a_crash_leaves_is_never_merged(lake, tmp_path, cli):
    """A writer's lock, temporary files, a shard renamed into place but never listed."""
    clean_db, db = _db(tmp_path / "c"), _db(tmp_path / "d")
    assert cli("ingest", "shards", lake, "--db", clean_db).rc == 0
    run_dir = lake / "run_id=b"
    _lock_file(run_dir, pid=999_999_999)
    (run_dir / ".manifest.json.0123.tmp").write_text("{half")
    (run_dir / "point_steps" / ".part-w0-000003.parquet.0123.tmp").write_bytes(b"PAR1")
    _foreign_shard(lake, run_dir / "point_steps" / "part-w0-000003.parquet")  # renamed, never listed
    assert cli("ingest", "shards", lake, "--db", db).rc == 0
    assert _rows(db) == _rows(clean_db)
    r = cli("query", "select count(*) AS n from point_steps", "--lake", lake, "--format", "json")
    assert r.rc == 0 and r.json() == [{"n": 2 * STEPS * TRACKED}], r


# ----------------------------------------------------------------------------- run names


@pytest.mark.parametrize("name", ["a=b", "a\nb", "a\tb", "a b", "a/b", "..", ".hidden", "-x", "a\x1bb",
                                  "x" * 201, "é"])
def test_unsafe_run_names_are_refused(name):
    from dpledger.ingest.sinks import safe_run_id
    from dpledger.warehouse.errors import UserError

    with pytest.raises(UserError, match="run name") as info:
        safe_run_id(name)
    assert "\n" not in str(info.value) and "\t" not in str(info.value) and "\x1b" not in str(info.value)


@pytest.mark.parametrize("name", ["s0-n0.8", "table1-row3", "run_1", "a+b", "_x", "x" * 200])
def test_safe_run_names_are_kept(name):
    from dpledger.ingest.sinks import safe_run_id

    assert safe_run_id(name) == name


def test_train_and_sweep_refuse_a_run_named_a_eq_b(tmp_path, cli):
    db = _db(tmp_path / "d")
    line = _error(cli("train", *TRAIN_FLAGS, "--run", "a=b", "--db", db))
    assert "'a=b'" in line, line
    assert not (tmp_path / "d" / "runs").exists()

    lake = tmp_path / "L"
    config = tmp_path / "s.toml"
    config.write_text("[base]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in CFG.items())
                      + '[[runs]]\nseed = 0\nrun = "a=b"\n')
    line = _error(cli("sweep", config, "--lake", lake, "--db", db))
    assert "'a=b'" in line, line
    assert not lake.exists() or not list(lake.iterdir())


# ----------------------------------------------------------------------------- merges that wait or fail


def test_a_merge_waits_for_a_database_another_process_holds(lake, tmp_path, cli):
    db = _db(tmp_path / "d")
    assert cli("init", "--db", db).rc == 0
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(3)", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        started = time.monotonic()
        r = cli("ingest", "shards", lake, "--db", db)
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert r.rc == 0, r
    assert "in use by another process; waiting" in r.err
    assert waited > 1.0
    assert _q(db, "SELECT run_id, count(*) FROM point_steps GROUP BY 1 ORDER BY 1") == [
        ("a", STEPS * TRACKED), ("b", STEPS * TRACKED)]


@pytest.mark.parametrize("damage", ["corrupt", "no-norm-clipped", "null-norm-clipped"])
def test_a_merge_failing_midway_leaves_the_database_as_it_was(lake, tmp_path, cli, damage):
    """Run a merged before up to step 0; then run a committed on and run b appeared with a
    damaged second shard: one line naming it (and the column), and the database row for row
    as before (neither run a's newer shards nor run b's good first shard merged)."""
    import pyarrow as pa

    db = _db(tmp_path / "d")
    a_manifest = lake / "run_id=a" / "manifest.json"
    full = a_manifest.read_text()
    m = json.loads(full)
    m["shards"], m["committed_step"], m["status"] = m["shards"][:1], 0, "running"
    a_manifest.write_text(json.dumps(m))
    shutil.move(lake / "run_id=b", tmp_path / "b-aside")
    assert cli("ingest", "shards", lake, "--db", db).rc == 0
    a_manifest.write_text(full)
    shutil.move(tmp_path / "b-aside", lake / "run_id=b")
    shard = lake / "run_id=b" / "point_steps" / "part-w0-000001.parquet"
    if damage == "corrupt":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        t = pq.read_table(shard)
        if damage == "no-norm-clipped":
            t = t.drop(["norm_clipped"])
        else:
            t = t.set_column(t.column_names.index("norm_clipped"), "norm_clipped",
                             pa.array([None] * t.num_rows, pa.bool_()))
        pq.write_table(t, shard)
    before, rows_before = table_snapshot(db), _rows(db)
    assert len(rows_before) == TRACKED
    line = _error(cli("ingest", "shards", lake, "--db", db))
    assert str(shard) in line, line
    if damage != "corrupt":
        assert "norm_clipped" in line, line
    assert table_snapshot(db) == before
    assert _rows(db) == rows_before
    assert _q(db, "SELECT run_id, committed_step, status FROM runs") == [("a", 0, "running")]


def test_the_required_shard_columns_are_the_schemas_not_null_columns(tmp_path, cli):
    import duckdb

    from dpledger.ingest.shards import REQUIRED

    db = _db(tmp_path / "d")
    assert cli("init", "--db", db).rc == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        for table, required in REQUIRED.items():
            not_null = {c for c, nullable in con.execute(
                "SELECT column_name, is_nullable FROM duckdb_columns() WHERE table_name = ?", [table]).fetchall()
                if not nullable} - {"run_id"}
            assert required == not_null, table
    finally:
        con.close()


# ----------------------------------------------------------------------------- a full disk at a train commit


@pytest.mark.parametrize("where", ["state", "database"])
def test_a_full_disk_during_a_train_commit_is_one_line_and_resumable(tmp_path, cli, monkeypatch, where):
    """The 2nd commit of a train into DuckDB hits a full disk: writing its resume state
    (``ingest.atomic``), or the rows (DuckDB's own write, as DuckDB reports it). One line,
    exit 2; the database holds exactly the 1st commit; resuming completes the run to an
    uninterrupted run's rows."""
    import duckdb

    import dpledger.ingest.atomic as atomic
    import dpledger.ingest.load as load
    import dpledger.ingest.recorder as recorder

    db, ref = _db(tmp_path / "d"), _db(tmp_path / "r")
    if where == "state":
        real = atomic.atomic_write
        calls = []

        def full(path, write):
            if Path(path).parent.name == "state":
                calls.append(path)
                if len(calls) == 2:
                    write(Path(path).with_name(".half.tmp"))  # bytes went somewhere before the disk filled
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, write)

        monkeypatch.setattr(atomic, "atomic_write", full)
        monkeypatch.setattr(recorder, "atomic_write", full)
    else:
        real_append = load.append_rows
        calls = []

        def full(con, table, rows):
            if table == "steps":
                calls.append(table)
                if len(calls) == 2:  # the point_steps rows of this commit are in the transaction already
                    raise duckdb.IOException(f'Could not write file "{db}.wal": No space left on device')
            return real_append(con, table, rows)

        monkeypatch.setattr(load, "append_rows", full)
    line = _error(cli("train", *TRAIN_FLAGS, "--run", "f", "--sink", "database", "--db", db))
    assert "No space left on device" in line, line
    assert ("step-00000001.pt" if where == "state" else str(db)) in line, line
    assert _q(db, "SELECT committed_step, count(DISTINCT step), count(*) FROM runs JOIN point_steps USING (run_id) "
                  "GROUP BY 1") == [(0, 1, TRACKED)]
    assert _q(db, "SELECT count(*) FROM steps") == [(1,)]
    monkeypatch.undo()
    r = cli("train", "--resume", "f", "--db", db)
    assert r.rc == 0, r
    assert cli("train", *TRAIN_FLAGS, "--run", "f", "--sink", "database", "--db", ref).rc == 0
    assert len(_rows(db)) == STEPS * TRACKED
    assert _rows(db) == _rows(ref)
