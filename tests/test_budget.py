"""`dpledger budget` against Opacus's accountants."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from dpledger.analysis.rdp import DEFAULT_ORDERS


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.004, 1.0, 10000, 1e-5), (0.01, 0.7, 500, 1e-6), (0.1, 2.0, 300, 1e-5)])
def test_rdp_budget_equals_opacus(cli, q, sigma, steps, delta):
    r = cli("budget", "--sample-rate", q, "--noise-multiplier", sigma, "--steps", steps, "--delta", delta, "--json")
    assert r.rc == 0, r
    out = r.json()
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    eps, order = acc.get_privacy_spent(delta=delta, alphas=list(DEFAULT_ORDERS))
    assert out["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert out["order"] == order
    assert set(out) >= {"epsilon", "order", "noise_multiplier", "steps", "delta", "accountant"}
    assert out["steps"] == steps and out["accountant"] == "rdp"


def test_prv_and_gdp_budgets_equal_opacus(cli):
    for name, cls in (("prv", PRVAccountant), ("gdp", GaussianAccountant)):
        out = cli("budget", "--sample-rate", "0.004", "--noise-multiplier", "1.0", "--epochs", "40",
                  "--delta", "1e-5", "--accountant", name, "--json").json()
        acc = cls()
        acc.history = [(1.0, 0.004, 40 * 250)]
        assert out["steps"] == 10000
        assert out["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_epochs_use_ceil_of_one_over_q(cli):
    out = cli("budget", "--sample-rate", "0.003", "--noise-multiplier", "1.0", "--epochs", "2", "--delta", "1e-5",
              "--json").json()
    assert out["steps"] == 2 * math.ceil(1 / 0.003)


def test_target_epsilon_gives_opacus_noise_multiplier(cli):
    for acc in ("rdp", "prv"):
        out = cli("budget", "--sample-rate", "0.004", "--target-epsilon", "3", "--epochs", "10", "--delta", "1e-5",
                  "--accountant", acc, "--json").json()
        kwargs = {"alphas": list(DEFAULT_ORDERS)} if acc == "rdp" else {}
        want = get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=0.004, steps=2500,
                                    accountant=acc, **kwargs)
        assert out["noise_multiplier"] == pytest.approx(want, rel=1e-12)
        assert out["epsilon"] <= 3.0 and out["epsilon"] == pytest.approx(3.0, abs=0.02)


def test_table_output_names_the_order(cli):
    r = cli("budget", "--sample-rate", "0.004", "--noise-multiplier", "1.0", "--steps", "100", "--delta", "1e-5")
    assert r.rc == 0 and r.out.startswith("epsilon = ") and "optimal order" in r.out


@pytest.mark.parametrize("args,fragment", [
    (["--sample-rate", "0", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "--sample-rate 0.0 is outside (0, 1]"),
    (["--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "outside (0, 1]"),
    (["--sample-rate", "0.1", "--noise-multiplier", "0", "--steps", "10", "--delta", "1e-5"], "--noise-multiplier 0.0 must be positive"),
    (["--sample-rate", "0.1", "--noise-multiplier", "-1", "--steps", "10", "--delta", "1e-5"], "must be positive"),
    (["--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "0"], "--delta 0.0 is outside (0, 1)"),
    (["--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1"], "--delta 1.0 is outside (0, 1)"),
    (["--sample-rate", "0.1", "--noise-multiplier", "1", "--delta", "1e-5"], "give --steps or --epochs"),
    (["--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "3", "--epochs", "1", "--delta", "1e-5"], "give --steps or --epochs"),
    (["--sample-rate", "0.1", "--steps", "3", "--delta", "1e-5"], "--noise-multiplier"),
    (["--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5", "--accountant", "zz"], "--accountant zz"),
    (["--sample-rate", "0.1", "--noise-multiplier", "x", "--steps", "10", "--delta", "1e-5"], "Invalid value for '--noise-multiplier'"),
])
def test_budget_bad_input(cli, args, fragment):
    r = cli("budget", *args)
    assert r.rc == 2, r
    assert fragment in r.err and len(r.err.strip().splitlines()) == 1
