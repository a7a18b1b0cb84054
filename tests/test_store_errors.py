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

import duckdb

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


def test_a_database_in_use_is_reported_as_in_use(gla_db, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(60)", str(gla_db)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = _dpledger("runs", "--db", gla_db, home=tmp_path)
        assert r.returncode == 2 and "in use by another process" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_newer_schema_asks_for_a_newer_dpledger(gla_db, tmp_path):
    con = duckdb.connect(str(gla_db))
    con.execute("INSERT INTO schema_version (version, name) VALUES (?, 'from_the_future.sql')",
                [schema.latest_version() + 1])
    con.close()
    for args in (["runs"], ["init"], ["query", "select 1"]):
        r = _dpledger(*args, "--db", gla_db, home=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "newer than this dpledger knows" in r.stderr and "dpledger init" not in r.stderr, r.stderr
