"""`dpledger fit` and `dpledger account --fill`: fills between checkpoints in the warehouse."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pandas as pd
import pytest
from opacus.accountants.analysis.rdp import compute_rdp

from dpledger import warehouse
from dpledger.analysis import rdp
from dpledger.ingest import ingest_steps

ORDERS = list(rdp.DEFAULT_ORDERS)


def _run(db, tmp, df, steps):
    path = tmp / "r.parquet"
    df.to_parquet(path, index=False)
    con = warehouse.connect(db)
    ingest_steps(con, path, "r", sample_rate=0.02, noise_multiplier=1.0, max_grad_norm=1.0, steps=steps)
    con.close()


def test_account_with_linear_fill_composes_the_interpolated_ratios(db, tmp_path, cli):
    df = pd.DataFrame({"step": [0, 10, 20, 0, 10, 20], "point_id": [0, 0, 0, 1, 1, 1],
                       "grad_norm": [0.2, 0.8, 0.5, 1.5, 0.1, 0.1]})
    _run(db, tmp_path, df, steps=25)
    for fill in ("linear", "step"):
        r = cli("account", "--fill", fill, "--exact", "--db", db)
        assert r.rc == 0, r
        con = duckdb.connect(str(db), read_only=True)
        got = con.execute("SELECT epsilon, steps_covered FROM point_epsilon ORDER BY point_id").fetchall()
        assert con.execute("SELECT fill FROM accountings").fetchall()[0][0].startswith(fill if fill != "step" else "hold")
        con.close()
        for p in (0, 1):
            rec = df[df.point_id == p]
            r_rec = np.minimum(rec.grad_norm.to_numpy(), 1.0)
            t = np.arange(25)
            ratios = np.interp(t, rec.step, r_rec) if fill == "linear" else r_rec[np.searchsorted(rec.step, t, "right") - 1]
            curve = sum(np.asarray(compute_rdp(q=0.02, noise_multiplier=1.0 / x, steps=1, orders=ORDERS)) for x in ratios)
            assert got[p][0] == pytest.approx(rdp.epsilon_from_rdp(curve, 1e-5, ORDERS)[0], rel=1e-8)
            assert got[p][1] == 25
    r = cli("account", "--fill", "linear", "--db", db)  # the fast path stays above exact, within 1e-3
    assert r.rc == 0


def test_fit_stores_the_fit_and_its_holdout(gla_db, cli):
    r = cli("fit", "--run", "res1", "--method", "linear", "--method", "pchip", "--holdout", "3", "--db", gla_db, "--json")
    assert r.rc == 0, r
    out = r.json()
    assert [x["method"] for x in out] == ["linear", "pchip"]
    assert all(x["n_points"] == 10 and x["n_records"] == 410 for x in out)
    assert all(np.isfinite(x["metrics"]["eps_mae"]) and x["metrics"]["held_out"] == 130 for x in out)
    con = duckdb.connect(str(gla_db), read_only=True)
    rows = con.execute("SELECT method, holdout_k, params, metrics FROM fits ORDER BY method").fetchall()
    con.close()
    assert [(m, k) for m, k, _, _ in rows] == [("linear", 3), ("pchip", 3)]
    assert json.loads(rows[0][3])["cost_mae"] == pytest.approx(out[0]["metrics"]["cost_mae"])
    r = cli("fit", "--run", "res1", "--method", "pchip", "--holdout", "3", "--db", gla_db)
    assert r.rc == 0 and "pchip" in r.out  # refitting replaces the row
    con = duckdb.connect(str(gla_db), read_only=True)
    assert con.execute("SELECT count(*) FROM fits").fetchall() == [(2,)]
    con.close()


@pytest.mark.parametrize("args,fragment", [
    (["fit", "--run", "res1", "--method", "spline"], "--method spline"),
    (["fit", "--run", "res1", "--holdout", "1"], "--holdout 1"),
    (["fit", "--run", "nope"], "unknown run 'nope'"),
    (["account", "--fill", "spline"], "--fill spline"),
    (["account", "--fill", "linear", "--rule", "gla"], "--fill goes with --rule rdp"),
])
def test_fit_bad_input(gla_db, cli, args, fragment):
    r = cli(*args, "--db", gla_db)
    assert r.rc == 2 and fragment in r.err, r
