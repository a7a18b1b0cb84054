"""The tight (PLD) accountant in the warehouse, the CLI and the report: ``--accountant pld``.

Stored as the composition label ``rule = 'pld'`` beside the rdp rows; numbers from
:mod:`analysis.pld` (tested against dp_accounting in tests/test_pld.py), checked here for
the warehouse plumbing: the hold-last histogram, the run's data-independent PLD ε beside
the ranking, PLD ≤ RDP per point, the budget, the refusals.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpledger import warehouse
from dpledger.analysis import pld
from dpledger.analysis.budget import budget
from dpledger.analysis.validate import ParameterError
from dpledger.warehouse import accounting
from dpledger.warehouse.account_pld import PLD_MEANING
from dpledger.warehouse.errors import UserError
from test_accounting import eps_table, make_run, run_account

dpa = pytest.importorskip("dp_accounting")

DELTA = 1e-5


def dp_accounting_dpsgd(q, sigma, steps, delta=DELTA) -> float:
    """dp_accounting's PLD accountant on the DP-SGD event (its default settings)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def norms(rng, steps, n):
    """(steps, n) norms with C = 1: point 0 at or above C at every step, the rest of several shapes."""
    out = rng.uniform(0.05, 0.9, (steps, n))
    out[:, 0] = rng.uniform(1.0, 3.0, steps)                        # clipped at every step
    out[:, 1] = rng.uniform(0.001, 0.01, steps)                     # tiny
    out[:, 2] = np.where(rng.random(steps) < 0.7, 0.0, 2.0)         # many zeros, else clipped
    out[:, 3] = np.minimum(0.05 * rng.pareto(1.5, steps) + 0.01, 2)  # heavy tail
    return out


@pytest.fixture
def pld_run(db, tmp_path):
    """A dense run (every step recorded) and a checkpointed one (hold-last covers), both accounted rdp then pld."""
    rng = np.random.default_rng(0)
    dense = norms(rng, 400, 8)
    make_run(db, "dense", dense, q=0.01, sigma=1.0, tmp=tmp_path)
    ckpt = norms(rng, 20, 8)
    make_run(db, "ckpt", ckpt, q=0.01, sigma=1.0, steps=400, record_steps=np.arange(0, 400, 20), tmp=tmp_path)
    rdp_sum = run_account(db, ["dense", "ckpt"])
    pld_sum = run_account(db, ["dense", "ckpt"], accountant="pld")
    return {"dense": dense, "ckpt": ckpt, "rdp": rdp_sum, "pld": pld_sum}


def test_clipped_point_gets_the_run_pld_epsilon_and_dp_accountings(db, pld_run):
    got = eps_table(db, "dense", "pld")
    run_eps = pld.data_independent_epsilon_pld(0.01, 1.0, 400, DELTA)
    assert got.epsilon[0] == pytest.approx(run_eps, rel=1e-6)
    summary = {s["run_id"]: s for s in pld_run["pld"]}["dense"]
    assert summary["run_epsilon"] == pytest.approx(run_eps, rel=1e-12)
    assert summary["epsilon_max"] == pytest.approx(run_eps, rel=1e-6)
    ref = dp_accounting_dpsgd(0.01, 1.0, 400)
    assert ref * (1 - 1e-6) <= got.epsilon[0] <= ref * 1.01  # the documented tolerance of the default grid
    assert got.best_order.isna().all() and not got.exact.any() and (got.steps_covered == 400).all()
    from dpledger.warehouse.rank import rank_summary

    con = warehouse.connect(db, read_only=True)
    try:
        rs = rank_summary(con, "dense", "pld")
    finally:
        con.close()
    assert rs["run_epsilon"] == pytest.approx(run_eps, rel=1e-12) and rs["highest_at_run_epsilon"]
    assert rs["above_run_epsilon"] == 0 and any(PLD_MEANING in n for n in rs["notes"])


def test_pld_is_at_most_rdp_for_every_point(db, pld_run):
    for run in ("dense", "ckpt"):
        r, p = eps_table(db, run, "rdp"), eps_table(db, run, "pld")
        assert (r.point_id.to_numpy() == p.point_id.to_numpy()).all()
        assert (p.epsilon.to_numpy() <= r.epsilon.to_numpy()).all(), run
        assert (p.steps_covered.to_numpy() == r.steps_covered.to_numpy()).all()


def test_warehouse_equals_analysis_on_the_same_histogram(db, pld_run):
    grid = pld.geometric_grid()
    table = pld.pld_table(0.01, 1.0, grid)
    # dense: one step a row
    hist = pld.pld_histogram(np.tile(np.arange(8), 400), np.minimum(pld_run["dense"], 1.0).ravel(), 8, grid)
    want = pld.per_example_epsilon_pld(hist, 0.01, 1.0, DELTA, table=table)
    np.testing.assert_allclose(eps_table(db, "dense", "pld").epsilon, want, rtol=1e-12)
    # checkpoints every 20 steps: each record stands for 20 steps (hold-last)
    hist = pld.pld_histogram(np.tile(np.arange(8), 20), np.minimum(pld_run["ckpt"], 1.0).ravel(), 8, grid,
                             covers=np.full(160, 20.0))
    want = pld.per_example_epsilon_pld(hist, 0.01, 1.0, DELTA, table=table)
    np.testing.assert_allclose(eps_table(db, "ckpt", "pld").epsilon, want, rtol=1e-12)


def test_summary_and_tables(db, pld_run):
    s = pld_run["pld"][0]
    assert s["rule"] == "pld" and s["meaning"] == PLD_MEANING and s["points_above_run_epsilon"] == 0
    assert any("error budget" in n and "grid rounding" in n and "delta tail" in n for n in s["notes"])
    con = warehouse.connect(db, read_only=True)
    try:
        acc = con.execute("SELECT rule, exact FROM accountings WHERE run_id = 'dense' ORDER BY rule").fetchall()
        assert acc == [("pld", False), ("rdp", False)]
        assert con.execute("SELECT count(*) FROM point_epsilon WHERE rule = 'pld' AND (rdp IS NOT NULL "
                           "OR best_order IS NOT NULL)").fetchall()[0][0] == 0
        cfg = con.execute("SELECT count(*), count(epsilon_expected), min(n_runs) FROM config_epsilon "
                          "WHERE rule = 'pld'").fetchall()[0]
        assert cfg == (8, 0, 2)  # both runs share one configuration; no expectation under pld
        side = con.execute("SELECT point_id, epsilon_rdp, epsilon_pld, ratio_pld_rdp FROM point_epsilon_accountants "
                           "WHERE run_id = 'dense' ORDER BY point_id").df()
        np.testing.assert_allclose(side.epsilon_pld / side.epsilon_rdp, side.ratio_pld_rdp)
        assert (side.ratio_pld_rdp < 1).all()
    finally:
        con.close()


def test_account_pld_leaves_the_rdp_rows_untouched(db, tmp_path):
    make_run(db, "a", norms(np.random.default_rng(1), 200, 5), q=0.02, sigma=1.2, tmp=tmp_path)
    run_account(db, ["a"])
    con = warehouse.connect(db, read_only=True)
    q = ("SELECT * EXCLUDE (computed_at) FROM accountings WHERE rule = 'rdp' ORDER BY ALL",
         "SELECT * FROM point_epsilon WHERE rule = 'rdp' ORDER BY ALL",
         "SELECT * FROM config_epsilon WHERE rule = 'rdp' ORDER BY ALL")
    before = [con.execute(s).fetchall() for s in q]
    con.close()
    run_account(db, ["a"], accountant="pld")
    con = warehouse.connect(db, read_only=True)
    try:
        assert [con.execute(s).fetchall() for s in q] == before
    finally:
        con.close()


def test_gla_with_pld_is_refused_in_one_line(gla_db, cli):
    r = cli("account", "--rule", "gla", "--accountant", "pld", "--db", gla_db)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and "rule rdp only" in r.err, r
    con = warehouse.connect(gla_db)
    try:
        with pytest.raises(UserError, match="rule rdp only"):
            accounting.account(con, rule="gla", accountant="pld")
        with pytest.raises(UserError, match="accountant"):
            accounting.account(con, accountant="prv")
    finally:
        con.close()
    r = cli("rank", "--run", "res1", "--rule", "gla", "--accountant", "pld", "--db", gla_db)
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1, r


def test_cli_account_rank_report_on_the_fixture(gla_db, cli, tmp_path):
    assert cli("account", "--db", gla_db).rc == 0
    r = cli("account", "--accountant", "pld", "--db", gla_db)
    assert r.rc == 0, r
    assert "tighter description" in r.out and "error budget" in r.out and "data-independent PLD epsilon" in r.out
    r = cli("rank", "--run", "res1", "--accountant", "pld", "--lowest", "3", "--json", "--db", gla_db)
    assert r.rc == 0, r
    rows = r.json()
    con = warehouse.connect(gla_db, read_only=True)
    try:
        run = con.execute("SELECT sample_rate, noise_multiplier, steps, delta FROM runs WHERE run_id = 'res1'").fetchall()[0]
        pld_eps = con.execute("SELECT point_id, epsilon FROM point_epsilon WHERE run_id = 'res1' AND rule = 'pld' "
                              "ORDER BY epsilon, point_id LIMIT 3").fetchall()
        rdp_run = con.execute("SELECT epsilon FROM run_epsilon WHERE run_id = 'res1'").fetchall()[0][0]
    finally:
        con.close()
    run_eps = pld.data_independent_epsilon_pld(*run)
    assert [(x["point_id"], x["epsilon"]) for x in rows] == pld_eps
    assert all(x["run_epsilon"] == pytest.approx(run_eps, rel=1e-12) for x in rows)
    assert run_eps < rdp_run
    assert all(x["ratio"] == pytest.approx(x["epsilon"] / run_eps) for x in rows)
    r = cli("rank", "--run", "res1", "--accountant", "pld", "--lowest", "3", "--db", gla_db)
    assert r.rc == 0 and "data-independent PLD epsilon" in r.out, r
    r = cli("report", "--run", "res1", "--out", tmp_path / "r.html", "--json", "--db", gla_db)
    assert r.rc == 0, r
    s = r.json()["summary"]
    assert s["rule"] == "rdp" and s["pld_epsilon_median"] < s["rdp_epsilon_median"] == s["epsilon_median"]
    assert s["run_epsilon_pld"] == pytest.approx(run_eps, rel=1e-12)
    html = (tmp_path / "r.html").read_text()
    assert "PLD accountant" in html and "slack of the RDP bound" in html
    r = cli("report", "--run", "res1", "--accountant", "pld", "--out", tmp_path / "p.html", "--json", "--db", gla_db)
    assert r.rc == 0, r
    s = r.json()["summary"]
    assert s["rule"] == "pld" and s["run_epsilon"] == pytest.approx(run_eps, rel=1e-12)
    assert s["epsilon_median"] == s["pld_epsilon_median"]
    r = cli("links", "--run", "res1", "--accountant", "pld", "--json", "--db", gla_db)
    assert r.rc == 0 and r.json()["rule"] == "pld", r


@pytest.mark.parametrize("q,sigma,steps", [(256 / 60000, 1.0, 2000), (0.01, 0.8, 300)])
def test_budget_pld_equals_dp_accountings(q, sigma, steps, cli):
    ref = dp_accounting_dpsgd(q, sigma, steps)
    got = budget(q, DELTA, noise_multiplier=sigma, steps=steps, accountant="pld")
    assert got["accountant"] == "pld"
    assert ref * (1 - 1e-6) <= got["epsilon"] <= ref * 1.01  # the documented tolerance
    assert got["epsilon"] == pld.data_independent_epsilon_pld(q, sigma, steps, DELTA)
    r = cli("budget", "--sample-rate", q, "--delta", DELTA, "--noise-multiplier", sigma, "--steps", steps,
            "--accountant", "pld", "--json")
    assert r.rc == 0 and r.json()["epsilon"] == got["epsilon"], r


def test_budget_pld_refuses_a_target_epsilon():
    with pytest.raises(ParameterError, match="target_epsilon"):
        budget(0.01, DELTA, target_epsilon=2.0, steps=100, accountant="pld")
