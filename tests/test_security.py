"""Every CLI argument that reaches SQL is bound or validated: injection strings change
nothing, read nothing they should not, and fail (if at all) with one clean line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from conftest import copy_as_run, table_snapshot

EVIL = [
    "res1' OR '1'='1",
    "x'; DROP TABLE runs; --",
    "res1\"; DELETE FROM point_steps; --",
    "'); COPY runs TO '/tmp/dpledger-pwned.csv'; --",
    "res1/*",
]


@pytest.fixture
def accounted(gla_db, cli):
    assert cli("account", "--db", gla_db).rc == 0
    return gla_db


def _clean(r):
    assert r.rc in (0, 2), r
    assert "Traceback" not in r.err
    if r.rc == 2:
        assert len(r.err.strip().splitlines()) == 1, r.err


@pytest.mark.parametrize("evil", EVIL)
def test_run_names_and_keys_are_bound(accounted, cli, evil, tmp_path):
    before = table_snapshot(accounted)
    commands = [
        ["rank", "--run", evil],
        ["rank", "--run", "res1", "--rule", evil],
        ["report", "--run", evil, "--out", str(tmp_path / "r.html")],
        ["links", "--run", evil],
        ["links", "--config", evil],
        ["fit", "--run", evil],
        ["curvature", "--run", evil],
        ["account", "--run", evil],
        ["account", "--rule", evil],
        ["query", "SELECT count(*) AS n FROM runs WHERE run_id = $r", "-p", "r", evil, "--json"],
    ]
    for args in commands:
        r = cli(*args, "--db", accounted)
        _clean(r)
        if args[0] == "query":
            assert r.json() == [{"n": 0}]
        elif args[0] in ("rank", "report", "links", "fit", "curvature", "account"):
            assert r.rc == 2, (args, r)
    assert table_snapshot(accounted) == before
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("evil", EVIL)
def test_names_written_by_ingest_are_stored_as_values(db, cli, evil, tmp_path, gla_dir):
    """Run and dataset names from flags or files become values, never SQL."""
    pd.DataFrame({"step": [0, 1], "point_id": [0, 0], "grad_norm": [0.5, 0.7]}).to_csv(tmp_path / "s.csv", index=False)
    r = cli("ingest", "steps", tmp_path / "s.csv", "--run", evil, "--sample-rate", "0.1", "--noise-multiplier", "1",
            "--max-grad-norm", "1", "--dataset", evil, "--db", db)
    _clean(r)
    assert r.rc == 0
    gla_name = "g-" + evil.replace(",", ";")  # a run name inside a CSV field
    copy_as_run(gla_dir / "res1.csv", tmp_path / "g.csv", gla_name)
    r = cli("ingest", "gla-csv", tmp_path / "g.csv", "--db", db)
    _clean(r)
    assert r.rc == 0, r
    got = cli("query", "SELECT run_id, dataset FROM runs ORDER BY run_id", "--db", db, "--json").json()
    assert {g["run_id"] for g in got} == {evil, gla_name}
    assert cli("query", "SELECT count(*) AS n FROM point_steps", "--db", db, "--json").json() == [{"n": 412}]
    assert cli("account", "--run", evil, "--db", db).rc == 0
    assert cli("rank", "--run", evil, "--db", db, "--json").json()[0]["point_id"] == 0


def test_train_run_names_must_be_safe_folder_names(db, cli):
    for evil in ("../../etc", "a/b", "x'; DROP TABLE runs; --"):
        r = cli("train", "--run", evil, "--noise-multiplier", "1", "--db", db)
        assert r.rc == 2 and "run name" in r.err


def test_query_cannot_reach_other_files_even_through_a_lake(tmp_path, cli):
    config = tmp_path / "s.toml"
    config.write_text('[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 1\nn_train = 60\nbatch_size = 20\n'
                      'track = "3"\nnoise_multiplier = 1.0\n')
    db = tmp_path / "w.duckdb"
    assert cli("sweep", config, "--db", db, "--lake", tmp_path / "lake").rc == 0
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n42\n")
    for sql in (f"SELECT * FROM read_csv('{secret}')", f"COPY runs TO '{tmp_path / 'out.csv'}'",
                f"ATTACH '{tmp_path / 'x.duckdb'}' AS x"):
        r = cli("query", sql, "--lake", tmp_path / "lake")
        assert r.rc == 2, (sql, r)
        r = cli("query", sql, "--db", db)
        assert r.rc == 2, (sql, r)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.duckdb").exists()
    r = cli("query", "SELECT count(*) AS n FROM point_steps", "--lake", tmp_path / "lake", "--json")
    assert r.rc == 0 and r.json() == [{"n": 9}]


def _tree(root: Path) -> dict:
    """Every file under ``root`` with its bytes' hash: proves a command wrote nothing there."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def escape_statements(db: Path, lake: Path, out: Path, secret: Path, run_dir: Path) -> list[str]:
    """Statements that try to write, attach, reconfigure or read outside what a reader may."""
    shard = next(run_dir.rglob("part-*.parquet"))
    return [
        # attach / detach: the warehouse file read-write, new files in the lake
        f"ATTACH '{db}' AS wh2", f"DETACH wh", f"DETACH wh; ATTACH '{db}' AS wh2; DELETE FROM wh2.main.point_steps",
        f"ATTACH '{lake}/new.duckdb' AS n", "ATTACH ':memory:' AS m", f"ATTACH '{out}/x.sqlite' (TYPE sqlite)",
        f"ATTACH '{db}' AS w3 (READ_WRITE)", "COPY FROM DATABASE memory TO wh",
        # copy: out of the warehouse, over a shard, over the manifest, into the spill folder, in
        f"COPY runs TO '{out}/out.csv'", f"COPY (SELECT 0.0 AS grad_norm) TO '{shard}' (FORMAT parquet)",
        f"COPY (SELECT 1 AS a) TO '{run_dir}/manifest.json'", f"COPY runs TO '{db}.tmp/x.csv'",
        f"COPY runs TO '.tmp/x.csv'", f"COPY runs FROM '{secret}'",
        f"COPY point_steps TO '{out}/ps' (FORMAT parquet, PARTITION_BY run_id)",
        f"COPY (SELECT 1) TO '{lake}/x.csv'",
        # export / import
        f"EXPORT DATABASE '{out}/exp'", f"EXPORT DATABASE '{lake}/exp' (FORMAT parquet)", f"IMPORT DATABASE '{out}'",
        # extensions
        "INSTALL httpfs", "LOAD httpfs", "INSTALL sqlite", f"LOAD '{out}/evil.duckdb_extension'", "FORCE INSTALL json",
        # reading outside the lake / the database
        f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM read_csv_auto('{secret}')",
        f"SELECT * FROM read_text('{secret}')", f"SELECT * FROM read_blob('{secret}')", f"SELECT * FROM glob('{out}/*')",
        f"SELECT * FROM glob('{lake}/*')", "SELECT * FROM read_text('/etc/passwd')", f"SELECT * FROM sniff_csv('{secret}')",
        f"SELECT * FROM read_ndjson('{secret}')", f"SELECT * FROM read_json('{run_dir}/manifest.json')",
        f"FROM '{secret}'",
        # settings and pragmas
        "SET enable_external_access = true", "SET allowed_directories = ['/']", f"SET allowed_paths = ['{secret}']",
        f"SET temp_directory = '{out}/tmp'", "SET lock_configuration = false", "RESET enable_external_access",
        "SET memory_limit = '1GB'", "PRAGMA enable_profiling = 'json'", f"PRAGMA profiling_output = '{out}/prof.json'",
        f"SET profiling_output = '{out}/prof.json'", "SET access_mode = 'read_write'", "PRAGMA database_size",
        "PRAGMA enable_checkpoint_on_shutdown", "CALL pragma_version()", "USE wh",
        # definitions and writes
        "CREATE MACRO m(x) AS x", "CREATE TEMP TABLE t AS SELECT 1", "CREATE TEMP VIEW v AS SELECT 1",
        "CREATE TABLE t AS SELECT 1", "CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')",
        "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'x', SECRET 'y')", "CREATE SEQUENCE s", "DROP VIEW point_rank",
        "DROP TABLE runs", "ALTER TABLE runs ADD COLUMN x INT", "INSERT INTO runs (run_id) VALUES ('x')",
        "UPDATE runs SET lr = 1", "DELETE FROM point_steps", "TRUNCATE point_steps",
        # several statements, transactions, maintenance
        f"SELECT 1; COPY runs TO '{out}/m.csv'", "SELECT 1; SELECT 2", "SELECT 1; DETACH wh", "CHECKPOINT",
        "FORCE CHECKPOINT", "VACUUM", "BEGIN TRANSACTION", f"EXPLAIN ANALYZE COPY runs TO '{out}/e.csv'",
        f"SELECT * FROM query('COPY runs TO ''{out}/q.csv''')",
    ]


@pytest.fixture(scope="module")
def lake_warehouse(tmp_path_factory):
    """A database merged from a one-run sweep, and the lake it came from."""
    from dpledger.cli import main

    root = tmp_path_factory.mktemp("lakewh")
    config = root / "s.toml"
    config.write_text('[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 1\nn_train = 60\nbatch_size = 20\n'
                      'track = "3"\nnoise_multiplier = 1.0\n')
    assert main(["sweep", str(config), "--db", str(root / "w.duckdb"), "--lake", str(root / "lake")]) == 0
    return root


@pytest.mark.parametrize("mode", ["db", "db-allow-files", "lake"])
def test_the_read_path_writes_nothing_anywhere(lake_warehouse, cli, mode, tmp_path, monkeypatch):
    """72 escape statements through ``query`` and ``query --lake``: each refused in one line or harmless,
    and afterwards the database file, the lake, the output folder and the working folder are byte-identical."""
    root = lake_warehouse
    db, lake = root / "w.duckdb", root / "lake"
    out = tmp_path / "out"
    out.mkdir()
    (root / "w.duckdb.tmp").mkdir(exist_ok=True)  # an existing spill folder must stay empty
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n42\n")
    run_dir = next(lake.glob("run_id=*"))
    statements = escape_statements(db, lake, out, secret, run_dir)
    assert len(statements) >= 72
    where = {"db": ["--db", db], "db-allow-files": ["--db", db, "--allow-files"], "lake": ["--lake", lake, "--db", db]}
    before = {"root": _tree(root), "out": _tree(out), "cwd": _tree(cwd), "tmp": _tree(tmp_path)}
    for sql in statements:
        r = cli("query", sql, *where[mode])
        assert "Traceback" not in r.err, (sql, r)
        kind = sql.split()[0].upper()
        reads_a_file = ("read_" in sql or "glob(" in sql or "sniff_csv" in sql or "FROM '" in sql)
        if kind not in ("SELECT", "FROM") or ";" in sql or (reads_a_file and mode != "db-allow-files"):
            assert r.rc == 2, (mode, sql, r)
            assert len(r.err.strip().splitlines()) == 1, (sql, r.err)
        if "42" in r.out:
            assert mode == "db-allow-files", (sql, r.out)  # the secret is read only when files are allowed
    after = {"root": _tree(root), "out": _tree(out), "cwd": _tree(cwd), "tmp": _tree(tmp_path)}
    assert after == before
    assert not list((root / "w.duckdb.tmp").iterdir()) and not list((cwd / ".tmp").iterdir())
    # and the reader still reads
    r = cli("query", "SELECT count(*) AS n FROM point_steps", *where[mode], "--json")
    assert r.rc == 0 and r.json()[0]["n"] > 0
