"""analysis.rdp and analysis.grid against Opacus and against 50-digit quadrature."""

from __future__ import annotations

import math
import warnings

import mpmath as mp
import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from dpledger.analysis import composition, grid, rdp

ORDERS = np.array(rdp.DEFAULT_ORDERS)


def test_per_step_rdp_equals_opacus_on_a_grid_including_fractional_orders():
    """1e-9 relative wherever log A = (α-1)·RDP >= 1e-4; below that both lose digits to
    cancellation (log of a number near 1) and the quadrature test below decides."""
    compared = fractional = 0
    for q in [0.001, 256 / 60000, 0.01, 0.05, 0.1, 0.5, 1.0]:
        sigmas = np.array([0.3, 0.5, 0.8, 1.0, 1.3, 2.0, 4.0, 8.0, 16.0])
        ours = rdp.rdp_sgm(q, sigmas, ORDERS)
        for i, s in enumerate(sigmas):
            ref = np.asarray(compute_rdp(q=q, noise_multiplier=float(s), steps=1, orders=list(ORDERS)))
            sel = np.isfinite(ref) & (ref * (ORDERS - 1) >= 1e-4)
            np.testing.assert_allclose(ours[i][sel], ref[sel], rtol=1e-9, atol=0)
            compared += sel.sum()
            fractional += (sel & (ORDERS % 1 != 0)).sum()
    assert compared > 8000 and fractional > 4000


def _quad_rdp(q, sigma, alpha):
    mp.mp.dps = 40
    q, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)
    f = lambda z: mp.npdf(z, 0, s) * ((1 - q) + q * mp.exp((2 * z - 1) / (2 * s * s))) ** a  # noqa: E731
    # the integrand peaks near 0 (the k = 0 term) and near α (the k = α term) when σ is small
    cuts = sorted({-20 * s, -5 * s, mp.mpf(0), mp.mpf(0.5), 5 * s, 20 * s, a - 20 * s, a, a + 20 * s})
    return float(mp.log(mp.quad(f, [-mp.inf, *cuts, mp.inf])) / (a - 1))


@pytest.mark.parametrize("q,sigma,alpha,rtol", [
    (0.001, 1000.0, 12, 1e-12),     # tiny RDP, integer order: the log1p form keeps every digit
    (0.004, 300.0, 64, 1e-12),
    (0.01, 1.0, 2.5, 1e-8),
    (0.001, 40.0, 1.1, 1e-6),        # Opacus is off by 5e-5 here
    (0.004, 1e5, 1.5, 1e-7),         # beyond 1e4: the asymptotic expansion
    (0.05, 2e4, 7.3, 1e-7),
    # Opacus's series stopped at term 0 ((1-q)^α < e^-30) and gave -0.70 here (RDP < 0)
    (0.5, 3000.0, 100.5, 1e-6),
    (0.9, 50.0, 300.5, 1e-6),
    # the corners of the documented ranges (analysis.validate)
    (0.5, 1e-3, 2.5, 1e-9),
    (1e-12, 1e-3, 1.5, 1e-9),
    (0.999, 1e-3, 9999.5, 1e-9),
])
def test_per_step_rdp_against_quadrature(q, sigma, alpha, rtol):
    got = rdp.rdp_sgm(q, np.array([sigma]), [alpha])[0, 0]
    want = _quad_rdp(q, sigma, alpha)
    assert got == pytest.approx(want, rel=rtol)
    if not float(alpha).is_integer() and sigma > 1e4:
        assert got >= want  # the expansion is raised to stay an upper bound


def test_edge_cases():
    out = rdp.rdp_of_sensitivity(0.01, 1.0, np.array([0.0, 1.0]), [2, 2.5])
    assert np.all(out[0] == 0)  # zero sensitivity costs nothing
    np.testing.assert_allclose(out[1], compute_rdp(q=0.01, noise_multiplier=1.0, steps=1, orders=[2, 2.5]))
    assert np.all(rdp.rdp_sgm(0.01, np.array([np.inf]), [2, 3]) == 0)  # inf noise: zero sensitivity
    np.testing.assert_allclose(rdp.rdp_sgm(1.0, 2.0, [2, 3.5]), [2 / 8, 3.5 / 8])


def test_conversion_equals_opacus_get_privacy_spent():
    rng = np.random.default_rng(0)
    for _ in range(20):
        curve = np.sort(rng.gamma(2.0, 1.0, len(ORDERS))) * rng.uniform(0.01, 2)
        delta = 10 ** rng.uniform(-9, -3)
        with warnings.catch_warnings():  # Opacus warns when the optimum is at an edge order
            warnings.simplefilter("ignore")
            want = get_privacy_spent(orders=list(ORDERS), rdp=curve, delta=delta)
        got = rdp.epsilon_from_rdp(curve, delta, ORDERS)
        assert got[0] == pytest.approx(float(want[0]), rel=1e-14)
        assert got[1] == float(want[1])
    batch = np.stack([np.linspace(0.01, 3, len(ORDERS)) * k for k in (0.1, 1, 5)])
    eps, order = rdp.epsilon_from_rdp(batch, 1e-5, ORDERS)
    for i in range(3):
        assert (eps[i], order[i]) == rdp.epsilon_from_rdp(batch[i], 1e-5, ORDERS)


def test_edge_order_warns_like_opacus():
    with pytest.warns(UserWarning, match="largest alpha"):
        rdp.epsilon_from_rdp(np.full((1, len(ORDERS)), 1e-9), 1e-5, ORDERS, warn=True)
    assert rdp.order_at_edge(np.array([ORDERS[0], 5.0, ORDERS[-1]]), ORDERS).tolist() == [True, False, True]


@pytest.mark.parametrize("q,sigma", [(256 / 60000, 0.5789), (0.01, 1.0), (0.1, 0.8), (0.002, 3.0)])
def test_tabulated_chords_lie_above_the_curve(q, sigma):
    table = grid.tabulate(q, sigma, 64)
    assert table.bounded_orders == []  # every order convex on the grid
    r = np.random.default_rng(1).uniform(0, 1, 400)
    exact = rdp.rdp_of_sensitivity(q, sigma, r, ORDERS)
    chord = grid.interpolate(table, r)
    # the fractional series computes log A = (α-1)·ρ to ~1e-16 absolutely (a sum of terms near 1):
    # where ρ is tiny that noise, not the chord, decides the last digits
    assert np.all(chord >= exact * (1 - 1e-13) - 1e-15 / (ORDERS - 1))
    # and at the nodes the table is the exact value
    nodes = np.arange(65) / 64
    np.testing.assert_allclose(grid.interpolate(table, nodes), rdp.rdp_of_sensitivity(q, sigma, nodes, ORDERS),
                               rtol=1e-13, atol=1e-300)


def test_a_column_that_is_not_convex_is_bounded_by_the_next_integer_order(monkeypatch):
    real = rdp.rdp_of_sensitivity

    def bent(q, sigma, ratio, orders):
        out = real(q, sigma, ratio, orders)
        orders = np.atleast_1d(orders)
        for m, a in enumerate(orders):
            if a == 2.5 and len(np.atleast_1d(ratio)) > 3:
                out[len(out) // 2, m] *= 1.5  # a bump: concave around the middle
        return out

    monkeypatch.setattr(grid, "rdp_of_sensitivity", bent)
    table = grid.tabulate(0.01, 1.0, 16, [2.0, 2.5, 3.0])
    assert table.bounded_orders == [2.5]
    np.testing.assert_allclose(table.values[:, 1], real(0.01, 1.0, np.arange(17) / 16, [3.0])[:, 0])
    assert np.all(table.values[:, 1] >= real(0.01, 1.0, np.arange(17) / 16, [2.5])[:, 0])


def test_histogram_composition_is_the_sum_of_chords():
    rng = np.random.default_rng(2)
    table = grid.tabulate(0.01, 1.1, 32)
    point = rng.integers(0, 5, 300)
    r = rng.uniform(0, 1, 300)
    w = rng.integers(1, 4, 300).astype(float)
    hist = composition.Histogram(5, 32)
    hist.add(point, r, w)
    got = hist.rdp(table)
    np.testing.assert_allclose(hist.covered, np.bincount(point, weights=w, minlength=5))
    want = np.zeros((5, len(ORDERS)))
    np.add.at(want, point, grid.interpolate(table, r) * w[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-11)


def test_dp_epsilon_matches_opacus_accountant():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.1, 0.01, 1000)]
    want = acc.get_privacy_spent(delta=1e-5, alphas=list(ORDERS))
    got = rdp.dp_epsilon(0.01, 1.1, 1000, 1e-5)
    assert got[0] == pytest.approx(want[0], rel=1e-9) and got[1] == want[1]
    assert math.isfinite(got[0])


@pytest.mark.parametrize("call", [
    lambda: rdp.rdp_sgm(0.5, 1e-160, [2.5]),            # σ² underflows: the series used to spin for ever
    lambda: rdp.rdp_sgm(0.5, np.array([1.0, np.nan]), [2.5]),
    lambda: rdp.rdp_sgm(1e-300, 1.0, [2.5]),
    lambda: rdp.rdp_sgm(0.0, 1.0, [2.5]),
    lambda: rdp.rdp_sgm(1.5, 1.0, [2.5]),
    lambda: rdp.rdp_sgm(0.01, 1.0, [1.0]),
    lambda: rdp.rdp_sgm(0.01, 1.0, [1.0001]),
    lambda: rdp.rdp_sgm(0.01, 1.0, [2e4]),
    lambda: rdp.rdp_sgm(0.01, 1.0, [np.inf]),
    lambda: rdp.rdp_of_sensitivity(0.01, np.inf, [0.5]),
    lambda: rdp.rdp_of_sensitivity(0.01, 1e7, [0.5]),
    lambda: rdp.rdp_of_sensitivity(0.01, 1.0, [1.5]),
    lambda: rdp.rdp_of_sensitivity(0.01, 1.0, [np.nan]),
    lambda: rdp.dp_epsilon(0.01, 1.0, 10**10, 1e-5),
    lambda: rdp.dp_epsilon(0.01, 1.0, 2.5, 1e-5),
    lambda: rdp.dp_epsilon(0.01, 1.0, 10, 1.0),
    lambda: rdp.dp_epsilon(0.01, 1e-160, 10, 1e-5),
    lambda: rdp.epsilon_from_rdp([0.1, 0.2], 1e-5, [2, 3, 4]),
])
def test_parameters_outside_the_documented_ranges_are_refused(call):
    from dpledger.analysis.validate import ParameterError

    with pytest.raises(ParameterError):
        call()


def test_the_fractional_series_is_bounded(monkeypatch):
    """Cut at MAX_SERIES_TERMS with an error instead of looping; the worst corner of the
    documented ranges (q = 1/2, σ = 1e4, α = 1.1: ~90,000 terms) stays under the cut."""
    from dpledger.analysis import validate

    monkeypatch.setattr(validate, "MAX_SERIES_TERMS", 50)
    with pytest.raises(validate.ParameterError, match="did not converge within 50 terms"):
        rdp.rdp_sgm(0.5, 1e4, [1.1])
    assert rdp.rdp_sgm(0.01, 1.0, [2.5]) > 0  # a usual one needs a few dozen terms


@pytest.mark.parametrize("q", [1e-6, 0.0044, 0.1, 0.5, 0.999])
@pytest.mark.parametrize("sigma", [0.05, 0.8, 5.0, 1000.0])
def test_one_noise_multiplier_sums_every_fractional_order_at_once_to_the_same_bits(q, sigma):
    """rdp_sgm of a scalar σ runs the fractional-order series over all orders at once; the
    per-σ loop (a vector of noise multipliers) must give the very same values."""
    orders = np.asarray(rdp.DEFAULT_ORDERS)
    frac = np.array([not float(a).is_integer() for a in orders])
    alone = rdp.rdp_sgm(q, sigma)
    in_vector = rdp.rdp_sgm(q, np.array([sigma, 2.0 * sigma]))[0]
    np.testing.assert_array_equal(alone[frac], in_vector[frac])
    if q >= 0.1 and sigma <= 5.0:  # where Opacus's own series keeps its digits (module docstring)
        want = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders[frac]))
        np.testing.assert_allclose(alone[frac], want, rtol=1e-9)
