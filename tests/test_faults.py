"""Fault injection on the Parquet lake: a worker SIGKILLed mid-write, two sweeps writing
one lake while a reader queries it, a full or read-only disk, corrupt shards, and
re-running merges and sweeps.

Runs are tiny (digits, logreg, 120 training points, batch 20: 6 steps an epoch): the whole
file takes about 45 s on 2 cores; every subprocess has a timeout.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import REPO, query_rows as _q, table_snapshot

TABLES = ("point_steps", "steps", "evaluations", "checkpoints")
# 12 steps (2 epochs of 6), a commit every 2 steps: shards seq 0..5 committed at steps 1, 3, ..., 11;
# evaluations and checkpoints at steps 5 and 11 (shards 2 and 5).
CFG = dict(dataset="digits", model="logreg", epochs=2, n_train=120, n_test=40, batch_size=20,
           noise_multiplier=1.0, track="6", commit_every=2)
STEPS, TRACKED = 12, 6
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}


# ----------------------------------------------------------------------------- helpers




def _manifest(lake: Path, run: str) -> dict:
    return json.loads((lake / f"run_id={run}" / "manifest.json").read_text())


def _listed(lake: Path, run: str) -> dict[str, int]:
    """Files the run's manifest lists (relative to its folder) -> rows."""
    return {info["path"]: info["rows"] for shard in _manifest(lake, run)["shards"]
            for info in shard["files"].values()}


def _committed_rows(lake: Path, run: str, table: str, cols: list[str]) -> list[tuple]:
    """The rows of ``table`` the manifest commits, sorted (what any reader of the lake may see)."""
    d = lake / f"run_id={run}"
    parts = [pq.read_table(d / p, columns=cols) for p in _listed(lake, run) if p.startswith(table + "/")]
    if not parts:
        return []
    t = pa.concat_tables(parts)
    nan_free = [[None if isinstance(v, float) and math.isnan(v) else v for v in t.column(c).to_pylist()] for c in cols]
    return sorted(zip(*nan_free), key=repr)


def _shard_files(run_dir: Path) -> list[str]:
    """Every file in the run's folder and its table folders, relative to the run folder (but
    the worker's own model checkpoints, ``checkpoints/step-*.pt``, when its run_dir is there)."""
    out = [p.name for p in run_dir.iterdir() if p.is_file()]
    for table in TABLES:
        if (run_dir / table).is_dir():
            out += [f"{table}/{p.name}" for p in (run_dir / table).iterdir() if not p.name.endswith(".pt")]
    return sorted(out)


def _glob_rows(lake: Path, table: str = "point_steps") -> int:
    """Rows a reader globbing the lake's Parquet files sees (``read_parquet('LAKE/**/point_steps/*.parquet')``),
    without the manifest."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in lake.glob(f"run_id=*/{table}/*.parquet"))


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(r) -> str:
    # progress in a pipe is one "<phase>..." line per phase on stderr; the error is one line after them
    lines = [line for line in r.err.strip().splitlines() if not line.endswith("...")]
    assert r.rc == 2, r
    assert len(lines) == 1, r.err
    assert lines[0].startswith("error: "), r.err
    assert "Traceback" not in r.err
    return lines[0]


def _train_into_lake(lake: Path, run: str, run_dir: Path, worker: str = "w0", **overrides) -> dict:
    from dpledger.ingest.sinks import ShardSink
    from dpledger.ingest.worker import TrainConfig, train

    return train(TrainConfig(run=run, run_dir=str(run_dir), **{**CFG, **overrides}), ShardSink(lake, worker=worker))


def _sweep_config(path: Path, prefix: str, seeds, **base) -> Path:
    opts = {**CFG, "run": prefix, **base}
    lines = ["[base]"] + [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
    lines += ["[grid]", f"seed = {json.dumps(list(seeds))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- 1. SIGKILL mid-write

# In a fresh interpreter: train one run into a ShardSink, and SIGKILL the process itself in
# the middle of writing one file of commit SEQ: half of the file's bytes are on disk (the
# temporary name, fsynced) when the kill lands. WHERE is the file: the point_steps shard (the
# first file of a commit), the steps shard (the second: point_steps is renamed already), or
# the manifest (the commit point: every shard of the commit is renamed already).
_KILL_CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import pyarrow as pa
import pyarrow.parquet as pq
lake, where, seq, worker, cfg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
import dpledger.ingest.sinks as sinks
from dpledger.ingest.worker import TrainConfig, train

def die_half_written(path, data):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

real_write_table = pq.write_table
def write_table(table, where_, *args, **kwargs):
    p = Path(str(where_))
    if p.parent.name == where and p.name.startswith(f".part-{worker}-{seq:06d}.parquet."):
        buf = pa.BufferOutputStream()
        real_write_table(table, buf, *args, **kwargs)
        die_half_written(p, buf.getvalue().to_pybytes())
    return real_write_table(table, where_, *args, **kwargs)
pq.write_table = write_table

real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if where == "manifest" and Path(dst).name == "manifest.json":
        data = Path(src).read_bytes()
        if len(json.loads(data)["shards"]) == seq + 1:
            die_half_written(src, data)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace

train(TrainConfig(**cfg), sinks.ShardSink(lake, worker=worker))
sys.exit(3)  # the kill never landed
"""


@pytest.mark.parametrize("where,resume_worker", [
    ("point_steps", "w0"),   # kill while the first file of commit 2 is half written
    ("steps", "w1"),         # ... the second file (the first is renamed, unlisted); resumed under another worker name
    ("manifest", "w0"),      # ... the manifest (all of commit 2's shards renamed, unlisted)
])
def test_sigkill_mid_write_then_resume_matches_an_uninterrupted_run(tmp_path, cli, where, resume_worker):
    from dpledger.ingest.sinks import ShardSink
    from dpledger.ingest.worker import TrainConfig, train

    lake, db = tmp_path / "lake", tmp_path / "w.duckdb"
    cfg = {**CFG, "run": "r", "run_dir": str(tmp_path / "state-r")}
    proc = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(lake), where, "2", "w0", json.dumps(cfg)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # killed by the injected fault, mid-write

    # the commit point is the manifest: it still says commit 1 (step 3), the one before the kill
    run_dir = lake / "run_id=r"
    manifest = _manifest(lake, "r")
    assert manifest["committed_step"] == 3 and manifest["status"] == "running"
    assert [s["seq"] for s in manifest["shards"]] == [0, 1]
    listed = _listed(lake, "r")
    for rel, rows in listed.items():  # every listed file is whole
        assert pq.read_table(run_dir / rel).num_rows == rows
    # every visible Parquet file is whole too: a half-written file only ever has a hidden temporary name
    for p in lake.glob("run_id=*/*/*.parquet"):
        assert pq.read_table(p).num_rows > 0
    leftovers = [f for f in _shard_files(run_dir)
                 if f not in listed and f not in ("manifest.json", "run.json", "points.parquet")]
    # the killed writer's lock is left: stale, its pid is dead (the resume below takes it over)
    owner = json.loads((run_dir / "writer.lock").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(owner["pid"], 0)
    leftovers.remove("writer.lock")
    hidden = [f for f in leftovers if Path(f).name.startswith(".")]
    visible = sorted(f for f in leftovers if f not in hidden)
    assert len(hidden) == 1, leftovers
    if where == "manifest":
        assert hidden[0].startswith(".manifest.json.") and hidden[0].endswith(".tmp")
        assert visible == [f"{t}/part-w0-000002.parquet" for t in sorted(TABLES)]  # whole, but not committed
    else:
        assert hidden[0].startswith(f"{where}/.part-w0-000002.parquet.") and hidden[0].endswith(".tmp")
        with pytest.raises((OSError, pa.ArrowInvalid)):
            pq.read_table(run_dir / hidden[0])  # it is the half-written file
        assert visible == ([] if where == "point_steps" else ["point_steps/part-w0-000002.parquet"])

    # merging takes exactly the committed steps 0..3
    r = cli("ingest", "shards", lake, "--db", db)
    assert r.rc == 0, r
    assert _q(db, "SELECT committed_step, status FROM runs WHERE run_id = 'r'") == [(3, "running")]
    assert _q(db, "SELECT count(*), count(DISTINCT (step, point_id)), max(step) FROM point_steps") == [
        (4 * TRACKED, 4 * TRACKED, 3)]
    assert _q(db, "SELECT count(*), max(step) FROM steps") == [(4, 3)]
    assert _q(db, "SELECT count(*) FROM evaluations") == [(0,)]

    # resuming (by the stored options) continues after the last committed step and finishes the run
    summary = train(TrainConfig(run="r"), ShardSink(lake, worker=resume_worker), resume=True)
    assert summary["status"] == "finished" and summary["resumed_from"] == 4
    assert summary["rows"] == (STEPS - 4) * TRACKED
    manifest = _manifest(lake, "r")
    assert manifest["committed_step"] == STEPS - 1 and manifest["status"] == "finished"
    # nothing the killed writer left is still there: a reader globbing the lake sees the committed rows only
    assert _glob_rows(lake) == sum(n for p, n in _listed(lake, "r").items() if p.startswith("point_steps/"))
    assert not [f for f in _shard_files(run_dir) if Path(f).name.startswith(".")]
    assert not (run_dir / "writer.lock").exists()  # taken over, and released when the run finished

    # the same run, never interrupted, into another lake
    whole = _train_into_lake(tmp_path / "lake2", "r", tmp_path / "state-r2")
    assert whole["rows"] == STEPS * TRACKED
    for table, cols in (("point_steps", ["step", "point_id", "grad_norm", "norm_clipped", "loss", "sampled"]),
                        ("steps", ["step", "epoch", "batch_size", "loss", "lr", "test_accuracy"]),
                        ("evaluations", ["step", "point_id", "loss", "correct", "margin", "confidence_logit"])):
        a = _committed_rows(lake, "r", table, cols)
        b = _committed_rows(tmp_path / "lake2", "r", table, cols)
        assert len(a) == len(b) > 0, table
        assert a == b, table  # same draws, same updates: no duplicate, no gap
    assert _glob_rows(lake) == _glob_rows(tmp_path / "lake2") == STEPS * TRACKED

    # merging again adds the rest: the database holds exactly the uninterrupted run's rows
    r = cli("ingest", "shards", lake, "--db", db)
    assert r.rc == 0, r
    db2 = tmp_path / "w2.duckdb"
    assert cli("ingest", "shards", tmp_path / "lake2", "--db", db2).rc == 0
    cols = "step, point_id, grad_norm, loss, sampled"
    rows = _q(db, f"SELECT {cols} FROM point_steps ORDER BY ALL")
    assert len(rows) == len(set((s, p) for s, p, *_ in rows)) == STEPS * TRACKED
    assert rows == _q(db2, f"SELECT {cols} FROM point_steps ORDER BY ALL")
    assert _q(db, "SELECT committed_step, status FROM runs") == [(STEPS - 1, "finished")]
    assert _q(db, "SELECT count(*) FROM steps") == _q(db2, "SELECT count(*) FROM steps") == [(STEPS,)]


# ----------------------------------------------------------------------------- 2. concurrent sweeps + reader

# A sweep (`dpledger sweep`, one worker, in this process) that logs the time of each of its
# commits (pausing 20 ms after each) and starts training only when the parent says go, so
# both sweeps write together.
_SWEEP_CHILD = r"""
import sys, time
from pathlib import Path
config, lake, db, go, log = sys.argv[1:6]
import opacus, torch  # imports done before the start signal
import dpledger.ingest.shards, dpledger.ingest.sweep, dpledger.ingest.worker, dpledger.models.grad_norms
import dpledger.ingest.sinks as sinks
from dpledger.cli import main
real_commit = sinks.ShardSink.commit
def commit(self, run_id, step, tables):
    real_commit(self, run_id, step, tables)
    with open(log, "a") as f:
        f.write(f"{time.time()} {run_id} {step}\n")
    time.sleep(0.02)  # a slower writer: the reader gets to read between commits
sinks.ShardSink.commit = commit
Path(log + ".ready").touch()
deadline = time.time() + 120
while not Path(go).exists():
    if time.time() > deadline:
        sys.exit(4)
    time.sleep(0.01)
sys.exit(main(["sweep", config, "--lake", lake, "--db", db, "--workers", "1", "--json"]))
"""

# A reader: `dpledger query` in a loop (in this process, as the CLI runs it) on a database
# no writer holds, and on the lake's Parquet files directly; each answer is logged.
_READER_CHILD = r"""
import contextlib, io, json, sys, time
from pathlib import Path
rdb, lake, stop, log = sys.argv[1:5]
from dpledger.cli import main

def query(*args):
    out, err = io.StringIO(), io.StringIO()
    t = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return {"t": t, "rc": rc, "out": out.getvalue(), "err": err.getvalue()}

records = []
glob = f"{lake}/**/point_steps/*.parquet"
query("query", "select 1", "--db", rdb)  # imports and first connection done before the writers start
Path(log + ".ready").touch()
deadline = time.time() + 240
while not Path(stop).exists() and time.time() < deadline:
    rec = {"db": query("query", "select count(*) AS n from point_steps", "--db", rdb, "--format", "json")}
    if any(Path(lake).glob("run_id=*/point_steps/part-*.parquet")):
        rec["lake"] = query("query", "--allow-files", f"select count(*) AS n from read_parquet('{glob}')",
                            "--db", rdb, "--format", "json")
    records.append(rec)
    time.sleep(0.02)
Path(log).write_text(json.dumps(records))
"""


def _wait_for(paths, procs, timeout):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"a child exited early ({proc.returncode}): {err[-2000:]}")
        assert time.time() < deadline, "children did not get ready in time"
        time.sleep(0.05)


def test_two_sweeps_write_one_lake_while_a_reader_queries(tmp_path, cli):
    lake = tmp_path / "lake"
    rdb = tmp_path / "reader" / "reader.duckdb"  # not beside the lake: reads of a database see its own lake/ too
    rdb.parent.mkdir()
    assert cli("init", "--db", rdb).rc == 0
    go, stop = tmp_path / "go", tmp_path / "stop"
    epochs = 8
    rows_per_run = epochs * 6 * 120  # steps x every point tracked
    base = dict(epochs=epochs, track="all")
    sweeps = {}
    for name in ("a", "b"):
        config = _sweep_config(tmp_path / f"{name}.toml", name, [0, 1], **base)
        log = tmp_path / f"{name}.log"
        sweeps[name] = (subprocess.Popen(
            [sys.executable, "-c", _SWEEP_CHILD, str(config), str(lake), str(tmp_path / f"{name}.duckdb"), str(go),
             str(log)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), log)
    procs = [p for p, _ in sweeps.values()]
    try:
        _wait_for([Path(str(log) + ".ready") for _, log in sweeps.values()], procs, 120)
        reader_log = tmp_path / "reader.json"
        reader = subprocess.Popen([sys.executable, "-c", _READER_CHILD, str(rdb), str(lake), str(stop),
                                   str(reader_log)], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        procs.append(reader)
        _wait_for([Path(str(reader_log) + ".ready")], procs, 120)  # reading before anyone writes
        go.touch()
        results = {name: p.communicate(timeout=240) for name, (p, _) in sweeps.items()}
        stop.touch()
        reader_out, reader_err = reader.communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # no error in any process
    for name, (p, _) in sweeps.items():
        out, err = results[name]
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err and "error" not in err.lower(), err[-3000:]
        summary = json.loads(out)
        assert sorted((r["run_id"], r["status"]) for r in summary["runs"]) == [
            (f"{name}-s0", "finished"), (f"{name}-s1", "finished")]
    assert reader.returncode == 0, reader_err[-3000:]
    records = json.loads(reader_log.read_text())
    answers = [rec[k] for rec in records for k in ("db", "lake") if k in rec]
    assert answers and all(a["rc"] == 0 and a["err"] == "" for a in answers), [a for a in answers if a["rc"]][:3]
    assert {json.loads(rec["db"]["out"])[0]["n"] for rec in records} == {0}  # nothing wrote the reader's db
    lake_counts = [(rec["lake"]["t"], json.loads(rec["lake"]["out"])[0]["n"]) for rec in records if "lake" in rec]
    assert [n for _, n in lake_counts] == sorted(n for _, n in lake_counts)  # files only ever appear

    # the two sweeps did write at the same time, and the reader read the lake while they wrote
    windows = {}
    for name, (_, log) in sweeps.items():
        times = [float(line.split()[0]) for line in log.read_text().splitlines()]
        assert len(times) == 2 * epochs * 6 // CFG["commit_every"]
        windows[name] = (min(times), max(times))
    overlap = (max(w[0] for w in windows.values()), min(w[1] for w in windows.values()))
    assert overlap[0] < overlap[1], f"the sweeps did not overlap: {windows}"
    during = [n for t, n in lake_counts if min(w[0] for w in windows.values()) <= t <= max(w[1] for w in windows.values())]
    assert during, "the reader never read the lake while the sweeps were writing"
    assert min(during) < 4 * rows_per_run  # it saw the lake half written
    assert lake_counts[-1][1] == 4 * rows_per_run

    # merged after the sweeps (no writer holds it any more): every row once
    r = cli("ingest", "shards", lake, "--db", rdb)
    assert r.rc == 0, r
    expect = [(f"{p}-s{s}", rows_per_run) for p in "ab" for s in (0, 1)]
    assert _q(rdb, "SELECT run_id, count(*) FROM point_steps GROUP BY 1 ORDER BY 1") == expect
    assert _q(rdb, "SELECT count(*), count(DISTINCT (run_id, step, point_id)) FROM point_steps") == [
        (4 * rows_per_run, 4 * rows_per_run)]
    assert _q(rdb, "SELECT DISTINCT status FROM runs") == [("finished",)]
    r = cli("query", "select count(*) AS n from point_steps", "--db", rdb, "--format", "json")
    assert r.rc == 0 and r.json() == [{"n": 4 * rows_per_run}], r
    # each sweep merged the lake when it finished, the other sweep's runs possibly half done:
    # merging again completes them, without a duplicate, to the same rows as the reader's database
    everything = _q(rdb, "SELECT run_id, step, point_id, grad_norm FROM point_steps ORDER BY ALL")
    for name in sweeps:
        sdb = tmp_path / f"{name}.duckdb"
        r = cli("ingest", "shards", lake, "--db", sdb)
        assert r.rc == 0, r
        assert _q(sdb, "SELECT run_id, step, point_id, grad_norm FROM point_steps ORDER BY ALL") == everything
        assert _q(sdb, "SELECT DISTINCT status FROM runs") == [("finished",)]


# ----------------------------------------------------------------------------- 3. disk full / read-only lake


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def _set_read_only(folder: Path, method: str, on: bool) -> bool:
    """chmod 0o500 (0o700 back), or the immutable attribute (chattr +i / -i): what root cannot
    write through either, where the filesystem and the capabilities allow it."""
    if method == "chmod":
        folder.chmod(0o500 if on else 0o700)
        return True
    chattr = shutil.which("chattr")
    return bool(chattr) and subprocess.run([chattr, "+i" if on else "-i", str(folder)],
                                           capture_output=True, timeout=30).returncode == 0


def _read_only_method(tmp: Path) -> str | None:
    """How to make a folder read-only here, tried on a probe folder: chmod, unless it does not
    stop this user (root); then chattr +i; None if neither does."""
    probe = tmp / "probe"
    probe.mkdir()
    try:
        for method in ("chmod", "chattr"):
            if _set_read_only(probe, method, True):
                stops = not _writable(probe)
                _set_read_only(probe, method, False)
                if stops:
                    return method
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


class _FullDiskFile:
    """A file whose write puts half the bytes on disk and then fails as a full disk does."""

    def __init__(self, f, fail):
        self.f, self.fail = f, fail

    def write(self, data):
        if self.fail(data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _inject_full_disk(monkeypatch, where: str, lake: Path) -> None:
    """Make the lake's disk 'full' at one write of the run: the 2nd commit's point_steps shard,
    the 2nd commit's manifest (the commit point), or the final manifest ("finished")."""
    import dpledger.ingest.atomic as atomic

    if where == "shard":
        real = pq.write_table

        def write_table(table, path, *args, **kwargs):
            p = Path(str(path))
            if p.parent.name == "point_steps" and p.name.startswith(".part-w0-000001.parquet."):
                buf = pa.BufferOutputStream()
                real(table, buf, *args, **kwargs)
                p.write_bytes(buf.getvalue().to_pybytes()[:100])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(table, path, *args, **kwargs)

        monkeypatch.setattr(pq, "write_table", write_table)
        return

    def fail(data: bytes) -> bool:
        m = json.loads(data)
        return len(m["shards"]) == 2 if where == "manifest" else m["status"] == "finished"

    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if Path(path).name.startswith(".manifest.json.") and "w" in mode:
            return _FullDiskFile(f, fail)
        return f

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)  # the atomic writer's own open(), nothing else's


@pytest.mark.parametrize("where", ["shard", "manifest", "final"])
def test_disk_full_on_the_lake_is_one_error_and_commits_nothing_partially(tmp_path, cli, monkeypatch, where):
    lake, db = tmp_path / "lake", tmp_path / "w.duckdb"
    config = _sweep_config(tmp_path / "d.toml", "d", [0])
    run_dir = lake / "run_id=d-s0"
    _inject_full_disk(monkeypatch, where, lake)
    r = cli("sweep", config, "--lake", lake, "--db", db)
    line = _one_line_error(r)
    assert str(run_dir) in line and "No space left on device" in line, line

    committed = STEPS - 1 if where == "final" else 1
    manifest = _manifest(lake, "d-s0")
    assert manifest["committed_step"] == committed
    assert [s["committed_step"] for s in manifest["shards"]] == list(range(1, committed + 1, 2))
    assert manifest["status"] in ("running", "failed")
    # nothing but committed files in the run's folder: no temporary file, no unlisted shard
    listed = _listed(lake, "d-s0")
    assert [f for f in _shard_files(run_dir) if f not in ("manifest.json", "run.json", "points.parquet")] == sorted(listed)
    assert _glob_rows(lake) == (committed + 1) * TRACKED
    # the sweep merged what was committed, exactly
    assert _q(db, "SELECT count(*), count(DISTINCT (step, point_id)), max(step) FROM point_steps") == [
        ((committed + 1) * TRACKED, (committed + 1) * TRACKED, committed)]
    assert _q(db, "SELECT committed_step FROM runs") == [(committed,)]

    # once there is room again, running the sweep again resumes the run and completes it
    monkeypatch.undo()
    r = cli("sweep", config, "--lake", lake, "--db", db)
    assert r.rc == 0, r
    assert _q(db, "SELECT count(*), count(DISTINCT (step, point_id)) FROM point_steps") == [
        (STEPS * TRACKED, STEPS * TRACKED)]
    assert _q(db, "SELECT committed_step, status FROM runs") == [(STEPS - 1, "finished")]
    assert _glob_rows(lake) == STEPS * TRACKED


@pytest.mark.parametrize("what", ["lake", "run-folder"])
def test_read_only_lake_is_one_error_and_commits_nothing_partially(tmp_path, cli, monkeypatch, what):
    """A real permission error: the lake folder read-only before the sweep, or the run's folder
    made read-only after its first commit (the shards of the 2nd commit can be written in
    their table folders, but the manifest, the commit point, cannot)."""
    import dpledger.ingest.sinks as sinks

    method = _read_only_method(tmp_path)
    if method is None:
        pytest.skip("cannot make a folder read-only for this user here (root: chmod does not stop it, "
                    "and chattr +i is not available); the disk-full tests simulate the failure")
    lake, db = tmp_path / "lake", tmp_path / "w.duckdb"
    lake.mkdir()
    run_dir = lake / "run_id=d-s0"
    config = _sweep_config(tmp_path / "d.toml", "d", [0])
    locked = []
    if what == "lake":
        locked.append(lake)
    else:
        real_commit = sinks.ShardSink.commit

        def commit(self, run_id, step, tables):
            real_commit(self, run_id, step, tables)
            if not locked:  # after the first commit
                locked.append(self.run_dir(run_id))
                assert _set_read_only(locked[0], method, True)

        monkeypatch.setattr(sinks.ShardSink, "commit", commit)
    try:
        if what == "lake":
            assert _set_read_only(lake, method, True)
        r = cli("sweep", config, "--lake", lake, "--db", db)
    finally:
        for folder in locked:
            _set_read_only(folder, method, False)
    monkeypatch.undo()
    line = _one_line_error(r)
    assert str(run_dir) in line and ("Permission denied" in line or "Operation not permitted" in line), line
    if what == "lake":
        assert list(lake.iterdir()) == []
        assert _q(db, "SELECT count(*) FROM runs") == [(0,)]
    else:
        manifest = _manifest(lake, "d-s0")
        assert manifest["committed_step"] == 1 and len(manifest["shards"]) == 1
        listed = _listed(lake, "d-s0")
        # the writer's lock could not be removed from the read-only folder: it is stale (no sink
        # of this process holds it), and the sweep below, in this same process, takes it over
        files = [f for f in _shard_files(run_dir) if f not in ("manifest.json", "run.json", "points.parquet")]
        assert files == sorted([*listed, "writer.lock"])
        assert _glob_rows(lake) == 2 * TRACKED
        assert _q(db, "SELECT count(*), max(step), min(committed_step) FROM point_steps JOIN runs USING (run_id)") == [
            (2 * TRACKED, 1, 1)]

    # writable again: the same sweep runs (or resumes) the run to its end
    r = cli("sweep", config, "--lake", lake, "--db", db)
    assert r.rc == 0, r
    assert _q(db, "SELECT count(*), count(DISTINCT (step, point_id)) FROM point_steps") == [
        (STEPS * TRACKED, STEPS * TRACKED)]
    assert _q(db, "SELECT committed_step, status FROM runs") == [(STEPS - 1, "finished")]
    assert not (run_dir / "writer.lock").exists()


# ----------------------------------------------------------------------------- 4. corrupt shards


@pytest.fixture(scope="module")
def two_run_lake(tmp_path_factory) -> Path:
    """A lake with two finished runs, a and b (b merges after a)."""
    root = tmp_path_factory.mktemp("lake2runs")
    for run in ("a", "b"):
        _train_into_lake(root / "lake", run, root / f"state-{run}", epochs=1, seed=0 if run == "a" else 1)
    return root / "lake"


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _drop_grad_norm(path: Path) -> Path:
    t = pq.read_table(path)
    pq.write_table(t.drop(["grad_norm"]), path)  # same rows, no grad_norm
    return path


def _conflicting_shard(path: Path) -> Path:
    """A new shard listed in the manifest whose rows repeat shard 0's keys with other norms:
    readable, right schema, right row count; only the merge itself can see the clash."""
    run_dir = path.parents[1]
    t = pq.read_table(path)
    t = t.set_column(t.column_names.index("grad_norm"), "grad_norm", pc.add(t.column("grad_norm"), 1.0))
    new = path.with_name("part-w0-000099.parquet")
    pq.write_table(t, new)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["shards"].append({"seq": 99, "worker": "w0", "committed_step": manifest["committed_step"],
                               "files": {"point_steps": {"path": "point_steps/part-w0-000099.parquet",
                                                         "rows": t.num_rows}}})
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return new


@pytest.mark.parametrize("damage", ["truncated", "wrong-schema", "deleted", "conflicting", "manifest"])
def test_a_corrupt_shard_is_one_error_and_changes_nothing(tmp_path, cli, two_run_lake, damage):
    lake, db = tmp_path / "lake", tmp_path / "w.duckdb"
    shutil.copytree(two_run_lake, lake)
    assert cli("init", "--db", db).rc == 0
    b = lake / "run_id=b"
    if damage == "truncated":
        named = _truncate(b / "point_steps" / "part-w0-000001.parquet")
    elif damage == "wrong-schema":
        named = _drop_grad_norm(b / "point_steps" / "part-w0-000002.parquet")
    elif damage == "deleted":
        named = b / "steps" / "part-w0-000001.parquet"
        named.unlink()
    elif damage == "conflicting":
        named = _conflicting_shard(b / "point_steps" / "part-w0-000000.parquet")
    else:
        named = _truncate(b / "manifest.json")
    before = table_snapshot(db)
    r = cli("ingest", "shards", lake, "--db", db)
    line = _one_line_error(r)
    assert str(named) in line, line
    assert table_snapshot(db) == before  # run a, fine and first, is not half merged either

    # the same lake without the damage merges (the error was the damage, nothing else)
    shutil.rmtree(lake)
    shutil.copytree(two_run_lake, lake)
    r = cli("ingest", "shards", lake, "--db", db)
    assert r.rc == 0, r
    assert _q(db, "SELECT run_id, count(*) FROM point_steps GROUP BY 1 ORDER BY 1") == [
        ("a", 6 * TRACKED), ("b", 6 * TRACKED)]


# ----------------------------------------------------------------------------- 5. re-running is a no-op


def test_merging_again_and_rerunning_a_finished_sweep_change_nothing(tmp_path, cli):
    from dpledger.ingest.sinks import ShardSink
    from dpledger.ingest.worker import TrainConfig, train

    lake, db = tmp_path / "lake", tmp_path / "w.duckdb"
    config = _sweep_config(tmp_path / "i.toml", "i", [0, 1])
    r = cli("sweep", config, "--lake", lake, "--db", db, "--json")
    assert r.rc == 0, r
    assert _q(db, "SELECT run_id, count(*) FROM point_steps GROUP BY 1 ORDER BY 1") == [
        ("i-s0", STEPS * TRACKED), ("i-s1", STEPS * TRACKED)]
    snap, files = table_snapshot(db), _tree_digest(lake)

    r = cli("ingest", "shards", lake, "--db", db)  # the same lake again
    assert r.rc == 0, r
    assert "0 point-step rows merged from 0 files" in r.out
    assert table_snapshot(db) == snap

    moved = tmp_path / "restored" / "lake"  # the same lake at another path (restored from a backup)
    shutil.copytree(lake, moved)
    assert cli("ingest", "shards", moved, "--db", db).rc == 0
    assert table_snapshot(db) == snap

    r = cli("sweep", config, "--lake", lake, "--db", db, "--json")  # finished runs are skipped
    assert r.rc == 0, r
    assert [x.get("skipped") for x in r.json()["runs"]] == ["finished already"] * 2
    assert table_snapshot(db) == snap
    assert _tree_digest(lake) == files  # not a byte of the lake rewritten

    summary = train(TrainConfig(run="i-s0"), ShardSink(lake), resume=True)  # resuming a finished run
    assert summary["status"] == "finished" and summary["rows"] == 0
    assert cli("ingest", "shards", lake, "--db", db).rc == 0
    assert table_snapshot(db) == snap
