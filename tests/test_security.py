"""Every CLI argument that reaches SQL is bound or validated: injection strings change
nothing, read nothing they should not, and fail (if at all) with one clean line."""

from __future__ import annotations

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
