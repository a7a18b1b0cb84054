"""Per-example PLD ε (analysis.pld) against Google's dp_accounting composing the same steps point by point.

The reference is dp_accounting's PLD at its default pessimistic settings (connect-the-dots,
value_discretization_interval 1e-4, log_mass_truncation_bound -50): per point, one
``from_gaussian_mechanism(σ, sensitivity=r, sampling_prob=q)`` per distinct r, each
``self_compose(count)``, composed with ``compose`` and read with ``get_epsilon_for_delta``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

dpa = pytest.importorskip("dp_accounting")
from dp_accounting.pld import privacy_loss_distribution as pldlib  # noqa: E402

from dpledger.analysis import composition, pld  # noqa: E402
from dpledger.analysis import grid as rdp_grid  # noqa: E402

DELTA = 1e-5
REF_H = 1e-4  # dp_accounting's default


@functools.lru_cache(maxsize=None)
def _ref_cell(q, sigma, r, h=REF_H):
    return pldlib.from_gaussian_mechanism(sigma, sensitivity=r, sampling_prob=q, value_discretization_interval=h)


def reference_epsilon(q, sigma, values, counts, delta=DELTA, h=REF_H):
    """dp_accounting's ε of the composition of counts[i] steps at sensitivity values[i]."""
    total = None
    for r, c in zip(values, counts):
        if r <= 0 or c == 0:
            continue
        part = _ref_cell(q, sigma, float(r), h).self_compose(int(c))
        total = part if total is None else total.compose(part)
    return 0.0 if total is None else total.get_epsilon_for_delta(delta)


def reference_from_hist(q, sigma, row, grid):
    cells = np.flatnonzero(row[1:] > 0)
    return reference_epsilon(q, sigma, grid[cells], row[1:][cells])


def norm_sets(kind: str, n: int, steps: int, rng) -> np.ndarray:
    """(n, steps) clipped-norm ratios r of one shape."""
    if kind == "at_clip":
        return np.full((n, steps), 1.0)
    if kind == "tiny":
        return rng.uniform(0.002, 0.02, (n, steps))
    if kind == "mixture":
        return np.where(rng.random((n, steps)) < 0.3, 1.0, rng.uniform(0.05, 0.5, (n, steps)))
    if kind == "heavy_tail":
        return np.minimum(0.05 * rng.pareto(1.5, (n, steps)) + 0.01, 1.0)
    if kind == "many_zeros":
        return np.where(rng.random((n, steps)) < 0.8, 0.0, rng.uniform(0.1, 1.0, (n, steps)))
    raise ValueError(kind)


def hist_of(ratios: np.ndarray, grid) -> np.ndarray:
    n, steps = ratios.shape
    return pld.pld_histogram(np.repeat(np.arange(n), steps), ratios.ravel(), n, grid)


# ------------------------------------------------------------------ one step


@pytest.mark.parametrize("q,sigma,r", [(0.01, 1.0, 1.0), (0.1, 0.5, 0.3), (0.001, 4.0, 0.05), (1.0, 1.0, 0.7)])
def test_cell_pmf_is_dp_accountings(q, sigma, r):
    ref = _ref_cell(q, sigma, r)
    for direction, pmf in ((pld.REMOVE, ref._pmf_remove), (pld.ADD, ref._pmf_add)):
        pmf = pmf.to_dense_pmf()
        mine = pld.connect_dots_pmf(q, sigma, r, direction, REF_H)
        assert mine.lo == pmf._lower_loss and mine.probs.size == pmf._probs.size
        assert np.max(np.abs(mine.probs - pmf._probs)) < 1e-10
        assert mine.inf_mass == pytest.approx(pmf._infinity_mass, rel=1e-6, abs=1e-30)


def test_hockey_stick_matches_mechanism():
    from dp_accounting.pld import privacy_loss_mechanism as plm

    eps = np.linspace(-0.5, 3.0, 41)
    for direction, adj in ((pld.REMOVE, plm.AdjacencyType.REMOVE), (pld.ADD, plm.AdjacencyType.ADD)):
        ref = plm.GaussianPrivacyLoss(0.8, sensitivity=0.6, sampling_prob=0.05, adjacency_type=adj)
        np.testing.assert_allclose(pld.hockey_stick(eps, 0.05, 0.8, 0.6, direction),
                                   ref.get_delta_for_epsilon(eps), rtol=1e-9, atol=1e-15)


# ------------------------------------------------------------------ data-independent


@pytest.mark.parametrize("q", [0.001, 0.01, 0.1])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])
def test_data_independent_is_dp_accountings(q, sigma):
    steps_list = ([20] if sigma < 1 else [1, 300]) + ([5000] if (q, sigma) in {(0.01, 1.0), (0.001, 4.0), (0.1, 4.0)} else [])
    for steps in steps_list:
        ref = pldlib.from_gaussian_mechanism(sigma, sampling_prob=q).self_compose(steps).get_epsilon_for_delta(DELTA)
        mine = pld.data_independent_epsilon_pld(q, sigma, steps, DELTA, value_discretization_interval=REF_H,
                                                divisors=(1,))
        assert abs(mine - ref) <= 1e-6 * ref, (q, sigma, steps, mine, ref)
        # the default (coarser, adaptive) grid: never below, at most 1% above
        fast = pld.data_independent_epsilon_pld(q, sigma, steps, DELTA)
        assert ref * (1 - 1e-6) <= fast <= ref * 1.01, (q, sigma, steps, fast, ref)


def test_data_independent_is_dp_sgd_accountant():
    """Against dp_accounting's DP-SGD event through its PLDAccountant."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    q, sigma, steps = 256 / 60000, 1.0, 2000
    acc = pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps))
    ref = acc.get_epsilon(DELTA)
    mine = pld.data_independent_epsilon_pld(q, sigma, steps, DELTA, value_discretization_interval=REF_H,
                                            divisors=(1,))
    assert abs(mine - ref) <= 1e-6 * ref


def test_point_at_clip_gets_data_independent_epsilon():
    q, sigma, steps = 0.01, 1.0, 1000
    grid = pld.geometric_grid()
    norms = np.array([[1.0] * steps, [3.0] * steps, list(np.linspace(1.0, 9.0, steps))])  # ≥ C at every step
    hist = hist_of(np.minimum(norms, 1.0), grid)
    ref = pldlib.from_gaussian_mechanism(sigma, sampling_prob=q).self_compose(steps).get_epsilon_for_delta(DELTA)
    for h, divisors in ((REF_H, (1,)), (pld.DEFAULT_DISCRETIZATION, pld.DEFAULT_DIVISORS)):
        table = pld.pld_table(q, sigma, grid, h, divisors=divisors)
        eps = pld.per_example_epsilon_pld(hist, q, sigma, DELTA, table=table)
        di = pld.data_independent_epsilon_pld(q, sigma, steps, DELTA, value_discretization_interval=h,
                                              divisors=divisors)
        np.testing.assert_allclose(eps, di, rtol=1e-12)  # exactly the run's data-independent ε
        assert np.all(eps >= ref * (1 - 1e-6)) and np.all(eps <= ref * 1.01)
        if h == REF_H:
            np.testing.assert_allclose(eps, ref, rtol=1e-6)


# ------------------------------------------------------------------ per example, heterogeneous

# (q, σ, steps) and a coarse grid so the reference composes few distinct PLDs
CASES = [
    (0.001, 0.5, 2000), (0.001, 4.0, 1000),
    (0.01, 0.5, 30), (0.01, 1.0, 5000), (0.01, 4.0, 300),
    (0.1, 1.0, 100), (0.1, 4.0, 5000),
]
KINDS = ["at_clip", "tiny", "mixture", "heavy_tail", "many_zeros"]
COARSE = pld.geometric_grid(ratio=1.6, r_min=1e-3)  # 16 cells


@pytest.mark.parametrize("q,sigma,steps", CASES)
def test_per_example_against_reference_on_the_rounded_r(q, sigma, steps):
    rng = np.random.default_rng(int(q * 1000) + int(sigma * 10) + steps)
    # the all-at-clip shape is tested above at 5,000 steps; σ = 0.5 (long PMFs) is slow in the reference
    kinds = KINDS[1:3] if sigma < 1 else KINDS if steps <= 300 else KINDS[1:4]
    ratios = np.concatenate([norm_sets(k, 1, steps, rng) for k in kinds])
    single = np.zeros((1, steps))
    single[0, 0] = 1.0  # one step at the clip, all others free
    ratios = np.concatenate([ratios, single])
    hist = hist_of(ratios, COARSE)
    refs = np.array([reference_from_hist(q, sigma, row, COARSE) for row in hist])
    for h, divisors, upper in ((REF_H, (1,), 1e-6), (pld.DEFAULT_DISCRETIZATION, pld.DEFAULT_DIVISORS, 1e-2)):
        table = pld.pld_table(q, sigma, COARSE, h, divisors=divisors)
        res = pld.compose(table, hist, DELTA)
        rel = (res.epsilon - refs) / np.maximum(refs, 1e-300)
        assert np.all((res.epsilon >= refs) | (rel >= -1e-6)), (h, res.epsilon, refs)
        assert np.all(res.epsilon <= refs * (1 + upper) + 1e-12), (h, rel)
        # the error budget: a priori bounds hold, δ spent on tails is tiny
        assert np.all(res.epsilon - refs <= res.discretisation_bound + 1e-9)
        assert np.all(res.delta_tail < 1e-12)


def test_grid_effect_against_reference_on_raw_r():
    """Raw (not rounded) r in the reference: the default grid stays above it, by at most ~the grid ratio."""
    q, sigma, steps = 0.01, 1.0, 2000
    rng = np.random.default_rng(3)
    values = np.array([0.0, 0.0137, 0.2711, 0.5555, 0.9203])  # off-grid norms, few distinct (the reference is slow)
    picks = [rng.choice(values, size=steps, p=p) for p in ([0, 0, 0, 0, 1.0], [0.2, 0.3, 0.3, 0.1, 0.1],
                                                           [0.5, 0.5, 0, 0, 0], [0, 0, 0.5, 0.5, 0])]
    ratios = np.array(picks)
    grid = pld.geometric_grid()
    hist = hist_of(ratios, grid)
    res = pld.compose(pld.pld_table(q, sigma, grid, REF_H, divisors=(1,)), hist, DELTA)
    raw = np.array([reference_epsilon(q, sigma, values, [(row == v).sum() for v in values]) for row in ratios])
    rounded = np.array([reference_from_hist(q, sigma, row, grid) for row in hist])
    assert np.all(res.epsilon >= raw * (1 - 1e-6))
    np.testing.assert_allclose(res.epsilon, rounded, rtol=1e-6)
    assert np.all(res.epsilon <= raw * (1 + 2 * pld.DEFAULT_GRID_RATIO - 2))  # within 2% of the raw-r reference
    assert np.all(res.grid_rounding <= pld.DEFAULT_GRID_RATIO - 1 + 1e-12)


# ------------------------------------------------------------------ PLD ≤ RDP


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.0, 1000), (0.001, 0.5, 1000), (0.1, 4.0, 500)])
def test_pld_below_rdp_for_every_point(q, sigma, steps):
    rng = np.random.default_rng(7)
    ratios = np.concatenate([norm_sets(k, 2, steps, rng) for k in KINDS])
    n = ratios.shape[0]
    idx = np.repeat(np.arange(n), steps)
    eps_pld = pld.per_example_epsilon_pld(hist_of(ratios, pld.geometric_grid()), q, sigma, DELTA)
    rh = composition.Histogram(n, rdp_grid.DEFAULT_GRID)
    rh.add(idx, ratios.ravel())
    eps_rdp, _ = composition.epsilon(rh.rdp(rdp_grid.tabulate(q, sigma)), DELTA)
    assert np.all(eps_pld <= eps_rdp), (eps_pld, eps_rdp)
    assert np.all(eps_pld[ratios.max(axis=1) > 0] > 0)


# ------------------------------------------------------------------ helpers and inputs


def test_cells_round_up():
    grid = np.array([0.25, 0.5, 1.0])
    np.testing.assert_array_equal(pld.cell_index([0.0, 1e-9, 0.25, 0.26, 0.5, 0.99, 1.0, 7.0], grid),
                                  [0, 1, 1, 2, 2, 3, 3, 3])
    g = pld.geometric_grid(1.01, 1e-3)
    assert g[-1] == 1.0 and g[0] <= 1e-3 and np.all(np.diff(g) > 0)
    r = np.random.default_rng(0).uniform(0, 1, 10_000)
    cell = pld.cell_index(r, g)
    assert np.all(g[cell - 1] >= r)


def test_histogram_counts_and_covers():
    grid = pld.uniform_grid(4)
    h = pld.PldHistogram(2, grid)
    h.add([0, 0, 1], [0.1, 0.0, 1.0], covers=[3, 2, 5])
    np.testing.assert_array_equal(h.values, [[2, 3, 0, 0, 0], [0, 0, 0, 0, 5]])
    with pytest.raises(ValueError):
        h.add([0], [0.5], covers=[0.5])
    with pytest.raises(ValueError):
        pld.compose(pld.pld_table(0.01, 1.0, grid), np.array([[0, 0.5, 0, 0, 0]]), DELTA)


def test_zero_rows_cost_nothing_and_bad_inputs():
    grid = pld.uniform_grid(4)
    table = pld.pld_table(0.01, 1.0, grid)
    res = pld.compose(table, np.array([[10.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]), DELTA)
    np.testing.assert_array_equal(res.epsilon, [0.0, 0.0])
    with pytest.raises(ValueError):
        pld.compose(table, np.zeros((1, 3)), DELTA)
    with pytest.raises(ValueError):
        pld.compose(table, np.zeros((1, 5)), 2.0)
    with pytest.raises(ValueError):
        pld.cell_index([np.nan], grid)
    with pytest.raises(ValueError):
        pld.pld_table(0.0, 1.0, grid)
