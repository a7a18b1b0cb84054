"""Opening the warehouse fails with one line that says what is wrong, and fetches nothing.

A SQLite file given as the database is named as such (DuckDB would otherwise try to
download its SQLite extension); a corrupt file is reported as corrupt, not as "in
use" (the old check matched "lock" inside "block"); a database written by a newer
dpledger asks for a newer dpledger, not for ``init`` (which would refuse it).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import duckdb
from conftest import copy_as_run, query_rows

from dpledger.warehouse import schema


def _dpledger(*args, home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpledger", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": str(home)})


def test_a_sqlite_file_is_named_and_no_extension_is_fetched(tmp_path):
    path = tmp_path / "study.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()
    before = path.read_bytes()
    for args in (["runs"], ["init"], ["query", "select 1"], ["account"]):
        r = _dpledger(*args, "--db", path, home=tmp_path / "home")
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().splitlines() == [f"error: {path} is not a DuckDB database file (it is a SQLite database)"]
    assert path.read_bytes() == before
    assert not (tmp_path / "home").exists()  # no ~/.duckdb/extensions: nothing was installed


def test_a_corrupt_database_is_not_reported_as_in_use(gla_db, tmp_path):
    data = bytearray(gla_db.read_bytes())
    for i in range(3 * 4096, len(data) - 4096):  # the blocks after the headers
        data[i] = (data[i] + 77) % 256
    gla_db.write_bytes(bytes(data))
    r = _dpledger("runs", "--db", gla_db, home=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "corrupt" in r.stderr.lower() and "in use" not in r.stderr


def _hold(db, seconds: float) -> subprocess.Popen:
    """Another process holding the database file open read-write for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(float(sys.argv[2]))", str(db), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    return holder


def test_a_database_in_use_is_reported_as_in_use(gla_db, tmp_path):
    holder = _hold(gla_db, 60)
    try:
        for command in (["init"], ["runs"]):  # a writer and a reader alike wait, then say so
            started = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "dpledger", *command, "--db", str(gla_db)], capture_output=True,
                               text=True, timeout=120, env={**os.environ, "DPLEDGER_WAIT": "1.5"})
            assert r.returncode == 2 and "in use by another process after waiting 1.5 s" in r.stderr, r.stderr
            assert 1.4 < time.monotonic() - started < 30
            assert r.stderr.count("waiting up to 1.5 s") == 1  # said once, not per retry
    finally:
        holder.kill()
        holder.wait()


def test_a_writer_waits_for_a_busy_database_then_writes(gla_db, gla_dir, tmp_path):
    holder = _hold(gla_db, 3)
    try:
        copy = tmp_path / "res2.csv"
        copy_as_run(gla_dir / "res1.csv", copy, "res2")
        r = _dpledger("ingest", "gla-csv", copy, "--db", gla_db, home=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "is in use by another process; waiting up to 60 s" in r.stderr
    finally:
        holder.kill()
        holder.wait()
    assert query_rows(gla_db, "SELECT count(*) FROM point_steps WHERE run_id = 'res2'") == [(410,)]


def test_the_wait_is_a_checked_parameter(gla_db, tmp_path):
    for bad in ("-1", "nan", "1e9", "soon"):
        r = subprocess.run([sys.executable, "-m", "dpledger", "init", "--db", str(gla_db)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "DPLEDGER_WAIT": bad})
        assert r.returncode == 2 and f"$DPLEDGER_WAIT={bad}" in r.stderr, r.stderr


def test_a_newer_schema_asks_for_a_newer_dpledger(gla_db, tmp_path):
    con = duckdb.connect(str(gla_db))
    con.execute("INSERT INTO schema_version (version, name) VALUES (?, 'from_the_future.sql')",
                [schema.latest_version() + 1])
    con.close()
    for args in (["runs"], ["init"], ["query", "select 1"]):
        r = _dpledger(*args, "--db", gla_db, home=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "newer than this dpledger knows" in r.stderr and "dpledger init" not in r.stderr, r.stderr
