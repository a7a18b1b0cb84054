"""Runs as the warehouse knows them: the one "unknown run" rule.

Every command that takes a run name checks it here, so every one of them says the
same thing about a name it does not know.
"""

from __future__ import annotations

from .errors import UserError


def known_runs(con, limit: int = 8) -> list[str]:
    """The first ``limit`` run names, sorted (for error messages)."""
    return [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1 LIMIT ?", [limit]).fetchall()]


def unknown_run(run_id: str, known: list[str], where: str = "") -> UserError:
    """The error for a run name that is not there (``where``: e.g. " in lake DIR")."""
    return UserError(f"unknown run '{run_id}'{where} (runs: {', '.join(known) or 'none yet'})", "run")


def require_runs(con, run_ids: list[str]) -> None:
    """Raise :func:`unknown_run` for the first of ``run_ids`` the database does not hold."""
    ids = list(run_ids)
    found = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE run_id IN (SELECT unnest(?))", [ids]).fetchall()}
    for run_id in ids:
        if run_id not in found:
            raise unknown_run(run_id, known_runs(con))


def require_run(con, run_id: str) -> None:
    """Raise :func:`unknown_run` unless ``run_id`` is a run of the database."""
    require_runs(con, [run_id])
