"""The fast path's speed-ups give the numbers of the plain computations they replace.

The histogram's complex one-scatter accumulator (and its np.add.at fallback) against
tent weights summed by np.add.at; coverage's count/min/max shortcut against the SQL
view; per-point ε of every run shape (dense, uniform checkpoints, ragged hold-last, a
tracked subset of ids, zero norms, norms above the clip) against the exact path; the
prefetching stream against the plain one; the grid tabulated in a thread against
:func:`analysis.grid.tabulate`; repeated rows refused.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from dpledger import warehouse
from dpledger.analysis import composition, grid
from dpledger.warehouse.account_rdp import PendingGrid, ensure_grid
from dpledger.warehouse.coverage import _prefetched, coverage, stream
from dpledger.warehouse.errors import UserError
from dpledger.warehouse.runs import load_run
from test_accounting import _ingest_frame, eps_table, make_run, run_account


def reference_histogram(idx, ratio, covers, n, size):
    """Tent weights (analysis.grid.tent_weights) summed per (point, node) by np.add.at."""
    j, lo, hi = grid.tent_weights(ratio, size)
    w = np.ones(len(idx)) if covers is None else np.asarray(covers, dtype=np.float64)
    h = np.zeros((n, size + 1))
    np.add.at(h, (idx, j), lo * w)
    np.add.at(h, (idx, j + 1), hi * w)
    return h


def ratios_with_edges(rng, rows):
    r = rng.uniform(0, 1.3, rows)  # above 1: norms above the clip
    r[::17] = 0.0                  # zero norms
    r[::23] = 1.0                  # exactly at the clip: the last cell's right node
    r[::29] = 1 / 64               # exactly on a node
    return r


@pytest.mark.parametrize("fast", [True, False], ids=["coo_todense", "add.at"])
@pytest.mark.parametrize("weighted", [False, True], ids=["covers 1", "covers"])
def test_histogram_equals_tent_weights_summed_per_node(monkeypatch, fast, weighted):
    if not fast:
        monkeypatch.setattr(composition, "_coo_todense", None)
    elif composition._coo_todense is None:
        pytest.skip("this scipy has no coo_todense")
    rng = np.random.default_rng(3)
    n, size, rows = 7, 64, 5_000
    idx = rng.integers(0, n, rows)
    ratio = ratios_with_edges(rng, rows)
    covers = rng.integers(1, 9, rows).astype(np.float64) if weighted else None
    hist = composition.Histogram(n, size)
    for a in range(0, rows, 999):  # several batches, as the stream feeds them
        hist.add(idx[a:a + 999], ratio[a:a + 999], None if covers is None else covers[a:a + 999])
    want = reference_histogram(idx, ratio, covers, n, size)
    np.testing.assert_allclose(hist.values, want, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(hist.covered, np.bincount(idx, weights=covers, minlength=n))
    # the node weights of each point sum to the steps it covers
    np.testing.assert_allclose(hist.values.sum(axis=1), hist.covered, rtol=1e-12)


def test_tent_cells_are_tent_weights_bit_for_bit():
    r = ratios_with_edges(np.random.default_rng(5), 10_000)
    j, f = composition.tent_cells(r, 1024)
    j0, lo0, hi0 = grid.tent_weights(r, 1024)
    np.testing.assert_array_equal(j, j0)
    np.testing.assert_array_equal(f, hi0)
    np.testing.assert_array_equal(1.0 - f, lo0)


def test_histogram_refuses_what_the_unchecked_loop_would_write_out_of_bounds():
    hist = composition.Histogram(3, 16)
    with pytest.raises(IndexError):
        hist.add(np.array([0, 3]), np.array([0.5, 0.5]))
    with pytest.raises(IndexError):
        hist.add(np.array([-1]), np.array([0.5]))
    with pytest.raises(ValueError, match="NaN"):
        hist.add(np.array([0]), np.array([np.nan]))
    assert not hist.values.any() and not hist.covered.any()


def test_prefetched_batches_and_errors_and_early_close():
    assert list(_prefetched(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("reader broke")

    got = []
    with pytest.raises(RuntimeError, match="reader broke"):
        for item in _prefetched(failing()):
            got.append(item)
    assert got == [1]
    gen = _prefetched(iter(range(1000)), depth=2)
    assert next(gen) == 0
    gen.close()  # the reader thread stops
    assert not [t for t in threading.enumerate() if t.name == "dpledger-prefetch"]


def _runs(db, tmp_path):
    """dense (zero norms, norms above C), uniform checkpoints with planned steps past the
    last record, ragged per-point steps, and a tracked subset of non-contiguous ids."""
    rng = np.random.default_rng(17)
    norms = rng.uniform(0, 2.0, (60, 6))
    norms[:, 2] = 0.0
    norms[::3, 4] = 5.0
    make_run(db, "dense", norms, q=0.02, sigma=0.8, tmp=tmp_path)
    make_run(db, "uniform", rng.uniform(0, 1.5, (5, 4)), q=0.02, record_steps=[0, 7, 8, 20, 33], steps=50,
             tmp=tmp_path)
    make_run(db, "late", rng.uniform(0, 1.5, (10, 3)), q=0.02, record_steps=np.arange(5, 15), steps=15,
             tmp=tmp_path)
    ragged = pd.DataFrame({"step": [0, 5, 10, 0, 3, 1, 2, 7], "point_id": [0, 0, 0, 1, 1, 2, 2, 2],
                           "grad_norm": [0.5, 1.2, 0.0, 0.8, 0.05, 0.3, 3.0, 0.9]})
    _ingest_frame(db, "ragged", ragged, tmp_path, steps=15)
    s, p = np.meshgrid(np.arange(30), [3, 7, 20, 21], indexing="ij")
    subset = pd.DataFrame({"step": s.ravel(), "point_id": p.ravel(), "grad_norm": rng.uniform(0, 1.5, s.size)})
    _ingest_frame(db, "subset", subset, tmp_path, steps=30)
    return {"dense": "dense", "uniform": "uniform", "late": "uniform", "ragged": "ragged", "subset": "dense"}


def test_coverage_shortcut_matches_the_sql_view(db, tmp_path):
    shapes = _runs(db, tmp_path)
    con = warehouse.connect(db, read_only=True)
    try:
        for name, shape in shapes.items():
            run = load_run(con, name)
            cov = coverage(con, run)
            assert cov.shape == shape, name
            ids = [r[0] for r in con.execute("SELECT DISTINCT point_id FROM point_steps WHERE run_id = ? "
                                             "ORDER BY point_id", [name]).fetchall()]
            assert cov.point_ids.tolist() == ids
            view = con.execute("SELECT point_id, step, covers FROM point_step_coverage WHERE run_id = ? "
                               "ORDER BY point_id, step", [name]).fetchall()
            for prefetch in (False, True):
                rows = []
                for idx, step, _ratio, covers in stream(con, run, cov, steps=True, prefetch=prefetch):
                    c = np.ones(len(idx)) if covers is None else covers
                    rows += zip(cov.point_ids[idx].tolist(), step.tolist(), c.tolist())
                assert sorted(rows) == [(p, s, float(c)) for p, s, c in view], (name, prefetch)
    finally:
        con.close()


def test_fast_epsilon_of_every_shape_is_the_exact_one_from_above(db, tmp_path):
    shapes = _runs(db, tmp_path)
    exact, fast = {}, {}
    run_account(db, list(shapes), exact=True)
    for name in shapes:
        exact[name] = eps_table(db, name)
    run_account(db, list(shapes), grid=256)
    for name in shapes:
        fast[name] = eps_table(db, name)
    for name in shapes:
        e, f = exact[name], fast[name]
        assert f.point_id.tolist() == e.point_id.tolist(), name
        assert f.steps_covered.tolist() == e.steps_covered.tolist(), name
        np.testing.assert_allclose(f.epsilon, e.epsilon, rtol=1e-4, err_msg=name)
        assert np.all(f.epsilon >= e.epsilon * (1 - 1e-12)), name  # an upper bound
    # the zero-norm point of the dense run composes RDP 0 on both paths (the least ε); the tracked ids are the subset's
    assert fast["dense"].epsilon[2] == exact["dense"].epsilon[2] == fast["dense"].epsilon.min()
    assert fast["subset"].point_id.tolist() == [3, 7, 20, 21]


def test_repeated_rows_are_refused_not_counted_twice(db, tmp_path):
    make_run(db, "dup", np.full((10, 3), 0.5), q=0.02, tmp=tmp_path)
    con = warehouse.connect(db)
    try:  # same row count as a full block: one row repeated, another missing
        con.execute("DELETE FROM point_steps WHERE run_id = 'dup' AND step = 4 AND point_id = 1")
        con.execute("INSERT INTO point_steps SELECT * FROM point_steps WHERE run_id = 'dup' AND step = 3 "
                    "AND point_id = 2")
    finally:
        con.close()
    with pytest.raises(UserError, match="repeated"):
        run_account(db, ["dup"])


def test_pending_grid_is_the_tabulated_grid_and_is_stored(db):
    con = warehouse.connect(db)
    try:
        want = grid.tabulate(0.01, 1.1, 128)
        pending = PendingGrid(con, 0.01, 1.1, 128)
        got = pending.result(con)
        np.testing.assert_array_equal(got.values, want.values)
        np.testing.assert_array_equal(got.excess, want.excess)
        assert con.execute("SELECT count(*) FROM rdp_grid WHERE grid_size = 128").fetchall()[0][0] == want.values.size
        again = ensure_grid(con, 0.01, 1.1, 128)  # read back from rdp_grid
        np.testing.assert_array_equal(again.values, want.values)
        np.testing.assert_allclose(again.excess, want.excess, rtol=0, atol=0)
    finally:
        con.close()
