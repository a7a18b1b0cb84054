"""Per-example accounting in the warehouse: exact vs Opacus, fast >= exact, gla vs the
study's own numbers and a hand computation, config aggregates, CLI behaviour."""

from __future__ import annotations

import math

import duckdb
import mpmath as mp
import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp

from dpledger import warehouse
from dpledger.analysis import composition, gla, grid, rdp
from conftest import table_snapshot
from dpledger.ingest import ingest_steps
from dpledger.warehouse import accounting

ORDERS = list(rdp.DEFAULT_ORDERS)


def make_run(db, run, norms: np.ndarray, *, q=0.01, sigma=1.0, C=1.0, steps=None, record_steps=None, delta=1e-5,
             tmp=None, dataset=None):
    """Ingest a (recorded steps × points) matrix of norms as run ``run``."""
    record_steps = np.arange(norms.shape[0]) if record_steps is None else np.asarray(record_steps)
    s, p = np.meshgrid(record_steps, np.arange(norms.shape[1]), indexing="ij")
    df = pd.DataFrame({"step": s.ravel(), "point_id": p.ravel(), "grad_norm": norms.ravel()})
    path = tmp / f"{run}.parquet"
    df.to_parquet(path, index=False)
    con = warehouse.connect(db)
    try:
        ingest_steps(con, path, run, sample_rate=q, noise_multiplier=sigma, max_grad_norm=C, delta=delta,
                     steps=steps or int(record_steps.max()) + 1, dataset=dataset)
    finally:
        con.close()


def eps_table(db, run, rule="rdp"):
    con = warehouse.connect(db, read_only=True)  # same configuration as connections the test holds open
    try:
        return con.execute("SELECT point_id, epsilon, best_order, steps_covered, exact FROM point_epsilon "
                           "WHERE run_id = ? AND rule = ? ORDER BY point_id", [run, rule]).df()
    finally:
        con.close()


def run_account(db, runs=None, **kw):
    con = warehouse.connect(db)
    try:
        return accounting.account(con, runs, **kw)
    finally:
        con.close()


def test_all_norms_at_C_gives_opacus_data_independent_epsilon(db, tmp_path):
    make_run(db, "c", np.full((300, 4), 3.0), q=0.02, sigma=0.9, tmp=tmp_path)  # clipped: s = C every step
    acc = RDPAccountant()
    acc.history = [(0.9, 0.02, 300)]
    want, want_order = acc.get_privacy_spent(delta=1e-5, alphas=ORDERS)
    for exact in (True, False):
        run_account(db, ["c"], exact=exact)
        got = eps_table(db, "c")
        np.testing.assert_allclose(got.epsilon, want, rtol=1e-6 if exact else 1e-9)
        assert (got.best_order == want_order).all()
        assert (got.steps_covered == 300).all()


def test_exact_path_equals_a_per_step_opacus_sum_with_checkpoints(db, tmp_path):
    """Norms recorded every 25 steps: each stands for 25 steps (hold last)."""
    rng = np.random.default_rng(3)
    norms = rng.uniform(0.1, 1.6, (8, 3))
    make_run(db, "ck", norms, q=0.01, sigma=1.2, record_steps=np.arange(8) * 25, steps=200, tmp=tmp_path)
    run_account(db, ["ck"], exact=True)
    got = eps_table(db, "ck")
    for p in range(3):
        curve = sum(25 * np.asarray(compute_rdp(q=0.01, noise_multiplier=1.2 / min(n, 1.0), steps=1, orders=ORDERS))
                    for n in norms[:, p])
        acc_eps = rdp.epsilon_from_rdp(curve, 1e-5, ORDERS)[0]
        assert got.epsilon[p] == pytest.approx(acc_eps, rel=1e-8)
    assert (got.steps_covered == 200).all()


@pytest.mark.parametrize("dist", ["uniform", "small", "mixed"])
def test_fast_path_is_above_exact_and_within_1e_4(db, tmp_path, dist):
    rng = np.random.default_rng({"uniform": 0, "small": 1, "mixed": 2}[dist])
    shape = (400, 30)
    if dist == "uniform":
        norms = rng.uniform(0, 1.5, shape)
    elif dist == "small":  # points that pay little: tiny norms, high optimal orders
        norms = rng.gamma(2.0, 0.01, shape) * rng.uniform(0.1, 3, shape[1])
    else:
        norms = np.where(rng.random(shape) < 0.3, 2.0, rng.gamma(1.5, 0.2, shape))
    make_run(db, "r", norms, q=256 / 60000, sigma=0.8, tmp=tmp_path)
    run_account(db, ["r"], exact=True)
    exact = eps_table(db, "r").epsilon.to_numpy()
    run_account(db, ["r"])
    fast = eps_table(db, "r").epsilon.to_numpy()
    assert np.all(fast >= exact)
    assert np.max((fast - exact) / exact) < 1e-4


@pytest.mark.parametrize("q", [0.001, 0.01, 0.1])
def test_fast_path_on_tiny_norms_is_within_1e_4_of_exact(db, tmp_path, q):
    """Every r below the grid's first cell (1/1024): the chord in r from 0 overstated ε by
    6.5% at q = 0.1, σ = 0.5, 5,000 steps (0.022277 against 0.020914); the chord in r²
    is exact to first order there. Norms from a few values keep the exact path quick."""
    rng = np.random.default_rng(int(q * 1000))
    levels = np.array([1e-6, 1e-5, 1e-4, 3e-4, 6e-4, 9e-4])
    norms = rng.choice(levels, (5000, 4)) * np.array([1.0, 0.5, 0.25, 0.1])  # each point its own scale
    make_run(db, "tiny", norms, q=q, sigma=0.5, tmp=tmp_path)
    run_account(db, ["tiny"], exact=True)
    exact = eps_table(db, "tiny").epsilon.to_numpy()
    summary = run_account(db, ["tiny"])[0]
    got = eps_table(db, "tiny")
    fast = got.epsilon.to_numpy()
    assert np.all(fast >= exact * (1 - 1e-12))
    assert np.max((fast - exact) / exact) < 1e-4
    assert not any("above exact" in n for n in summary["notes"])
    # and the grid's chords alone, before any point is recomputed exactly
    hist = composition.Histogram(4, grid.DEFAULT_GRID)
    hist.add(np.tile(np.arange(4), 5000), norms.ravel())
    chords = composition.epsilon(hist.rdp(grid.tabulate(q, 0.5)), 1e-5, ORDERS)[0]
    assert np.all(chords >= exact * (1 - 1e-12)) and np.max((chords - exact) / exact) < 2e-5


def test_fast_path_pins_a_sharp_turn_by_recomputing_exactly(db, tmp_path):
    """At q = 0.001, σ = 2 the large orders' per-step RDP turns within one cell near
    r = 0.5; a point of 100 steps at r = 0.45 and one step at r = 0.49739 (in that cell) has
    its optimal order there, and the chords alone put its ε 2.5% above exact. The grid's
    error bound flags it and account recomputes it exactly."""
    norms = np.stack([np.r_[np.full(99, 0.45), 0.49739], np.full(100, 0.3)], axis=1)
    make_run(db, "turn", norms, q=0.001, sigma=2.0, tmp=tmp_path)
    run_account(db, ["turn"], exact=True)
    exact = eps_table(db, "turn").epsilon.to_numpy()
    summary = run_account(db, ["turn"])[0]
    got = eps_table(db, "turn")
    fast = got.epsilon.to_numpy()
    assert np.all(fast >= exact * (1 - 1e-12)) and np.max((fast - exact) / exact) < 1e-4
    assert got.exact.tolist() == [True, False]  # only the loose one
    assert any("1 points recomputed exactly" in n for n in summary["notes"])


def test_sql_views_and_udfs_agree_with_the_accounting(db, tmp_path):
    rng = np.random.default_rng(5)
    make_run(db, "v", rng.uniform(0, 1.3, (60, 6)), q=0.02, sigma=1.0, tmp=tmp_path)
    run_account(db, ["v"])
    con = warehouse.connect(db, read_only=True)
    sql = con.execute("SELECT point_id, epsilon, best_order FROM point_epsilon_sql WHERE run_id = 'v' "
                      "ORDER BY point_id").df()
    table = eps_table(db, "v")
    np.testing.assert_allclose(sql.epsilon, table.epsilon, rtol=1e-10)
    assert (sql.best_order == table.best_order).all()
    # exact per-row RDP through the UDF, summed in SQL, at each point's optimal order
    per_row = con.execute(
        "SELECT point_id, sum(rdp_step_cost(r.sample_rate, r.noise_multiplier, "
        "least(grad_norm, r.max_grad_norm) / r.max_grad_norm, pe.best_order)) AS R "
        "FROM point_steps ps JOIN runs r USING (run_id) JOIN point_epsilon pe USING (run_id, point_id) "
        "WHERE run_id = 'v' AND pe.rule = 'rdp' GROUP BY point_id ORDER BY point_id").df()
    for _, row in per_row.iterrows():
        norms = con.execute("SELECT grad_norm FROM point_steps WHERE run_id='v' AND point_id=?",
                            [int(row.point_id)]).fetchnumpy()["grad_norm"]
        order = float(table.best_order[int(row.point_id)])
        want = sum(compute_rdp(q=0.02, noise_multiplier=1.0 / min(n, 1.0), steps=1, orders=[order])[0]
                   for n in norms if n > 0)
        assert row.R == pytest.approx(want, rel=1e-8)
    # the conversion UDF over the stored curves reproduces the table
    conv = con.execute("SELECT rdp_epsilon(a.orders, pe.rdp, pe.delta) FROM point_epsilon pe "
                       "JOIN accountings a USING (run_id, rule) WHERE run_id = 'v' ORDER BY point_id").fetchall()
    np.testing.assert_allclose([c[0] for c in conv], table.epsilon, rtol=1e-14)
    re = con.execute("SELECT epsilon FROM run_epsilon WHERE run_id = 'v'").fetchall()[0][0]
    assert re == pytest.approx(rdp.dp_epsilon(0.02, 1.0, 60, 1e-5)[0], rel=1e-12)
    con.close()


def _ingest_frame(db, run, df, tmp, **kw):
    path = tmp / f"{run}.parquet"
    df.to_parquet(path, index=False)
    con = warehouse.connect(db)
    try:
        ingest_steps(con, path, run, sample_rate=0.02, noise_multiplier=1.0, max_grad_norm=1.0, **kw)
    finally:
        con.close()


def make_three_shapes(db, tmp) -> pd.DataFrame:
    """Runs 'dense' (every step), 'uniform' (checkpoints) and 'ragged' (each point its own steps);
    returns the ragged run's rows."""
    rng = np.random.default_rng(11)
    make_run(db, "dense", rng.uniform(0, 1.5, (40, 5)), q=0.02, tmp=tmp)
    make_run(db, "uniform", rng.uniform(0, 1.5, (6, 5)), q=0.02, record_steps=[0, 4, 9, 15, 22, 30], steps=40,
             tmp=tmp)
    ragged = pd.DataFrame({"step": [0, 5, 10, 0, 3, 1, 2], "point_id": [0, 0, 0, 1, 1, 2, 2],
                           "grad_norm": [0.5, 1.2, 0.1, 0.8, 0.05, 0.3, 0.9]})
    _ingest_frame(db, "ragged", ragged, tmp, steps=15)
    return ragged


def test_every_run_shape_agrees_with_the_sql_views(db, tmp_path):
    """dense, uniform (checkpoints) and ragged (each point its own steps) runs: the
    streamed fast path equals the pure-SQL view path, and ragged covers hold last per point."""
    ragged = make_three_shapes(db, tmp_path)
    run_account(db, ["dense", "uniform", "ragged"])
    con = warehouse.connect(db, read_only=True)
    for run in ("dense", "uniform", "ragged"):
        sql = con.execute("SELECT point_id, epsilon, steps_covered FROM point_epsilon_sql WHERE run_id = ? "
                          "ORDER BY point_id", [run]).df()
        table = eps_table(db, run)
        fast = ~table.exact.to_numpy()  # account recomputes exactly the points whose grid bound is loose
        np.testing.assert_allclose(sql.epsilon[fast], table.epsilon[fast], rtol=1e-10)
        assert np.all(sql.epsilon[~fast] >= table.epsilon[~fast] * (1 - 1e-12))  # the chords: above exact
        assert (sql.steps_covered == table.steps_covered).all()
    cov = con.execute("SELECT point_id, step, covers FROM point_step_coverage WHERE run_id = 'ragged' "
                      "ORDER BY point_id, step").fetchall()
    assert cov == [(0, 0, 5), (0, 5, 5), (0, 10, 5), (1, 0, 3), (1, 3, 12), (2, 1, 1), (2, 2, 13)]
    con.close()
    assert eps_table(db, "ragged").steps_covered.tolist() == [15, 15, 14]  # point 2 starts at step 1
    run_account(db, ["ragged"], exact=True)
    got = eps_table(db, "ragged").epsilon
    for p, rows in ragged.groupby("point_id"):
        steps = rows.step.tolist() + [15]
        curve = sum((steps[k + 1] - steps[k]) * np.asarray(compute_rdp(
            q=0.02, noise_multiplier=1.0 / min(n, 1.0), steps=1, orders=ORDERS)) for k, n in enumerate(rows.grad_norm))
        assert got[p] == pytest.approx(rdp.epsilon_from_rdp(curve, 1e-5, ORDERS)[0], rel=1e-8)


def test_gla_legacy_scaling_reproduces_the_study_costs(gla_db, gla_dir, cli):
    r = cli("account", "--rule", "gla", "--legacy-scaling", "--db", gla_db)
    assert r.rc == 0, r
    con = warehouse.connect(gla_db, read_only=True)
    got = con.execute("SELECT point_id AS point, step, cost FROM point_step_cost WHERE rule = 'gla'").df()
    con.close()
    want = pd.read_csv(gla_dir / "compo_res1.csv")
    m = want.merge(got, on=["point", "step"])
    assert len(m) == 410
    rel = np.abs(m.cost - m["Privacy cost"]) / m["Privacy cost"]
    assert rel.max() < 1e-9
    # all but one value identical to the last bit; (point 7, step 5600) differs by 2e-10, as
    # if the study had used a norm 5e-11 away from the one its CSV prints
    assert (rel == 0).sum() >= 409


def _gla_by_hand(ratio_by_run, record_steps, T, q, sigma, alpha0, p):
    """Direct loops over steps (independent of analysis.gla) for one point."""
    g, alphas = float(alpha0), []
    for _ in range(T):
        alphas.append(math.ceil(g))
        g = g * p / (p - 1) - 1 / p
    total = 0.0
    for i in range(T):
        k = max(j for j, s in enumerate(record_steps) if s <= i)
        a = alphas[i]
        terms = []
        for ratios in ratio_by_run:
            r = ratios[k]
            A = mp.fsum(math.comb(a, kk) * mp.mpf(1 - q) ** (a - kk) * mp.mpf(q) ** kk
                        * mp.exp(mp.mpf(r) ** 2 * (kk * kk - kk) / (2 * sigma ** 2)) for kk in range(a + 1))
            terms.append(p * float(mp.log(A)))
        top = max(terms)
        c = top + math.log(sum(math.exp(t - top) for t in terms) / len(terms))
        total += ((p - 1) / p) ** i / p * c
    return total / (alpha0 - 1)


def test_gla_matches_a_hand_computation_per_run_and_in_expectation(db, tmp_path):
    rec = [0, 10, 20]
    a = np.array([[0.9, 0.2], [0.5, 0.05], [1.7, 0.3]])  # steps x points, run A
    b = np.array([[0.4, 0.6], [0.7, 0.1], [0.2, 0.9]])  # run B, same configuration
    for name, norms in (("A", a), ("B", b)):
        make_run(db, name, norms, q=0.05, sigma=1.0, record_steps=rec, steps=30, tmp=tmp_path, dataset="toy")
    run_account(db, ["A"], rule="gla")  # brings in B, its configuration sibling
    p = gla.holder_p(20)
    con = duckdb.connect(str(db), read_only=True)
    for point in (0, 1):
        ra, rb = np.minimum(a[:, point], 1.0), np.minimum(b[:, point], 1.0)
        for name, runs in (("A", [ra]), ("B", [rb])):
            curve = [_gla_by_hand(runs, rec, 30, 0.05, 1.0, a0, p) for a0 in gla.DEFAULT_ALPHA0]
            want = rdp.epsilon_from_rdp(np.array(curve), 1e-5, gla.DEFAULT_ALPHA0)[0]
            got = con.execute("SELECT epsilon FROM point_epsilon WHERE run_id=? AND point_id=? AND rule='gla'",
                              [name, point]).fetchall()[0][0]
            assert got == pytest.approx(want, rel=1e-10)
        curve = [_gla_by_hand([ra, rb], rec, 30, 0.05, 1.0, a0, p) for a0 in gla.DEFAULT_ALPHA0]
        want = rdp.epsilon_from_rdp(np.array(curve), 1e-5, gla.DEFAULT_ALPHA0)[0]
        got = con.execute("SELECT epsilon_expected, n_runs FROM config_epsilon WHERE point_id=? AND rule='gla'",
                          [point]).fetchall()[0]
        assert got[0] == pytest.approx(want, rel=1e-10) and got[1] == 2
    con.close()


def test_config_epsilon_over_runs(db, tmp_path):
    rng = np.random.default_rng(7)
    n1, n2 = rng.uniform(0, 1.2, (15, 3)), rng.uniform(0, 1.2, (15, 3))
    make_run(db, "s0", n1, tmp=tmp_path, dataset="toy")
    make_run(db, "s1", n2, tmp=tmp_path, dataset="toy")
    make_run(db, "other", n2, sigma=2.0, tmp=tmp_path, dataset="toy")  # another configuration
    run_account(db, exact=True)
    con = duckdb.connect(str(db), read_only=True)
    cfg = con.execute("SELECT point_id, n_runs, epsilon_mean, epsilon_min, epsilon_max, epsilon_expected "
                      "FROM config_epsilon c WHERE rule = 'rdp' AND config_key = "
                      "(SELECT config_key FROM runs WHERE run_id = 's0') ORDER BY point_id").df()
    con.close()
    e0, e1 = eps_table(db, "s0").epsilon, eps_table(db, "s1").epsilon
    np.testing.assert_allclose(cfg.epsilon_mean, (e0 + e1) / 2, rtol=1e-12)
    np.testing.assert_allclose(cfg.epsilon_min, np.minimum(e0, e1))
    np.testing.assert_allclose(cfg.epsilon_max, np.maximum(e0, e1))
    assert (cfg.n_runs == 2).all()
    for p in range(3):  # expectation: mean of the per-step costs over runs, then convert
        curves = [sum(np.asarray(compute_rdp(q=0.01, noise_multiplier=1.0 / max(min(v, 1.0), 1e-300), steps=1,
                                             orders=ORDERS)) for v in n[:, p]) for n in (n1, n2)]
        want = rdp.epsilon_from_rdp((curves[0] + curves[1]) / 2, 1e-5, ORDERS)[0]
        assert cfg.epsilon_expected[p] == pytest.approx(want, rel=1e-8)
        assert cfg.epsilon_min[p] <= cfg.epsilon_expected[p] <= cfg.epsilon_max[p]


def test_fixture_rankings_are_stable_under_reingest(gla_db, gla_dir, cli, tmp_path):
    for rule in ("rdp", "gla"):
        assert cli("account", "--rule", rule, "--db", gla_db).rc == 0
    first = {rule: cli("rank", "--run", "res1", "--rule", rule, "--db", gla_db, "--json").json() for rule in ("rdp", "gla")}
    assert [row["rank"] for row in first["rdp"]] == list(range(1, 11))
    assert cli("ingest", "gla-csv", gla_dir / "res1.csv", "--db", gla_db).rc == 0  # a no-op
    for rule in ("rdp", "gla"):
        assert cli("account", "--rule", rule, "--db", gla_db).rc == 0
        again = cli("rank", "--run", "res1", "--rule", rule, "--db", gla_db, "--json").json()
        assert [r["point_id"] for r in again] == [r["point_id"] for r in first[rule]]
    # the study ranked points by the plain sum of its per-checkpoint costs (its rank.py);
    # the same sum over point_step_cost with legacy scaling gives the same order
    want = pd.read_csv(gla_dir / "compo_res1.csv").groupby("point")["Privacy cost"].sum().sort_values()
    assert cli("account", "--rule", "gla", "--legacy-scaling", "--db", gla_db).rc == 0
    summed = cli("query", "SELECT point_id FROM point_step_cost WHERE rule = 'gla' GROUP BY point_id "
                 "ORDER BY sum(cost)", "--db", gla_db, "--json").json()
    assert [r["point_id"] for r in summed] == list(want.index)


def test_rank_output(gla_db, cli):
    assert cli("account", "--db", gla_db).rc == 0
    low = cli("rank", "--run", "res1", "--lowest", "3", "--db", gla_db, "--json").json()
    high = cli("rank", "--run", "res1", "--highest", "3", "--db", gla_db, "--json").json()
    assert [r["rank"] for r in low] == [1, 2, 3] and [r["rank"] for r in high] == [1, 2, 3]
    assert low[0]["epsilon"] < low[1]["epsilon"] < low[2]["epsilon"] < high[2]["epsilon"]
    assert set(low[0]) >= {"point_id", "label", "epsilon", "rank", "run_epsilon", "ratio"}
    assert low[0]["ratio"] == pytest.approx(low[0]["epsilon"] / low[0]["run_epsilon"])
    assert all(r["epsilon"] <= r["run_epsilon"] for r in high)  # norms clipped at C: never above the run's epsilon
    csv_out = cli("rank", "--run", "res1", "--lowest", "2", "--format", "csv", "--db", gla_db).out
    assert csv_out.splitlines()[0].startswith("point_id,label,epsilon,rank")


@pytest.mark.parametrize("args,fragment", [
    (["rank", "--run", "nope"], "unknown run 'nope'"),
    (["rank", "--run", "res1", "--rule", "xyz"], "--rule xyz"),
    (["rank", "--run", "res1", "--lowest", "0"], "--lowest 0"),
    (["account", "--run", "nope"], "unknown run 'nope'"),
    (["account", "--rule", "xyz"], "--rule xyz"),
    (["account", "--delta", "1.5"], "--delta 1.5"),
    (["account", "--delta", "0"], "--delta 0"),
    (["account", "--legacy-scaling"], "--legacy-scaling goes with --rule gla"),
    (["account", "--grid", "1"], "--grid 1"),
])
def test_accounting_bad_input(gla_db, cli, args, fragment):
    before = table_snapshot(gla_db)
    r = cli(*args, "--db", gla_db)
    assert r.rc == 2, r
    assert fragment in r.err and len(r.err.strip().splitlines()) == 1
    assert table_snapshot(gla_db) == before


def test_rank_before_account_says_what_to_do(gla_db, cli):
    r = cli("rank", "--run", "res1", "--db", gla_db)
    assert r.rc == 2 and "dpledger account --run res1" in r.err


def test_account_skips_non_private_runs(db, tmp_path, cli):
    make_run(db, "np", np.ones((5, 2)), tmp=tmp_path)
    con = warehouse.connect(db)
    con.execute("UPDATE runs SET private = false")
    con.close()
    r = cli("account", "--db", db, "--json")
    assert r.rc == 0 and r.json()[0]["skipped"].startswith("not private")


def test_ties_share_a_rank_and_the_summary_counts_them(db, tmp_path):
    """Three points clipped at every step pay exactly the run's ε: they share rank 1 from the
    top (SQL's rank(), the next rank is 4) and rank_summary says they tie at the run's ε."""
    from dpledger.warehouse.rank import rank, rank_summary

    rng = np.random.default_rng(4)
    norms = np.column_stack([np.full(50, 5.0), rng.uniform(0.1, 0.5, 50), np.full(50, 2.0),
                             rng.uniform(0.1, 0.5, 50), np.full(50, 1.5)])  # points 0, 2, 4 always clipped
    make_run(db, "ties", norms, q=0.05, sigma=1.0, tmp=tmp_path)
    run_account(db, ["ties"])
    con = warehouse.connect(db, read_only=True)
    try:
        top = rank(con, "ties", highest=4).to_pylist()
        low = rank(con, "ties", lowest=5).to_pylist()
        s = rank_summary(con, "ties")
    finally:
        con.close()
    assert [(r["point_id"], r["rank"], r["n_tied"]) for r in top] == [(0, 1, 3), (2, 1, 3), (4, 1, 3), (top[3]["point_id"], 4, 1)]
    assert [r["rank"] for r in low] == [1, 2, 3, 3, 3]
    want = rdp.dp_epsilon(0.05, 1.0, 50, 1e-5)[0]
    assert top[0]["epsilon"] == pytest.approx(want, rel=1e-9) and top[0]["ratio"] == pytest.approx(1.0, rel=1e-9)
    assert s["ties_highest"] == 3 and s["highest_at_run_epsilon"] and s["at_run_epsilon"] == 3
    assert s["ties_lowest"] == 1 and s["above_run_epsilon"] == 0 and s["partially_covered"] == 0
    assert any("3 points tie at the highest epsilon" in n and "clipped at every step" in n for n in s["notes"])


def test_rank_shows_the_covered_fraction_of_a_partially_covered_run(db, tmp_path):
    """Norms for steps 0..9 of a 40-step run held to the end cover it all; a point whose
    first record is at step 30 covers only its last 10 steps: covered_fraction 0.25."""
    from dpledger.warehouse.rank import rank, rank_summary

    frame = pd.DataFrame({"step": [0, 10, 30], "point_id": [0, 0, 1], "grad_norm": [0.5, 0.7, 0.9]})
    _ingest_frame(db, "part", frame, tmp_path, steps=40)
    run_account(db, ["part"])
    con = warehouse.connect(db, read_only=True)
    try:
        table = rank(con, "part").to_pylist()
        s = rank_summary(con, "part")
    finally:
        con.close()
    assert {r["point_id"]: r["covered_fraction"] for r in table} == {0: 1.0, 1: 0.25}
    assert s["partially_covered"] == 1 and any("only part of the run" in n for n in s["notes"])


def test_gla_says_when_points_exceed_the_run_epsilon(gla_db, cli):
    """On the fixture every point's gla ε (12.1-20.5) is above the run's data-independent
    11.26: the account summary and rank_summary say so, and the edge-of-α_0 note is there."""
    from dpledger.warehouse.rank import rank_summary

    r = cli("account", "--rule", "gla", "--db", gla_db, "--json")
    (s,) = r.json()
    assert s["points_above_run_epsilon"] == 10 and s["epsilon_min"] > s["run_epsilon"]
    assert any("10 of 10 points have a gla epsilon above the run's data-independent epsilon" in n
               and "still holds for every point" in n for n in s["notes"])
    assert any("optimal alpha_0 at the edge" in n for n in s["notes"])
    con = warehouse.connect(gla_db, read_only=True)
    try:
        rs = rank_summary(con, "res1", "gla")
    finally:
        con.close()
    assert rs["above_run_epsilon"] == 10 and any("can be looser than the data-independent one" in n for n in rs["notes"])
