"""``dpledger rank``: a run's points ordered by per-example ε, beside the run's ε.

Layer: ``warehouse`` (a job over the view ``point_rank``).
"""

from __future__ import annotations

import pyarrow as pa

from .epsilon_tables import check_rule, require_accounted
from .errors import UserError
from .runs import require_run

def rank(con, run_id: str, rule: str = "rdp", lowest: int | None = None, highest: int | None = None) -> pa.Table:
    """The run's points by per-example ε: lowest first (default) or highest first."""
    check_rule(rule)
    if lowest is not None and highest is not None:
        raise UserError("give lowest N or highest N, not both", "lowest", "highest")
    for name, n in (("lowest", lowest), ("highest", highest)):
        if n is not None and n < 1:
            raise UserError(f"{name} {n} must be at least 1", name)
    require_run(con, run_id)
    require_accounted(con, run_id, rule)
    by = "rank_highest" if highest is not None else "rank_lowest"
    limit = highest if highest is not None else lowest
    return con.sql(
        f"SELECT point_id, label, epsilon, {by} AS rank, run_epsilon, ratio, best_order "
        f"FROM point_rank WHERE run_id = $run AND rule = $rule ORDER BY {by} LIMIT $n",
        params={"run": run_id, "rule": rule, "n": limit if limit is not None else 2**62},
    ).to_arrow_table()
