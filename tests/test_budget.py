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


def test_epochs_count_steps_as_opacus_get_noise_multiplier(cli):
    """steps = floor(epochs / q): 2 / 0.003 = 666.67 -> 666 (not 2 x ceil(1/q) = 668)."""
    out = cli("budget", "--sample-rate", "0.003", "--noise-multiplier", "1.0", "--epochs", "2", "--delta", "1e-5",
              "--json").json()
    assert out["steps"] == math.floor(2 / 0.003) == 666


@pytest.mark.parametrize("epochs,q", [(2, 0.003), (40, 0.004), (10, 0.004), (3.5, 0.01), (1, 256 / 60000), (7, 0.3)])
def test_steps_from_epochs_is_floor_of_epochs_over_q(epochs, q):
    from fractions import Fraction

    from dpledger.analysis.budget import steps_from_epochs

    # exact rational floor of the float quotient Opacus computes (int(epochs / q))
    assert steps_from_epochs(epochs, q) == math.floor(Fraction(epochs / q))


def test_target_epsilon_with_epochs_calibrates_for_the_steps_reported(cli):
    """The noise multiplier Opacus calibrates for `epochs` is the one for the steps budget reports."""
    out = cli("budget", "--sample-rate", "0.003", "--target-epsilon", "2", "--epochs", "2", "--delta", "1e-5",
              "--json").json()
    want = get_noise_multiplier(target_epsilon=2, target_delta=1e-5, sample_rate=0.003, epochs=2,
                                accountant="rdp", alphas=list(DEFAULT_ORDERS))
    assert out["steps"] == 666
    assert out["noise_multiplier"] == pytest.approx(want, rel=1e-12)


def test_budget_raises_parameter_errors_naming_the_parameter():
    from dpledger.analysis.budget import budget
    from dpledger.analysis.validate import ParameterError

    with pytest.raises(ParameterError, match=r"^sample_rate 2 is outside \[1e-12, 1\]$") as info:
        budget(2, 1e-5, noise_multiplier=1.0, steps=10)
    assert info.value.params == ("sample_rate",) and isinstance(info.value, ValueError)
    with pytest.raises(ParameterError, match="give steps or epochs") as info:
        budget(0.1, 1e-5, noise_multiplier=1.0, steps=10, epochs=1)
    assert set(info.value.params) == {"steps", "epochs"}


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
    (["--sample-rate", "0", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "--sample-rate 0.0 is outside [1e-12, 1]"),
    (["--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "outside [1e-12, 1]"),
    (["--sample-rate", "1e-300", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "outside [1e-12, 1]"),
    (["--sample-rate", "nan", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"], "must be finite"),
    (["--sample-rate", "0.1", "--noise-multiplier", "0", "--steps", "10", "--delta", "1e-5"],
     "--noise-multiplier 0.0 is outside [0.001, 1e+06]"),
    (["--sample-rate", "0.1", "--noise-multiplier", "-1", "--steps", "10", "--delta", "1e-5"], "outside [0.001, 1e+06]"),
    # σ² underflows: this used to spin for ever in the fractional-order series
    (["--sample-rate", "0.5", "--noise-multiplier", "1e-160", "--steps", "10", "--delta", "1e-5"],
     "--noise-multiplier 1e-160 is outside [0.001, 1e+06]"),
    (["--sample-rate", "0.1", "--noise-multiplier", "inf", "--steps", "10", "--delta", "1e-5"], "must be finite"),
    (["--sample-rate", "0.1", "--noise-multiplier", "1", "--steps", "10000000000", "--delta", "1e-5"],
     "--steps 10000000000 must be in [1, 1000000000]"),
    (["--sample-rate", "1e-9", "--noise-multiplier", "1", "--epochs", "10", "--delta", "1e-5"], "more than 1000000000"),
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


@pytest.mark.parametrize("n_train, batch_size, epochs", [(60, 20, 2), (100, 7, 3), (300, 64, 5), (1437, 64, 8),
                                                        (500, 33, 2.5)])
def test_train_and_budget_count_the_same_steps(n_train, batch_size, epochs):
    """One convention for every command: train's plan and budget --epochs both take
    floor(epochs / q) steps (Opacus's get_noise_multiplier), and so give the same epsilon."""
    import math

    from dpledger.analysis.budget import budget
    from dpledger.ingest.worker import TrainConfig, plan_run

    cfg = TrainConfig(run="x", dataset="digits", model="logreg", n_train=n_train, batch_size=batch_size,
                      epochs=epochs, noise_multiplier=1.0, track="none")
    plan = plan_run(cfg, None, 1)
    q = batch_size / n_train
    assert plan.q == pytest.approx(q) and plan.total == math.floor(epochs / q)
    out = budget(plan.q, 1e-5, noise_multiplier=1.0, epochs=epochs)
    assert out["steps"] == plan.total
