"""A Parquet lake queried and accounted in place equals the same data merged into a file."""

from __future__ import annotations

import shutil

import duckdb
import pytest

from dpledger import warehouse
from dpledger.warehouse import accounting
from dpledger.warehouse.lake import connect_lake


@pytest.fixture(scope="module")
def lake_and_db(tmp_path_factory):
    from dpledger.cli import main

    d = tmp_path_factory.mktemp("lake")
    config = d / "s.toml"
    config.write_text('[base]\ndataset = "digits"\nmodel = "logreg"\nepochs = 2\nn_train = 100\nbatch_size = 20\n'
                      'track = "10"\nnoise_multiplier = 1.0\nmax_grad_norm = 0.5\ncommit_every = 3\n'
                      '[grid]\nseed = [0, 1]\n')
    db = d / "merged.duckdb"
    assert main(["sweep", str(config), "--db", str(db), "--lake", str(d / "lake")]) == 0
    return d / "lake", db


def _eps(con, run):
    return con.execute("SELECT point_id, epsilon FROM point_epsilon WHERE run_id = ? ORDER BY point_id",
                       [run]).fetchall()


def test_views_over_the_lake_equal_the_merged_database(lake_and_db):
    lake, db = lake_and_db
    con = connect_lake(lake)
    merged = warehouse.connect(db, read_only=True)
    for sql in ("SELECT run_id, step, point_id, grad_norm, sampled FROM point_steps ORDER BY ALL",
                "SELECT run_id, step, batch_size, loss FROM steps ORDER BY ALL",
                "SELECT run_id, step, point_id, correct FROM evaluations ORDER BY ALL",
                "SELECT run_id, sample_rate, noise_multiplier, steps, status, committed_step, config_key FROM runs "
                "ORDER BY ALL",
                "SELECT dataset, point_id, label FROM points ORDER BY ALL"):
        assert con.execute(sql).fetchall() == merged.execute(sql).fetchall(), sql
    merged.close()
    accounting.account(con)
    rw = warehouse.connect(db)
    accounting.account(rw)
    for run in ("s0", "s1"):
        a, b = _eps(con, run), _eps(rw, run)
        assert len(a) == 10 and a == b
    rw.close()
    con.close()


def test_account_lake_writes_results_to_a_database(lake_and_db, tmp_path, cli):
    lake, _ = lake_and_db
    out = tmp_path / "results.duckdb"
    r = cli("account", "--lake", lake, "--db", out, "--json")
    assert r.rc == 0, r
    assert sorted(s["run_id"] for s in r.json()) == ["s0", "s1"]
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT count(*) FROM point_epsilon").fetchall() == [(20,)]
    assert con.execute("SELECT count(*) FROM point_steps").fetchall() == [(0,)]  # nothing loaded
    con.close()
    ranked = cli("rank", "--run", "s0", "--lowest", "3", "--db", out, "--json").json()
    eps = [x["epsilon"] for x in ranked]
    # SQL rank(): equal epsilon, equal rank (at C = 0.5 a logreg's points are clipped at most steps)
    assert [x["rank"] for x in ranked] == [1 + sum(e < x for e in eps) for x in eps] and eps == sorted(eps)
    assert ranked[0]["label"] is not None


def test_unlisted_files_are_not_read(lake_and_db, tmp_path):
    lake, _ = lake_and_db
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    shard = next((copy / "run_id=s0" / "point_steps").glob("part-*.parquet"))
    shutil.copy(shard, shard.with_name("part-w9-999999.parquet"))  # a renamed shard the manifest never listed
    con = connect_lake(copy)
    n = con.execute("SELECT count(*) FROM point_steps WHERE run_id = 's0'").fetchall()[0][0]
    con.close()
    con = connect_lake(lake)
    assert n == con.execute("SELECT count(*) FROM point_steps WHERE run_id = 's0'").fetchall()[0][0]
    con.close()


def test_lake_errors(tmp_path, cli):
    r = cli("query", "SELECT 1", "--lake", tmp_path / "nope")
    assert r.rc == 2 and "no such lake folder" in r.err
    r = cli("account", "--lake", tmp_path, "--db", tmp_path / "x.duckdb")
    assert r.rc == 2 and "no committed runs" in r.err


def test_account_lake_per_run_on_ray_equals_local(lake_and_db, tmp_path, cli):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'dpledger[distributed]'")
    local, ray_db = tmp_path / "local.duckdb", tmp_path / "ray.duckdb"
    lake, _ = lake_and_db
    assert cli("account", "--lake", lake, "--db", local).rc == 0
    r = cli("account", "--lake", lake, "--db", ray_db, "--executor", "ray")
    assert r.rc == 0, r
    a, b = (duckdb.connect(str(p), read_only=True) for p in (local, ray_db))
    q = "SELECT run_id, point_id, epsilon, best_order FROM point_epsilon ORDER BY ALL"
    assert a.execute(q).fetchall() == b.execute(q).fetchall() and len(a.execute(q).fetchall()) == 20
    q = "SELECT config_key, point_id, n_runs, epsilon_expected FROM config_epsilon ORDER BY ALL"
    assert a.execute(q).fetchall() == b.execute(q).fetchall()
    a.close()
    b.close()
