"""analysis.fits: fills between recorded checkpoints, against curves with known answers,
scipy's own PCHIP, a hand-computed hold-out, the warehouse's ε on the fixture run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.interpolate import PchipInterpolator
from scipy.special import expit
import torch

from dpledger.analysis import fits, rdp

T = 9360


def _smooth(t):
    return 0.2 + 0.6 * np.exp(-np.asarray(t, dtype=np.float64) / 3000)


def _held(f, point, t, first, last):
    """Expected value of a fill at t for a point whose records span [first, last]: ends held."""
    return f(np.clip(t, first, last))


# --------------------------------------------------------------------------- known curves


def test_linear_curve_linear_and_pchip_exact_step_within_slope_times_gap():
    steps = np.array([[0, 150, 400, 1000, 1300, 2600, 4000, 5100, 7000, 9000]])
    slope = 0.8 / 9000
    line = lambda t: 0.1 + slope * np.asarray(t, dtype=np.float64)  # noqa: E731
    values = line(steps)
    t = np.arange(-50, T + 50)
    want = line(np.clip(t, 0, 9000))  # held after the last record
    for method in ("linear", "pchip"):
        got = fits.fit(method, steps, values).predict(np.zeros_like(t), t)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=method)
    got = fits.fit("step", steps, values).predict(np.zeros_like(t), t)
    # step holds r(t_i) on [t_i, t_{i+1}): below the line by slope x (t - t_i) < slope x gap
    last_rec = steps[0][np.clip(np.searchsorted(steps[0], t, side="right") - 1, 0, None)]
    np.testing.assert_allclose(got, line(last_rec), rtol=0, atol=1e-15)
    err = want - got
    assert np.all(err >= -1e-15)
    assert err.max() <= slope * np.diff(steps[0]).max() + 1e-15
    assert err.max() > 0.9 * slope * np.diff(steps[0]).max()  # the bound is attained, not vacuous


def test_piecewise_constant_curve_step_is_exact_and_linear_is_not():
    steps = np.array([[0, 100, 250, 700, 1000]])
    levels = np.array([0.3, 0.9, 0.0, 1.0, 0.5])
    t = np.arange(0, 1200)
    truth = levels[np.searchsorted(steps[0], t, side="right") - 1]
    got = fits.fit("step", steps, levels[None, :]).fill(1200)
    assert got.shape == (1, 1200)
    np.testing.assert_array_equal(got[0], truth)
    assert np.abs(fits.fit("linear", steps, levels[None, :]).fill(1200)[0] - truth).max() > 0.5


def test_smooth_curve_errors_within_stated_bounds():
    """r(t) = 0.2 + 0.6 exp(-t/3000) recorded every h = 200 steps, 0..9200.

    * step: on [t_i, t_i + h) the error is r(t_i) - r(t) < r(t_i) - r(t_i + h), largest at
      t_i = 0: 0.6 (1 - exp(-h/3000)) = 0.0387;
    * linear: h²/8 · max|r''| = 200²/8 · 0.6/3000² = 3.33e-4;
    * pchip: its slopes are estimated (weighted harmonic means), so the error is O(h³)
      with no tidy constant; measured 7.4e-6, asserted < 2e-5 (and 10x below linear).
    """
    h = 200
    steps = np.arange(0, T, h)[None, :]
    values = _smooth(steps)
    t = np.arange(T)
    truth = _smooth(np.minimum(t, steps.max()))
    err = {m: np.abs(fits.fit(m, steps, values).fill(T)[0] - truth).max() for m in ("step", "linear", "pchip")}
    step_bound = 0.6 * (1 - math.exp(-h / 3000))
    linear_bound = h**2 / 8 * 0.6 / 3000**2
    assert step_bound * 0.95 < err["step"] <= step_bound
    assert linear_bound * 0.9 < err["linear"] <= linear_bound
    assert err["pchip"] < 2e-5
    assert err["pchip"] < err["linear"] / 10


def test_pchip_equals_scipy_per_point_on_ragged_random_records():
    rng = np.random.default_rng(3)
    steps, values = [], []
    for n in (2, 3, 7, 15, 15, 40):
        steps.append(np.sort(rng.choice(3000, n, replace=False)))
        values.append(rng.uniform(size=n) ** 3)
    steps.append(steps[3].copy())  # a step pattern shared by two points: one scipy call for both
    values.append(rng.uniform(size=15))
    f = fits.fit("pchip", steps, values)
    t = np.arange(-10, 3010)
    for p, (s, v) in enumerate(zip(steps, values)):
        want = PchipInterpolator(s, v)(np.clip(t, s[0], s[-1]))
        np.testing.assert_allclose(f.predict(np.full(t.shape, p), t), np.clip(want, 0, 1), rtol=0, atol=1e-12)


def test_interpolants_reproduce_records_exactly_and_ragged_equals_2d():
    rng = np.random.default_rng(5)
    steps = np.sort(np.stack([rng.choice(5000, 12, replace=False) for _ in range(4)]), axis=1)
    values = rng.uniform(size=(4, 12))
    values[0, ::3] = 0.0
    values[1, ::2] = 1.0
    pts = np.repeat(np.arange(4), 12)
    for method in ("step", "linear", "pchip"):
        f2 = fits.fit(method, steps, values)
        np.testing.assert_array_equal(f2.predict(pts, steps.ravel()), values.ravel())
        fr = fits.fit(method, list(steps), list(values))
        np.testing.assert_array_equal(fr.fill(5100), f2.fill(5100))


def test_offset_recovers_shared_shape_and_points_with_two_records():
    """logit r_p(t) = f(t) + a_p with f piecewise linear on the record grid: the model of the
    method, so the fit is exact up to the (tiny, default) smoothing penalty, even for a
    point with only 2 records, which linear interpolation misses by 0.1."""
    knots = np.arange(0, 9001, 300)
    fk = -1 + 2 * np.exp(-knots / 3000) + 0.3 * np.sin(knots / 1000)
    shape = lambda t: np.interp(t, knots, fk)  # noqa: E731
    a = np.array([-1.0, -0.3, 0.0, 0.4, 1.1, 2.0])
    steps = [knots] * 5 + [np.array([600, 7200])]
    values = [expit(shape(s) + ai) for s, ai in zip(steps, a)]
    t = np.arange(T)
    truth = np.stack([expit(shape(np.clip(t, s[0], s[-1])) + ai) for s, ai in zip(steps, a)])
    f = fits.fit("offset", steps, values)
    np.testing.assert_allclose(f.fill(T), truth, rtol=0, atol=1e-6)
    exact = fits.fit("offset", steps, values, smooth=0.0)
    np.testing.assert_allclose(exact.fill(T), truth, rtol=0, atol=1e-12)
    # the offsets themselves, up to the gauge sum(a) = 0
    np.testing.assert_allclose(exact.params["offsets"], a - a.mean(), atol=1e-10)
    assert exact.params["space"] == "logit"
    lin = fits.fit("linear", steps, values).fill(T)
    assert np.abs(lin[5] - truth[5]).max() > 0.05


def test_nn_fits_smooth_curve_and_is_deterministic():
    steps = np.arange(0, T, 200)[None, :]
    values = _smooth(steps)
    t = np.arange(T)
    truth = _smooth(np.minimum(t, steps.max()))
    torch.manual_seed(0)
    f = fits.fit("nn", steps, values, seed=7)
    got = f.fill(T)[0]
    assert np.abs(got - truth).max() < 0.02
    torch.manual_seed(12345)  # the caller's global RNG state must not matter ...
    before = torch.get_rng_state()
    again = fits.fit("nn", steps, values, seed=7).fill(T)[0]
    assert torch.equal(torch.get_rng_state(), before)  # ... nor be touched
    np.testing.assert_array_equal(got, again)
    other = fits.fit("nn", steps, values, seed=8).fill(T)[0]
    assert np.abs(other - got).max() > 1e-7  # the seed matters
    assert np.abs(other - truth).max() < 0.02


# --------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("method", fits.METHODS)
def test_outputs_clipped_shaped_and_params_json(method):
    rng = np.random.default_rng(11)
    steps = np.sort(np.stack([rng.choice(2000, 9, replace=False) for _ in range(5)]), axis=1)
    values = rng.choice([0.0, 1.0, 1e-9, 0.999], size=(5, 9))
    kw = {"n_iter": 60} if method == "nn" else {}
    f = fits.fit(method, steps, values, **kw)
    dense = f.fill(2500)
    assert dense.shape == (5, 2500)
    assert np.all((dense >= 0) & (dense <= 1)) and np.all(np.isfinite(dense))
    out = f.predict(np.array([[0, 4], [2, 3]]), np.array([[-100, 5000], [10**7, 0]]))
    assert out.shape == (2, 2) and np.all((out >= 0) & (out <= 1))
    # before the first / after the last record the fit's own value there is held
    np.testing.assert_allclose(f.predict([1, 1], [-5, steps[1, 0]])[0], f.predict([1], [steps[1, 0]])[0])
    np.testing.assert_allclose(f.predict([1], [10**6]), f.predict([1], [steps[1, -1]]))
    assert f.method == method
    json.dumps(f.params)


def test_bad_input_raises_clear_value_errors():
    s = np.array([[0, 10, 20]])
    v = np.array([[0.1, 0.2, 0.3]])
    q = dict(q=0.01, noise_multiplier=1.0, n_steps=30, delta=1e-5)
    cases = [
        (lambda: fits.fit("spline", s, v), "unknown fill method 'spline'"),
        (lambda: fits.fit("linear", s, v[:, :2]), "3 steps but 2 values"),
        (lambda: fits.fit("linear", [s[0], s[0]], [v[0]]), "steps has 2 points but values has 1"),
        (lambda: fits.fit("linear", s[0], v[0]), "2-D array"),
        (lambda: fits.fit("linear", s, np.array([[0.1, np.nan, 0.3]])), "not finite"),
        (lambda: fits.fit("linear", np.array([[0, np.nan, 20]]), v), "not finite"),
        (lambda: fits.fit("linear", s, np.array([[0.1, 1.5, 0.3]])), r"outside \[0, 1\]"),
        (lambda: fits.fit("linear", s, np.array([[-0.1, 0.5, 0.3]])), r"outside \[0, 1\]"),
        (lambda: fits.fit("linear", np.array([[0, 20, 20]]), v), "strictly increasing"),
        (lambda: fits.fit("linear", np.array([[-5, 0, 20]]), v), "negative"),
        (lambda: fits.fit("linear", [np.array([])], [np.array([])]), "no records"),
        (lambda: fits.fit("linear", s, v, knots=3), "takes no option"),
        (lambda: fits.fit("linear", s, v).predict([1], [5]), "point_index out of range"),
        (lambda: fits.fit("linear", s, v).fill(0), "n_steps"),
        (lambda: fits.holdout("linear", s, v, 1, **q), "k must be an integer >= 2"),
        (lambda: fits.holdout("linear", s, v, 2.5, **q), "k must be an integer >= 2"),
        (lambda: fits.holdout("linear", s, v, 5, **q), "nothing to hold out"),
        (lambda: fits.holdout("nope", s, v, 2, **q), "unknown fill method"),
        (lambda: fits.holdout("linear", s, v, 2, **{**q, "delta": 2.0}), "delta"),
        (lambda: fits.compare(s, v, 2, methods=("linear", "cubic"), **q), "unknown fill method 'cubic'"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


# --------------------------------------------------------------------------- holdout


def test_held_out_indices():
    got = fits.held_out_mask([5, 2, 7, 1], 3)
    want = np.zeros(15, dtype=bool)
    want[[2, 7 + 2, 7 + 5]] = True  # point 0: index 2; point 1: none; point 2: 2 and 5; point 3: none
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fits.held_out_mask([5], 2), [False, True, False, True, False])
    np.testing.assert_array_equal(fits.held_out_mask([4], 2), [False, True, False, False])  # 3 is the last


def _exact_eps(r_dense, q, sigma, delta):
    orders = np.array(rdp.DEFAULT_ORDERS)
    total = rdp.rdp_of_sensitivity(q, sigma, r_dense, orders).sum(axis=0)
    return rdp.epsilon_from_rdp(total, delta, orders)[0]


def test_holdout_matches_hand_computation():
    """1 point, records at 0..40 every 10, k=2: indices 1 and 3 (steps 10, 30) held out.
    The linear fit of (0, .2), (20, .4), (40, .6) predicts .3 and .5 there (true .9, .1);
    step predicts .2 and .4."""
    q, sigma, n_steps, delta = 0.02, 1.1, 50, 1e-5
    steps = np.array([[0, 10, 20, 30, 40]])
    values = np.array([[0.2, 0.9, 0.4, 0.1, 0.6]])
    cost = lambda r: rdp.rdp_of_sensitivity(q, sigma, np.asarray(r, dtype=float), [8.0])[:, 0]  # noqa: E731
    true_c = cost([0.9, 0.1])
    for method, pred in (("linear", [0.3, 0.5]), ("step", [0.2, 0.4])):
        out = fits.holdout(method, steps, values, 2, q=q, noise_multiplier=sigma, n_steps=n_steps, delta=delta)
        assert out["method"] == method and out["k"] == 2 and out["held_out"] == 2
        err = np.abs(cost(pred) - true_c)
        assert out["cost_mae"] == pytest.approx(err.mean(), rel=1e-12)
        assert out["cost_max_abs"] == pytest.approx(err.max(), rel=1e-12)
        big = true_c >= 0.01 * cost([1.0])[0]  # relative errors only above the floor (1% of a full step)
        assert big.tolist() == [True, False]
        assert out["cost_mre_above_floor"] == pytest.approx(np.mean(err[big] / true_c[big]), rel=1e-12)
        assert out["cost_max_rel_above_floor"] == pytest.approx(np.max(err[big] / true_c[big]), rel=1e-12)
        assert "cost_mre" not in out and "cost_max_rel" not in out  # over all records: meaningless near 0
        assert [k for k in out if k in dict(fits.METRICS)] == [k for k, _ in fits.METRICS]
        assert out["r_mae"] == pytest.approx(np.mean(np.abs(np.array(pred) - [0.9, 0.1])), rel=1e-12)
        # ε by the exact path over steps 0..49, the last record held for 41..49
        t = np.arange(n_steps)
        s, v = steps[0].astype(float), values[0]
        if method == "linear":
            full = np.interp(t, s, v)
            train = np.interp(t, s[[0, 2, 4]], v[[0, 2, 4]])
        else:
            full = v[np.searchsorted(s, t, side="right") - 1]
            train = v[[0, 2, 4]][np.searchsorted(s[[0, 2, 4]], t, side="right") - 1]
        step_full = v[np.searchsorted(s, t, side="right") - 1]
        e_full, e_train, e_step = (_exact_eps(x, q, sigma, delta) for x in (full, train, step_full))
        # the tabulated fast path is an upper bound within ~1e-5 of exact
        assert e_full <= out["eps_full_mean"] <= e_full + 1e-4
        assert e_step <= out["eps_step_full_mean"] <= e_step + 1e-4
        assert e_train <= out["eps_holdout_mean"] <= e_train + 1e-4
        assert out["eps_mae"] == pytest.approx(abs(e_train - e_full), abs=2e-4)
        assert out["eps_step_mae"] == pytest.approx(abs(e_train - e_step), abs=2e-4)
        assert abs(e_train - e_full) > 1e-2  # holding out changed ε: the check above is not vacuous
    # a tiny true cost (r = 1e-10, cost ~1e-22) predicted as anything: no relative error of 1e37
    tiny = fits.holdout("linear", steps, np.array([[0.2, 1e-10, 0.4, 1e-10, 0.6]]), 2,
                        q=q, noise_multiplier=sigma, n_steps=n_steps, delta=delta)
    assert tiny["held_out_above_floor"] == 0 and tiny["cost_mre_above_floor"] is None
    assert all(v is None or abs(v) < 1e3 for k, v in tiny.items() if k in dict(fits.METRICS))
    assert "cost MAE" in fits.format_table([tiny]) and "ε MAE" in fits.format_table([tiny])


# --------------------------------------------------------------------------- the fixture run


@pytest.fixture(scope="module")
def res1(gla_dir):
    d = pd.read_csv(gla_dir / "res1.csv").sort_values(["point", "step"])
    d["r"] = np.minimum(d["distance (sum)"] * d["batch_size"] / d["cn"], 1.0)
    steps = d.pivot(index="point", columns="step", values="step").to_numpy()
    values = d.pivot(index="point", columns="step", values="r").to_numpy()
    return steps, values, float(d["p"].iloc[0]), float(d["sigma"].iloc[0])


def test_fixture_step_fill_gives_the_warehouse_epsilons(res1):
    """The README's `dpledger account` on res1 (hold-last, 1,024-cell grid): min 5.796,
    median 8.617, max 10.26 over the 10 points."""
    steps, values, q, sigma = res1
    eps = fits.point_epsilons(fits.fit("step", steps, values), T, q=q, noise_multiplier=sigma, delta=1e-5)
    assert eps.shape == (10,)
    assert eps.min() == pytest.approx(5.796, abs=5e-4)
    assert np.median(eps) == pytest.approx(8.617, abs=5e-4)
    assert eps.max() == pytest.approx(10.26, abs=5e-3)


@pytest.mark.parametrize("k,held", [(3, 130), (2, 200)])
def test_fixture_compare_all_methods(res1, k, held):
    steps, values, q, sigma = res1
    rows = fits.compare(steps, values, k, q=q, noise_multiplier=sigma, n_steps=T, delta=1e-5)
    print(f"\nres1 hold-out, k={k} (q={q:.6g}, sigma={sigma:.6g}, {T} steps, delta=1e-5, cost order 8):")
    print(fits.format_table(rows))
    assert [r["method"] for r in rows] == list(fits.METHODS)
    for r in rows:
        assert r["k"] == k and r["held_out"] == held
        for key, val in r.items():
            if key != "method":
                assert isinstance(val, (int, float)) and math.isfinite(val), (r["method"], key, val)
        json.dumps(r)
    step_row = rows[0]
    assert step_row["eps_mae"] == step_row["eps_step_mae"]  # step's own full fit is the step fill
