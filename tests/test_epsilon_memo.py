"""The data-independent ε remembered by writers (``dp_epsilon_memo``) and read by ``runs``.

Writers store a run's ε when they store or change its (q, σ, steps, δ); ``dpledger runs``
reads it from there (no RDP evaluated on a read), and falls back to computing it for a
run the memo lacks. Checked against Opacus's RDP accountant.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from opacus.accountants import RDPAccountant

from dpledger import warehouse
from dpledger.analysis import rdp
from dpledger.analysis.rdp import DEFAULT_ORDERS
from dpledger.ingest import ingest_steps
from dpledger.warehouse import udfs

Q, SIGMA, STEPS, DELTA = 0.02, 0.9, 40, 1e-5


def opacus_epsilon(q, sigma, steps, delta):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_privacy_spent(delta=delta, alphas=list(DEFAULT_ORDERS))


def steps_file(tmp_path, steps=STEPS, points=5):
    path = tmp_path / "steps.parquet"
    pq.write_table(pa.table({
        "step": np.repeat(np.arange(steps), points), "point_id": np.tile(np.arange(points), steps),
        "grad_norm": np.linspace(0.1, 2.0, steps * points),
    }), path)
    return path


def ingest(db, tmp_path, run="r", **params):
    con = warehouse.connect(db)
    try:
        ingest_steps(con, steps_file(tmp_path), run, **{"sample_rate": Q, "noise_multiplier": SIGMA,
                                                         "max_grad_norm": 1.0, "delta": DELTA, **params})
    finally:
        con.close()


def memo(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT sample_rate, noise_multiplier, steps, delta, epsilon, best_order "
                           "FROM dp_epsilon_memo ORDER BY ALL").fetchall()
    finally:
        con.close()


def test_ingest_remembers_the_run_epsilon_as_opacus_computes_it(db, tmp_path):
    ingest(db, tmp_path)
    ((q, sigma, steps, delta, eps, order),) = memo(db)
    assert (q, sigma, steps, delta) == (Q, SIGMA, STEPS, DELTA)
    want, want_order = opacus_epsilon(Q, SIGMA, STEPS, DELTA)
    assert eps == pytest.approx(want, rel=1e-10) and order == want_order


def test_runs_reads_the_memo_without_evaluating_rdp(db, tmp_path, cli, monkeypatch):
    ingest(db, tmp_path)
    remembered = memo(db)[0][4]

    def refuse(*_a, **_k):
        raise AssertionError("runs evaluated the RDP of the sampled Gaussian")

    monkeypatch.setattr(rdp, "dp_epsilon", refuse)
    udfs.dp_epsilon_of.cache_clear()  # the ingest computed it in this process: a cached ε would hide a call
    r = cli("runs", "--db", db, "--json")
    assert r.rc == 0, r
    (run,) = r.json()
    assert run["epsilon"] == remembered


def test_a_run_the_memo_lacks_is_computed_on_read(db, tmp_path, cli):
    """A database whose memo lost a row (or never had it) still lists the right ε."""
    ingest(db, tmp_path)
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM dp_epsilon_memo")
    con.close()
    (run,) = cli("runs", "--db", db, "--json").json()
    assert run["epsilon"] == pytest.approx(opacus_epsilon(Q, SIGMA, STEPS, DELTA)[0], rel=1e-10)
    assert memo(db) == []  # the read wrote nothing


def test_changed_steps_are_remembered_too(db, tmp_path, cli):
    """Ingesting more steps into a run extends its steps: the new mechanism is remembered."""
    ingest(db, tmp_path)
    con = warehouse.connect(db)
    try:
        longer = tmp_path / "more"
        longer.mkdir()
        ingest_steps(con, steps_file(longer, steps=STEPS + 10), "r2", sample_rate=Q, noise_multiplier=SIGMA,
                     max_grad_norm=1.0, delta=DELTA)
    finally:
        con.close()
    assert [row[2] for row in memo(db)] == [STEPS, STEPS + 10]
    by_run = {run["run_id"]: run["epsilon"] for run in cli("runs", "--db", db, "--json").json()}
    assert by_run["r2"] == pytest.approx(opacus_epsilon(Q, SIGMA, STEPS + 10, DELTA)[0], rel=1e-10)
    assert by_run["r2"] > by_run["r"]


def test_a_database_from_before_the_memo_gets_it_filled_on_upgrade(db, tmp_path):
    ingest(db, tmp_path)
    con = duckdb.connect(str(db))  # back to schema 5: no memo table, the ledger's column as 5 named it
    con.execute("DROP TABLE dp_epsilon_memo")
    con.execute("ALTER TABLE ingests RENAME COLUMN digest TO sha256")
    con.execute("DELETE FROM schema_version WHERE version >= 6")
    con.close()
    with pytest.raises(warehouse.UserError, match="schema version 5"):
        warehouse.connect(db, read_only=True)
    summary = warehouse.init(db)
    assert "applied 006_epsilon_memo.sql" in summary["actions"]
    ((*_key, eps, _order),) = memo(db)
    assert eps == pytest.approx(opacus_epsilon(Q, SIGMA, STEPS, DELTA)[0], rel=1e-10)


def test_runs_with_parameters_out_of_range_are_not_remembered(db, tmp_path):
    """A non-private run has no data-independent ε: nothing is stored for it."""
    con = warehouse.connect(db)
    con.execute("INSERT INTO runs (run_id, sample_rate, noise_multiplier, steps, delta, private) "
                "VALUES ('np', 0.1, 1.0, 10, 1e-5, false), ('bad', 0.1, 1.0, 10, 2.0, true)")
    from dpledger.warehouse.runs import remember_epsilon

    assert remember_epsilon(con) == 0
    con.close()
    assert memo(db) == []
