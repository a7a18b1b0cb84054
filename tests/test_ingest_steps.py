"""The generic per-point, per-step ingest (CSV and Parquet)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import query_rows as _q, table_snapshot




def _frame(n_points=5, n_steps=4, seed=0):
    rng = np.random.default_rng(seed)
    steps, points = np.meshgrid(np.arange(n_steps), np.arange(n_points), indexing="ij")
    return pd.DataFrame({
        "step": steps.ravel(),
        "point_id": points.ravel() + 100,
        "grad_norm": rng.gamma(2.0, 0.5, steps.size),
        "loss": rng.random(steps.size),
        "sampled": rng.random(steps.size) < 0.3,
    })


RUN = ["--sample-rate", "0.01", "--noise-multiplier", "1.1", "--max-grad-norm", "1.0"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_steps_file_lands_row_for_row(db, tmp_path, cli, fmt):
    df = _frame()
    path = tmp_path / f"norms.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path, index=False)
    r = cli("ingest", "steps", path, "--run", "r1", *RUN, "--dataset", "toy", "--db", db)
    assert r.rc == 0, r
    got = pd.DataFrame(_q(db, "SELECT step, point_id, grad_norm, loss, sampled FROM point_steps "
                              "WHERE run_id = 'r1' ORDER BY step, point_id"),
                       columns=["step", "point_id", "grad_norm", "loss", "sampled"])
    want = df.sort_values(["step", "point_id"]).reset_index(drop=True)
    np.testing.assert_array_equal(got.step, want.step)
    np.testing.assert_array_equal(got.point_id, want.point_id)
    np.testing.assert_allclose(got.grad_norm, want.grad_norm, rtol=1e-15)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-15)
    np.testing.assert_array_equal(got.sampled.astype(bool), want.sampled)
    assert _q(db, "SELECT sample_rate, noise_multiplier, max_grad_norm, delta, steps, dataset FROM runs") == [
        (0.01, 1.1, 1.0, 1e-5, 4, "toy")]
    assert _q(db, "SELECT count(*), min(point_id), max(point_id) FROM points WHERE dataset = 'toy'") == [(5, 100, 104)]
    assert _q(db, "SELECT bool_or(norm_clipped) FROM point_steps") == [(False,)]


def test_more_steps_for_an_existing_run_extend_it(db, tmp_path, cli):
    df = _frame(n_steps=6)
    df[df.step < 3].to_csv(tmp_path / "a.csv", index=False)
    df[df.step >= 3].to_csv(tmp_path / "b.csv", index=False)
    assert cli("ingest", "steps", tmp_path / "a.csv", "--run", "r", *RUN, "--db", db).rc == 0
    # later files may omit the parameters; the stored run supplies them
    r = cli("ingest", "steps", tmp_path / "b.csv", "--run", "r", "--db", db)
    assert r.rc == 0, r
    assert _q(db, "SELECT count(*) FROM point_steps") == [(30,)]
    assert _q(db, "SELECT steps FROM runs") == [(6,)]


def test_conflicting_run_parameters_are_refused(db, tmp_path, cli):
    df = _frame()
    df[df.step < 2].to_csv(tmp_path / "a.csv", index=False)
    df[df.step >= 2].to_csv(tmp_path / "b.csv", index=False)
    assert cli("ingest", "steps", tmp_path / "a.csv", "--run", "r", *RUN, "--db", db).rc == 0
    before = table_snapshot(db)
    r = cli("ingest", "steps", tmp_path / "b.csv", "--run", "r", "--sample-rate", "0.02", "--db", db)
    assert r.rc == 2
    assert "sample_rate" in r.err and "0.02" in r.err and "conflicts" in r.err
    assert table_snapshot(db) == before


def test_new_run_needs_its_parameters(db, tmp_path, cli):
    _frame().to_csv(tmp_path / "a.csv", index=False)
    r = cli("ingest", "steps", tmp_path / "a.csv", "--run", "r", "--sample-rate", "0.1", "--db", db)
    assert r.rc == 2
    assert "--noise-multiplier" in r.err and "--max-grad-norm" in r.err


def test_same_file_for_another_run_is_not_a_noop(db, tmp_path, cli):
    _frame().to_parquet(tmp_path / "a.parquet")
    assert cli("ingest", "steps", tmp_path / "a.parquet", "--run", "x", *RUN, "--db", db).rc == 0
    r = cli("ingest", "steps", tmp_path / "a.parquet", "--run", "x", *RUN, "--db", db, "--json")
    assert r.json()[0]["status"] == "skipped"
    assert cli("ingest", "steps", tmp_path / "a.parquet", "--run", "y", *RUN, "--db", db).rc == 0
    assert _q(db, "SELECT run_id, count(*) FROM point_steps GROUP BY 1 ORDER BY 1") == [("x", 20), ("y", 20)]
