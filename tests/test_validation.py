"""Parameters outside their documented ranges (analysis.validate), at every entry: the SQL
UDFs fail the query with one error naming the UDF and the parameter; `account` refuses a
run stored with such values in one line naming the run and the parameter."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from conftest import query_rows
from dpledger import warehouse
from dpledger.ingest import ingest_steps


@pytest.mark.parametrize("sql,fragment", [
    ("SELECT dp_epsilon(0.01, 1.0, 1000, 1.0)", "dp_epsilon: delta 1 is outside (0, 1)"),
    ("SELECT dp_best_order(0.01, 1.0, -1, 1e-5)", "dp_best_order: steps -1 must be a whole number"),
    ("SELECT dp_epsilon(0.01, 'inf'::DOUBLE, 10, 1e-5)", "dp_epsilon: noise_multiplier inf is not finite"),
    ("SELECT rdp_step_cost(0.01, 1.0, 1.5, 2)", "rdp_step_cost: ratio 1.5 is outside [0, 1]"),
    ("SELECT rdp_step_cost(1e-300, 1.0, 0.5, 2)", "rdp_step_cost: sample_rate 1e-300 is outside [1e-12, 1]"),
    ("SELECT rdp_epsilon([2.0, 3.0], [0.1], 1e-5)", "rdp_epsilon: orders and rdp must be non-empty lists of one length"),
    ("SELECT rdp_best_order([1.0, 3.0], [0.1, 0.2], 1e-5)", "rdp_best_order: orders 1 is outside [1.01, 10000]"),
    ("SELECT rdp_epsilon([2.0, 3.0], [0.1, 'nan'::DOUBLE], 1e-5)", "rdp_epsilon: rdp NaN is not a number"),
    ("SELECT gla_ratio(1.0, 'inf'::DOUBLE, 10, false)", "gla_ratio: max_grad_norm inf is not finite"),
    ("SELECT gla_step_cost(0.01, 1.0, 0.5, 3, 8, 1, NULL, false)", "gla_step_cost: holder_p 1 is outside (1,"),
    ("SELECT rdp_sgm(0.5, 'nan'::DOUBLE, 2.5)", "rdp_sgm: noise_multiplier NaN is not a number"),
    # σ² underflows: this read-only query used to spin for ever
    ("SELECT rdp_sgm(0.5, 1e-160, 2.5)", "rdp_sgm: noise_multiplier 1e-160 is outside [0.001, inf)"),
])
def test_udfs_refuse_arguments_outside_their_ranges(db, sql, fragment):
    con = warehouse.connect(db)
    try:
        with pytest.raises(duckdb.Error) as info:
            con.sql(sql).fetchall()
    finally:
        con.close()
    message = str(info.value)
    assert fragment in message and "\n" not in message, message


def test_udfs_in_range_and_null(db):
    warehouse.connect(db).close()
    rows = query_rows(db, "SELECT rdp_sgm(0.01, 1.0, 2.5), rdp_sgm(NULL, 1.0, 2.5), dp_epsilon(0.01, 1.0, 0, 1e-5), "
                          "dp_params_valid(0.01, 1.0, 10, 1e-5), dp_params_valid(1e-300, 1.0, 10, 1e-5)")
    assert rows[0][0] > 0 and rows[0][1] is None and rows[0][2] > 0 and rows[0][3] is True and rows[0][4] is False


def _run(db, tmp_path, run, **override):
    """A run with norms, then its stored parameters overwritten as an older database may hold them."""
    df = pd.DataFrame({"step": np.repeat(np.arange(20), 3), "point_id": np.tile(np.arange(3), 20),
                       "grad_norm": np.random.default_rng(0).uniform(0, 2, 60)})
    path = tmp_path / f"{run}.parquet"
    df.to_parquet(path, index=False)
    con = warehouse.connect(db)
    try:
        ingest_steps(con, path, run, sample_rate=0.01, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, steps=20)
        for column, value in override.items():
            con.execute(f"UPDATE runs SET {column} = ? WHERE run_id = ?", [value, run])
    finally:
        con.close()


@pytest.mark.parametrize("column,value,fragment", [
    ("max_grad_norm", float("inf"), "run 'bad': max_grad_norm inf must be finite"),
    ("sample_rate", 1e-300, "run 'bad': sample_rate 1e-300 is outside [1e-12, 1]"),
    ("noise_multiplier", 1e-160, "run 'bad': noise_multiplier 1e-160 is outside [0.001, 1e+06]"),
    ("delta", 1.0, "run 'bad': delta 1.0 is outside (0, 1)"),
])
def test_account_refuses_a_run_stored_with_values_out_of_range(db, tmp_path, cli, column, value, fragment):
    _run(db, tmp_path, "good")
    _run(db, tmp_path, "bad", **{column: value})
    r = cli("account", "--run", "bad", "--db", db)
    assert r.rc == 2, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "--" not in lines[0], r
    assert query_rows(db, "SELECT count(*) FROM point_epsilon WHERE run_id = 'bad'") == [(0,)]
    # the other run is still accounted and ranked, with its run epsilon beside
    assert cli("account", "--run", "good", "--db", db).rc == 0
    r = cli("rank", "--run", "good", "--db", db, "--json")
    assert r.rc == 0 and all(row["run_epsilon"] > 0 for row in r.json()), r
    assert query_rows(db, "SELECT epsilon IS NULL FROM run_epsilon WHERE run_id = 'bad'") == [(column in (
        "sample_rate", "noise_multiplier", "delta"),)]
