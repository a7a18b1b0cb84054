"""Runs as the warehouse knows them: loading their parameters, and the one "unknown run" rule.

Layer: ``warehouse`` (the store). Every job that takes a run name checks it here, so
every one of them says the same thing about a name it does not know; the accounting,
fit and report jobs read a run's mechanism parameters as a :class:`RunInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpledger.analysis import validate
from dpledger.analysis.validate import ParameterError

from .errors import UserError


@dataclass(frozen=True)
class RunInfo:
    """The columns of ``runs`` the derived-table jobs need."""

    run_id: str
    sample_rate: float | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    steps: int | None
    delta: float | None
    private: bool
    batch_size: int | None
    n_train: int | None
    config_key: str | None


_COLUMNS = ("run_id, sample_rate, noise_multiplier, max_grad_norm, steps, delta, coalesce(private, true), "
            "batch_size, n_train, config_key")


def known_runs(con, limit: int = 8) -> list[str]:
    """The first ``limit`` run names, sorted (for error messages)."""
    return [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1 LIMIT ?", [limit]).fetchall()]


def unknown_run(run_id: str, known: list[str], where: str = "") -> UserError:
    """The error for a run name that is not there (``where``: e.g. " in lake DIR")."""
    return UserError(f"unknown run '{run_id}'{where} (runs: {', '.join(known) or 'none yet'})")


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


def load_runs(con, run_ids: list[str] | None = None) -> list[RunInfo]:
    """The runs named, in that order (each must exist), or every run with recorded norms."""
    if run_ids:
        require_runs(con, run_ids)
        rows = con.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id IN (SELECT unnest(?))",
                           [list(run_ids)]).fetchall()
        order = {r: i for i, r in enumerate(run_ids)}
        rows.sort(key=lambda r: order[r[0]])
    else:
        rows = con.execute(f"SELECT {_COLUMNS} FROM runs WHERE run_id IN (SELECT DISTINCT run_id FROM point_steps) "
                           "ORDER BY run_id").fetchall()
    return [RunInfo(*r) for r in rows]


def load_run(con, run_id: str) -> RunInfo:
    """One run by name (:func:`unknown_run` if there is none)."""
    (run,) = load_runs(con, [run_id])
    return run


def require_params(run: RunInfo) -> None:
    """Raise unless the run has the mechanism parameters accounting needs (q, σ, C, steps), each
    within the documented range of :mod:`analysis.validate` (a run stored with C = inf, or
    q = 1e-300, is refused in one line naming the run and the parameter, not accounted)."""
    missing = [name for name, v in (("sample_rate", run.sample_rate), ("noise_multiplier", run.noise_multiplier),
                                    ("max_grad_norm", run.max_grad_norm), ("steps", run.steps)) if v is None]
    if missing:
        raise UserError(f"run '{run.run_id}' has no {', '.join(missing)}; it cannot be accounted")
    try:
        validate.mechanism(run.sample_rate, run.noise_multiplier, run.max_grad_norm, n_steps=run.steps)
        if run.delta is not None:
            validate.delta(run.delta)
    except ParameterError as exc:  # the run's stored value, not a flag of the command: no params
        raise UserError(f"run '{run.run_id}': {exc}; it cannot be accounted") from None


_MEMO_MISSING = """
FROM runs r
WHERE r.run_id IN (SELECT unnest($runs)) AND coalesce(r.private, true)
  AND dp_params_valid(r.sample_rate, r.noise_multiplier, r.steps, r.delta)
  AND NOT EXISTS (SELECT 1 FROM dp_epsilon_memo m
                  WHERE m.sample_rate = r.sample_rate AND m.noise_multiplier = r.noise_multiplier
                    AND m.steps = r.steps AND m.delta = r.delta)"""


def remember_epsilon(con, run_ids: list[str] | None = None) -> int:
    """Store the data-independent ε of ``run_ids`` (default: every run) in ``dp_epsilon_memo``
    where it is not there yet; return how many mechanisms were added.

    Writers call this whenever they store or change a run's (sample_rate,
    noise_multiplier, steps, delta), so that the ``run_epsilon`` view (and ``dpledger
    runs``) reads the number instead of computing the RDP at every order on every read.
    A run with parameters outside the documented ranges is skipped (the view shows NULL).
    """
    if run_ids is None:
        run_ids = [r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()]
    params = {"runs": list(run_ids)}
    if not run_ids or not con.execute(f"SELECT count(*) {_MEMO_MISSING}", params).fetchall()[0][0]:
        return 0  # the common case, without touching the (lazily imported) RDP code
    before = con.execute("SELECT count(*) FROM dp_epsilon_memo").fetchall()[0][0]
    con.execute(
        "INSERT OR IGNORE INTO dp_epsilon_memo "
        "SELECT sample_rate, noise_multiplier, steps, delta, "
        "       dp_epsilon(sample_rate, noise_multiplier, steps, delta), "
        "       dp_best_order(sample_rate, noise_multiplier, steps, delta) "
        f"FROM (SELECT DISTINCT r.sample_rate, r.noise_multiplier, r.steps, r.delta {_MEMO_MISSING})", params)
    return con.execute("SELECT count(*) FROM dp_epsilon_memo").fetchall()[0][0] - before


def prepare_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> None:
    """Compute ahead (e.g. on a thread while a load runs) the ε that :func:`remember_epsilon`
    will ask the ``dp_epsilon`` UDF for: the UDF then finds it computed. Raises what
    :func:`dpledger.analysis.rdp.dp_epsilon` raises for parameters out of range."""
    from .udfs import dp_epsilon_of

    dp_epsilon_of(float(sample_rate), float(noise_multiplier), int(steps), float(delta))
