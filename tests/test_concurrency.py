"""Writers never lock readers out: two training processes write one warehouse while a
third process reads it in a loop (``runs``, ``query``, ``watch --json``) — no errors, and
the final rows are exactly the two runs' rows, none lost, none twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import duckdb

STEPS, POINTS = 600, 60  # epochs 120 at q = 20/100 -> 600 steps; every point tracked every step (long enough
# for the reader to catch the runs training: commits no longer hold the training loop up)


def _train(db, run):
    return subprocess.Popen(
        [sys.executable, "-m", "dpledger", "train", "--dataset", "digits", "--model", "logreg", "--n-train", "100",
         "--batch-size", "20", "--epochs", "120", "--track", str(POINTS), "--noise-multiplier", "1.0",
         "--commit-every", "2", "--eval-every", "10", "--run", run, "--db", str(db)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _read(db, *args):
    return subprocess.run([sys.executable, "-m", "dpledger", *args, "--db", str(db)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_two_trainers_and_a_reader_share_one_warehouse(tmp_path):
    db = tmp_path / "w.duckdb"
    trainers = [_train(db, "a"), _train(db, "b")]
    reads, errors, seen_running = 0, [], set()
    deadline = time.time() + 600
    while not db.exists() and time.time() < deadline:  # the trainers create the warehouse as they start
        time.sleep(0.05)
    while any(t.poll() is None for t in trainers) and time.time() < deadline:
        for args in (["runs", "--json"], ["query", "SELECT run_id, count(*) AS n FROM point_steps GROUP BY 1"],
                     ["watch", "--json", "--count", "1"]):
            r = _read(db, *args)
            reads += 1
            if r.returncode != 0:
                errors.append((args, r.returncode, r.stderr[-300:]))
            elif args[0] == "runs":
                seen_running |= {x["run_id"] for x in json.loads(r.stdout) if x["status"] == "running"}
            elif args[0] == "watch":
                seen_running |= {x["run_id"] for x in json.loads(r.stdout or "[]") if x["status"] == "running"}
    outs = [t.communicate(timeout=300) for t in trainers]
    assert [t.returncode for t in trainers] == [0, 0], outs
    assert not errors, errors
    assert reads >= 3 and seen_running, (reads, seen_running)  # the reader did read while they trained
    con = duckdb.connect(str(db), read_only=True)  # the database file itself: both runs merged, whole
    try:
        rows = dict(con.execute("SELECT run_id, count(*) FROM point_steps GROUP BY 1").fetchall())
        distinct = con.execute("SELECT count(DISTINCT (run_id, step, point_id)) FROM point_steps").fetchall()[0][0]
        status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    finally:
        con.close()
    assert rows == {"a": STEPS * POINTS, "b": STEPS * POINTS} and distinct == 2 * STEPS * POINTS
    assert status == {"a": "finished", "b": "finished"}
    r = _read(db, "query", "SELECT count(*) AS n FROM point_steps", "--json")  # the live view agrees
    assert json.loads(r.stdout) == [{"n": 2 * STEPS * POINTS}]
