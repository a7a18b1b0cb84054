"""Schema creation, re-init, migrations and the SQLAlchemy declarations."""

from __future__ import annotations

import duckdb
import pytest

from dpledger import warehouse
from dpledger.warehouse import schema as dbmod
from dpledger.warehouse import tables

DESIGN_TABLES = {
    "runs", "points", "membership", "steps", "point_steps", "evaluations",
    "curvature", "memorization", "ingests", "accountings", "point_epsilon", "config_epsilon", "rdp_grid",
}


def _tables(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    finally:
        con.close()


def test_init_creates_every_design_table_and_records_versions(cli, db):
    r = cli("init", "--db", db, "--json")
    assert r.rc == 0, r
    summary = r.json()
    assert summary["created"] is True
    assert summary["schema_version"] == dbmod.latest_version() >= 1
    assert DESIGN_TABLES | {"schema_version"} <= _tables(db)
    con = duckdb.connect(str(db), read_only=True)
    versions = [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()]
    con.close()
    assert versions == [m.version for m in dbmod.migrations()]


def test_reinit_is_idempotent(cli, db):
    assert cli("init", "--db", db).rc == 0
    from conftest import table_snapshot

    before = table_snapshot(db)
    r = cli("init", "--db", db, "--json")
    assert r.rc == 0
    assert r.json()["actions"] == []
    assert r.json()["created"] is False
    assert table_snapshot(db) == before


def test_upgrade_applies_only_missing_migrations(db):
    """A database at an older version gets the later migrations and keeps its rows."""
    migrations = dbmod.migrations()
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    con.execute(migrations[0].sql)
    con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [migrations[0].version, migrations[0].name])
    con.execute("INSERT INTO runs (run_id, sample_rate) VALUES ('old', 0.5)")
    con.close()
    summary = warehouse.init(db)
    assert summary["schema_version_before"] == migrations[0].version
    assert summary["schema_version"] == migrations[-1].version
    con = warehouse.connect(db, read_only=True)
    assert con.execute("SELECT sample_rate FROM runs WHERE run_id = 'old'").fetchall() == [(0.5,)]
    con.close()


def test_read_only_needs_a_current_database(db, tmp_path):
    with pytest.raises(warehouse.UserError, match="no dpledger database"):
        warehouse.connect(db, read_only=True)
    duckdb.connect(str(db)).close()  # an empty DuckDB file, not a warehouse
    with pytest.raises(warehouse.UserError, match="not a dpledger database"):
        warehouse.connect(db, read_only=True)
    warehouse.init(db)
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM schema_version WHERE version = (SELECT max(version) FROM schema_version)")
    con.close()
    if dbmod.latest_version() > 1:
        with pytest.raises(warehouse.UserError, match="dpledger init"):
            warehouse.connect(db, read_only=True)


def test_default_path_comes_from_env(monkeypatch, tmp_path, cli):
    monkeypatch.chdir(tmp_path)
    assert cli("init").rc == 0
    assert (tmp_path / "dpledger.duckdb").exists()
    monkeypatch.setenv("DPLEDGER_DB", str(tmp_path / "env.duckdb"))
    assert cli("init").rc == 0
    assert (tmp_path / "env.duckdb").exists()
    assert warehouse.resolve_db_path("explicit.duckdb").name == "explicit.duckdb"


def test_sqlalchemy_declarations_match_the_sql_schema(db):
    warehouse.init(db)
    con = warehouse.connect(db, read_only=True)
    for table in tables.metadata.sorted_tables:
        cols = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table.name]).fetchall()]
        assert cols == [c.name for c in table.columns], table.name
    con.close()
    assert {t.name for t in tables.metadata.sorted_tables} >= DESIGN_TABLES


def test_init_refuses_a_missing_folder(cli, tmp_path):
    r = cli("init", "--db", tmp_path / "nope" / "w.duckdb")
    assert r.rc == 2
    assert "does not exist" in r.err
    assert r.err.count("\n") == 1
