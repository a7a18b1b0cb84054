"""Per-example privacy accounting over the warehouse: ``dpledger account``.

Layer: ``warehouse`` (a derived-table job). :func:`account` checks its parameters and
dispatches each run to a rule: ``rdp`` (:mod:`warehouse.account_rdp`, one run at a
time) or ``gla`` (:mod:`warehouse.account_gla`, a configuration's runs together), then
refreshes ``config_epsilon`` (:mod:`warehouse.config_epsilon`). The numbers are
:mod:`analysis.composition`'s and :mod:`analysis.gla`'s. With ``accountant="pld"``
(rule ``rdp`` only) the same per-step sum composition is accounted by privacy loss
distributions (:mod:`warehouse.account_pld`, :mod:`analysis.pld`) and stored under the
composition label ``rule = 'pld'``, beside the rdp rows.

What the numbers mean (also in the report): summed over one run's recorded norms,
the ``rdp`` rule gives the *output-specific individual* privacy of Yu et al.
(TMLR 2023): a statement about that training trajectory, which the per-step norms
depend on. The ``gla`` rule (Thudi et al., USENIX Security 2024) bounds the
per-instance guarantee in expectation over training runs. Neither replaces the
data-independent ε of the run (``run_epsilon``), which is shown beside them. The
``pld`` label is a tighter description of the same trajectory, not a budget to enforce
(:data:`warehouse.account_pld.PLD_MEANING`).
"""

from __future__ import annotations

from typing import Callable

from dpledger.analysis import grid as gridmod

from .account_gla import account_gla_config
from .account_pld import account_pld
from .account_rdp import account_rdp
from .config_epsilon import refresh_config_epsilon
from .epsilon_tables import RULES, check_delta, check_rule
from .errors import UserError
from .fit_table import check_method
from .runs import RunInfo, load_runs, require_params
from .sqlutil import transaction

__all__ = ["ACCOUNTANTS", "RULES", "account"]

#: The accountants of the per-step sum composition (rule rdp): Rényi DP, or privacy loss distributions.
ACCOUNTANTS = ("rdp", "pld")


def _check(rule: str, delta, grid, legacy_scaling: bool, fill: str, accountant: str = "rdp", exact: bool = False) -> None:
    if accountant not in ACCOUNTANTS:
        raise UserError(f"accountant {accountant}: expected one of {', '.join(ACCOUNTANTS)}", "accountant")
    if rule == "pld":
        raise UserError("rule pld is written by accountant pld: give rule rdp with accountant pld", "rule", "accountant")
    check_rule(rule)
    if accountant == "pld":
        if rule != "rdp":
            raise UserError(f"accountant pld goes with rule rdp only (rule {rule} has its own composition)",
                            "accountant", "rule")
        if exact or fill != "step" or legacy_scaling:
            raise UserError("accountant pld takes no --exact or --fill (it composes the recorded steps, hold-last)",
                            "accountant")
    check_delta(delta, "delta", "delta")
    if isinstance(grid, bool) or not isinstance(grid, int) or not 2 <= grid <= gridmod.MAX_GRID:
        raise UserError(f"grid {grid} must be an integer in [2, {gridmod.MAX_GRID}]", "grid")
    if legacy_scaling and rule != "gla":
        raise UserError("legacy_scaling goes with rule gla", "legacy_scaling", "rule")
    check_method(fill, "fill")
    if fill != "step" and rule != "rdp":
        raise UserError("fill goes with rule rdp (gla composes its own per-step terms)", "fill", "rule")


def _configurations(con, private: list[RunInfo]) -> dict[str, list[RunInfo]]:
    """The named runs' configurations, each with all its private runs that have norms (gla's unit)."""
    by_config: dict[str, list[RunInfo]] = {run.config_key: [] for run in private}
    if by_config:
        siblings = con.execute(
            "SELECT run_id FROM runs WHERE config_key IN (SELECT unnest(?)) AND coalesce(private, true) "
            "AND run_id IN (SELECT DISTINCT run_id FROM point_steps) ORDER BY run_id",
            [list(by_config)],
        ).fetchall()
        for run in load_runs(con, [s[0] for s in siblings]):
            require_params(run)
            by_config[run.config_key].append(run)
    return by_config


def account(
    con,
    run_ids: list[str] | None = None,
    rule: str = "rdp",
    delta: float | None = None,
    exact: bool = False,
    grid: int = gridmod.DEFAULT_GRID,
    legacy_scaling: bool = False,
    on_run: Callable[[str, int, int], None] | None = None,
    fill: str = "step",
    accountant: str = "rdp",
) -> list[dict]:
    """Compute per-example ε for runs (all runs with norms by default) under ``rule``.

    ``rdp`` composes each run's per-step RDP (fast tabulated upper bound, or
    ``exact``; ``fill`` one of :data:`analysis.fits.METHODS` between records); ``gla``
    composes whole configurations (all runs sharing dataset, model, q, σ, C and steps)
    with the Hölder rule of :mod:`analysis.gla`. Returns one summary per run; fills
    ``point_epsilon``, ``accountings`` and ``config_epsilon``.

    ``accountant``: ``rdp`` (default) or ``pld`` — the tight privacy-loss-distribution
    accountant of the same per-step sum composition (rule ``rdp`` only), stored as
    ``rule = 'pld'`` beside the rdp rows (which it leaves untouched); its summaries'
    ``run_epsilon`` is the run's data-independent PLD ε and ``meaning`` says what the
    number means (:data:`warehouse.account_pld.PLD_MEANING`).
    """
    _check(rule, delta, grid, legacy_scaling, fill, accountant, exact)
    runs = load_runs(con, run_ids)
    summaries: list[dict] = []
    private = []
    for run in runs:
        if not run.private:
            summaries.append({"run_id": run.run_id, "rule": "pld" if accountant == "pld" else rule, "skipped": "not private (--disable-dp baseline)"})
            continue
        require_params(run)
        check_delta(delta or run.delta, f"run '{run.run_id}' delta")
        private.append(run)
    if accountant == "pld":
        tables: dict = {}  # one PLD table per (q, sigma), shared across the runs of this call
        for i, run in enumerate(private):
            if on_run:
                on_run(run.run_id, i, len(private))
            summaries.extend(account_pld(con, [run], delta, tables))
            with transaction(con):
                refresh_config_epsilon(con, run.config_key, "pld")
        return summaries
    if rule == "rdp":
        for i, run in enumerate(private):
            if on_run:
                on_run(run.run_id, i, len(private))
            summaries.append(account_rdp(con, run, delta or run.delta, exact, grid, fill))
            with transaction(con):
                refresh_config_epsilon(con, run.config_key, "rdp")
        return summaries
    done = 0
    for key, group in _configurations(con, private).items():
        if on_run:
            on_run(", ".join(r.run_id for r in group), done, len(private))
        sums, expected = account_gla_config(con, group, delta, legacy_scaling)
        summaries.extend(sums)
        with transaction(con):
            refresh_config_epsilon(con, key, "gla", expected)
        done += len(group)
    return summaries
