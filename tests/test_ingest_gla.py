"""Ingest of the real GLA-format fixture, checked against the CSV read independently."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import copy_as_run, query_rows as _q, table_snapshot


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))




def test_fixture_rows_land_with_exact_counts_and_values(gla_db, gla_dir):
    rows = _csv_rows(gla_dir / "res1.csv")
    assert len(rows) == 410
    assert _q(gla_db, "SELECT count(*) FROM point_steps WHERE run_id = 'res1'") == [(410,)]
    assert _q(gla_db, "SELECT count(*) FROM evaluations WHERE run_id = 'res1'") == [(410,)]
    assert _q(gla_db, "SELECT count(*) FROM steps WHERE run_id = 'res1'") == [(41,)]
    assert _q(gla_db, "SELECT count(*) FROM points WHERE dataset = 'MNIST'") == [(10,)]
    assert _q(gla_db, "SELECT bool_and(norm_clipped) FROM point_steps") == [(True,)]
    # pick rows across the file, the reformatted last checkpoint included
    for i in (0, 17, 133, 256, 409):
        row = rows[i]
        step, point = int(row["step"]), int(row["point"])
        got = _q(gla_db, "SELECT grad_norm FROM point_steps WHERE run_id='res1' AND step=? AND point_id=?",
                 [step, point])
        assert got[0][0] == pytest.approx(float(row["distance (sum)"]) * int(row["batch_size"]), rel=1e-12)
        correct = _q(gla_db, "SELECT correct FROM evaluations WHERE run_id='res1' AND step=? AND point_id=?",
                     [step, point])
        assert correct == [(row["correct"] == "1",)]
        acc = _q(gla_db, "SELECT test_accuracy FROM steps WHERE run_id='res1' AND step=?", [step])
        assert acc[0][0] == pytest.approx(float(row["accuracy"]))


def test_fixture_run_parameters(gla_db):
    (run,) = _q(gla_db, "SELECT sample_rate, noise_multiplier, max_grad_norm, batch_size, epochs, "
                        "target_epsilon, seed, dataset, model, lr, private, delta, n_train, steps, config "
                        "FROM runs WHERE run_id = 'res1'")
    q, sigma, c, b, epochs, eps, seed, dataset, model, lr, private, delta, n_train, steps, config = run
    assert q == 0.004266666666666667  # the most precise spelling in the file (row 402 on)
    assert sigma == 0.57891845703125 and c == 1.0 and b == 256 and epochs == 40.0
    assert eps == 10.0 and seed == 24 and dataset == "MNIST" and model == "lenet" and lr == 0.1
    assert private is True and delta == 1e-5 and n_train == 60000
    assert steps == 9375  # floor(epochs / q) = floor(40 * 60000 / 256), as Opacus's get_noise_multiplier counts
    config = json.loads(config)
    assert config["optimizer"] == "sgd" and config["norm_type"] == "gn" and config["alpha"] == 8
    assert {"type", "stage"} <= set(config["varying_columns"])


def test_reingest_is_a_noop(gla_db, gla_dir, cli):
    before = table_snapshot(gla_db)
    r = cli("ingest", "gla-csv", gla_dir / "res1.csv", "--db", gla_db, "--json")
    assert r.rc == 0, r
    assert r.json()[0]["status"] == "skipped"
    assert table_snapshot(gla_db) == before


def test_renamed_copies_become_separate_runs(gla_db, gla_dir, tmp_path, cli):
    a = copy_as_run(gla_dir / "res1.csv", tmp_path / "res2.csv", "res2")
    b = copy_as_run(gla_dir / "res1.csv", tmp_path / "res3.csv", "res3")
    r = cli("ingest", "gla-csv", a, b, "--db", gla_db, "--json")
    assert r.rc == 0, r
    assert [x["runs"] for x in r.json()] == [["res2"], ["res3"]]
    assert _q(gla_db, "SELECT run_id, count(*) FROM point_steps GROUP BY 1 ORDER BY 1") == [
        ("res1", 410), ("res2", 410), ("res3", 410)]
    assert _q(gla_db, "SELECT count(*) FROM points") == [(10,)]  # the same MNIST points
    same = _q(gla_db, "SELECT count(*) FROM point_steps a JOIN point_steps b USING (step, point_id) "
                      "WHERE a.run_id = 'res1' AND b.run_id = 'res3' AND a.grad_norm = b.grad_norm")
    assert same == [(410,)]
    runs = cli("runs", "--db", gla_db, "--json").json()
    assert [(x["run_id"], x["point_step_rows"], x["points_tracked"], x["steps_recorded"]) for x in runs] == [
        ("res1", 410, 10, 41), ("res2", 410, 10, 41), ("res3", 410, 10, 41)]


def test_run_option_names_the_run(db, gla_dir, cli):
    r = cli("ingest", "gla-csv", gla_dir / "res1.csv", "--run", "mine", "--delta", "1e-6", "--db", db)
    assert r.rc == 0, r
    assert _q(db, "SELECT run_id, delta FROM runs") == [("mine", 1e-6)]
    # the same file under another name is another ingest, not a no-op
    r = cli("ingest", "gla-csv", gla_dir / "res1.csv", "--run", "mine2", "--db", db)
    assert r.rc == 0 and "410" in r.out
    assert _q(db, "SELECT count(*) FROM point_steps") == [(820,)]


def test_rows_split_across_files_join_one_run(db, gla_dir, tmp_path, cli):
    lines = (gla_dir / "res1.csv").read_text().splitlines()
    (tmp_path / "a.csv").write_text("\n".join(lines[:200]) + "\n")
    (tmp_path / "b.csv").write_text("\n".join([lines[0]] + lines[200:]) + "\n")
    assert cli("ingest", "gla-csv", tmp_path / "a.csv", tmp_path / "b.csv", "--db", db).rc == 0
    assert _q(db, "SELECT count(*), count(DISTINCT run_id) FROM point_steps") == [(410, 1)]
    assert _q(db, "SELECT count(*) FROM steps") == [(41,)]


def test_points_per_query_rescales_to_per_example_norms(tmp_path, gla_dir, cli):
    """The study's recorded distance x batch_size is min(|grad|/k, C) for k points queried
    together; --points-per-query k stores min(k x that, C), the per-example clipped norm,
    records k, and legacy scaling (the study's own costs) refuses the rescaled run."""
    import csv

    plain, scaled = tmp_path / "plain.duckdb", tmp_path / "scaled.duckdb"
    assert cli("ingest", "gla-csv", gla_dir / "res1.csv", "--db", plain).rc == 0
    r = cli("ingest", "gla-csv", gla_dir / "res1.csv", "--points-per-query", "10", "--db", scaled)
    assert r.rc == 0, r
    rows = list(csv.DictReader(open(gla_dir / "res1.csv")))
    expected = {(int(x["step"]), int(x["point"])): min(10 * float(x["distance (sum)"]) * float(x["batch_size"]),
                                                      float(x["cn"])) for x in rows}
    got = {(s, p): g for s, p, g in _q(scaled, "SELECT step, point_id, grad_norm FROM point_steps")}
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) <= 1e-12 * max(1.0, expected[k]) for k in got)
    assert any(got[k] > v for k, v in _q_dict(plain).items())  # some norms grew: the tiny ones, tenfold
    assert _q(scaled, "SELECT json_extract(config, '$.points_per_query')::INT FROM runs") == [(10,)]
    assert cli("account", "--db", scaled).rc == 0
    r = cli("account", "--rule", "gla", "--legacy-scaling", "--db", scaled)
    assert r.rc == 2 and "--legacy-scaling" in r.err and "points_per_query" in r.err, r
    r = cli("ingest", "gla-csv", gla_dir / "res1.csv", "--points-per-query", "0", "--db", tmp_path / "x.duckdb")
    assert r.rc == 2 and "--points-per-query 0" in r.err, r


def _q_dict(db):
    return {(s, p): g for s, p, g in _q(db, "SELECT step, point_id, grad_norm FROM point_steps")}
