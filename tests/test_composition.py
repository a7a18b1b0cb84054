"""The one composition path: accounting, the fits path and the report give one ε;
Python's coverage rule equals the SQL view's."""

from __future__ import annotations

import numpy as np
import pytest

from dpledger import warehouse
from dpledger.analysis import composition, fits, grid, rdp
from dpledger.warehouse.coverage import coverage, stream
from dpledger.warehouse.fit_table import run_records
from dpledger.warehouse.report_frames import cumulative_epsilon
from dpledger.warehouse.runs import load_run
from test_accounting import eps_table, make_run, make_three_shapes, run_account

Q, SIGMA, T, DELTA = 0.02, 0.9, 120, 1e-5


def test_accounting_fits_and_report_give_one_epsilon(db, tmp_path):
    """Norms every 10 steps from step 0 (hold-last): the account's fast path equals the
    ``step`` fill composed by analysis.fits, and its exact path equals the report's
    cumulative ε at the last step."""
    rng = np.random.default_rng(7)
    norms = np.where(rng.random((12, 6)) < 0.2, 2.0, rng.gamma(1.5, 0.3, (12, 6)))
    make_run(db, "one", norms, q=Q, sigma=SIGMA, record_steps=np.arange(12) * 10, steps=T, tmp=tmp_path)

    run_account(db, ["one"])
    fast = eps_table(db, "one")
    run_account(db, ["one"], exact=True)
    exact = eps_table(db, "one")

    con = warehouse.connect(db, read_only=True)
    try:
        run = load_run(con, "one")
        pids, steps, values = run_records(con, run)
        via_fits = fits.point_epsilons(fits.fit("step", steps, values), T, q=Q, noise_multiplier=SIGMA, delta=DELTA)
        curves = cumulative_epsilon(con, run, [int(p) for p in pids])
    finally:
        con.close()
    via_report = curves.sort_values("step").groupby("point_id").cumulative_cost.last()

    np.testing.assert_array_equal(pids, fast.point_id)
    np.testing.assert_allclose(via_fits, fast.epsilon, rtol=1e-10)
    np.testing.assert_allclose(via_report.to_numpy(), exact.epsilon, rtol=1e-10)
    assert (curves.groupby("point_id").step.max() == T).all()
    # and each against the numbers themselves: per-step RDP summed by hand
    for p in range(norms.shape[1]):
        curve = 10 * rdp.rdp_of_sensitivity(Q, SIGMA, np.minimum(norms[:, p], 1.0)).sum(axis=0)
        want = rdp.epsilon_from_rdp(curve, DELTA)[0]
        assert exact.epsilon[p] == pytest.approx(want, rel=1e-9)
        assert want <= fast.epsilon[p] <= want * (1 + 1e-3)


def test_histogram_and_exact_sum_agree_with_their_definitions():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 4, 500)
    r = composition.clipped_ratio(rng.uniform(0, 2, 500), 1.5)
    assert r.max() <= 1.0 and r.min() >= 0.0
    covers = rng.integers(1, 5, 500).astype(float)
    table = grid.tabulate(Q, SIGMA, 256)
    hist = composition.Histogram(4, 256)
    exact = composition.ExactSum(4, Q, SIGMA)
    for a in range(0, 500, 128):  # batches accumulate
        hist.add(idx[a:a + 128], r[a:a + 128], covers[a:a + 128])
        exact.add(idx[a:a + 128], r[a:a + 128], covers[a:a + 128])
    want = np.zeros((4, len(rdp.DEFAULT_ORDERS)))
    np.add.at(want, idx, rdp.rdp_of_sensitivity(Q, SIGMA, r) * covers[:, None])
    np.testing.assert_allclose(exact.rdp(), want, rtol=1e-12)
    assert np.all(hist.rdp(table) >= exact.rdp())
    np.testing.assert_allclose(hist.covered, exact.covered)
    eps, best = composition.epsilon(exact.rdp(), DELTA)
    assert eps.shape == best.shape == (4,)


def test_python_coverage_equals_the_sql_view(db, tmp_path):
    make_three_shapes(db, tmp_path)
    con = warehouse.connect(db, read_only=True)
    try:
        for name, shape in (("dense", "dense"), ("uniform", "uniform"), ("ragged", "ragged")):
            run = load_run(con, name)
            cov = coverage(con, run)
            assert cov.shape == shape
            rows = []
            for idx, step, ratio, covers in stream(con, run, cov, batch_rows=7):
                c = np.ones(len(idx)) if covers is None else covers
                rows += list(zip(cov.point_ids[idx].tolist(), step.tolist(), c.tolist(), ratio.tolist()))
            got = sorted(rows)
            view = con.execute("SELECT point_id, step, covers, shape, least(grad_norm, 1.0) / 1.0 "
                               "FROM point_step_coverage WHERE run_id = ? ORDER BY point_id, step", [name]).fetchall()
            assert {v[3] for v in view} == {shape}
            assert [(p, s, float(c)) for p, s, c, _, _ in view] == [(p, s, c) for p, s, c, _ in got]
            np.testing.assert_array_equal([v[4] for v in view], [g[3] for g in got])
    finally:
        con.close()
