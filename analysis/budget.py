"""The data-independent budget of DP-SGD, with no training and no database.

Layer: ``analysis`` (pure numeric code; imports no other project package, Opacus lazily
for its ``prv``/``gdp`` accountants and its noise calibration). Owns :func:`budget` and
the one rule that turns epochs into steps, :func:`steps_from_epochs`, which ``budget``,
``dpledger train`` and every importer use.
"""

from __future__ import annotations

from . import rdp, validate
from .validate import ParameterError, positive

ACCOUNTANTS = ("rdp", "prv", "gdp", "pld")


def steps_from_epochs(epochs: float, sample_rate: float) -> int:
    """⌊epochs / q⌋ steps, exactly as Opacus's ``get_noise_multiplier`` counts them
    (``int(epochs / sample_rate)``), so a noise multiplier calibrated for ``epochs``
    is calibrated for the steps trained. At most :data:`analysis.validate.MAX_STEPS`."""
    epochs = positive("epochs", epochs)
    sample_rate = validate.sample_rate(sample_rate)
    n = int(epochs / sample_rate)
    if n > validate.MAX_STEPS:
        raise ParameterError(f"epochs {epochs} at sample_rate {sample_rate} make {n} steps, more than "
                             f"{validate.MAX_STEPS}", "epochs", "sample_rate")
    return n


def budget(
    sample_rate: float,
    delta: float,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str = "rdp",
    target_epsilon: float | None = None,
) -> dict:
    """ε of DP-SGD with (q, σ, steps, δ), or σ for a target ε, with no training.

    ``rdp`` uses :mod:`analysis.rdp` (orders :data:`analysis.rdp.DEFAULT_ORDERS`);
    ``prv`` and ``gdp`` use Opacus's accountants; ``pld`` the tight privacy-loss-distribution
    accountant of :func:`analysis.pld.data_independent_epsilon_pld` (pessimistic: at or
    above ``dp_accounting``'s PLD accountant at its default settings, within 1% of it;
    the same number as a per-example PLD point clipped at every step). A target ε gives σ
    by Opacus's ``get_noise_multiplier`` (not with ``pld``: refused). ``epochs`` count :func:`steps_from_epochs` steps.
    Ranges (:mod:`analysis.validate`): q ∈ [1e-12, 1], δ ∈ (0, 1), σ ∈ [1e-3, 1e6], steps
    whole in [1, 1e9]. Raises :class:`analysis.validate.ParameterError` (a ``ValueError``)
    naming the parameter on bad input.
    """
    validate.sample_rate(sample_rate)
    validate.delta(delta)
    if accountant not in ACCOUNTANTS:
        raise ParameterError(f"accountant {accountant}: expected one of {', '.join(ACCOUNTANTS)}", "accountant")
    if (steps is None) == (epochs is None):
        raise ParameterError("give steps or epochs (one of them)", "steps", "epochs")
    if steps is not None:
        validate.steps(steps)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ParameterError("give noise_multiplier (for epsilon) or target_epsilon (for the noise multiplier)",
                             "noise_multiplier", "target_epsilon")
    if noise_multiplier is not None:
        validate.noise_multiplier(noise_multiplier)
    if target_epsilon is not None:
        positive("target_epsilon", target_epsilon)
    if accountant == "pld" and target_epsilon is not None:
        raise ParameterError("target_epsilon goes with accountant rdp, prv or gdp (pld gives epsilon for a noise "
                             "multiplier)", "target_epsilon", "accountant")
    n_steps = int(steps) if steps is not None else steps_from_epochs(epochs, sample_rate)
    out = {"accountant": accountant, "sample_rate": sample_rate, "steps": n_steps, "delta": delta}
    if target_epsilon is not None:
        from opacus.accountants.utils import get_noise_multiplier

        kwargs = {"alphas": list(rdp.DEFAULT_ORDERS)} if accountant == "rdp" else {}
        try:
            sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                         steps=n_steps, accountant=accountant, **kwargs)
        except ValueError as exc:
            raise ParameterError(f"target_epsilon {target_epsilon}: {exc}", "target_epsilon") from None
        out["target_epsilon"] = target_epsilon
        noise_multiplier = float(sigma)
    out["noise_multiplier"] = noise_multiplier
    if accountant == "rdp":
        eps, order = rdp.dp_epsilon(sample_rate, noise_multiplier, n_steps, delta)
        out["epsilon"], out["order"] = float(eps), float(order)
    elif accountant == "pld":
        from .pld import data_independent_epsilon_pld

        out["epsilon"] = data_independent_epsilon_pld(sample_rate, noise_multiplier, n_steps, delta)
    else:
        from opacus.accountants import create_accountant

        acc = create_accountant(mechanism=accountant)
        acc.history = [(noise_multiplier, sample_rate, n_steps)]
        out["epsilon"] = float(acc.get_epsilon(delta=delta))
    return out
