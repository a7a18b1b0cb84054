"""``dpledger rank``: a run's points ordered by per-example ε, beside the run's ε.

Layer: ``warehouse`` (a job over the view ``point_rank``).

Ties: points of equal ε share a rank, as SQL's ``rank()`` gives it (1, 1, 1, 4, ...), and
within a rank the table lists them by point id. Equality is exact: points whose per-step
ratios are the same (e.g. clipped at every step) get bit-identical ε from the one
composition path, while different ratios give different ε, however close. A point's ε
"equals the run's ε" within a relative :data:`RUN_EPSILON_RTOL`: the run's ε comes from a
different computation (one per-step RDP times the steps) than the points' (a histogram
times the grid, raised by a 1e-12 rounding margin).

:func:`rank_summary` says what a table of the first N cannot: how many points tie at the
top and at the bottom, whether the top ties sit at the run's ε (clipped at every step),
how many points' norms cover only part of the run, and, for the ``gla`` rule, how many
points exceed the run's data-independent ε (see :mod:`warehouse.account_gla`). Its
``notes`` are sentences a front end can print as they are.

Rule ``pld`` (the PLD accountant of the same per-step sum, ``--accountant pld``): the
run's ε beside the points is the run's data-independent *PLD* ε
(:func:`warehouse.account_pld.run_epsilon_pld` at the accounting's δ), not RDP's.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .account_gla import GLA_ABOVE_RUN
from .account_pld import PLD_MEANING, run_epsilon_pld
from .epsilon_tables import check_rule, require_accounted
from .errors import UserError
from .runs import require_run

#: A point's ε equals the run's data-independent ε within this relative tolerance.
RUN_EPSILON_RTOL = 1e-9

COLUMNS = ("point_id", "label", "epsilon", "rank", "n_tied", "run_epsilon", "ratio", "covered_fraction", "best_order")


def _check(con, run_id: str, rule: str, lowest, highest) -> None:
    check_rule(rule)
    if lowest is not None and highest is not None:
        raise UserError("give lowest N or highest N, not both", "lowest", "highest")
    for name, n in (("lowest", lowest), ("highest", highest)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            raise UserError(f"{name} {n} must be a whole number of at least 1", name)
    require_run(con, run_id)
    require_accounted(con, run_id, rule)


def reference_epsilon(con, run_id: str, rule: str) -> float | None:
    """The run ε that rule's per-example ε compares to: None (the view's RDP run ε) except for ``pld``,
    where it is the data-independent PLD ε at the δ of the run's pld accounting."""
    if rule != "pld":
        return None
    row = con.execute("SELECT r.sample_rate, r.noise_multiplier, r.steps, a.delta FROM runs r JOIN accountings a "
                      "USING (run_id) WHERE r.run_id = ? AND a.rule = 'pld'", [run_id]).fetchall()
    if not row:
        return None
    return run_epsilon_pld(*row[0])


def rank(con, run_id: str, rule: str = "rdp", lowest: int | None = None, highest: int | None = None) -> pa.Table:
    """The run's points by per-example ε: lowest first (default) or highest first.

    Columns (:data:`COLUMNS`): ``rank`` (equal ε, equal rank), ``n_tied`` (points sharing
    that ε), ``run_epsilon`` and ``ratio`` (ε / run ε), ``covered_fraction`` (steps the
    point's norms cover / the run's steps). :func:`rank_summary` has the ties and notes.
    """
    _check(con, run_id, rule, lowest, highest)
    by = "rank_highest" if highest is not None else "rank_lowest"
    limit = highest if highest is not None else lowest
    ref = reference_epsilon(con, run_id, rule)
    return con.sql(
        f"SELECT point_id, label, epsilon, {by} AS rank, n_tied, coalesce($ref, run_epsilon) AS run_epsilon, "
        f"coalesce(epsilon / $ref, ratio) AS ratio, covered_fraction, best_order "
        f"FROM point_rank WHERE run_id = $run AND rule = $rule ORDER BY {by}, point_id LIMIT $n",
        params={"run": run_id, "rule": rule, "n": limit if limit is not None else 2**62, "ref": ref},
    ).to_arrow_table()


def rank_summary(con, run_id: str, rule: str = "rdp") -> dict:
    """What the ranking as a whole says, beside :func:`rank`'s table.

    Keys: ``run_id``, ``rule``, ``points``, ``run_epsilon``, ``epsilon_max``,
    ``epsilon_min``, ``ties_highest`` / ``ties_lowest`` (points sharing the highest /
    lowest ε; 1 when there is no tie), ``highest_at_run_epsilon`` (the highest ε equals the
    run's, within :data:`RUN_EPSILON_RTOL`), ``at_run_epsilon`` (points whose ε equals the
    run's), ``above_run_epsilon`` (points whose ε exceeds it by more than the tolerance:
    none under ``rdp``; under ``gla`` the bound can be looser), ``partially_covered``
    (points whose norms cover fewer steps than the run has) and ``notes`` (sentences).
    """
    _check(con, run_id, rule, None, None)
    ref = reference_epsilon(con, run_id, rule)
    row = con.execute(
        "WITH k AS (SELECT epsilon, rank_highest, rank_lowest, covered_fraction, "
        "CAST(coalesce(?, run_epsilon) AS DOUBLE) AS run_epsilon FROM point_rank WHERE run_id = ? AND rule = ?) "
        "SELECT count(*), any_value(run_epsilon), max(epsilon), min(epsilon), "
        "count(*) FILTER (WHERE rank_highest = 1), count(*) FILTER (WHERE rank_lowest = 1), "
        "count(*) FILTER (WHERE abs(epsilon - run_epsilon) <= ? * run_epsilon), "
        "count(*) FILTER (WHERE epsilon > run_epsilon * (1 + ?)), "
        "count(*) FILTER (WHERE covered_fraction < 1) FROM k",
        [ref, run_id, rule, RUN_EPSILON_RTOL, RUN_EPSILON_RTOL]).fetchall()[0]
    n, run_eps, eps_max, eps_min, ties_hi, ties_lo, at_run, above, partial = row
    top_at_run = run_eps is not None and abs(eps_max - run_eps) <= RUN_EPSILON_RTOL * run_eps
    notes = []
    if ties_hi > 1:
        where = (" at the run's epsilon (clipped at every step)" if top_at_run and rule in ("rdp", "pld")
                 else " at the run's epsilon" if top_at_run else "")
        notes.append(f"{ties_hi} points tie at the highest epsilon {eps_max:.6g}{where}; they share rank 1")
    elif top_at_run and rule in ("rdp", "pld"):
        notes.append("the highest epsilon equals the run's (that point is clipped at every step)")
    if ties_lo > 1:
        notes.append(f"{ties_lo} points tie at the lowest epsilon {eps_min:.6g}; they share rank 1 from the bottom")
    if partial:
        notes.append(f"{partial} points have norms for only part of the run's steps (covered_fraction < 1); "
                     "their epsilon covers that part only")
    if above and rule == "gla":
        notes.append(GLA_ABOVE_RUN.format(n=above, points=n, run_epsilon=run_eps))
    if rule == "pld":
        notes.append(f"run epsilon {run_eps:.6g} is the run's data-independent PLD epsilon. {PLD_MEANING}")
    return {"run_id": run_id, "rule": rule, "points": int(n), "run_epsilon": run_eps, "epsilon_max": eps_max,
            "epsilon_min": eps_min, "ties_highest": int(ties_hi), "ties_lowest": int(ties_lo),
            "highest_at_run_epsilon": bool(top_at_run), "at_run_epsilon": int(at_run),
            "above_run_epsilon": int(above), "partially_covered": int(partial), "notes": notes}
