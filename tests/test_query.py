"""Read-only query, parameter binding, output formats, and the SQLAlchemy path."""

from __future__ import annotations

import csv
import io

import pandas as pd
import polars as pl
import pytest
import sqlalchemy as sa

from dpledger import warehouse
from conftest import table_snapshot
from dpledger.warehouse import tables


def test_query_refuses_writes(gla_db, cli):
    before = table_snapshot(gla_db)
    for sql in ("DELETE FROM point_steps", "DROP TABLE runs", "CREATE TABLE x (a INT)",
                "INSERT INTO runs (run_id) VALUES ('x')", "UPDATE runs SET lr = 1"):
        r = cli("query", sql, "--db", gla_db)
        assert r.rc == 2, sql
        assert "read-only" in r.err
    assert table_snapshot(gla_db) == before


def test_query_cannot_touch_files_unless_allowed(gla_db, cli, tmp_path):
    target = tmp_path / "out.csv"
    r = cli("query", f"COPY (SELECT 1) TO '{target}'", "--db", gla_db)
    assert r.rc == 2 and not target.exists()
    (tmp_path / "in.csv").write_text("a\n1\n2\n")
    r = cli("query", f"SELECT sum(a) AS s FROM read_csv('{tmp_path / 'in.csv'}')", "--db", gla_db)
    assert r.rc == 2 and "--allow-files" in r.err
    r = cli("query", f"SELECT sum(a) AS s FROM read_csv('{tmp_path / 'in.csv'}')", "--allow-files",
            "--db", gla_db, "--json")
    assert r.rc == 0 and r.json() == [{"s": 3}]


def test_parameters_are_bound_not_pasted(gla_db, cli):
    r = cli("query", "SELECT count(*) AS n FROM point_steps WHERE point_id = $p AND step >= $s",
            "-p", "p", "3", "-p", "s=9000", "--db", gla_db, "--json")
    assert r.rc == 0, r
    assert r.json() == [{"n": 2}]  # steps 9100 and 9300
    evil = "res1' OR '1'='1"
    r = cli("query", "SELECT count(*) AS n FROM runs WHERE run_id = $r", "-p", "r", evil, "--db", gla_db, "--json")
    assert r.json() == [{"n": 0}]
    r = cli("query", "SELECT $r AS v", "-p", "r", "'; DROP TABLE runs; --", "--db", gla_db, "--json")
    assert r.json() == [{"v": "'; DROP TABLE runs; --"}]


def test_output_formats_agree(gla_db, cli):
    sql = "SELECT step, point_id, grad_norm FROM point_steps WHERE point_id < 2 ORDER BY step, point_id LIMIT 6"
    as_json = cli("query", sql, "--format", "json", "--db", gla_db).json()
    as_csv = list(csv.DictReader(io.StringIO(cli("query", sql, "-f", "csv", "--db", gla_db).out)))
    assert len(as_json) == len(as_csv) == 6
    for j, c in zip(as_json, as_csv):
        assert j["step"] == int(c["step"]) and j["point_id"] == int(c["point_id"])
        assert j["grad_norm"] == float(c["grad_norm"])  # full precision in both
    table = cli("query", sql, "--db", gla_db).out
    assert "grad_norm" in table and "6 rows" in table


def test_runs_json_is_pure_json(gla_db, cli):
    r = cli("runs", "--db", gla_db, "--json")
    assert r.rc == 0
    (run,) = r.json()
    assert run["run_id"] == "res1" and run["point_step_rows"] == 410 and run["evaluation_rows"] == 410


def test_unknown_table_is_one_line(gla_db, cli):
    r = cli("query", "SELECT * FROM nope", "--db", gla_db)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and "nope" in r.err


def test_sqlalchemy_engine_reads_the_same_rows(gla_db):
    con = warehouse.connect(gla_db, read_only=True)
    direct = con.sql("SELECT run_id, step, point_id, grad_norm FROM point_steps ORDER BY step, point_id").df()
    con.close()
    engine = warehouse.engine(gla_db, read_only=True)
    ps = tables.point_steps
    stmt = sa.select(ps.c.run_id, ps.c.step, ps.c.point_id, ps.c.grad_norm).order_by(ps.c.step, ps.c.point_id)
    with engine.connect() as c:
        via_core = pd.DataFrame(c.execute(stmt).fetchall(), columns=["run_id", "step", "point_id", "grad_norm"])
    pd.testing.assert_frame_equal(direct, via_core, check_dtype=False)
    via_pandas = pd.read_sql(stmt, engine)
    pd.testing.assert_frame_equal(direct, via_pandas, check_dtype=False)
    with engine.connect() as c:
        via_polars = pl.read_database(stmt, c)
    assert via_polars.height == 410
    assert via_polars["grad_norm"].to_list() == direct["grad_norm"].tolist()
    runs = tables.runs
    with engine.connect() as c:
        (q,) = c.execute(sa.select(runs.c.sample_rate).where(runs.c.run_id == sa.bindparam("r")), {"r": "res1"}).one()
    assert q == pytest.approx(256 / 60000)
    engine.dispose()


def test_read_only_engine_refuses_writes(gla_db):
    engine = warehouse.engine(gla_db, read_only=True)
    with engine.connect() as c, pytest.raises(sa.exc.DBAPIError, match="read-only"):
        c.execute(sa.text("DELETE FROM runs"))
    engine.dispose()
